"""Benchmarks for the selective scan (nexus.scan), one function per section.

Run: .venv/bin/python benchmarks/scan.py [--repeats N] [--cold]

Sections: numba first-call time, fast vs reference forward+backward at the reference
training shape, and a denormal check (strong-decay vs normal inputs, with and without the
kernel's flush-to-zero). Later sections (e.g. the whole model) append to SECTIONS.
"""

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

BATCH, STEPS, DIM, N_STATE = 4, 128, 512, 16


def make_inputs(regime: str, seed: int = 0) -> list[torch.Tensor]:
    """x, dt, A, Bm, Cm, Dskip at the reference shape, as leaves requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, STEPS, DIM, generator=gen)
    if regime == "realistic":
        # Mamba's init: softplus(bias) log-uniform in [1e-3, 1e-1], plus data-dependent noise.
        u = torch.rand(DIM, generator=gen)
        target = torch.exp(np.log(1e-3) + (np.log(1e-1) - np.log(1e-3)) * u)
        bias = target + torch.log(-torch.expm1(-target))  # inverse softplus
        dt = F.softplus(bias + 0.5 * torch.randn(BATCH, STEPS, DIM, generator=gen))
        A = -torch.arange(1, N_STATE + 1, dtype=torch.float32).repeat(DIM, 1)  # S4D-real
    elif regime == "strong":  # exp(dt*A) down to exp(-250): deep in underflow
        dt = 0.5 + 4.5 * torch.rand(BATCH, STEPS, DIM, generator=gen)
        A = -(1.0 + 49.0 * torch.rand(DIM, N_STATE, generator=gen))
    elif regime == "fading":  # input stops after 8 steps; states decay through the subnormals
        x[:, 8:] = 0
        dt = 0.05 + 0.45 * torch.rand(BATCH, STEPS, DIM, generator=gen)
        A = -(1.0 + 49.0 * torch.rand(DIM, N_STATE, generator=gen))
    else:
        raise ValueError(regime)
    Bm = torch.randn(BATCH, STEPS, N_STATE, generator=gen)
    Cm = torch.randn(BATCH, STEPS, N_STATE, generator=gen)
    Dskip = torch.ones(DIM)
    return [t.requires_grad_() for t in (x, dt, A, Bm, Cm, Dskip)]


def fwd_bwd(fn: Callable, inputs: list[torch.Tensor], grad_y: torch.Tensor) -> None:
    for t in inputs:
        t.grad = None
    fn(*inputs).backward(grad_y)


def median_ms(step: Callable[[], None], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def section_compile(repeats: int) -> None:
    """Time of the first fast call (numba compile, or load from its on-disk cache)."""
    from nexus import scan

    inputs = make_inputs("realistic")
    grad_y = torch.randn(BATCH, STEPS, DIM)
    start = time.perf_counter()
    fwd_bwd(scan.selective_scan, inputs, grad_y)
    elapsed = time.perf_counter() - start
    hits = sum(sum(k.stats.cache_hits.values()) for k in (scan._scan_fwd, scan._scan_bwd))
    source = "loaded from numba cache" if hits else "compiled"
    print(f"numba first call (fwd+bwd, float32): {elapsed:.2f} s ({source})")


def section_scan(repeats: int) -> None:
    """Forward+backward of the fast kernel vs the reference loop at the reference shape."""
    from nexus.scan import selective_scan, selective_scan_reference

    inputs = make_inputs("realistic")
    grad_y = torch.randn(BATCH, STEPS, DIM)
    fast = median_ms(lambda: fwd_bwd(selective_scan, inputs, grad_y), repeats)
    ref = median_ms(lambda: fwd_bwd(selective_scan_reference, inputs, grad_y), repeats)
    with torch.no_grad():
        fast_fwd = median_ms(lambda: selective_scan(*inputs), repeats)
        ref_fwd = median_ms(lambda: selective_scan_reference(*inputs), repeats)
    shape = f"B={BATCH} T={STEPS} D={DIM} N={N_STATE}"
    print(f"scan fwd+bwd {shape}: fast {fast:.2f} ms, reference {ref:.2f} ms, {ref / fast:.1f}x")
    ratio = ref_fwd / fast_fwd
    print(f"scan fwd only: fast {fast_fwd:.2f} ms, reference {ref_fwd:.2f} ms, {ratio:.1f}x")


def section_denormal(repeats: int) -> None:
    """Strong-decay vs normal inputs: the kernel's flush-to-zero should keep them equal."""
    from nexus import scan

    regimes = ("realistic", "strong", "fading")
    grad_y = torch.randn(BATCH, STEPS, DIM)
    times = []
    for regime in regimes:
        inputs = make_inputs(regime)
        times.append(median_ms(lambda i=inputs: fwd_bwd(scan.selective_scan, i, grad_y), repeats))
    print(
        f"denormal check fwd+bwd: normal {times[0]:.2f} ms, strong decay {times[1]:.2f} ms "
        f"({times[1] / times[0]:.2f}x), fading input {times[2]:.2f} ms ({times[2] / times[0]:.2f}x)"
    )
    # The forward kernel with its flush switched off, to show what the flush protects against.
    for flush in (True, False):
        row = []
        for regime in regimes:
            x, dt, A, Bm, Cm, Dskip = (t.detach().contiguous().numpy() for t in make_inputs(regime))
            min_arg, tiny = scan._ftz_args(torch.float32)
            if not flush:
                min_arg, tiny = np.float32(-np.inf), np.float32(0.0)
            y = np.empty_like(x)
            h_last = np.empty((BATCH, DIM, N_STATE), dtype=np.float32)
            args = (x, dt, np.ascontiguousarray(A.T), Bm, Cm, Dskip, min_arg, tiny)
            args += (scan._chunk_size(DIM), y, h_last)
            row.append(median_ms(lambda a=args: scan._scan_fwd(*a), repeats))
        print(
            f"  fwd kernel, flush {'on ' if flush else 'off'}: normal {row[0]:.2f} ms, "
            f"strong decay {row[1]:.2f} ms, fading input {row[2]:.2f} ms"
        )


def section_model(repeats: int) -> None:
    """The whole nexus-6m forward+backward on a 4×128 micro-batch, and the scan's share of it."""
    from torch.profiler import profile

    from nexus.config import preset
    from nexus.model import NexusLM

    torch.manual_seed(0)
    model = NexusLM(preset("nexus-6m"))
    ids = torch.randint(0, 256, (BATCH, STEPS + 1))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()

    total_ms = median_ms(step, repeats)
    with profile() as prof:
        for _ in range(3):
            step()
    events = prof.key_averages()
    scan_us = sum(e.self_cpu_time_total for e in events if "SelectiveScan" in e.key)
    all_us = sum(e.self_cpu_time_total for e in events)
    print(
        f"model  nexus-6m fwd+bwd 4x128: {total_ms:.1f} ms median "
        f"({BATCH * STEPS / total_ms * 1000:.0f} tokens/s); "
        f"selective scan share {100 * scan_us / max(all_us, 1):.1f}% (profiler, 3 steps)"
    )


SECTIONS: list[Callable[[int], None]] = [
    section_compile,
    section_scan,
    section_denormal,
    section_model,
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement")
    parser.add_argument("--cold", action="store_true", help="use an empty numba cache")
    args = parser.parse_args()
    if args.cold:  # must be set before numba is imported
        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="nexus-numba-")
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats {args.repeats}")
    for section in SECTIONS:
        section(args.repeats)


if __name__ == "__main__":
    main()
