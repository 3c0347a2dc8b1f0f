"""The `nexus` command line: info, and user mistakes ending in one line without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nexus.cli import main


def run_nexus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nexus", *args], capture_output=True, text=True, timeout=300
    )


def test_info_json_reports_the_reference_parameter_count() -> None:
    result = run_nexus("info", "--preset", "nexus-6m", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert abs(info["parameters"] - 6_740_000) / 6_740_000 < 0.01
    assert info["layer_schedule"] == ["mamba"] * 3 + ["attention"] + ["mamba"] * 2
    assert sum(info["parameters_by_component"].values()) == info["parameters"]
    # Training costs at least 6 FLOPs per weight (2 forward, 4 backward) per token.
    assert info["flops_per_token_train"] >= 6 * (info["parameters"] - 256 * 256)


def test_info_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--preset", "nexus-tiny"]) == 0
    out = capsys.readouterr().out
    assert "124,116" in out and "mamba attention" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "--preset", "nexus-huge"], "unknown preset 'nexus-huge'"),
        (["train", "--data", "/no/such/file.txt"], "does not exist"),
        (["train", "--lr", "-1"], "lr must be a number > 0"),
        (["train", "--warmup_steps", "500", "--max_steps", "100"], "warmup_steps 500 exceeds"),
        (["eval", "/no/such/checkpoint.bin"], "does not exist"),
        (["sample", "/no/such/checkpoint.bin"], "does not exist"),
        (["report", "/no/such/run"], "/no/such/run"),
    ],
)
def test_user_mistakes_print_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    if args[0] == "train":
        args = [*args, "--out_dir", str(tmp_path / "run")]
    result = run_nexus(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nexus: error: ") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_a_reader_that_leaves_early_ends_the_command_quietly() -> None:
    """`nexus info | head -1`: the pipe closes before nexus writes; no error text, exit 141."""
    process = subprocess.Popen(
        [sys.executable, "-m", "nexus", "info", "--preset", "nexus-6m"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()  # before nexus has imported torch, so its first write finds no reader
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141, stderr
    assert stderr == ""
