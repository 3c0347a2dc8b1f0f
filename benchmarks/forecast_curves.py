"""The learning curves the forecast is judged on: real Nexus runs over five corpora, seven model
sizes, three schedules, peak learning rates from 0.3x to 3x the default, 300 to 3,000 steps.

Run: python benchmarks/forecast_curves.py [--jobs 2] [--only NAME ...] [--work DIR]

Each run trains with `nexus train` in a subprocess (one thread each, so two jobs share the two
cores), then its `metrics.jsonl` and `config.json` are copied to benchmarks/curves/<split>/<name>/,
where <split> is `design` (the forecast may be tuned on these) or `test` (held out: only
scored, never used to choose anything). A run whose folder exists is skipped, so the script can
be stopped and started again. The split was fixed in RUNS below before any run was trained.

The corpora are built from files any Debian machine with Python has (nothing is downloaded and
nothing is committed): Tiny Shakespeare (NEXUS_DATA, or ../shared/data), the Python standard
library's own source, Vim's English help files, the Russian, Ukrainian, Japanese and Chinese man
pages (60 % of the bytes non-ASCII), and a near-random byte stream from a seeded order-1 Markov
chain (entropy 5.32 nats per byte against ln 256 = 5.55).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CURVES = ROOT / "benchmarks" / "curves"
CORPUS_BYTES = 1_200_000
STDLIB = Path(os.__file__).parent


def shakespeare() -> bytes:
    candidates = [os.environ.get("NEXUS_DATA"), ROOT.parent / "shared/data/tinyshakespeare.txt"]
    for path in candidates:
        if path and Path(path).is_file():
            return Path(path).read_bytes()
    raise SystemExit("Tiny Shakespeare not found: set NEXUS_DATA to its path")


def python_source() -> bytes:
    files = sorted(STDLIB.glob("*.py"))
    return b"".join(path.read_bytes() for path in files)[:CORPUS_BYTES]


def vim_help() -> bytes:
    files = sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt"))
    return b"".join(Path(path).read_bytes() for path in files)[:CORPUS_BYTES]


def man_pages_intl() -> bytes:
    files = []
    for language in ("ru", "uk", "ja", "zh_CN"):
        files += glob.glob(f"/usr/share/man/{language}/**/*.gz", recursive=True)
    files = sorted(files)
    random.Random(7).shuffle(files)  # mix the languages, so val is not one language alone
    return b"".join(gzip.open(path).read() for path in files)[:CORPUS_BYTES]


def markov_bytes() -> bytes:
    rng = np.random.default_rng(11)
    cumulative = np.cumsum(rng.dirichlet(np.full(256, 2.0), size=256), axis=1)
    draws = rng.random(1_000_000)
    out, state = bytearray(len(draws)), 0
    for i, draw in enumerate(draws):
        state = min(int(np.searchsorted(cumulative[state], draw)), 255)
        out[i] = state
    return bytes(out)


CORPORA = {
    "shakespeare": shakespeare,
    "shakespeare-100k": lambda: shakespeare()[:100_000],  # small enough to over-fit
    "python": python_source,
    "vimdoc": vim_help,
    "intl": man_pages_intl,
    "random": markov_bytes,
}

MID = {"d_model": 128, "n_layers": 4, "attention_layers": [2], "n_heads": 4, "n_kv_heads": 2,
       "mlp_hidden": 384, "seq_len": 64}  # fmt: skip
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("nexus-tiny", {}),
    "tiny-moe": ("nexus-tiny-moe", {}),
    "small": ("nexus-tiny", {"d_model": 96, "n_layers": 3, "mlp_hidden": 256}),
    "mid": ("nexus-6m", MID),
    "mid-ssd": ("nexus-6m-ssd", {**MID, "ssm_head_dim": 32, "d_state": 32}),
    "6m": ("nexus-6m", {}),
    "6m-ssd": ("nexus-6m-ssd", {}),
}


@dataclass(frozen=True)
class CurveRun:
    name: str
    split: str  # "design" or "test"
    corpus: str
    model: str
    lr: float
    max_steps: int
    eval_interval: int
    schedule: str = "cosine"  # "cosine" to 0, "cosine10" to 10 % of the peak, or "wsd"
    warmup_steps: int = 100
    batch: tuple[int, int] = (4, 4)  # micro_batch, grad_accum
    seed: int = 1337
    extra: dict[str, Any] = field(default_factory=dict)

    def flags(self, data: Path, out_dir: Path) -> list[str]:
        preset, overrides = MODELS[self.model]
        settings: dict[str, Any] = {
            "preset": preset, "data": str(data), "out_dir": str(out_dir), "lr": self.lr,
            "max_steps": self.max_steps, "eval_interval": self.eval_interval,
            "warmup_steps": self.warmup_steps, "micro_batch": self.batch[0],
            "grad_accum": self.batch[1], "seed": self.seed, "sample_bytes": 64,
            "schedule": "wsd" if self.schedule == "wsd" else "cosine",
            "min_lr": 0.1 * self.lr if self.schedule == "cosine10" else 0.0,
            "compile": "off", **self.extra,
        }  # fmt: skip
        flags = [f"--{key}={value}" for key, value in settings.items()]
        if overrides:
            flags.append(f"--config={out_dir.parent / (self.name + '.yaml')}")
        return [*flags, "--no-tensorboard", "--force"]


# fmt: off
# The split was drawn before any run: within each corpus, runs alternate design / test, with
# the reference-size runs on both sides.
RUNS = [
    # Tiny Shakespeare
    CurveRun("shk-tiny-lr9e4-cos", "design", "shakespeare", "tiny", 9e-4, 1500, 100),
    CurveRun("shk-tiny-lr3e4-wsd", "test", "shakespeare", "tiny", 3e-4, 1200, 100, "wsd"),
    CurveRun("shk-tiny-lr1e4-cos10", "design", "shakespeare", "tiny", 1e-4, 800, 50, "cosine10"),
    CurveRun("shk-tiny-lr6e4-cos-long", "test", "shakespeare", "tiny", 6e-4, 3000, 250),
    CurveRun("shk-small-lr6e4-wsd", "design", "shakespeare", "small", 6e-4, 1000, 100, "wsd"),
    CurveRun("shk-small-lr2e4-cos", "test", "shakespeare", "small", 2e-4, 600, 50, seed=7),
    CurveRun("shk-mid-lr3e4-cos10", "design", "shakespeare", "mid", 3e-4, 800, 100, "cosine10",
             batch=(4, 1)),
    CurveRun("shk-mid-ssd-lr9e4-wsd", "test", "shakespeare", "mid-ssd", 9e-4, 600, 50, "wsd",
             warmup_steps=50, batch=(4, 1)),
    CurveRun("shk-6m-lr3e4-cos", "design", "shakespeare", "6m", 3e-4, 500, 50, batch=(4, 1),
             extra={"eval_batches": 8}),
    CurveRun("shk-6m-ssd-lr9e4-cos", "test", "shakespeare", "6m-ssd", 9e-4, 400, 50,
             warmup_steps=40, batch=(4, 1), extra={"eval_batches": 8}),
    CurveRun("shk-moe-lr9e4-cos", "design", "shakespeare", "tiny-moe", 9e-4, 1000, 100),
    CurveRun("shk-moe-lr3e4-cos10", "test", "shakespeare", "tiny-moe", 3e-4, 700, 70, "cosine10"),
    # a 100 KB slice: ~8 epochs and more, val turns up
    CurveRun("shk100k-small-lr9e4-cos", "design", "shakespeare-100k", "small", 9e-4, 2000, 100),
    CurveRun("shk100k-mid-lr6e4-cos", "test", "shakespeare-100k", "mid", 6e-4, 1200, 100,
             batch=(4, 2)),
    CurveRun("shk100k-tiny-lr9e4-wsd", "test", "shakespeare-100k", "tiny", 9e-4, 2500, 125, "wsd"),
    CurveRun("shk100k-mid-lr3e4-wsd", "design", "shakespeare-100k", "mid", 3e-4, 1000, 50, "wsd",
             batch=(4, 2)),
    # Python source
    CurveRun("py-tiny-lr9e4-cos", "test", "python", "tiny", 9e-4, 2000, 200),
    CurveRun("py-tiny-lr3e4-cos10", "design", "python", "tiny", 3e-4, 1000, 100, "cosine10"),
    CurveRun("py-small-lr9e4-wsd", "test", "python", "small", 9e-4, 1500, 150, "wsd"),
    CurveRun("py-small-lr1e4-cos", "design", "python", "small", 1e-4, 600, 60, seed=3),
    CurveRun("py-mid-lr6e4-cos", "design", "python", "mid", 6e-4, 700, 70, batch=(4, 1)),
    CurveRun("py-mid-ssd-lr3e4-cos10", "test", "python", "mid-ssd", 3e-4, 800, 100, "cosine10",
             batch=(4, 1)),
    CurveRun("py-moe-lr6e4-wsd", "design", "python", "tiny-moe", 6e-4, 900, 100, "wsd"),
    CurveRun("py-6m-lr6e4-wsd", "test", "python", "6m", 6e-4, 500, 50, "wsd", warmup_steps=50,
             batch=(4, 1), extra={"eval_batches": 8}),
    # Vim's English help
    CurveRun("vim-tiny-lr6e4-cos", "design", "vimdoc", "tiny", 6e-4, 1200, 100),
    CurveRun("vim-tiny-lr2e4-wsd", "test", "vimdoc", "tiny", 2e-4, 900, 100, "wsd", seed=5),
    CurveRun("vim-small-lr9e4-cos10", "design", "vimdoc", "small", 9e-4, 1800, 200, "cosine10"),
    CurveRun("vim-small-lr3e4-cos", "test", "vimdoc", "small", 3e-4, 1000, 50),
    CurveRun("vim-mid-ssd-lr6e4-wsd", "design", "vimdoc", "mid-ssd", 6e-4, 700, 100, "wsd",
             batch=(4, 1)),
    CurveRun("vim-mid-lr9e4-cos", "test", "vimdoc", "mid", 9e-4, 600, 60, warmup_steps=60,
             batch=(4, 1)),
    # Man pages in Russian, Ukrainian, Japanese and Chinese
    CurveRun("intl-tiny-lr9e4-wsd", "design", "intl", "tiny", 9e-4, 1500, 150, "wsd"),
    CurveRun("intl-tiny-lr3e4-cos", "test", "intl", "tiny", 3e-4, 1200, 100),
    CurveRun("intl-small-lr6e4-cos", "design", "intl", "small", 6e-4, 1000, 50),
    CurveRun("intl-small-lr9e4-cos10", "test", "intl", "small", 9e-4, 2000, 200, "cosine10"),
    CurveRun("intl-moe-lr9e4-cos", "test", "intl", "tiny-moe", 9e-4, 800, 80, seed=9),
    CurveRun("intl-mid-lr3e4-wsd", "design", "intl", "mid", 3e-4, 600, 50, "wsd", batch=(4, 1)),
    # The near-random byte stream
    CurveRun("rnd-tiny-lr9e4-cos", "design", "random", "tiny", 9e-4, 1000, 100),
    CurveRun("rnd-tiny-lr3e4-wsd", "test", "random", "tiny", 3e-4, 800, 100, "wsd"),
    CurveRun("rnd-small-lr6e4-cos10", "design", "random", "small", 6e-4, 1200, 100, "cosine10"),
    CurveRun("rnd-small-lr9e4-cos", "test", "random", "small", 9e-4, 300, 30, warmup_steps=30),
    CurveRun("rnd-mid-lr6e4-cos", "test", "random", "mid", 6e-4, 500, 50, batch=(4, 1)),
    CurveRun("rnd-moe-lr2e4-cos", "design", "random", "tiny-moe", 2e-4, 600, 60),
    # A second draw of the same kinds, split the same way, for a finer coverage count
    CurveRun("shk-tiny-lr2e4-cos-b", "test", "shakespeare", "tiny", 2e-4, 2000, 200, seed=21),
    CurveRun("shk-small-lr9e4-cos10-b", "design", "shakespeare", "small", 9e-4, 1200, 40,
             "cosine10", warmup_steps=50),
    CurveRun("shk-tiny-lr9e4-wsd-b", "test", "shakespeare", "tiny", 9e-4, 700, 35, "wsd",
             extra={"cooldown_fraction": 0.3}),
    CurveRun("shk-mid-lr6e4-wsd-b", "design", "shakespeare", "mid", 6e-4, 900, 90, "wsd",
             batch=(4, 1), extra={"cooldown_fraction": 0.1}),
    CurveRun("shk-6m-lr9e4-cos10-b", "test", "shakespeare", "6m", 9e-4, 300, 30, "cosine10",
             warmup_steps=30, batch=(4, 1), extra={"eval_batches": 8}),
    CurveRun("py-tiny-lr6e4-wsd-b", "design", "python", "tiny", 6e-4, 2400, 200, "wsd"),
    CurveRun("py-small-lr3e4-cos-b", "test", "python", "small", 3e-4, 1400, 140, seed=4),
    CurveRun("py-tiny-lr1e4-cos-b", "test", "python", "tiny", 1e-4, 1000, 100, "cosine10"),
    CurveRun("vim-tiny-lr9e4-wsd-b", "design", "vimdoc", "tiny", 9e-4, 1600, 80, "wsd",
             extra={"cooldown_fraction": 0.15}),
    CurveRun("vim-moe-lr6e4-cos-b", "test", "vimdoc", "tiny-moe", 6e-4, 1000, 100),
    CurveRun("vim-small-lr6e4-wsd-b", "test", "vimdoc", "small", 6e-4, 800, 40, "wsd"),
    CurveRun("intl-tiny-lr6e4-cos10-b", "design", "intl", "tiny", 6e-4, 1800, 150, "cosine10"),
    CurveRun("intl-mid-ssd-lr9e4-cos-b", "test", "intl", "mid-ssd", 9e-4, 700, 70,
             warmup_steps=50, batch=(4, 1)),
    CurveRun("intl-small-lr2e4-wsd-b", "test", "intl", "small", 2e-4, 1000, 100, "wsd"),
    CurveRun("rnd-tiny-lr6e4-wsd-b", "design", "random", "tiny", 6e-4, 1500, 150, "wsd"),
    CurveRun("rnd-small-lr3e4-cos-b", "test", "random", "small", 3e-4, 900, 90),
    CurveRun("shk100k-small-lr6e4-cos10-b", "design", "shakespeare-100k", "small", 6e-4, 3000,
             150, "cosine10"),
    CurveRun("shk100k-tiny-lr3e4-cos-b", "test", "shakespeare-100k", "tiny", 3e-4, 2000, 100),
    CurveRun("py-mid-ssd-lr9e4-wsd-b", "design", "python", "mid-ssd", 9e-4, 600, 60, "wsd",
             warmup_steps=60, batch=(4, 1)),
    CurveRun("vim-6m-ssd-lr6e4-cos-b", "design", "vimdoc", "6m-ssd", 6e-4, 400, 40,
             warmup_steps=40, batch=(4, 1), extra={"eval_batches": 8}),
]
# fmt: on


def build_corpus(name: str, folder: Path) -> Path:
    path = folder / f"{name}.bin"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(CORPORA[name]())
        temporary.replace(path)
    return path


def train(run: CurveRun, work: Path) -> str:
    destination = CURVES / run.split / run.name
    if destination.is_dir():
        return f"{run.name}: kept (already in {destination.relative_to(ROOT)})"
    data = build_corpus(run.corpus, work / "corpora")
    out_dir = work / "runs" / run.name
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    overrides = MODELS[run.model][1]
    if overrides:
        (out_dir.parent / f"{run.name}.yaml").write_text(json.dumps({"model": overrides}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "nexus", "train", *run.flags(data, out_dir)]
    start = time.perf_counter()
    log = work / "runs" / f"{run.name}.log"
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        return f"{run.name}: FAILED (exit {done.returncode}), see {log}"
    staging = destination.with_name(f".{run.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ("metrics.jsonl", "config.json"):
        shutil.copy(out_dir / name, staging / name)
    staging.replace(destination)
    shutil.rmtree(out_dir)
    return f"{run.name}: {time.perf_counter() - start:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="train just these runs")
    parser.add_argument("--work", default="/tmp/nexus-curves", help="corpora and run folders")
    args = parser.parse_args()
    runs = [r for r in RUNS if not args.only or r.name in args.only]
    work = Path(args.work)
    for corpus in sorted({r.corpus for r in runs}):
        build_corpus(corpus, work / "corpora")
    # The longest first, so the two jobs end together.
    runs.sort(key=lambda r: -r.max_steps * r.batch[0] * r.batch[1])
    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(lambda r: train(r, work), runs):
            print(line, flush=True)


if __name__ == "__main__":
    main()
