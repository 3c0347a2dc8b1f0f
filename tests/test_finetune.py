"""Fine-tuning with --init_from: the model comes from the parent (a Nexus checkpoint or a
Hugging Face Jamba directory), the first eval on the parent's data is the parent's eval, the
run records its parent, and a contradicting --preset is refused with the differences named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_config
from nexus.checkpoint import load_checkpoint, read_header
from nexus.cli import main
from nexus.config import TrainConfig, resolve_train_config
from nexus.errors import NexusError
from nexus.hf import export_to_hf
from nexus.report import load_run, render_report, run_forecast
from nexus.rundir import RunDir
from nexus.training import Trainer


@pytest.fixture(scope="module")
def parent(text_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finetune") / "parent"
    Trainer(tiny_config(text_corpus, out, model={"d_model": 48}), progress=False).run()
    return out


def evals(run_dir: Path) -> dict[int, dict]:
    records, _ = RunDir(run_dir).read_metrics()
    return {r["step"]: r for r in records if r["kind"] == "eval"}


def finetune_settings(source: Path, out: Path, text_corpus: Path) -> TrainConfig:
    flags = {**tiny_config(text_corpus, out).to_dict(), "init_from": str(source)}
    for key in ("preset", "model"):  # the model comes from the parent
        flags.pop(key)
    return resolve_train_config(None, flags)


def test_a_finetune_starts_where_the_parent_ended(parent: Path, text_corpus: Path, tmp_path):
    config = finetune_settings(parent / "step_8.bin", tmp_path / "child", text_corpus)
    assert (
        config.model_config()
        == TrainConfig.from_dict(
            json.loads((parent / "config.json").read_text())["train"]
        ).model_config()
    )  # d_model 48, which no preset has
    Trainer(config, progress=False).run()

    child, parent_evals = evals(tmp_path / "child"), evals(parent)
    assert sorted(child) == [0, 2, 4, 6, 8]
    for key in ("val_loss", "train_loss"):
        assert child[0][key] == parent_evals[8][key], key  # same weights, data and eval batches
    assert child[8]["val_loss"] != parent_evals[8]["val_loss"]  # and then it trains
    record = {
        "path": str(parent / "step_8.bin"),
        "kind": "nexus-checkpoint",
        "step": 8,
        "checksum": read_header(parent / "step_8.bin")["checksum"],
    }
    assert json.loads((tmp_path / "child" / "config.json").read_text())["parent"] == record
    assert load_checkpoint(tmp_path / "child" / "step_2.bin").meta["parent"] == record
    run = load_run(tmp_path / "child")
    assert f"- **fine-tuned from**: `{record['path']}`, step 8" in render_report(
        run, run_forecast(run)
    )


def test_a_hugging_face_parent(parent: Path, text_corpus: Path, tmp_path: Path) -> None:
    hf_dir = export_to_hf(parent / "step_8.bin", tmp_path / "hf")
    config = finetune_settings(hf_dir, tmp_path / "child", text_corpus)
    Trainer(config, progress=False).run()
    child = evals(tmp_path / "child")
    assert child[0]["val_loss"] == pytest.approx(evals(parent)[8]["val_loss"], abs=1e-6)
    saved = json.loads((tmp_path / "child" / "config.json").read_text())["parent"]
    assert saved["kind"] == "huggingface-jamba" and saved["step"] is None


def test_a_contradicting_preset_or_a_bad_source_is_refused(
    parent: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(NexusError, match=r"d_model 64 \(asked\) vs 48 \(parent\)"):
        resolve_train_config(
            None, {"init_from": str(parent / "step_8.bin"), "preset": "nexus-tiny"}
        )
    args = ["train", "--init_from", str(tmp_path / "missing.bin"), "--out_dir", str(tmp_path / "o")]
    assert main(args) == 2
    assert "no such checkpoint file or directory" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert main([*args[:1], "--init_from", str(tmp_path / "notes.txt"), *args[3:]]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
