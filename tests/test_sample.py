"""`nexus sample` as a user runs it: the streamed text against `generate`, --json and
--num_samples, stop sequences, and Ctrl-C in the middle of a long sample."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nexus.checkpoint import model_state_for_saving, save_checkpoint
from nexus.config import TrainConfig, preset
from nexus.generation import generate
from nexus.model import NexusLM


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, NexusLM]:
    torch.manual_seed(2)
    model = NexusLM(preset("nexus-tiny")).eval()
    meta = {
        "step": 0,
        "model_config": model.config.to_dict(),
        "train_config": TrainConfig().to_dict(),
    }
    path = tmp_path_factory.mktemp("sample") / "model.bin"
    save_checkpoint(path, model_state_for_saving(model), {}, meta)
    return path, model


def sample(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "nexus", "sample", *args], capture_output=True, timeout=120
    )


def test_streamed_text_is_the_prompt_and_the_generated_bytes(checkpoint) -> None:
    path, model = checkpoint
    result = sample(str(path), "--prompt", "To be", "--max_new_tokens", "60", "--seed", "4",
                    "--threads", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = b"To be" + generate(model, b"To be", 60, temperature=0.8, seed=4)
    assert result.stdout.decode() == expected.decode(errors="replace") + "\n"


def test_json_gives_each_sample_with_its_seed_and_settings(checkpoint) -> None:
    path, model = checkpoint
    options = ["--temperature", "1.1", "--top_k", "30", "--top_p", "0.9", "--max_new_tokens", "40"]
    result = sample(str(path), *options, "--seed", "9", "--num_samples", "2", "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [r["seed"] for r in records] == [9, 10]
    for record in records:
        expected = generate(
            model, b"To be", 40, temperature=1.1, top_k=30, top_p=0.9, seed=record["seed"]
        )
        assert record["text"] == expected.decode(errors="replace")
        assert record["bytes"] == 40 and record["bytes_per_s"] > 0
        assert record["settings"] == {
            "temperature": 1.1, "top_k": 30, "top_p": 0.9, "max_new_tokens": 40,
        }  # fmt: skip
    assert records[0]["text"] != records[1]["text"]


def test_a_stop_sequence_ends_the_sample_before_it(checkpoint) -> None:
    path, model = checkpoint
    full = generate(model, b"To be", 80, temperature=0)
    stop = next(full[i : i + 2] for i in range(30, 78) if b"\0" not in full[i : i + 2])
    command = [sys.executable, "-m", "nexus", "sample", str(path), "--temperature", "0",
               "--max_new_tokens", "80", "--json", "--stop", stop]  # fmt: skip
    result = subprocess.run(command, capture_output=True, timeout=120)  # argv bytes as given
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["text"] == full[: full.index(stop)].decode(errors="replace")
    assert record["bytes"] == full.index(stop)


def test_bad_settings_are_one_line_errors(checkpoint) -> None:
    path, _ = checkpoint
    for flags, message in [
        (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
        (["--temperature", "-0.1"], "--temperature must be >= 0"),
        (["--num_samples", "0"], "--num_samples must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1, not 0"),
    ]:
        result = sample(str(path), *flags)
        assert result.returncode == 2
        lines = result.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nexus: error: ") and message in lines[0]
        assert b"Traceback" not in result.stderr


def test_ctrl_c_stops_a_long_sample_keeping_what_was_written(checkpoint) -> None:
    path, model = checkpoint
    process = subprocess.Popen(
        [sys.executable, "-m", "nexus", "sample", str(path), "--temperature", "0",
         "--max_new_tokens", "1000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    received = b""
    deadline = time.monotonic() + 60
    while len(received) < 40 and time.monotonic() < deadline:  # text came long before the end
        received += os.read(process.stdout.fileno(), 4096)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130
    written = received + out
    produced = int(err.decode().split("stopped after ")[1].split()[0])
    assert produced > 0 and b"Traceback" not in err
    expected = b"To be" + generate(model, b"To be", produced, temperature=0)
    assert written == expected.decode(errors="replace").encode() + b"\n"
