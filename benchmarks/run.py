"""Nexus against the machine's limit and its peers, measured in one process and one run.

Run: python benchmarks/run.py [--quick] [--json] [--no-write]

- the fp32 matrix-product rate of this machine (GFLOP/s): the limit;
- nexus-6m training throughput (real steps of the reference run: 4 micro-batches of 4 × 128
  accumulated, then one AdamW update), compiled as `nexus train` runs it and eager, and its MFU;
- a plain pre-norm GPT of equal parameter count (SDPA attention) under the same loop, compiled
  and eager;
- Hugging Face's JambaForCausalLM at the same config, on its fastest CPU path, when
  `transformers` is installed: training tokens/s, cached greedy and sampled generation bytes/s
  (Nexus greedy, with the CLI's default sampling, and with top-k/top-p, all in one run);
- the peak resident memory of a `nexus train` run of nexus-6m (a subprocess).

The figures are ratios taken on the same machine state; `docs/performance.md` gets them with
the date and machine (between its generated-results markers) unless --no-write.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nexus.config import TrainConfig, preset
from nexus.generation import generate
from nexus.hf import jamba_config_dict
from nexus.info import flops_per_token
from nexus.model import NexusLM
from nexus.optim import build_optimizer
from nexus.training import deterministic_algorithms, next_byte_loss

ROOT = Path(__file__).resolve().parents[1]
PERFORMANCE_DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- benchmark results: begin -->", "<!-- benchmark results: end -->"
MICRO_BATCH, GRAD_ACCUM, SEQ_LEN = 4, 4, 128  # the reference run's step
PROMPT = b"ROMEO:"


def timed(fn: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
    """Seconds per call, after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def matmul_gflops(repeats: int, size: int = 2048) -> float:
    """The best rate of repeated size² products: the limit, so MFU errs low, not high."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = min(timed(lambda: a @ b, repeats))
    return 2 * size**3 / seconds / 1e9


LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def train_tokens_per_s(
    model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, loss_of: LossFn
) -> float:
    """Tokens/s of real training steps as the reference run takes them: GRAD_ACCUM
    micro-batches of 4 × 128 (forward, backward), then clipping and one AdamW update."""
    generator = torch.Generator().manual_seed(0)
    batches = torch.randint(0, 256, (GRAD_ACCUM, MICRO_BATCH, SEQ_LEN + 1), generator=generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            (loss_of(model, batch[:, :-1], batch[:, 1:]) / GRAD_ACCUM).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    seconds = statistics.median(timed(step, steps))
    return GRAD_ACCUM * MICRO_BATCH * SEQ_LEN / seconds


def fused_adamw(model: nn.Module) -> torch.optim.AdamW:
    """The peers' optimizer: fused AdamW, as Nexus's (and Hugging Face Trainer's default)."""
    return torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)


def cross_entropy_of(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    logits = model(inputs)
    logits = getattr(logits, "logits", logits)  # Hugging Face models return an output object
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def compile_seconds(loss_of: LossFn, model: nn.Module) -> float:
    """Wall time of the first call of a compiled loss and its backward (the compile)."""
    ids = torch.zeros(MICRO_BATCH, SEQ_LEN + 1, dtype=torch.long)
    start = time.perf_counter()
    loss_of(model, ids[:, :-1], ids[:, 1:]).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


class GPTBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp_hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.attn_norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_hidden, bias=False),
            nn.GELU(),
            nn.Linear(mlp_hidden, d_model, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, hd)
        mixed = self.proj(attended.transpose(1, 2).reshape(B, T, C))
        x = x + F.dropout(mixed, self.dropout, self.training)
        return x + F.dropout(self.mlp(self.mlp_norm(x)), self.dropout, self.training)


class GPT(nn.Module):
    """The baseline: a plain pre-norm transformer with learned positions; dropout (training
    only) where Nexus has it: the embeddings and each residual branch."""

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        n_heads: int,
        mlp_hidden: int,
        max_len: int = SEQ_LEN,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dropout = dropout
        self.embed = nn.Embedding(256, d_model)
        self.positions = nn.Parameter(torch.zeros(max_len, d_model))
        self.blocks = nn.ModuleList(
            GPTBlock(d_model, n_heads, mlp_hidden, dropout) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256, bias=False)
        # GPT-2's initialisation, as Nexus's: N(0, 0.02), the residual projections scaled by
        # 1/sqrt(2·layers).
        for name, param in self.named_parameters():
            if param.ndim == 2:
                residual = name.endswith(("proj.weight", "mlp.2.weight"))
                std = 0.02 / math.sqrt(2 * n_layers) if residual else 0.02
                nn.init.normal_(param, 0.0, std)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids) + self.positions[: ids.shape[1]]
        x = F.dropout(x, self.dropout, self.training)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def equal_size_gpt(
    target_parameters: int,
    d_model: int = 256,
    n_layers: int = 8,
    n_heads: int = 8,
    max_len: int = SEQ_LEN,
    dropout: float = 0.0,
) -> GPT:
    """A GPT of this shape with the MLP width that brings its count closest to the target."""
    per_unit = 2 * d_model * n_layers  # each MLP hidden unit adds an input and an output weight
    one_unit = GPT(d_model, n_layers, n_heads, 1, max_len)
    fixed = sum(p.numel() for p in one_unit.parameters()) - per_unit
    hidden = round((target_parameters - fixed) / per_unit)
    return GPT(d_model, n_layers, n_heads, hidden, max_len, dropout)


def hf_jamba(config_name: str = "nexus-6m") -> nn.Module | None:
    """Hugging Face's Jamba at the preset's config (the one `nexus export` writes), on its
    fastest CPU path: mamba.py's scan."""
    try:
        from transformers import JambaConfig, JambaForCausalLM
    except ImportError:
        return None
    config_json = {**jamba_config_dict(preset(config_name)), "use_mambapy": True}
    return JambaForCausalLM(JambaConfig.from_dict(config_json))


# Sampling settings timed beside greedy decoding: the CLI's defaults (`nexus sample`), and a
# top-k/top-p setting as llama.cpp uses by default (the kernel's heaviest path: a sort a byte).
SAMPLED = {
    "default": {"temperature": 0.8, "top_k": 0, "top_p": 1.0},
    "top_k 40, top_p 0.95": {"temperature": 0.8, "top_k": 40, "top_p": 0.95},
}


def nexus_generate_bytes_per_s(model: NexusLM, new_bytes: int, settings: dict) -> float:
    def run() -> None:
        generate(model, PROMPT, new_bytes, seed=0, **settings)

    return new_bytes / min(timed(run, 3, warmup=1))


def hf_generate_bytes_per_s(model: nn.Module, new_bytes: int, settings: dict) -> float:
    ids = torch.tensor([list(PROMPT)])
    if settings["temperature"] == 0:
        options = {"do_sample": False}
    else:  # top_k 0 switches off transformers' own default of 50
        options = {"do_sample": True, **settings}

    def run() -> None:
        with torch.no_grad():
            model.generate(
                ids,
                max_new_tokens=new_bytes,
                min_new_tokens=new_bytes,
                use_cache=True,
                pad_token_id=0,
                **options,
            )

    return new_bytes / min(timed(run, 2, warmup=1))


def peak_rss_mb_of_training(steps: int) -> float:
    """Peak RSS of a real `nexus train` of nexus-6m, measured on the child process; compiled,
    as the reference run is."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.bin"
        data.write_bytes(os.urandom(200_000))
        command = [
            sys.executable, "-m", "nexus", "train", "--data", str(data),
            "--out_dir", str(Path(tmp) / "run"), "--max_steps", str(steps),
            "--eval_interval", str(steps), "--warmup_steps", "1", "--eval_batches", "2",
            "--sample_bytes", "16", "--device", "cpu", "--compile", "on",
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def run_benchmarks(quick: bool) -> dict[str, float | str | None]:
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    repeats = 3 if quick else 8  # optimizer steps of 4 micro-batches each
    config = preset("nexus-6m")
    result: dict[str, float | str | None] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mode": "quick" if quick else "full",
    }
    result["matmul_gflops"] = matmul_gflops(10 if quick else 30)

    # The trainer compiles the training step of a run this long (compile = "auto"): the
    # headline figures are of that path, the eager ones are kept beside them.
    nexus = NexusLM(config)
    optimizer = build_optimizer(nexus, TrainConfig())
    result["train_tokens_per_s_eager"] = train_tokens_per_s(
        nexus, optimizer, repeats, next_byte_loss
    )
    compiled_loss = torch.compile(next_byte_loss, dynamic=False)
    with deterministic_algorithms(True):  # as the trainer runs compiled steps on the CPU
        result["compile_s"] = compile_seconds(compiled_loss, nexus)
        result["train_tokens_per_s"] = train_tokens_per_s(nexus, optimizer, repeats, compiled_loss)
    flops = flops_per_token(config)["train"]
    result["flops_per_token_train"] = flops
    result["mfu"] = flops * result["train_tokens_per_s"] / (result["matmul_gflops"] * 1e9)

    gpt = equal_size_gpt(nexus.num_parameters())
    result["transformer_parameters"] = sum(p.numel() for p in gpt.parameters())
    gpt_optimizer = fused_adamw(gpt)
    result["transformer_tokens_per_s_eager"] = train_tokens_per_s(
        gpt, gpt_optimizer, repeats, cross_entropy_of
    )
    compiled_gpt_loss = torch.compile(cross_entropy_of, dynamic=False)
    compile_seconds(compiled_gpt_loss, gpt)
    result["transformer_tokens_per_s"] = train_tokens_per_s(
        gpt, gpt_optimizer, repeats, compiled_gpt_loss
    )
    # Like for like: compiled against compiled, eager against eager.
    result["vs_transformer"] = result["train_tokens_per_s"] / result["transformer_tokens_per_s"]
    result["vs_transformer_eager"] = (
        result["train_tokens_per_s_eager"] / result["transformer_tokens_per_s_eager"]
    )

    new_bytes = 128 if quick else 256
    greedy = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
    nexus.eval()
    result["generate_bytes_per_s"] = nexus_generate_bytes_per_s(nexus, new_bytes, greedy)
    for name, settings in SAMPLED.items():
        result[f"sampled_bytes_per_s[{name}]"] = nexus_generate_bytes_per_s(
            nexus, new_bytes, settings
        )
    result["sampled_vs_greedy"] = (
        result["sampled_bytes_per_s[default]"] / result["generate_bytes_per_s"]
    )
    hf = hf_jamba()
    result["hf_train_tokens_per_s"] = result["hf_generate_bytes_per_s"] = None
    result["vs_hf_train"] = result["vs_hf_train_eager"] = result["vs_hf_generate"] = None
    result["hf_sampled_bytes_per_s"] = result["vs_hf_sampled"] = None
    if hf is not None:
        hf_optimizer = fused_adamw(hf)
        result["hf_train_tokens_per_s"] = train_tokens_per_s(
            hf.train(), hf_optimizer, max(2, repeats // 2), cross_entropy_of
        )
        result["hf_generate_bytes_per_s"] = hf_generate_bytes_per_s(hf.eval(), new_bytes, greedy)
        result["hf_sampled_bytes_per_s"] = hf_generate_bytes_per_s(
            hf, new_bytes, SAMPLED["default"]
        )
        result["vs_hf_sampled"] = (
            result["sampled_bytes_per_s[default]"] / result["hf_sampled_bytes_per_s"]
        )
        result["vs_hf_train"] = result["train_tokens_per_s"] / result["hf_train_tokens_per_s"]
        result["vs_hf_train_eager"] = (
            result["train_tokens_per_s_eager"] / result["hf_train_tokens_per_s"]
        )
        result["vs_hf_generate"] = (
            result["generate_bytes_per_s"] / result["hf_generate_bytes_per_s"]
        )
    result["hf_mambapy"] = _mambapy_available()
    result["peak_rss_mb"] = peak_rss_mb_of_training(steps=3 if quick else 10)
    return result


def _mambapy_available() -> bool:
    try:
        import mambapy  # noqa: F401
    except ImportError:
        return False
    return True


def format_results(result: dict) -> str:
    def ratio(value: float | None) -> str:
        return "n/a (transformers not installed)" if value is None else f"{value:.2f}×"

    hf_note = "mamba.py scan" if result["hf_mambapy"] else "its default torch loop (no mambapy)"
    return "\n".join(
        [
            f"Measured {result['date']} on {result['machine']}, torch {result['torch']}, "
            f"{result['threads']} threads, {result['mode']} run.",
            "",
            "| measure | value | goal |",
            "|---|---|---|",
            f"| fp32 matmul rate (2048², the limit) | {result['matmul_gflops']:.1f} GFLOP/s | |",
            f"| nexus-6m training tokens/s (4 × 4×128 per AdamW step), compiled as `nexus train` "
            "runs it "
            f"| {result['train_tokens_per_s']:.0f} (eager: {result['train_tokens_per_s_eager']:.0f}"
            f"; compile {result['compile_s']:.0f} s) | |",
            f"| MFU ({result['flops_per_token_train'] / 1e6:.1f} MFLOP/token), compiled "
            f"| {100 * result['mfu']:.1f} % | ≥ 50 % |",
            f"| same-size GPT ({result['transformer_parameters']:,} params) tokens/s, compiled "
            f"| {result['transformer_tokens_per_s']:.0f} "
            f"(eager: {result['transformer_tokens_per_s_eager']:.0f}) | |",
            f"| Nexus / transformer tokens/s, compiled (eager / eager) "
            f"| {ratio(result['vs_transformer'])} ({ratio(result['vs_transformer_eager'])}) "
            "| ≥ 0.8× |",
            f"| Nexus compiled (eager) / HF Jamba training tokens/s ({hf_note}) | "
            f"{ratio(result['vs_hf_train'])} ({ratio(result['vs_hf_train_eager'])}) | ≥ 3× |",
            f"| Nexus cached generation bytes/s, greedy | {result['generate_bytes_per_s']:.0f} | |",
            f"| Nexus sampled bytes/s, the CLI's defaults (temperature 0.8) "
            f"| {result['sampled_bytes_per_s[default]']:.0f} "
            f"(top_k 40, top_p 0.95: {result['sampled_bytes_per_s[top_k 40, top_p 0.95]']:.0f}) "
            "| |",
            f"| Nexus sampled (defaults) / greedy bytes/s | {result['sampled_vs_greedy']:.2f}× "
            "| ≥ 0.9× |",
            f"| Nexus / HF Jamba generation, greedy (cache) | "
            f"{ratio(result['vs_hf_generate'])} | ≥ 10× |",
            f"| Nexus / HF Jamba generation, sampled with the same settings "
            f"(`do_sample=True`) | {ratio(result['vs_hf_sampled'])} | ≥ 10× |",
            f"| peak RSS of `nexus train` (nexus-6m) | {result['peak_rss_mb']:.0f} MB "
            "| < 2048 MB |",
        ]
    )


def write_performance_doc(text: str) -> None:
    block = f"{BEGIN}\n{text}\n{END}"
    if PERFORMANCE_DOC.exists():
        current = PERFORMANCE_DOC.read_text()
        if BEGIN in current and END in current:
            head, rest = current.split(BEGIN, 1)
            new = head + block + rest.split(END, 1)[1]
        else:
            new = current.rstrip() + "\n\n" + block + "\n"
    else:
        new = f"# Performance\n\n## Latest benchmark\n\n{block}\n"
    PERFORMANCE_DOC.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats: under 5 minutes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-write", action="store_true", help="leave docs/performance.md")
    args = parser.parse_args()
    result = run_benchmarks(args.quick)
    text = format_results(result)
    if not args.no_write:
        write_performance_doc(text)
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()
    }
    print(json.dumps(clean) if args.json else text)


if __name__ == "__main__":
    main()
