"""Checkpoint files: atomic writes, checksums, damaged and foreign files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nexus.checkpoint import load_checkpoint, read_header, save_checkpoint
from nexus.errors import NexusError
from nexus.rundir import atomic_write


def write_sample(path: Path) -> bytes:
    model_state = {"model.w": torch.arange(12, dtype=torch.float32).view(3, 4)}
    optimizer = {"0.exp_avg": torch.ones(3, 4), "0.step": torch.tensor(5.0)}
    meta = {"step": 40, "model_config": {}, "best_val_loss": 1.5}
    return save_checkpoint(path, model_state, optimizer, meta, rng_state=torch.get_rng_state())


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "step_40.bin"
    write_sample(path)
    checkpoint = load_checkpoint(path)
    assert checkpoint.step == 40
    assert torch.equal(checkpoint.model_state["model.w"], torch.arange(12.0).view(3, 4))
    assert torch.equal(checkpoint.optimizer_tensors["0.step"], torch.tensor(5.0))
    assert torch.equal(checkpoint.rng_state, torch.get_rng_state())
    assert checkpoint.meta["best_val_loss"] == 1.5
    assert read_header(path)["step"] == "40"
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_a_flipped_bit_is_reported_as_corruption(tmp_path: Path) -> None:
    path = tmp_path / "step_40.bin"
    payload = bytearray(write_sample(path))
    payload[-3] ^= 0x10  # inside the last tensor's bytes
    path.write_bytes(bytes(payload))
    with pytest.raises(NexusError, match="is corrupted"):
        load_checkpoint(path)


def test_truncated_missing_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "step_40.bin"
    payload = write_sample(path)
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(NexusError, match="corrupted or truncated"):
        load_checkpoint(path)
    path.write_bytes(payload[:5])
    with pytest.raises(NexusError, match="not a readable safetensors file"):
        load_checkpoint(path)
    with pytest.raises(NexusError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.bin")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(NexusError, match="not a Nexus checkpoint"):
        load_checkpoint(foreign)
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a checkpoint at all")
    with pytest.raises(NexusError, match="not a readable safetensors file"):
        load_checkpoint(text)


def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "best.bin"
    atomic_write(path, b"old contents")

    def fail_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail_fsync)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, b"new contents that never land")
    assert path.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.bin"]
