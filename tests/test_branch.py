"""Resuming from an earlier checkpoint: refused without --branch, and with it a clean branch
whose abandoned future is moved aside, so that a later plain --resume continues the branch
and ends exactly where an uninterrupted branch ends."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nexus.rundir as rundir
from conftest import tiny_config
from nexus.checkpoint import load_checkpoint, read_header
from nexus.cli import main
from nexus.errors import NexusError
from nexus.report import load_run, render_report, run_forecast
from nexus.schedule import lr_at
from nexus.training import Trainer

CHANGED = {"lr": 1e-3}  # the branch's changed setting, from step 4 on


@pytest.fixture(scope="module")
def original(text_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("branch") / "original"
    Trainer(tiny_config(text_corpus, out), progress=False).run()
    return out


def eval_records(run_dir: Path) -> dict[int, dict]:
    records, _ = rundir.RunDir(run_dir).read_metrics()
    return {r["step"]: r for r in records if r["kind"] == "eval"}


def test_an_earlier_checkpoint_is_refused_without_branch(original: Path, text_corpus: Path):
    with pytest.raises(NexusError, match=r"holds later checkpoints \(steps 6, 8\); pass --branch"):
        Trainer(tiny_config(text_corpus, original), resume=original / "step_4.bin")
    assert sorted(p.name for p in original.glob("step_*.bin")) == [
        "step_2.bin", "step_4.bin", "step_6.bin", "step_8.bin"
    ]  # fmt: skip


# The branch, in a process of its own that kill -9s itself while step_8.bin is being written
# (the temp file is there, the rename never happens).
BRANCH_THEN_KILL = textwrap.dedent(
    """
    import os, signal, sys
    import nexus.rundir as rundir
    from conftest import tiny_config
    from nexus.training import Trainer

    real_replace = os.replace
    def dying_replace(source, target):
        if str(target).endswith("step_8.bin") and "abandoned" not in str(target):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(source, target)
    rundir.os.replace = dying_replace
    out = sys.argv[2]
    config = tiny_config(sys.argv[1], out, lr=float(sys.argv[3]))
    Trainer(config, resume=os.path.join(out, "step_4.bin"), branch=True, progress=False).run()
    """
)


def test_a_branch_killed_then_resumed_ends_as_the_uninterrupted_branch(
    original: Path, text_corpus: Path, tmp_path: Path
):
    reference, branched = tmp_path / "reference", tmp_path / "branched"
    shutil.copytree(original, reference)
    shutil.copytree(original, branched)
    Trainer(
        tiny_config(text_corpus, reference, **CHANGED),
        resume=reference / "step_4.bin", branch=True, progress=False,
    ).run()  # fmt: skip

    killed = subprocess.run(
        [sys.executable, "-c", BRANCH_THEN_KILL, str(text_corpus), str(branched),
         str(CHANGED["lr"])],
        cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr

    # The abandoned future is aside, so a plain resume takes the branch's step 6, not step 8.
    (abandoned,) = branched.glob("abandoned-*")
    assert sorted(p.name for p in abandoned.glob("step_*.bin")) == ["step_6.bin", "step_8.bin"]
    assert load_checkpoint(abandoned / "step_8.bin").meta["train_config"]["lr"] == 3e-3
    assert set(eval_records(abandoned)) == {6, 8}
    assert sorted(p.name for p in branched.glob("step_*.bin")) == [
        "step_2.bin", "step_4.bin", "step_6.bin"
    ]  # fmt: skip
    Trainer(tiny_config(text_corpus, branched, **CHANGED), resume=True, progress=False).run()

    done, expected = (
        load_checkpoint(branched / "step_8.bin"),
        load_checkpoint(reference / "step_8.bin"),
    )
    for name, tensor in {**expected.model_state, **expected.optimizer_tensors}.items():
        got = {**done.model_state, **done.optimizer_tensors}[name]
        assert torch.equal(got, tensor), name
    assert eval_records(branched) == {
        step: {**record, "elapsed_s": eval_records(branched)[step]["elapsed_s"]}
        for step, record in eval_records(reference).items()
    }
    assert eval_records(branched)[8] != eval_records(original)[8]  # the setting did change
    # best.bin is the branch's best, and the run says where it branched.
    best_step = min(eval_records(branched).values(), key=lambda r: r["val_loss"])["step"]
    assert read_header(branched / "best.bin")["step"] == str(best_step)
    (branch,) = json.loads((branched / "config.json").read_text())["branches"]
    assert (branch["from_step"], branch["abandoned"]) == (4, abandoned.name)
    assert branch["abandoned_checkpoints"] == [6, 8]
    run = load_run(branched)
    assert f"Branched at step 4 ({branch['at']})" in render_report(run, run_forecast(run))


def test_branch_needs_resume_path_and_an_imported_checkpoint_needs_out_dir(
    original: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--branch"]) == 2
    assert "--branch needs --resume PATH" in capsys.readouterr().err
    loose = tmp_path / "loose.bin"  # a checkpoint with no run around it, as `nexus import` makes
    shutil.copy(original / "step_8.bin", loose)
    assert main(["train", "--resume", str(loose)]) == 2
    err = capsys.readouterr().err
    assert "has no run around it" in err and "--out_dir" in err
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_a_resume_that_changes_the_schedule_keeps_each_past_steps_lr(
    original: Path, text_corpus: Path, tmp_path: Path
):
    run = tmp_path / "longer"
    shutil.copytree(original, run)
    for step in (6, 8):
        (run / f"step_{step}.bin").unlink()  # as if stopped after step 4
    Trainer(tiny_config(text_corpus, run, max_steps=12), resume=True, progress=False).run()

    history = json.loads((run / "config.json").read_text())["schedule_history"]
    assert [(h["from_step"], h["train"]["max_steps"]) for h in history] == [(1, 8), (5, 12)]
    loaded = load_run(run)
    recorded = {r.step: r.lr for r in loaded.train_logs}  # the LR each logged step ran with
    assert sorted(recorded) == [2, 4, 6, 8, 10, 12]
    assert all(loaded.lr_at(step) == lr for step, lr in recorded.items())
    # The current schedule alone would give step 4 another LR: the history is what matters.
    assert lr_at(4, loaded.train) != recorded[4]
    rows = {
        int(cells[0]): cells
        for line in render_report(loaded, run_forecast(loaded)).splitlines()
        if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])
        and cells[0].isdigit()
    }  # fmt: skip
    assert float(rows[4][5]) == pytest.approx(recorded[4], rel=5e-3)  # shown to 3 digits
