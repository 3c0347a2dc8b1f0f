"""Data-parallel training: 2 gloo processes under torchrun give the single-process run's
losses and the same files, and a grad_accum that does not divide is refused clearly."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import tiny_config
from nexus.checkpoint import load_checkpoint
from nexus.distributed import DistContext
from nexus.errors import NexusError
from nexus.training import Trainer

SETTINGS = {"max_steps": 4, "grad_accum": 2, "eval_interval": 2}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def eval_records(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["kind"] == "eval"}


def layout(path: Path) -> tuple[dict, dict, list]:
    checkpoint = load_checkpoint(path)
    return (
        {name: tuple(t.shape) for name, t in checkpoint.model_state.items()},
        {name: tuple(t.shape) for name, t in checkpoint.optimizer_tensors.items()},
        sorted(checkpoint.meta),
    )


def torchrun(train_args: list[str]) -> subprocess.CompletedProcess:
    """`nexus train` in 2 gloo processes on this machine."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "nexus",
        "train",
        *train_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_micro_steps_split_the_step_across_ranks() -> None:
    shares = [DistContext(rank, 4).micro_steps(8) for rank in range(4)]
    assert sorted(step for share in shares for step in share) == list(range(8))
    assert list(shares[1]) == [1, 5]


def test_grad_accum_that_does_not_divide_is_refused(text_corpus: Path, tmp_path: Path) -> None:
    config = tiny_config(text_corpus, tmp_path / "run", grad_accum=3)
    with pytest.raises(NexusError, match="grad_accum 3 does not divide across 2 processes"):
        Trainer(config, progress=False, dist=DistContext(rank=0, world_size=2))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def as_flags(settings: dict[str, Any]) -> list[str]:
    """`nexus train` flags for TrainConfig settings (a boolean as --name or --no-name; a
    setting left at None, such as init_from, as no flag)."""
    args: list[str] = []
    for name, value in settings.items():
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(f"--{name}" if value else f"--no-{name}")
        else:
            args += [f"--{name}", str(value)]
    return args


def test_two_gloo_processes_match_one_process(text_corpus: Path, tmp_path: Path) -> None:
    single, double = tmp_path / "single", tmp_path / "double"
    Trainer(tiny_config(text_corpus, single, **SETTINGS), progress=False).run()

    flags = {**tiny_config(text_corpus, double, **SETTINGS).to_dict(), **SETTINGS}
    flags.pop("model")
    result = torchrun(as_flags(flags))
    # Only rank 0 logs: each eval is reported once.
    assert result.stdout.count("step 4: train loss") == 1, result.stdout

    one, two = eval_records(single), eval_records(double)
    assert sorted(one) == sorted(two) == [2, 4]
    for step in one:
        for key in ("train_loss", "val_loss"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5), (step, key)
    assert {p.name for p in double.iterdir()} == {p.name for p in single.iterdir()}
    for name in ("step_2.bin", "step_4.bin", "best.bin"):
        assert layout(double / name) == layout(single / name), name

    # Resume: every rank loads step_2.bin and the run ends as the uninterrupted one did.
    resumed = tmp_path / "resumed"
    shutil.copytree(double, resumed)
    (resumed / "step_4.bin").unlink()
    torchrun(["--resume", "--out_dir", str(resumed)])
    again = eval_records(resumed)
    assert sorted(again) == [2, 4]
    assert again[4]["val_loss"] == pytest.approx(two[4]["val_loss"], rel=1e-6)
