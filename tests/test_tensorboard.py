"""TensorBoard event files of a run: they hold what metrics.jsonl holds, at the same steps, once
per step across a stop and a resume; a forced restart clears them; without the tensorboard
package, or with `--no-tensorboard`, training runs as before and writes none."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nexus.training as training
from conftest import tiny_config
from nexus.cli import main
from nexus.errors import TrainingInterrupted
from nexus.rundir import TENSORBOARD_DIR, RunDir
from nexus.tensorboard import SAMPLE_TAG, SCALARS, sample_markdown
from nexus.training import Trainer

OFF_LINE = "TensorBoard logging is off"


class Log:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def events(run_dir: Path) -> Any:
    """Everything the event files hold, as TensorBoard reads them (it drops events that a
    resumed run's purge step marks as redone)."""
    reader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    accumulator = reader.EventAccumulator(
        str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0}
    )
    return accumulator.Reload()


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    steps = [(e.step, e.value) for e in events(run_dir).Scalars(tag)]
    assert len(steps) == len({step for step, _ in steps}), f"{tag}: a step appears twice"
    return dict(steps)


def as_float32(value: float) -> float:
    return float(np.float32(value))


def assert_events_match_metrics(run_dir: Path) -> None:
    """Every scalar of every record in metrics.jsonl, at its step, and no other step."""
    records, _ = RunDir(run_dir).read_metrics()
    for kind, keys in SCALARS.items():
        mine = [r for r in records if r["kind"] == kind]
        for key in keys:
            expected = {r["step"]: as_float32(r[key]) for r in mine}
            assert scalars(run_dir, f"{kind}/{key}") == expected, (kind, key)
    samples = {
        e.step: e.tensor_proto.string_val[0].decode()
        for e in events(run_dir).Tensors(f"{SAMPLE_TAG}/text_summary")
    }
    assert samples == {
        r["step"]: sample_markdown(r["sample"]) for r in records if r["kind"] == "eval"
    }


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if type(t).__name__ == "_AsyncWriterThread"]


@pytest.fixture(scope="module")
def finished_run(text_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tensorboard") / "run"
    Trainer(tiny_config(text_corpus, out, log_interval=1), progress=False, log=Log()).run()
    return out


def test_event_files_hold_the_metrics(finished_run: Path) -> None:
    tags = events(finished_run).Tags()
    assert set(tags["scalars"]) == {
        f"{kind}/{key}" for kind, keys in SCALARS.items() for key in keys
    }
    assert scalars(finished_run, "train/loss").keys() == set(range(1, 9))
    assert scalars(finished_run, "eval/val_loss").keys() == {2, 4, 6, 8}
    assert_events_match_metrics(finished_run)
    sample = events(finished_run).Tensors(f"{SAMPLE_TAG}/text_summary")[-1]
    assert sample.tensor_proto.string_val[0].decode().startswith("    To be")
    assert writer_threads() == []  # closed at the end of the run


def test_resume_from_an_earlier_checkpoint_shows_each_step_once(
    finished_run: Path, text_corpus: Path, tmp_path: Path
) -> None:
    """Steps 5-8 were logged, then the run resumes from step 4 and logs them again: TensorBoard
    keeps the second time only, as metrics.jsonl does."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    for step in (6, 8):
        (out / f"step_{step}.bin").unlink()  # as if killed before step 6 was saved
    config = tiny_config(text_corpus, out, log_interval=1)
    Trainer(config, resume=True, progress=False, log=Log()).run()
    assert len(list((out / TENSORBOARD_DIR).iterdir())) == 2  # one event file per start
    assert scalars(out, "train/loss").keys() == set(range(1, 9))
    assert_events_match_metrics(out)


def test_a_stop_signal_closes_the_event_file_and_resume_continues_it(
    text_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    config = tiny_config(text_corpus, out, log_interval=1)
    real_batch = training.train_batch

    def train_batch(*args: Any, **kwargs: Any) -> Any:
        if kwargs["step"] == 3 and kwargs["micro_step"] == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer finishes step 3, saves, stops
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(training, "train_batch", train_batch)
    with pytest.raises(TrainingInterrupted, match="stopped after step 3"):
        Trainer(config, progress=False, log=Log()).run()
    assert writer_threads() == []
    assert scalars(out, "train/loss").keys() == {1, 2, 3}
    monkeypatch.setattr(training, "train_batch", real_batch)
    Trainer(config, resume=True, progress=False, log=Log()).run()
    assert scalars(out, "train/loss").keys() == set(range(1, 9))
    assert_events_match_metrics(out)


def test_force_clears_the_old_event_files(
    finished_run: Path, text_corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    Trainer(tiny_config(text_corpus, out, max_steps=2), force=True, progress=False).run()
    assert len(list((out / TENSORBOARD_DIR).iterdir())) == 1
    assert scalars(out, "eval/val_loss").keys() == {2}
    assert_events_match_metrics(out)


def test_without_tensorboard_training_runs_and_says_how_to_turn_it_on(
    text_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    out, log = tmp_path / "run", Log()
    last = Trainer(tiny_config(text_corpus, out, max_steps=2), progress=False, log=log).run()
    assert last["step"] == 2 and (out / "step_2.bin").is_file()
    assert not (out / TENSORBOARD_DIR).exists()
    assert log.text.count(OFF_LINE) == 1 and "pip install tensorboard" in log.text


def test_no_tensorboard_flag(text_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    flags = {"preset": "nexus-tiny", "max_steps": 2, "eval_interval": 2, "eval_batches": 1}
    flags.update(eval_batch_size=2, micro_batch=2, grad_accum=1, warmup_steps=1, device="cpu")
    argv = [part for key, value in flags.items() for part in (f"--{key}", str(value))]
    argv += ["--data", str(text_corpus), "--out_dir", str(out), "--no-tensorboard"]
    assert main(["train", *argv]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["tensorboard"] is False
    assert not (out / TENSORBOARD_DIR).exists()
    # A resume keeps the run's own setting.
    assert main(["train", *argv[:-1], "--max_steps", "4", "--resume"]) == 0
    assert not (out / TENSORBOARD_DIR).exists()
