"""Shared fixtures: small made corpora and quick training configs."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nexus.config import TrainConfig

SHARED_SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
# Root reads any file whatever its mode, through the capabilities CAP_DAC_OVERRIDE and
# CAP_DAC_READ_SEARCH; drop them from the bounding set and exec, and a root process meets the
# same "permission denied" as anyone else.
WITHOUT_ROOT_READ = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        sys.exit(77)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""

WORDS = [
    "the",
    "king",
    "and",
    "queen",
    "of",
    "verona",
    "speak",
    "to",
    "romeo",
    "while",
    "juliet",
    "waits",
    "at",
    "the",
    "window",
    "to",
    "be",
    "or",
    "not",
    "to",
    "be",
    "that",
    "is",
    "the",
    "question",
    "whether",
    "tis",
    "nobler",
    "in",
    "the",
    "mind",
]


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 40 KB of English-like text made from a small vocabulary: learnable in seconds."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(1200)]
    path = tmp_path_factory.mktemp("data") / "words.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Decoding in this process on one thread (the decode kernel reads torch's count): with two,
    every byte starts OpenMP work whose threads spin-wait, which on a busy 2-core machine slows
    decoding many times over. The bytes do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    if not SHARED_SHAKESPEARE.is_file():
        pytest.skip("the shared Tiny Shakespeare copy is not beside this checkout")
    return SHARED_SHAKESPEARE


def tiny_config(data: Path, out_dir: Path, **overrides: object) -> TrainConfig:
    """A few-second run of the tiny preset."""
    settings: dict[str, object] = {
        "preset": "nexus-tiny",
        "data": str(data),
        "out_dir": str(out_dir),
        "max_steps": 8,
        "micro_batch": 4,
        "grad_accum": 2,
        "lr": 3e-3,
        "warmup_steps": 2,
        "eval_interval": 2,
        "eval_batches": 2,
        "eval_batch_size": 4,
        "log_interval": 2,
        "sample_bytes": 16,
        "device": "cpu",
    }
    settings.update(overrides)
    return TrainConfig.from_dict(settings)
