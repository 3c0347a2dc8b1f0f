"""Own data at size: how fast a directory is prepared into the store, and what training on a
large store costs in memory and start-up against training on Tiny Shakespeare.

Run: python benchmarks/data.py [--gigabytes 3] [--work DIR]

It writes a directory of text files of the given total size (Tiny Shakespeare repeated with
each file's number, so no two files are equal), prepares it with an empty cache (MB/s), then
runs `nexus train --max_steps 20` on it and on Tiny Shakespeare alone, each in a fresh process,
and reports each one's peak RSS and the seconds from launch to the first logged step (the
first run also compiles the numba kernels into the fresh cache; the second finds them).
Goals (issue 14): preparing >= 200 MB/s, the large run's peak RSS within 150 MB of the small
one's, the first step within 10 s of launch once the store exists.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared/data/tinyshakespeare.txt"
FILE_BYTES = 64 << 20


def make_corpus(folder: Path, total: int) -> int:
    base = SHAKESPEARE.read_bytes()
    written, number = 0, 0
    while written < total:
        header = f"# file {number}\n".encode()
        body = header + base * (FILE_BYTES // len(base))
        path = folder / f"part{number // 100:03d}" / f"file{number:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body[: total - written])
        written += min(len(body), total - written)
        number += 1
    return written


def timed_run(data: Path, out: Path, env: dict[str, str]) -> tuple[float, float]:
    """Peak RSS (MB) of a short `nexus train` and the seconds to its first logged step."""
    command = [sys.executable, "-m", "nexus", "train", "--data", str(data),
               "--out_dir", str(out), "--max_steps", "20", "--log_interval", "1",
               "--eval_interval", "20", "--eval_batches", "2", "--compile", "off",
               "--no-tensorboard", "--force"]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    first_step = None
    for line in process.stdout:
        if first_step is None and line.startswith("step 1/"):
            first_step = time.perf_counter() - start
    process.wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return usage, first_step or float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=3.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/nexus-data-bench"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    corpus, cache = args.work / "corpus", args.work / "cache"
    size = make_corpus(corpus, int(args.gigabytes * 1e9))
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}

    from nexus.sources import SourceSpec
    from nexus.store import prepare

    os.sync()
    start = time.perf_counter()
    store = prepare(SourceSpec(corpus), root=cache / "nexus" / "stores", log=lambda m: None)
    seconds = time.perf_counter() - start
    print(f"prepared {size / 1e6:,.0f} MB in {seconds:.1f} s: {size / 1e6 / seconds:,.0f} MB/s "
          f"({store.summary['files']} files)")  # fmt: skip
    # Each run in its own process; RUSAGE_CHILDREN keeps the largest child's peak, so the
    # small run goes first.
    small_rss, small_start = timed_run(SHAKESPEARE, args.work / "small", env)
    large_rss, large_start = timed_run(corpus, args.work / "large", env)
    print(f"Tiny Shakespeare: peak RSS {small_rss:,.0f} MB, first step after {small_start:.1f} s")
    print(f"{size / 1e9:.1f} GB store: peak RSS {large_rss:,.0f} MB "
          f"(+{large_rss - small_rss:,.0f}), first step after {large_start:.1f} s")  # fmt: skip
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
