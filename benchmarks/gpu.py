"""Nexus on one CUDA GPU, measured in one process; prints one JSON line (and writes it to --out).

Run: python benchmarks/gpu.py [--out FILE] [--quick]

- the bf16 matrix-product rate of this GPU (TFLOP/s): the limit MFU is taken against;
- the Mamba-1 selective scan alone, forward + backward at B 8, T 1024, d_inner 1536, N 16:
  the Triton kernels against the sequential PyTorch loop (goal ≥ 30×) and mamba.py's parallel
  scan when `mambapy` is installed;
- training tokens/s under bf16 autocast (fp32 weights, fused AdamW) for nexus-6m and nexus-100m,
  eager, against an equal-size GPT with SDPA attention (goal ≥ 0.8×) and Hugging Face's Jamba
  at the same config with `use_mambapy` (goal ≥ 5×), and their MFU;
- greedy generation bytes/s of nexus-6m on the GPU, and whether its bytes equal the CPU's.

Each figure is the median of timed repeats after warm-up, with the GPU synchronised around
each; a part that fails records its error instead of a number, so one run always reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from run import equal_size_gpt, hf_jamba

from nexus import scan
from nexus.config import preset
from nexus.generation import generate
from nexus.info import flops_per_token
from nexus.model import NexusLM


def gpu_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """The median wall time of fn with the GPU's queue drained before and after each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bf16_matmul_tflops(size: int = 8192) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    return 2 * size**3 / gpu_seconds(lambda: a @ b, 10) / 1e12


def scan_inputs(batch: int, steps: int, channels: int, state: int) -> list[torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, device="cuda", generator=generator)

    x = rand(batch, steps, channels) - 0.5
    dt = F.softplus(rand(batch, steps, channels) * 4 - 5)  # Mamba's Δ range
    A = -torch.arange(1, state + 1, device="cuda", dtype=torch.float32).repeat(channels, 1)
    Bm, Cm = rand(batch, steps, state) - 0.5, rand(batch, steps, state) - 0.5
    Dskip = torch.ones(channels, device="cuda")
    return [t.requires_grad_() for t in (x, dt, A, Bm, Cm, Dskip)]


def scan_seconds(scan_fn: Callable, inputs: list[torch.Tensor], repeats: int) -> float:
    def forward_backward() -> None:
        y = scan_fn(*inputs)
        y.sum().backward()

    return gpu_seconds(forward_backward, repeats, warmup=1)


def mambapy_scan(x, dt, A, Bm, Cm, Dskip):
    """The same recurrence through mamba.py's parallel scan over (B, T, D, N) tensors."""
    from mambapy.pscan import pscan

    decay = torch.exp(dt.unsqueeze(-1) * A)  # (B, T, D, N)
    inputs = (dt * x).unsqueeze(-1) * Bm.unsqueeze(2)  # (B, T, D, N)
    states = pscan(decay, inputs)
    return (states @ Cm.unsqueeze(-1)).squeeze(-1) + Dskip * x


def measure_scan(quick: bool) -> dict:
    inputs = scan_inputs(8, 1024, 1536, 16)
    result = {"shape": "B 8, T 1024, d_inner 1536, N 16, fp32, forward + backward"}
    result["triton_s"] = scan_seconds(scan.selective_scan, inputs, 5 if quick else 20)
    result["loop_s"] = scan_seconds(scan.selective_scan_reference, inputs, 2 if quick else 3)
    result["triton_vs_loop"] = result["loop_s"] / result["triton_s"]
    try:
        result["mambapy_s"] = scan_seconds(mambapy_scan, inputs, 5 if quick else 20)
        result["triton_vs_mambapy"] = result["mambapy_s"] / result["triton_s"]
    except ImportError:
        result["mambapy_s"] = None
    return result


def tokens_per_s(model: torch.nn.Module, batch: int, seq_len: int, repeats: int) -> float:
    """Training steps as `nexus train` takes them on a GPU: bf16 autocast forward, fp32 loss,
    backward, clipping, one fused AdamW update of the fp32 weights."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    ids = torch.randint(0, 256, (batch, seq_len + 1), device="cuda")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        logits = getattr(logits, "logits", logits).float()
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return batch * seq_len / gpu_seconds(step, repeats)


# Each preset's benchmark step and the shape of its equal-size GPT (d_model, layers, heads).
TRAINING = {
    "nexus-6m": {"batch": 32, "seq_len": 128, "gpt": (256, 8, 8)},
    "nexus-100m": {"batch": 16, "seq_len": 1024, "gpt": (768, 12, 12)},
}


def measure_training(name: str, peak_tflops: float, quick: bool) -> dict:
    setting = TRAINING[name]
    batch, seq_len = setting["batch"], setting["seq_len"]
    config = preset(name)
    repeats = 3 if quick else 10
    nexus = NexusLM(config).cuda()
    result = {"batch": batch, "seq_len": seq_len, "parameters": nexus.num_parameters()}
    result["tokens_per_s"] = tokens_per_s(nexus, batch, seq_len, repeats)
    flops = flops_per_token(config)["train"]
    result["mfu"] = flops * result["tokens_per_s"] / (peak_tflops * 1e12)
    del nexus
    gpt = equal_size_gpt(result["parameters"], *setting["gpt"], max_len=seq_len).cuda()
    result["gpt_parameters"] = sum(p.numel() for p in gpt.parameters())
    result["gpt_tokens_per_s"] = tokens_per_s(gpt, batch, seq_len, repeats)
    result["vs_gpt"] = result["tokens_per_s"] / result["gpt_tokens_per_s"]
    del gpt
    try:
        hf = hf_jamba(name)
        if hf is None:
            raise ImportError("transformers is not installed")
        result["hf_tokens_per_s"] = tokens_per_s(hf.cuda().train(), batch, seq_len, repeats)
        result["vs_hf"] = result["tokens_per_s"] / result["hf_tokens_per_s"]
    except Exception as error:  # a peer that cannot run is reported, not fatal
        result["hf_error"] = f"{type(error).__name__}: {error}"
    torch.cuda.empty_cache()
    return result


def measure_generation(new_bytes: int) -> dict:
    torch.manual_seed(0)
    model = NexusLM(preset("nexus-6m")).eval()
    on_cpu = generate(model, b"ROMEO:", new_bytes, temperature=0)
    model.cuda()
    seconds = gpu_seconds(lambda: generate(model, b"ROMEO:", new_bytes, temperature=0), 3)
    on_gpu = generate(model, b"ROMEO:", new_bytes, temperature=0)
    same = next((i for i, (a, b) in enumerate(zip(on_cpu, on_gpu, strict=True)) if a != b), None)
    return {
        "bytes_per_s": new_bytes / seconds,
        "greedy_equals_cpu": on_cpu == on_gpu,
        "first_difference_at": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON line here")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU; this machine has none")
    result: dict = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton_path": scan.TRITON_PATH_ENABLED,
    }
    parts: dict[str, Callable[[], object]] = {
        "bf16_matmul_tflops": bf16_matmul_tflops,
        "scan": lambda: measure_scan(args.quick),
        "train_nexus-6m": lambda: measure_training(
            "nexus-6m", result["bf16_matmul_tflops"], args.quick
        ),
        "train_nexus-100m": lambda: measure_training(
            "nexus-100m", result["bf16_matmul_tflops"], args.quick
        ),
        "generation": lambda: measure_generation(256),
    }
    for name, measure in parts.items():
        try:
            result[name] = measure()
        except Exception:  # one failed part must not lose the others
            result[name] = {"error": traceback.format_exc(limit=3)}
        print(f"{name}: done", file=sys.stderr, flush=True)
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
