"""Benchmarks for the Mamba-2 (SSD) path against Mamba-1, at the reference training shape.

Run: .venv/bin/python benchmarks/ssd.py [--repeats N] [--threads T] [--omp-active]

Sections: the chunked SSD scan's forward+backward by chunk size (and its sequential
reference), one Mamba-1 mixer vs one Mamba-2 mixer, and the whole `nexus-6m` vs
`nexus-6m-ssd` forward+backward on a 4×128 micro-batch. Each comparison alternates its
candidates repeat by repeat, so that a change in the machine's load hits all of them alike,
and prints the median wall time and the median CPU time of the process.

OMP_WAIT_POLICY is set to PASSIVE unless --omp-active is given (or it is already set):
numba's OpenMP pool (the Mamba-1 scan's) is a second OpenMP runtime beside torch's, and with
the default active wait its threads spin after every scan call and slow down every torch op
that follows, Mamba-2's included, which would confound the comparison.
"""

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

BATCH, STEPS, D_MODEL = 4, 128, 256


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per candidate")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--omp-active", action="store_true", help="leave OMP_WAIT_POLICY unset (see above)"
    )
    return parser.parse_args()


def compare(candidates: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median wall ms per candidate, timed round-robin; prints wall and CPU medians."""
    for step in candidates.values():  # warm-up: first-call costs (numba, allocator)
        step()
        step()
    wall: dict[str, list[float]] = {name: [] for name in candidates}
    cpu: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, step in candidates.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    medians = {name: 1e3 * statistics.median(times) for name, times in wall.items()}
    for name in candidates:
        cpu_ms = 1e3 * statistics.median(cpu[name])
        print(f"  {name:<34} wall {medians[name]:8.2f} ms   cpu {cpu_ms:8.2f} ms")
    return medians


def fwd_bwd(fn: Callable, inputs: list, grad) -> Callable[[], None]:
    def step() -> None:
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)

    return step


def section_scan(repeats: int) -> None:
    """The SSD scan alone at the 6m-ssd sizes (H=8, P=64, G=1, N=64), by chunk size."""
    import torch
    import torch.nn.functional as F

    from nexus.config import preset
    from nexus.ssd import ssd_scan, ssd_scan_reference

    config = preset("nexus-6m-ssd")
    H, P, G, N = config.ssm_heads, config.ssm_head_dim, config.n_groups, config.d_state
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, STEPS, H, P, generator=gen)
    dt = F.softplus(torch.randn(BATCH, STEPS, H, generator=gen) - 3.0)
    A = -torch.empty(H).uniform_(1.0, 16.0, generator=gen)
    Bm = torch.randn(BATCH, STEPS, G, N, generator=gen)
    Cm = torch.randn(BATCH, STEPS, G, N, generator=gen)
    D = torch.ones(H)
    inputs = [t.requires_grad_() for t in (x, dt, A, Bm, Cm, D)]
    grad = torch.randn(BATCH, STEPS, H, P, generator=gen)
    print(f"SSD scan fwd+bwd, B={BATCH} T={STEPS} H={H} P={P} G={G} N={N}:")
    candidates = {
        f"chunk {L}": fwd_bwd(lambda *a, L=L: ssd_scan(*a, chunk_size=L), inputs, grad)
        for L in (16, 32, 64, 128)
    }
    candidates["sequential reference"] = fwd_bwd(ssd_scan_reference, inputs, grad)
    compare(candidates, repeats)


def section_mixers(repeats: int) -> None:
    """One Mamba-1 mixer vs one Mamba-2 mixer (input projection to output projection)."""
    import torch

    from nexus.config import preset
    from nexus.model import NexusLM

    torch.manual_seed(0)
    mixers = {
        "Mamba-1 mixer (nexus-6m)": NexusLM(preset("nexus-6m")).model.layers[0].mamba,
        "Mamba-2 mixer (nexus-6m-ssd)": NexusLM(preset("nexus-6m-ssd")).model.layers[0].mamba,
    }
    hidden = torch.randn(BATCH, STEPS, D_MODEL, requires_grad=True)
    grad = torch.randn(BATCH, STEPS, D_MODEL)

    def step_for(mixer: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            mixer.zero_grad(set_to_none=True)
            hidden.grad = None
            mixer(hidden).backward(grad)

        return step

    print(f"one mixer fwd+bwd, B={BATCH} T={STEPS} d_model={D_MODEL}:")
    medians = compare({name: step_for(m) for name, m in mixers.items()}, repeats)
    first, second = medians.values()
    print(f"  Mamba-2 / Mamba-1 wall time: {second / first:.2f}")


def section_models(repeats: int) -> None:
    """The whole nexus-6m vs nexus-6m-ssd, forward+backward with the loss, 4×128 batch."""
    import torch
    import torch.nn.functional as F

    from nexus.config import preset
    from nexus.model import NexusLM

    torch.manual_seed(0)
    ids = torch.randint(0, 256, (BATCH, STEPS + 1))
    candidates = {}
    for name in ("nexus-6m", "nexus-6m-ssd"):
        model = NexusLM(preset(name))

        def step(model: NexusLM = model) -> None:
            model.zero_grad(set_to_none=True)
            logits = model(ids[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()

        candidates[f"{name} ({model.num_parameters():,} params)"] = step
    print(f"whole model fwd+bwd, {BATCH}x{STEPS} tokens:")
    medians = compare(candidates, repeats)
    for name, ms in medians.items():
        print(f"  {name.split()[0]:<14} {BATCH * STEPS / ms * 1000:8.0f} tokens/s (wall)")
    first, second = medians.values()
    print(f"  nexus-6m-ssd / nexus-6m wall time: {second / first:.2f}")


SECTIONS: list[Callable[[int], None]] = [section_scan, section_mixers, section_models]


def main() -> None:
    args = parse_args()
    if not args.omp_active:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch/numba load OpenMP
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats {args.repeats}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    sys.stdout.flush()
    for section in SECTIONS:
        section(args.repeats)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
