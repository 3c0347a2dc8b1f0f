"""The run directory: its one atomic write (mode from the umask), metrics.jsonl read back with
a cut last line, truncation for a resume, and the checkpoints it lists."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from nexus.errors import NexusError
from nexus.report import write_report
from nexus.rundir import RunDir, atomic_write


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_write_gives_the_umask_mode_and_leaves_no_temp(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / "out" / "file.txt", b"contents")
    finally:
        os.umask(previous)
    path = tmp_path / "out" / "file.txt"
    assert path.read_bytes() == b"contents"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["file.txt"]


def test_metrics_round_trip_skip_a_cut_line_and_truncate_for_a_resume(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    written = [
        {"kind": "train", "step": 10, "loss": 2.5},
        {"kind": "eval", "step": 10, "val_loss": 2.6},
        {"kind": "train", "step": 20, "loss": 2.1},
        {"kind": "stop", "step": 20, "reason": "val rising"},
    ]
    for record in written:
        run.append_metrics(record)
    with run.metrics_file.open("a") as handle:
        handle.write('{"kind": "train", "st')  # a kill mid-line
    assert run.read_metrics() == (written, 1)
    run.truncate_metrics(after=10)
    assert run.read_metrics() == (written[:2], 0)


def test_checkpoints_listed_by_step_and_the_latest(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.checkpoint_steps() == [] and run.latest_checkpoint() is None
    assert not run.holds_run()
    for name in ("step_20.bin", "step_100.bin", "step_3.bin", "step_x.bin", "best.bin"):
        (tmp_path / name).write_bytes(b"")
    assert run.checkpoint_steps() == [3, 20, 100]
    assert run.latest_checkpoint() == tmp_path / "step_100.bin"
    assert run.holds_run()


def test_a_missing_or_foreign_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(NexusError, match="does not exist"):
        RunDir.existing(tmp_path / "absent")
    with pytest.raises(NexusError, match=r"no config\.json"):
        RunDir.existing(tmp_path).read_config()
    (tmp_path / "config.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(NexusError, match="no 'train' table"):
        RunDir(tmp_path).read_config()


def test_the_report_files_get_the_mode_of_every_other_run_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"train": {"max_steps": 100}}))
    previous = os.umask(0o022)
    try:
        report = write_report(tmp_path)
    finally:
        os.umask(previous)
    for path in (report, tmp_path / "training_progress.png"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
