"""The training loop: eval → checkpoint → forward/backward with accumulation → clip → step → log,
with resume that reproduces the uninterrupted run exactly on CPU."""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor

from nexus import __version__
from nexus.checkpoint import (
    WEIGHTS_ONLY,
    Checkpoint,
    checkpoint_meta,
    load_checkpoint,
    model_from_checkpoint,
    model_state_for_saving,
    read_header,
    read_meta,
    save_checkpoint,
    weights_only_payload,
)
from nexus.config import ModelConfig, TrainConfig
from nexus.data import (
    ByteCorpus,
    FileBytes,
    dataset_name,
    eval_batches,
    resolve_dataset,
    train_batch,
    whole_file,
)
from nexus.distributed import SINGLE_PROCESS, DistContext
from nexus.errors import NexusError, TrainingInterrupted
from nexus.generation import generate
from nexus.model import NexusLM
from nexus.optim import build_optimizer, optimizer_tensors, restore_optimizer
from nexus.rundir import STOP_KIND, RunDir, atomic_write
from nexus.schedule import ScheduleHistory, lr_at
from nexus.sources import SourceSpec, is_plain_file
from nexus.store import prepare
from nexus.tensorboard import TensorBoardLog
from nexus.verdict import Verdict, decide, format_log

if TYPE_CHECKING:
    from nexus.forecast import Forecast

SAMPLE_TEMPERATURE = 0.8
# compile = "auto" compiles the training forward/backward of runs of at least this many
# micro-steps: compiling nexus-6m costs ~60 s cold (~10 s from the cache) and saves 15-35 ms
# per micro-step on 2 cores, so it pays from a few thousand micro-steps.
COMPILE_MIN_MICRO_STEPS = 4000


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise NexusError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate_loss(
    model: NexusLM, batches: list[tuple[Tensor, Tensor]], device: torch.device
) -> float:
    """Mean cross-entropy (nats per byte) over fixed batches."""
    was_training = model.training
    model.eval()
    total = 0.0
    for inputs, targets in batches:
        total += next_byte_loss(model, inputs.to(device), targets.to(device)).item()
    model.train(was_training)
    return total / len(batches)


def next_byte_loss(model: NexusLM, inputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of the model's next-byte logits (computed in fp32) against the targets."""
    with autocast(inputs.device):
        logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def use_compile(config: TrainConfig, model_config: ModelConfig) -> bool:
    """Whether to train through torch.compile: `compile = "on"`, or "auto" for a dense model
    whose run is long enough to earn back the compile time (an MoE model's data-dependent
    routing would split the graph). Decided by the whole run, not the steps left, so a resumed
    run computes exactly what the uninterrupted one did."""
    if config.compile == "auto":
        micro_steps = config.max_steps * config.grad_accum
        return not model_config.moe_layers and micro_steps >= COMPILE_MIN_MICRO_STEPS
    return config.compile == "on"


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """torch.use_deterministic_algorithms(True) inside the block when enabled. Compiled CPU
    kernels otherwise sum some gradients (the embedding's) with atomic adds in a varying order,
    and a resumed run would drift from the uninterrupted one by float rounding."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled or before)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def autocast(device: torch.device) -> torch.autocast:
    # bf16 only on CUDA: on this kind of CPU bf16 matrix products are hundreds of times slower.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class StopRequests:
    """SIGINT/SIGTERM set a flag so the loop can finish its step and save; a second Ctrl-C
    abandons the step at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _quiet(message: str) -> None:
    """The log of a rank other than 0: silent."""


def safe_exp(value: float) -> float:
    return math.exp(value) if value < 700 else math.inf


@dataclass
class RunState:
    step: int = 0
    best_val_loss: float = math.inf
    best_step: int | None = None
    elapsed_s: float = 0.0


class Trainer:
    """One run in one out_dir. `run()` trains from the current step to max_steps.

    With `dist` (a torchrun process group), each rank runs its share of the micro-batches of
    every step and the gradients are summed across ranks; only rank 0 logs, evaluates, samples
    and writes files, while the others wait for it at a barrier."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: str | Path | bool = False,
        force: bool = False,
        branch: bool = False,
        log: TextIO | None = None,
        progress: bool | None = None,
        dist: DistContext = SINGLE_PROCESS,
    ) -> None:
        dist.check_grad_accum(config.grad_accum)
        self.config = config
        self.dist = dist
        self.out_dir = Path(config.out_dir)
        self.run_dir = RunDir(self.out_dir)
        self.log_stream = log or sys.stdout
        self.show_progress = dist.is_main and (
            sys.stderr.isatty() if progress is None else progress
        )
        self.bar: Any = None
        self.tensorboard: TensorBoardLog | None = None
        # Made at each eval on rank 0 from the records so far; the report reuses the forecast.
        self.forecast: Forecast | None = None
        self.verdict: Verdict | None = None
        self.device = pick_device(config.device)
        if dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", dist.local_rank)
        self.model_config = config.model_config()
        # The data is checked first, so a mistake there never costs a run that --force clears.
        data_path = resolve_dataset(config.data)
        self.sources: dict[str, Any] | None = None  # what a prepared store was made of
        seq_len, name = self.model_config.seq_len, dataset_name(data_path)
        if config.val_data:
            train, _ = self._source(data_path)
            val, _ = self._source(Path(config.val_data).expanduser())
            self.corpus = ByteCorpus.from_parts(train, val, seq_len, name, data_path)
        elif data_path.exists() and not is_plain_file(data_path):
            _, store_file = self._source(data_path)
            self.corpus = ByteCorpus.from_store(store_file, seq_len, name=name)
        else:
            self.corpus = ByteCorpus.from_file(data_path, seq_len, name=name)
        self.branch: dict[str, Any] | None = None  # set when this resume starts a branch
        resume_from = self._prepare_out_dir(resume, force, branch)
        # Built on the CPU from the seed, so every rank starts from the same weights.
        torch.manual_seed(config.seed)
        self.model = NexusLM(self.model_config, config.dropout).to(self.device)
        self.optimizer = build_optimizer(self.model, config)
        self.state = RunState()
        seq_len = self.model_config.seq_len
        self.val_batches = eval_batches(
            self.corpus.val,
            seed=config.seed,
            n_batches=config.eval_batches,
            batch_size=config.eval_batch_size,
            seq_len=seq_len,
        )
        self.train_eval_batches = eval_batches(
            self.corpus.train,
            seed=config.seed + 1,
            n_batches=config.eval_batches,
            batch_size=config.eval_batch_size,
            seq_len=seq_len,
        )
        # A fine-tune's parent: its weights start a fresh run; a resumed one has them already.
        self.parent: dict[str, Any] | None = None
        if config.init_from and resume_from is None:
            self._start_from_parent(config.init_from)
        if resume_from is not None:
            self._restore(resume_from)
        if dist.is_main:
            self._write_run_config()
        dist.barrier()

    # --- set-up -------------------------------------------------------------------------

    def _prepare_out_dir(
        self, resume: str | Path | bool, force: bool, branch: bool = False
    ) -> Path | None:
        run_dir = self.run_dir
        if run_dir.path.exists() and not run_dir.path.is_dir():
            raise NexusError(f"--out_dir {str(run_dir.path)!r} is a file; pass a directory")
        has_run = run_dir.holds_run()
        resume_from: Path | None = None
        step = None  # of the checkpoint --resume PATH names
        if resume is True:
            resume_from = run_dir.latest_checkpoint()
            if resume_from is None and not run_dir.config_file.is_file():
                raise NexusError(
                    f"nothing to resume: {str(run_dir.path)!r} holds no run (no step_<N>.bin "
                    "checkpoint); start without --resume, or pass the run's --out_dir"
                )
            # else: a run stopped before its first checkpoint; it starts again from step 0
        elif resume:
            resume_from = Path(resume)
            if not resume_from.is_file():
                raise NexusError(f"--resume {str(resume_from)!r}: no such checkpoint file")
            meta = read_meta(resume_from)
            if meta.get(WEIGHTS_ONLY):
                raise NexusError(
                    f"--resume {str(resume_from)!r} holds the weights only (best.bin keeps no "
                    "optimizer state), so no run continues exactly from it; resume from a "
                    "step_<N>.bin"
                )
            step = meta["step"]
            later = [s for s in run_dir.checkpoint_steps() if s > step]
            if later and not branch:
                raise NexusError(
                    f"--resume {str(resume_from)!r} is step {step}, but {str(run_dir.path)!r} "
                    f"holds later checkpoints (steps {', '.join(map(str, later))}); pass --branch "
                    "to continue from it and move them into an abandoned-<time>/ folder, or "
                    "resume into a new --out_dir"
                )
        elif has_run and not force:
            raise NexusError(
                f"{str(run_dir.path)!r} already holds a run; pass --resume to continue it, "
                "--force to start over (its checkpoints are deleted), or choose another --out_dir"
            )
        self.dist.barrier()  # every rank has looked at the directory before rank 0 changes it
        if self.dist.is_main:
            run_dir.make_writable()
            if has_run and force and not resume:
                run_dir.clear()
            run_dir.remove_stale_temp_files()
            if branch and step is not None:
                self._branch_from(step)
            if resume is True and resume_from is None:
                self._truncate_metrics(after=0)
                self._log(f"no checkpoint in {run_dir.path} yet: the run starts again from step 0")
        self.dist.barrier()
        return resume_from

    def _source(self, path: Path) -> tuple[torch.Tensor | FileBytes, Path]:
        """A data source's bytes: a plain file in memory, anything else from its prepared store
        (whose summary goes into config.json), with the file they come from."""
        if path.exists() and not is_plain_file(path):
            config = self.config
            spec = SourceSpec(path, config.text_field, config.include, config.exclude)
            if self.dist.is_main:  # one process prepares; the others then find its store
                store = prepare(spec, config.doc_separator, log=self._log)
            self.dist.barrier()
            if not self.dist.is_main:
                store = prepare(spec, config.doc_separator, log=_quiet)
            self.sources = self.sources or store.summary
            size = store.data_file.stat().st_size
            return FileBytes(store.data_file, 0, size), store.data_file
        return whole_file(path), path

    def _start_from_parent(self, source: str) -> None:
        from nexus.finetune import read_parent  # the Hugging Face reader loads only here

        parent = read_parent(source)
        weights = parent.load_model().state_dict()
        self.model.load_state_dict(weights)
        self.parent = parent.to_dict()
        step = f" step {parent.step}" if parent.step is not None else ""
        self._log(f"weights from {parent.path}{step} (sha256 {parent.checksum[:12]}…)")

    def _branch_from(self, step: int) -> None:
        """Start a branch at `step`: the run's later checkpoints and records move into an
        abandoned-<time>/ folder, and config.json notes the branch."""
        try:
            best_step = int(read_header(self.run_dir.best_file)["step"])
        except (NexusError, KeyError, ValueError):
            best_step = None
        folder, moved = self.run_dir.abandon_after(step, best_is_later=(best_step or 0) > step)
        self.branch = {
            "from_step": step,
            "abandoned": folder.name,
            "abandoned_checkpoints": moved,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        later = f"steps {', '.join(map(str, moved))}" if moved else "no checkpoints"
        self._log(f"branch at step {step}: {later} and their records moved to {folder}")

    def _restore(self, path: Path) -> None:
        checkpoint = load_checkpoint(path)
        self.model = model_from_checkpoint(
            checkpoint, self.device, expected=self.model_config, dropout=self.config.dropout
        )
        self.optimizer = build_optimizer(self.model, self.config)
        restore_optimizer(
            self.optimizer, checkpoint.optimizer_tensors, checkpoint.meta["optimizer_param_groups"]
        )
        if checkpoint.rng_state is not None:
            torch.set_rng_state(checkpoint.rng_state)
        meta = checkpoint.meta
        best = meta.get("best_val_loss")
        self.state = RunState(
            step=checkpoint.step,
            best_val_loss=math.inf if best is None else float(best),
            best_step=meta.get("best_step"),
            elapsed_s=float(meta.get("elapsed_s", 0.0)),
        )
        if self.dist.is_main:
            self._truncate_metrics(after=checkpoint.step)
            self._repair_best(path, checkpoint)
        self._log(f"resumed from {path} at step {checkpoint.step}")

    def _repair_best(self, path: Path, checkpoint: Checkpoint) -> None:
        """best.bin must hold the best step the resumed checkpoint knows of. A stop between
        writing step_<N>.bin and best.bin leaves it one best behind, and a branch may have moved
        it away with the abandoned steps: copy it from step_<best>.bin where that is on disk."""
        best_step = checkpoint.meta.get("best_step")
        if not isinstance(best_step, int) or path.resolve().parent != self.out_dir.resolve():
            return
        source = path if best_step == checkpoint.step else self.run_dir.checkpoint(best_step)
        best = self.run_dir.best_file
        try:
            current = read_header(best).get("step") if best.is_file() else None
        except NexusError:
            current = None
        if current != str(best_step) and source.is_file():
            saved = checkpoint if source == path else load_checkpoint(source)
            self._write_bytes(best, weights_only_payload(saved.model_state, saved.meta))
            self._log(f"{best} brought up to date from {source.name}")

    def _truncate_metrics(self, after: int) -> None:
        """Drop records of steps the resumed run will redo, so each step appears once."""
        try:
            self.run_dir.truncate_metrics(after)
        except OSError as error:
            raise NexusError(
                f"could not write {self.run_dir.metrics_file} ({error.strerror or error}); the "
                "previous version is intact. Free disk space or fix permissions, then resume"
            ) from None

    def _write_run_config(self) -> None:
        record = {
            "train": self.config.to_dict(),
            "model": self.model_config.to_dict(),
            "parameters": self.model.num_parameters(),
            "dataset": {
                "name": self.corpus.name,
                "path": str(self.corpus.path),
                "bytes": self.corpus.size_bytes,
                "train_bytes": len(self.corpus.train),
                "val_bytes": len(self.corpus.val),
                **({"sources": self.sources} if self.sources else {}),
                **({"val_data": self.config.val_data} if self.config.val_data else {}),
            },
            "nexus_version": __version__,
        }
        earlier = self._earlier_config()
        previous = earlier.get("branches")
        branches = (previous if isinstance(previous, list) else []) + (
            [self.branch] if self.branch else []
        )
        if branches:
            record["branches"] = branches
        history = self._schedule_history(earlier)
        if len(history.stretches) > 1:
            record["schedule_history"] = history.to_records()
        self.parent = self.parent or earlier.get("parent")
        if self.parent:
            record["parent"] = self.parent
        self._write_bytes(self.run_dir.config_file, json.dumps(record, indent=2).encode())
        self._log("config: " + json.dumps(self.config.to_dict(), sort_keys=True))

    def _earlier_config(self) -> dict[str, Any]:
        """config.json as the run left it, when this run continues one (else empty)."""
        if self.state.step == 0 and self.branch is None:
            return {}
        try:
            return self.run_dir.read_config()
        except NexusError:
            return {}

    def _schedule_history(self, earlier: dict[str, Any]) -> ScheduleHistory:
        """The schedule each step ran with: the earlier stretches up to the resumed step, then
        the current settings (a new stretch only if they change the LR)."""
        if not earlier:
            return ScheduleHistory.of(self.config)
        try:
            before = TrainConfig.from_dict(earlier["train"])
        except (KeyError, TypeError, NexusError):
            return ScheduleHistory.of(self.config)
        history = ScheduleHistory.of(before, earlier.get("schedule_history"))
        return history.continued(self.state.step + 1, self.config)

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to max_steps, or to an early stop under `early_stop`; returns the last eval
        record, with "stopped_early" (the reason) added when the run stopped early."""
        config = self.config
        torch.set_flush_denormal(True)  # decays underflow to subnormals, 10x slower on x86
        self.model.train()
        last_eval: dict[str, Any] = {}
        start = time.perf_counter()
        elapsed_before = self.state.elapsed_s
        window_start, window_tokens = time.perf_counter(), 0
        bad_steps_in_a_row = 0
        compiled = use_compile(config, self.model_config)
        self.loss_fn = next_byte_loss
        if compiled:
            self._log("compiling the training step (~1 min the first time; --compile off skips it)")
            self.loss_fn = torch.compile(next_byte_loss, dynamic=False)
        self.bar = bar = self._progress_bar()
        with (
            StopRequests() as stop,
            self._tensorboard_events(),
            deterministic_algorithms(compiled and self.device.type == "cpu"),
        ):
            if self.parent and self.state.step == 0 and self.dist.is_main:
                # Where the fine-tune starts: on the parent's own data, the parent's eval.
                last_eval = self._evaluate(0, 0.0)
            for step in range(self.state.step + 1, config.max_steps + 1):
                loss, aux_loss, grad_norm, lr = self._train_step(step)
                self.state.step = step
                self.state.elapsed_s = elapsed_before + time.perf_counter() - start
                window_tokens += config.tokens_per_step
                finite = math.isfinite(loss) and math.isfinite(grad_norm)
                bad_steps_in_a_row = 0 if finite else bad_steps_in_a_row + 1
                if not finite:
                    self._skipped_step(step, loss, grad_norm, bad_steps_in_a_row)
                if step % config.log_interval == 0 or step == config.max_steps:
                    tokens_per_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                    window_start, window_tokens = time.perf_counter(), 0
                    record = {
                        "kind": "train",
                        "step": step,
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": tokens_per_s,
                        "elapsed_s": self.state.elapsed_s,
                    }
                    if aux_loss is not None:
                        record["aux_loss"] = aux_loss
                    if self.dist.is_main:
                        self._append_metrics(record)
                        self._show_train(bar, record)
                if step % config.eval_interval == 0 or step == config.max_steps:
                    if self.dist.is_main:
                        last_eval = self._evaluate(step, lr)
                        self._checkpoint(step, last_eval)
                    self.dist.barrier()
                    # Rank 0 decides; the all-reduce tells the other ranks, so all stop together.
                    stops = self.verdict is not None and self.verdict.action == "stop"
                    if config.early_stop and self.dist.any(stops, self.device):
                        last_eval = self._stop_early(step, last_eval)
                        break
                # Every rank stops after the same step (torchrun signals them all, not at once).
                if self.dist.any(stop.requested, self.device):
                    self._stop_cleanly(step, stop.signal_name or "SIGTERM")
        if bar is not None:
            bar.close()
            self.bar = None
        return last_eval

    def _skipped_step(self, step: int, loss: float, grad_norm: float, in_a_row: int) -> None:
        self._log(
            f"step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
            f"update skipped ({in_a_row} in a row)"
        )
        if in_a_row >= self.config.max_bad_steps:
            latest = self.run_dir.latest_checkpoint()
            last_good = latest.name if latest is not None else "no checkpoint yet"
            raise NexusError(
                f"training diverged: {in_a_row} steps in a row had non-finite loss or "
                f"gradients (last good checkpoint: {last_good}); lower --lr or check the data, "
                "then resume or start over"
            )

    def _stop_cleanly(self, step: int, signal_name: str) -> None:
        if self.dist.is_main and not self.run_dir.checkpoint(step).exists():
            self._save(self.run_dir.checkpoint(step), self._last_eval_record())
        self.dist.barrier()  # no rank exits (and has torchrun end the others) before the save
        raise TrainingInterrupted(
            f"{signal_name} received: stopped after step {step} and saved "
            f"{self.run_dir.checkpoint(step)}; continue with "
            f"`nexus train --resume --out_dir {self.out_dir}`"
        )

    def _last_eval_record(self) -> dict[str, Any]:
        records, _ = self.run_dir.read_metrics()
        evals = [r for r in records if r.get("kind") == "eval"]
        return evals[-1] if evals else {}

    def _train_step(self, step: int) -> tuple[float, float | None, float, float]:
        """One optimizer step: (cross-entropy, MoE load-balancing loss or None, gradient norm,
        lr). The gradient is of cross-entropy + router_aux_loss_coef · load-balancing loss."""
        config = self.config
        lr = lr_at(step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        has_moe = self.model.has_moe
        total_loss = total_aux_loss = 0.0
        for micro_step in self.dist.micro_steps(config.grad_accum):
            inputs, targets = train_batch(
                self.corpus,
                seed=config.seed,
                step=step,
                micro_step=micro_step,
                batch_size=config.micro_batch,
                seq_len=self.model_config.seq_len,
            )
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            loss = self._loss(inputs, targets)
            objective = loss
            if has_moe:
                aux_loss = self.model.aux_loss()
                objective = loss + self.model_config.router_aux_loss_coef * aux_loss
                total_aux_loss += aux_loss.item()
            (objective / config.grad_accum).backward()
            total_loss += loss.item()
        total_loss = self.dist.sum(total_loss, self.device)
        mean_aux_loss = (
            self.dist.sum(total_aux_loss, self.device) / config.grad_accum if has_moe else None
        )
        self.dist.sum_gradients(self.model)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip))
        if math.isfinite(total_loss) and math.isfinite(grad_norm):
            self.optimizer.step()  # a non-finite step would poison the weights: skip it
        return total_loss / config.grad_accum, mean_aux_loss, grad_norm, lr

    def _loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        try:
            return self.loss_fn(self.model, inputs, targets)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            if self.loss_fn is next_byte_loss:
                raise
            # No C++ compiler, say: the first call compiles, before any gradient exists.
            reason = str(error).strip().splitlines()[0]
            self._log(f"torch.compile failed ({reason}); training eagerly instead")
            self.loss_fn = next_byte_loss
            return self.loss_fn(self.model, inputs, targets)

    def _evaluate(self, step: int, lr: float) -> dict[str, Any]:
        config = self.config
        train_loss = evaluate_loss(self.model, self.train_eval_batches, self.device)
        val_loss = evaluate_loss(self.model, self.val_batches, self.device)
        prompt = config.sample_prompt.encode()
        continuation = generate(
            self.model,
            prompt,
            config.sample_bytes,
            temperature=SAMPLE_TEMPERATURE,
            seed=config.seed,
        )
        record = {
            "kind": "eval",
            "step": step,
            "train_loss": train_loss,
            "train_ppl": safe_exp(train_loss),
            "val_loss": val_loss,
            "val_ppl": safe_exp(val_loss),
            "lr": lr,
            "sample": (prompt + continuation).decode("utf-8", errors="replace"),
            "elapsed_s": self.state.elapsed_s,
            "tokens_seen": step * config.tokens_per_step,
        }
        self._append_metrics(record)
        self.verdict = self._decide()
        verdict = f"\n  {format_log(self.verdict)}" if self.verdict is not None else ""
        self._log(
            f"step {step}: train loss {train_loss:.4f} (ppl {record['train_ppl']:.2f}), "
            f"val loss {val_loss:.4f} (ppl {record['val_ppl']:.2f}), lr {lr:.3e}\n"
            f"  sample: {record['sample'][:120]!r}{verdict}"
        )
        return record

    def _decide(self) -> Verdict | None:
        """The keep-or-stop verdict on the records so far. Like the report it is a by-product:
        when it fails the run goes on (and cannot stop early) with a warning."""
        self.forecast = None
        try:
            from nexus.report import FORECAST_FAILED, forecast_or_failure, load_run

            run = load_run(self.out_dir)
            self.forecast = forecast_or_failure(run)
            if self.forecast.status == FORECAST_FAILED:
                self._log(f"warning: {self.forecast.message}; the verdict goes on without it")
            return decide(run, self.forecast)
        except Exception as error:
            self._log(f"warning: no keep-or-stop verdict ({type(error).__name__}: {error})")
            return None

    def _stop_early(self, step: int, eval_record: dict[str, Any]) -> dict[str, Any]:
        """End the run at this eval as the verdict says: save the step (unless the eval's
        checkpoint already did), record and log why, rewrite the report."""
        reason = self.verdict.reason if self.verdict is not None else "rank 0 decided (see its log)"
        path = self.run_dir.checkpoint(step)
        if self.dist.is_main:
            if not path.exists():
                self._save(path, eval_record)
            self._append_metrics({"kind": STOP_KIND, "step": step, "reason": reason})
            self._log(f"early stop after step {step}: {reason}; saved {path}")
            self._write_report()
        self.dist.barrier()
        return {**eval_record, "stopped_early": reason}

    def _checkpoint(self, step: int, eval_record: dict[str, Any]) -> None:
        is_best = math.isfinite(eval_record["val_loss"]) and (
            eval_record["val_loss"] < self.state.best_val_loss
        )
        if is_best:
            self.state.best_val_loss, self.state.best_step = eval_record["val_loss"], step
        if step % self.config.checkpoint_interval == 0 or step == self.config.max_steps:
            self._save(self.run_dir.checkpoint(step), eval_record)
            self._drop_old_checkpoints()
        if is_best:
            weights = model_state_for_saving(self.model)
            payload = weights_only_payload(weights, self._meta(eval_record))
            self._write_bytes(self.run_dir.best_file, payload)
        self._write_report()

    def _drop_old_checkpoints(self) -> None:
        """Keep the keep_last newest step_<N>.bin files (0: all); the newest, which a resume
        needs, is always among them."""
        keep = self.config.keep_last
        if keep > 0:
            for step in self.run_dir.checkpoint_steps()[:-keep]:
                self.run_dir.checkpoint(step).unlink(missing_ok=True)

    def _save(self, path: Path, eval_record: dict[str, Any]) -> None:
        try:
            save_checkpoint(
                path,
                model_state_for_saving(self.model),
                optimizer_tensors(self.optimizer),
                self._meta(eval_record),
                rng_state=torch.get_rng_state(),
            )
        except OSError as error:
            raise NexusError(
                f"could not write {path} ({error.strerror or error}); earlier checkpoints are "
                f"intact. Free disk space or fix permissions, then `nexus train --resume "
                f"--out_dir {self.out_dir}`"
            ) from None

    def _meta(self, eval_record: dict[str, Any]) -> dict[str, Any]:
        return checkpoint_meta(
            step=self.state.step,
            train_config=self.config,
            model_config=self.model_config,
            optimizer_param_groups=self.optimizer.state_dict()["param_groups"],
            metrics=eval_record,
            best_val_loss=self.state.best_val_loss,
            best_step=self.state.best_step,
            elapsed_s=self.state.elapsed_s,
            **({"parent": self.parent} if self.parent else {}),
        )

    # --- records and output -------------------------------------------------------------

    def _write_bytes(self, path: Path, payload: bytes) -> None:
        try:
            atomic_write(path, payload)
        except OSError as error:
            raise NexusError(
                f"could not write {path} ({error.strerror or error}); the previous version is "
                "intact. Free disk space or fix permissions, then resume"
            ) from None

    def _append_metrics(self, record: dict[str, Any]) -> None:
        try:
            self.run_dir.append_metrics(record)
        except OSError as error:
            raise NexusError(
                f"could not append to {self.run_dir.metrics_file} ({error.strerror or error}); "
                "free disk space, then `nexus train --resume`"
            ) from None
        self._to_tensorboard(lambda log: log.add(record))

    @contextmanager
    def _tensorboard_events(self) -> Iterator[None]:
        """TensorBoard event files on rank 0 while the loop runs, closed (so flushed) however
        it ends: at max_steps, on a stop signal or on an error."""
        if self.dist.is_main and self.config.tensorboard:
            try:
                self.tensorboard = TensorBoardLog.open(self.out_dir, self.state.step + 1)
                if self.tensorboard is None:
                    self._log(
                        "TensorBoard logging is off: the tensorboard package is not installed "
                        "(`pip install tensorboard` turns it on)"
                    )
            except Exception as error:  # e.g. a tensorboard whose protobuf does not fit
                self._log(f"warning: TensorBoard logging is off ({type(error).__name__}: {error})")
        try:
            yield
        finally:
            self._to_tensorboard(TensorBoardLog.close)
            self.tensorboard = None

    def _to_tensorboard(self, action: Callable[[TensorBoardLog], None]) -> None:
        # The event files are a view of metrics.jsonl: a failure there stops them, not the run.
        log = self.tensorboard
        if log is None:
            return
        try:
            action(log)
        except Exception as error:
            self.tensorboard = None
            self._log(f"warning: TensorBoard logging stopped ({type(error).__name__}: {error})")

    def _write_report(self) -> None:
        # The report is a by-product: a failure there must not end an hour of training.
        try:
            from nexus.report import write_report

            write_report(self.out_dir, forecast=self.forecast)
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            self._log(f"warning: TRAINING_PROGRESS.md not updated ({reason})")

    def _progress_bar(self) -> Any:
        if not self.show_progress:
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.config.max_steps, initial=self.state.step, unit="step", dynamic_ncols=True
        )

    def _show_train(self, bar: Any, record: dict[str, Any]) -> None:
        if bar is not None:
            bar.update(record["step"] - bar.n)
            aux = {"aux": f"{record['aux_loss']:.4f}"} if "aux_loss" in record else {}
            bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                **aux,
                lr=f"{record['lr']:.2e}",
                tok_s=f"{record['tokens_per_s']:.0f}",
            )
            return
        remaining = self.config.max_steps - record["step"]
        eta_s = remaining * self.config.tokens_per_step / max(record["tokens_per_s"], 1e-9)
        aux = f"aux_loss {record['aux_loss']:.4f} " if "aux_loss" in record else ""
        self._log(
            f"step {record['step']}/{self.config.max_steps} loss {record['loss']:.4f} {aux}"
            f"lr {record['lr']:.2e} grad_norm {record['grad_norm']:.3f} "
            f"{record['tokens_per_s']:.0f} tok/s eta {eta_s / 60:.1f} min"
        )

    def _log(self, message: str) -> None:
        if not self.dist.is_main:
            return
        if self.bar is not None:
            self.bar.write(message, file=self.log_stream)
        else:
            print(message, file=self.log_stream, flush=True)


def train(
    config: TrainConfig,
    *,
    resume: str | Path | bool = False,
    force: bool = False,
    branch: bool = False,
) -> dict[str, Any]:
    """Train a run as configured; returns the last eval record (see Trainer.run)."""
    return Trainer(config, resume=resume, force=force, branch=branch).run()
