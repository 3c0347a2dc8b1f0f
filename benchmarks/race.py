"""Time to quality, side by side: a Nexus preset against an equal-size GPT on the same clock.

Run: python benchmarks/race.py [--preset P] [--config FILE] [--max_steps N] [--json]

One after the other, on this machine and Tiny Shakespeare's contiguous 90/10 split:
1. Nexus trains as `nexus train --preset P --config FILE` does (the preset's steps, schedule,
   compile and evals; a config file and `--max_steps` override them, as in `nexus train`);
2. a short learning-rate sweep gives the GPT its own best peak LR (each candidate trains
   `--sweep-minutes` and is judged by its final val loss);
3. the GPT (`benchmarks/run.py`'s: pre-norm, SDPA attention, learned positions, the MLP width
   that matches the preset's parameter count) trains for exactly the wall time the Nexus run
   took, compiled, with the same batch, warmup, optimizer (AdamW, or Muon for its blocks'
   matrices), weight decay, dropout and grad clipping, and the same schedule laid out on the
   clock instead of on steps.
Both evaluate on the same fixed val windows at the same moments, evals counted in their time.
It prints val loss against elapsed minutes for both and the ratio of their times to a target
val loss (1.50 by default). `--nexus-run DIR` races a finished run of this machine instead of
training one (say so beside the results: the two did not run back to back). A race of a
30-minute Nexus run takes about 70 minutes, 40 with --nexus-run.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from run import equal_size_gpt
from torch import Tensor

from nexus.config import TrainConfig, resolve_train_config
from nexus.data import ByteCorpus, eval_batches, resolve_dataset, train_batch
from nexus.model import NexusLM
from nexus.optim import ADAM_BETAS, Muon, MuonAdamW, Optimizer
from nexus.training import Trainer


@dataclass
class Curve:
    name: str
    parameters: int
    points: list[tuple[float, int, float]]  # (elapsed s, step, val loss)

    def time_to(self, target: float) -> float | None:
        """Elapsed seconds at the first eval whose val loss is at or below target."""
        return next((t for t, _, val in self.points if val <= target), None)

    def val_at(self, seconds: float) -> float | None:
        """The val loss of the last eval at or before `seconds`."""
        seen = [val for t, _, val in self.points if t <= seconds]
        return seen[-1] if seen else None


def nexus_curve(run_dir: Path) -> tuple[TrainConfig, Curve]:
    """A finished Nexus run's settings and the curve of its eval records."""
    saved = json.loads((run_dir / "config.json").read_text())
    config = TrainConfig.from_dict(saved["train"])
    points = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "eval":
            points.append((record["elapsed_s"], record["step"], record["val_loss"]))
    return config, Curve(f"Nexus {config.preset}", saved["parameters"], points)


def gpt_optimizer(model: torch.nn.Module, config: TrainConfig, lr: float) -> Optimizer:
    """Nexus's optimizer family for the GPT: AdamW with weight decay on the matrices, or Muon
    for the blocks' matrices and AdamW for the rest."""

    def adamw(params: list[Tensor]) -> torch.optim.AdamW:
        groups = [
            {"params": [p for p in params if p.ndim == 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.ndim != 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, fused=True)

    named = list(model.named_parameters())
    if config.optimizer == "adamw":
        return adamw([p for _, p in named])
    hidden = [p for n, p in named if n.startswith("blocks.") and p.ndim == 2]
    rest = [p for n, p in named if not (n.startswith("blocks.") and p.ndim == 2)]
    return MuonAdamW(Muon(hidden, lr=lr, weight_decay=config.weight_decay), adamw(rest))


class GPTRun:
    """The GPT's training loop: Nexus's batches and optimizer settings, the LR laid out on
    time."""

    def __init__(self, config: TrainConfig, corpus: ByteCorpus, lr: float) -> None:
        torch.manual_seed(config.seed)
        target = NexusLM(config.model_config()).num_parameters()
        seq_len = config.model_config().seq_len
        self.model = equal_size_gpt(target, max_len=seq_len, dropout=config.dropout)
        self.config, self.corpus, self.peak_lr = config, corpus, lr
        self.optimizer = gpt_optimizer(self.model, config, lr)
        self.loss = torch.compile(self._loss, dynamic=False)
        # The val windows Nexus's run evaluates on, and as many train windows: a Nexus eval
        # measures both, so the GPT spends the same time on its evals.
        self.val, self.train_windows = (
            eval_batches(
                split,
                seed=seed,
                n_batches=config.eval_batches,
                batch_size=config.eval_batch_size,
                seq_len=seq_len,
            )
            for split, seed in ((corpus.val, config.seed), (corpus.train, config.seed + 1))
        )

    def _loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        logits = self.model(inputs)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def lr_at(self, step: int, elapsed: float, budget: float) -> float:
        """Nexus's schedule with the budget's seconds in place of steps: a linear warmup over
        the preset's warmup steps, then cosine to min_lr at the budget's end, or (wsd) the peak
        held, then linear to min_lr over the last cooldown_fraction of the seconds."""
        config = self.config
        if step <= config.warmup_steps:
            return self.peak_lr * step / config.warmup_steps
        floor, left = config.min_lr, max(0.0, 1.0 - elapsed / budget)
        if config.schedule == "wsd":
            return floor + (self.peak_lr - floor) * min(1.0, left / config.cooldown_fraction)
        return floor + 0.5 * (self.peak_lr - floor) * (1 + math.cos(math.pi * (1 - left)))

    def evaluate(self) -> float:
        """The val loss; the train windows are measured too (and dropped) to cost what a Nexus
        eval costs."""
        self.model.eval()
        with torch.no_grad():
            losses = [
                [self.loss(inputs, targets).item() for inputs, targets in batches]
                for batches in (self.val, self.train_windows)
            ]
        self.model.train()
        return sum(losses[0]) / len(losses[0])

    def run(self, budget: float, eval_times: list[float]) -> Curve:
        """Train until `budget` seconds have passed, evaluating at the first step boundary
        after each of `eval_times` and at the end."""
        config, seq_len = self.config, self.config.model_config().seq_len
        pending = sorted(t for t in eval_times if t < budget)
        points: list[tuple[float, int, float]] = []
        start = time.perf_counter()
        step = 0
        while (elapsed := time.perf_counter() - start) < budget:
            step += 1
            lr = self.lr_at(step, elapsed, budget)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            for micro_step in range(config.grad_accum):
                inputs, targets = train_batch(
                    self.corpus,
                    seed=config.seed,
                    step=step,
                    micro_step=micro_step,
                    batch_size=config.micro_batch,
                    seq_len=seq_len,
                )
                (self.loss(inputs, targets) / config.grad_accum).backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            self.optimizer.step()
            if pending and time.perf_counter() - start >= pending[0]:
                while pending and time.perf_counter() - start >= pending[0]:
                    pending.pop(0)
                points.append((time.perf_counter() - start, step, self.evaluate()))
        points.append((time.perf_counter() - start, step, self.evaluate()))
        parameters = sum(p.numel() for p in self.model.parameters())
        return Curve(f"GPT (lr {self.peak_lr:g})", parameters, points)


def sweep(config: TrainConfig, corpus: ByteCorpus, lrs: list[float], seconds: float) -> float:
    """The peak LR whose short run ends at the lowest val loss."""
    finals = {}
    for lr in lrs:
        curve = GPTRun(config, corpus, lr).run(seconds, [])
        finals[lr] = curve.points[-1][2]
        print(f"  GPT sweep: lr {lr:g} -> val {finals[lr]:.4f} after {seconds / 60:.1f} min")
    return min(finals, key=finals.__getitem__)


def table(nexus: Curve, gpt: Curve, target: float) -> str:
    """Val loss at each eval, side by side: the GPT evaluates at the first step after each of
    Nexus's evals, so its minutes are a few seconds later."""
    rows = [
        f"| minutes | {nexus.name} val | minutes | {gpt.name} val |",
        "|---|---|---|---|",
    ]
    for (t, _, val), (t_other, _, other) in zip(nexus.points, gpt.points, strict=False):
        rows.append(f"| {t / 60:.1f} | {val:.4f} | {t_other / 60:.1f} | {other:.4f} |")
    t_gpt, t_nexus = gpt.time_to(target), nexus.time_to(target)
    lines = ["", *rows, ""]
    for curve, t in ((nexus, t_nexus), (gpt, t_gpt)):
        reached = "not reached" if t is None else f"reached at {t / 60:.1f} min"
        best = min(val for _, _, val in curve.points)
        lines.append(
            f"{curve.name}: {curve.parameters:,} parameters, {curve.points[-1][1]:,} steps, "
            f"best val {best:.4f}; val {target}: {reached}"
        )
    if t_nexus is not None:
        if t_gpt is not None:
            lines.append(f"GPT time / Nexus time to val {target}: {t_gpt / t_nexus:.2f}")
        else:
            budget = gpt.points[-1][0]
            lines.append(f"GPT time / Nexus time to val {target}: > {budget / t_nexus:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="default: nexus-6m-fast, or the config file's")
    parser.add_argument("--config", help="TOML or YAML settings, as nexus train --config")
    parser.add_argument("--max_steps", type=int, help="the Nexus run's length")
    parser.add_argument(
        "--nexus-run", help="a finished run directory of this machine to race instead of training"
    )
    parser.add_argument("--gpt-lrs", default="3e-4,6e-4,1.2e-3", help="the GPT's sweep")
    parser.add_argument("--sweep-minutes", type=float, default=3.0)
    parser.add_argument("--target", type=float, default=1.50, help="val loss to time")
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    args = parser.parse_args()

    torch.set_flush_denormal(True)
    data = resolve_dataset(None)
    if args.nexus_run:
        config, nexus = nexus_curve(Path(args.nexus_run))
        print(f"Nexus {config.preset}: the finished run in {args.nexus_run}")
    else:
        flags = {"data": str(data), "tensorboard": False}
        if args.preset or not args.config:
            flags["preset"] = args.preset or "nexus-6m-fast"
        if args.max_steps:
            flags["max_steps"] = args.max_steps
        with tempfile.TemporaryDirectory() as out:
            config = resolve_train_config(args.config, {**flags, "out_dir": out})
            print(f"Nexus {config.preset}: training ({config.max_steps} steps)")
            Trainer(config, progress=False).run()
            config, nexus = nexus_curve(Path(out))
    budget = nexus.points[-1][0]
    corpus = ByteCorpus.from_file(resolve_dataset(config.data), config.model_config().seq_len)
    lrs = [float(x) for x in args.gpt_lrs.split(",")]
    best_lr = sweep(config, corpus, lrs, args.sweep_minutes * 60)
    print(f"GPT: training at lr {best_lr:g} for {budget / 60:.1f} min, Nexus's wall time")
    gpt = GPTRun(config, corpus, best_lr).run(budget, [t for t, _, _ in nexus.points])
    print(table(nexus, gpt, args.target))
    if args.json:
        print(json.dumps({c.name: c.points for c in (nexus, gpt)}))


if __name__ == "__main__":
    main()
