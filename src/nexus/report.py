"""TRAINING_PROGRESS.md: reading a run directory's records (config.json, metrics.jsonl, the
checkpoint files) and rendering them, with the forecast, as the progress page; and the backtest
of the forecast on a run. Every number, verdict and sentence comes from the records."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nexus.config import ModelConfig, TrainConfig
from nexus.errors import NexusError
from nexus.forecast import (
    MEASURED_COVERAGE,
    PERCENT,
    Backtest,
    Forecast,
    Schedule,
    forecast_val_loss,
)
from nexus.forecast import backtest as backtest_records
from nexus.forecast import format_backtest as format_backtest
from nexus.rundir import BEST_FILE, STOP_KIND, RunDir, atomic_write
from nexus.schedule import ScheduleHistory
from nexus.verdict import decide, format_duration, report_lines

# Over-fitting verdict when val loss still falls: a gap above this that has also grown by more
# than GAP_GROWTH_NATS since the first eval. A steady gap is the train/val split's own difference.
GAP_NATS = 0.10
GAP_GROWTH_NATS = 0.05
FINAL_ANNEALING = 0.25  # the last quarter of the LR's way down from the peak to the floor
CHART_HEIGHT = 10
CHART_MAX_COLUMNS = 20
SAMPLE_CHARS = 80
SAMPLES_SHOWN = 5
WORD_SAMPLE_BYTES = 1_000_000  # the train text the sample check reads, in evenly spaced pieces
WORD_SAMPLE_PIECES = 16
FORECAST_FAILED = "failed"  # the status of a forecast that raised instead of answering


@dataclass(frozen=True)
class EvalRecord:
    step: int
    train_loss: float
    train_ppl: float
    val_loss: float
    val_ppl: float
    lr: float
    sample: str
    elapsed_s: float
    tokens_seen: float


@dataclass(frozen=True)
class TrainRecord:
    step: int
    loss: float
    lr: float
    tokens_per_s: float
    elapsed_s: float


@dataclass(frozen=True)
class CheckpointFile:
    name: str
    size_bytes: int
    step: int | None  # from the file name (step_N.bin) or, for best.bin, from its header


@dataclass(frozen=True)
class Run:
    """Everything the report says, read once from the run directory."""

    name: str
    train: TrainConfig
    model: ModelConfig
    parameters: int | None
    dataset: dict[str, Any]
    evals: tuple[EvalRecord, ...]  # one per step, the latest record winning, by step
    train_logs: tuple[TrainRecord, ...]
    skipped_lines: int  # unreadable metrics lines, e.g. a truncated last line
    checkpoints: tuple[CheckpointFile, ...]
    dataset_words: frozenset[str] = frozenset()  # to say how word-like the samples are
    words_sampled_bytes: int = 0  # how much of the training text dataset_words come from
    stopped: tuple[int, str] | None = None  # (step, reason) when --early_stop ended the run
    branches: tuple[dict[str, Any], ...] = ()  # resumes from an earlier checkpoint (--branch)
    schedule: ScheduleHistory | None = None  # the LR each step ran with; None: train's
    parent: dict[str, Any] | None = None  # a fine-tune's parent: path, kind, step, checksum

    def lr_at(self, step: int) -> float:
        """The LR of update `step` as the run ran it (a resume may have changed the schedule)."""
        return (self.schedule or ScheduleHistory.of(self.train)).lr(step)

    @property
    def last_step(self) -> int:
        return max([r.step for r in self.evals] + [r.step for r in self.train_logs] + [0])

    @property
    def finite_evals(self) -> list[EvalRecord]:
        return [r for r in self.evals if math.isfinite(r.val_loss)]

    @property
    def best(self) -> EvalRecord | None:
        finite = self.finite_evals
        return min(finite, key=lambda r: (r.val_loss, r.step)) if finite else None

    def eval_steps(self) -> list[int]:
        """The scheduled eval steps up to max_steps, plus any step the records hold besides."""
        interval, last = self.train.eval_interval, self.train.max_steps
        scheduled = set(range(interval, last + 1, interval)) | {last}
        return sorted(scheduled | {r.step for r in self.evals})


# ---------------------------------------------------------------------------- reading a run


def load_run(run_dir: Path) -> Run:
    """Read a run directory; a NexusError says what is missing."""
    directory = RunDir.existing(run_dir)
    config = directory.read_config()
    train = TrainConfig.from_dict(config["train"])
    model = ModelConfig.from_dict(config["model"]) if "model" in config else train.model_config()
    records, skipped = directory.read_metrics()
    evals, train_logs, stopped, unknown = _sort_records(records)
    dataset = config.get("dataset") if isinstance(config.get("dataset"), dict) else {}
    parameters = config.get("parameters")
    return Run(
        name=directory.path.resolve().name,
        train=train,
        model=model,
        parameters=parameters if isinstance(parameters, int) else None,
        dataset=dataset,
        evals=evals,
        train_logs=train_logs,
        skipped_lines=skipped + unknown,
        checkpoints=_checkpoint_files(directory),
        **_train_text_words(dataset),
        stopped=stopped,
        branches=tuple(b for b in config.get("branches") or () if isinstance(b, dict)),
        schedule=ScheduleHistory.of(train, config.get("schedule_history")),
        parent=config["parent"] if isinstance(config.get("parent"), dict) else None,
    )


def _sort_records(
    records: list[dict[str, Any]],
) -> tuple[tuple[EvalRecord, ...], tuple[TrainRecord, ...], tuple[int, str] | None, int]:
    """The evals and train logs by step, the early stop (step, reason) if any, and the number
    of records of no known kind."""
    evals: dict[int, EvalRecord] = {}
    logs: dict[int, TrainRecord] = {}
    stopped: tuple[int, str] | None = None
    unknown = 0
    for record in records:
        step, kind = record["step"], record.get("kind")
        if kind == "eval":
            evals[step] = _eval_record(step, record)  # after a resume the later record wins
        elif kind == "train":
            logs[step] = _train_record(step, record)
        elif kind == STOP_KIND:
            reason = record.get("reason")
            stopped = (step, reason if isinstance(reason, str) else "no reason recorded")
        else:
            unknown += 1
    ordered_evals = tuple(evals[s] for s in sorted(evals))
    return ordered_evals, tuple(logs[s] for s in sorted(logs)), stopped, unknown


def _number(record: dict[str, Any], key: str) -> float:
    value = record.get(key)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if is_number else math.nan


def _eval_record(step: int, record: dict[str, Any]) -> EvalRecord:
    sample = record.get("sample")
    return EvalRecord(
        step=step,
        train_loss=_number(record, "train_loss"),
        train_ppl=_number(record, "train_ppl"),
        val_loss=_number(record, "val_loss"),
        val_ppl=_number(record, "val_ppl"),
        lr=_number(record, "lr"),
        sample=sample if isinstance(sample, str) else "",
        elapsed_s=_number(record, "elapsed_s"),
        tokens_seen=_number(record, "tokens_seen"),
    )


def _train_record(step: int, record: dict[str, Any]) -> TrainRecord:
    return TrainRecord(
        step=step,
        loss=_number(record, "loss"),
        lr=_number(record, "lr"),
        tokens_per_s=_number(record, "tokens_per_s"),
        elapsed_s=_number(record, "elapsed_s"),
    )


def _checkpoint_files(run_dir: RunDir) -> tuple[CheckpointFile, ...]:
    """The step_<N>.bin files in step order, then best.bin with the step its header names."""
    found = [
        CheckpointFile(path.name, path.stat().st_size, step)
        for step in run_dir.checkpoint_steps()
        if (path := run_dir.checkpoint(step)).is_file()
    ]
    if run_dir.best_file.is_file():
        found.append(
            CheckpointFile(BEST_FILE, run_dir.best_file.stat().st_size, _step_of(run_dir.best_file))
        )
    return tuple(found)


def _step_of(path: Path) -> int | None:
    from nexus.checkpoint import read_header  # torch loads only where a best.bin exists

    try:
        return int(read_header(path)["step"])
    except (NexusError, KeyError, ValueError):
        return None


def _train_text_words(dataset: dict[str, Any]) -> dict[str, Any]:
    """The words of a fixed, bounded sample of the train split (WORD_SAMPLE_PIECES evenly
    spaced pieces, WORD_SAMPLE_BYTES in all), so the sample check costs the same at every eval
    whatever the corpus size; and how many bytes were read."""
    path = dataset.get("path")
    if not isinstance(path, str) or not Path(path).is_file():
        return {}
    size = Path(path).stat().st_size
    train_bytes = dataset.get("train_bytes")
    if isinstance(train_bytes, int) and 0 < train_bytes <= size:
        size = train_bytes  # the split is the file's first bytes
    if size <= WORD_SAMPLE_BYTES:
        starts, piece = [0], size
    else:
        piece = WORD_SAMPLE_BYTES // WORD_SAMPLE_PIECES
        starts = np.linspace(0, size - piece, WORD_SAMPLE_PIECES).astype(int).tolist()
    chunks = []
    with open(path, "rb") as file:
        for start in starts:
            file.seek(start)
            chunks.append(file.read(piece))
    text = b"\n".join(chunks).decode("utf-8", errors="replace").lower()
    return {
        "dataset_words": frozenset(re.findall(r"[a-z]+", text)),
        "words_sampled_bytes": sum(len(chunk) for chunk in chunks),
    }


# ---------------------------------------------------------------------------- the report


def write_report(run_dir: Path, forecast: Forecast | None = None) -> Path:
    """Rewrite TRAINING_PROGRESS.md and training_progress.png in `run_dir`; return the md path.
    `forecast`, when given, is run_forecast's answer for the evals the run holds now (the trainer
    has just made it for its verdict, and a forecast takes a second or so)."""
    from nexus.plot import plot_progress  # matplotlib loads only when a report is written

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    forecast = forecast_or_failure(run) if forecast is None else forecast
    directory = RunDir(run_dir)
    path = directory.report_file
    atomic_write(path, render_report(run, forecast).encode("utf-8"))
    atomic_write(directory.plot_file, plot_progress(run, forecast))
    return path


def forecast_or_failure(run: Run) -> Forecast:
    """run_forecast's answer, or a forecast of status FORECAST_FAILED that says why it raised:
    a fit that breaks on some records must not cost the rest of the page, nor the verdict."""
    try:
        return run_forecast(run)
    except Exception as error:
        reason = f"the forecast failed ({type(error).__name__}: {error})"
        return Forecast(status=FORECAST_FAILED, message=reason, used_steps=(), ignored_steps=())


def run_forecast(run: Run, schedule: Schedule | None = None) -> Forecast:
    """The forecast of the val loss at the eval steps still to come, on the schedule the run
    ran with so far and its current settings from now on."""
    last_eval = run.evals[-1].step if run.evals else 0
    future = [s for s in run.eval_steps() if last_eval < s <= run.train.max_steps]
    return forecast_val_loss(
        [r.step for r in run.train_logs], [r.loss for r in run.train_logs],
        [r.step for r in run.evals], [r.val_loss for r in run.evals],
        run.train, future, schedule or Schedule.of(run.train, history=run.schedule),
    )  # fmt: skip


def backtest(run_dir: Path, cutoff_step: int | None = None) -> Backtest:
    """Forecast the run's val loss at its last step from the records up to `cutoff_step`
    (default: half of max_steps) alone, beside what the run reached there."""
    run = load_run(Path(run_dir))
    cutoff = run.train.max_steps // 2 if cutoff_step is None else cutoff_step
    return backtest_records(
        [r.step for r in run.train_logs], [r.loss for r in run.train_logs],
        [r.step for r in run.evals], [r.val_loss for r in run.evals],
        run.train, cutoff, Schedule.of(run.train, history=run.schedule),
    )  # fmt: skip


def render_report(run: Run, forecast: Forecast) -> str:
    """The whole TRAINING_PROGRESS.md text: a pure function of the run's records."""
    rule = "---"
    parts = [
        _title(run),
        _architecture(run),
        _configuration(run),
        rule,
        _progress_table(run),
        rule,
        _trend(run),
        _observations(run, forecast),
        rule,
        _predictions(run, forecast),
        _keep_or_stop(run, forecast),
        rule,
        _checkpoints(run),
        rule,
        f"*Last updated: Step {run.last_step}*",
    ]
    return "\n\n".join(parts) + "\n"


def _title(run: Run) -> str:
    stopped = "stopped early at " if run.stopped is not None else ""
    lines = [
        "# Nexus Training Progress",
        "",
        f"Run `{run.name}`: {stopped}step {run.last_step:,} of {run.train.max_steps:,} "
        f"({100 * run.last_step / run.train.max_steps:.0f} %), {len(run.evals)} eval"
        f"{'' if len(run.evals) == 1 else 's'} recorded.",
    ]
    if run.stopped is not None:
        lines.append(f"`--early_stop` ended it at step {run.stopped[0]:,}: {run.stopped[1]}.")
    for branch in run.branches:
        moved = branch.get("abandoned_checkpoints") or []
        steps = f"steps {', '.join(map(str, moved))}" if moved else "no checkpoints"
        lines.append(
            f"Branched at step {branch.get('from_step')} ({branch.get('at', 'time unknown')}): "
            f"the abandoned future ({steps} and their records) is in `{branch.get('abandoned')}/`."
        )
    if run.skipped_lines:
        lines.append(
            f"{run.skipped_lines} unreadable line{'s' if run.skipped_lines > 1 else ''} in "
            "metrics.jsonl left out (a run stopped mid-write leaves a truncated last line)."
        )
    return "\n".join(lines)


def _architecture(run: Run) -> str:
    model = run.model
    attention = len(model.attention_layers)
    ssm = model.n_layers - attention
    kind = (
        "Jamba-style hybrid" if attention and ssm else "pure attention" if attention else "pure SSM"
    )
    kv = f"KV heads: {model.n_kv_heads}" + (" - GQA" if model.n_kv_heads < model.n_heads else "")
    params = _count(run.parameters) if run.parameters is not None else "unknown"
    return "\n".join(
        [
            "## Model Architecture",
            f"- **Parameters**: {params}",
            f"- **d_model**: {model.d_model}",
            f"- **n_heads**: {model.n_heads} ({kv})",
            f"- **layers**: {model.n_layers} ({attention} attention, {ssm} SSM - {kind})",
            f"- **seq_len**: {model.seq_len}",
            f"- **vocab_size**: {model.vocab_size} (byte-level)",
        ]
    )


OPTIMIZER_NAMES = {"adamw": "AdamW", "muon": "Muon (the layers' weight matrices) + AdamW"}


def _decay(train: TrainConfig) -> str:
    if train.schedule == "wsd":
        floor, steps = _lr(train.min_lr), train.cooldown_steps
        return f"held, then linear decay to {floor} over the last {steps:,} steps"
    return f"cosine decay to {_lr(train.min_lr)}"


def _configuration(run: Run) -> str:
    train = run.train
    effective = train.micro_batch * train.grad_accum
    return "\n".join(
        [
            "## Training Configuration",
            f"- **learning_rate**: {_lr(train.lr)} (peak, {_decay(train)})",
            f"- **optimizer**: {OPTIMIZER_NAMES[train.optimizer]}",
            f"- **weight_decay**: {train.weight_decay:g}",
            f"- **dropout**: {train.dropout:g}",
            f"- **batch_size**: {train.micro_batch} (effective: {effective} with "
            f"grad_accum={train.grad_accum}; {train.tokens_per_step:,} tokens per step)",
            f"- **warmup_steps**: {train.warmup_steps}",
            f"- **max_steps**: {train.max_steps:,}",
            f"- **eval_interval**: {train.eval_interval}",
            f"- **dataset**: {_dataset(run.dataset)}",
            *_parent(run.parent),
        ]
    )


def _parent(parent: dict[str, Any] | None) -> list[str]:
    if parent is None:
        return []
    step = f", step {parent['step']}" if isinstance(parent.get("step"), int) else ""
    checksum = str(parent.get("checksum", ""))[:12]
    return [f"- **fine-tuned from**: `{parent.get('path')}`{step} (sha256 {checksum}…)"]


def _dataset(dataset: dict[str, Any]) -> str:
    name = dataset.get("name") or "unknown"
    size = dataset.get("bytes")
    if not isinstance(size, int):
        return str(name)
    split = ""
    if isinstance(dataset.get("train_bytes"), int) and isinstance(dataset.get("val_bytes"), int):
        split = f"; {dataset['train_bytes']:,} train / {dataset['val_bytes']:,} val"
    if isinstance(dataset.get("val_data"), str):
        split += f"; validated on `{dataset['val_data']}`"
    sources = dataset.get("sources")
    if isinstance(sources, dict):
        skipped = sources.get("skipped") or {}
        split += (
            f"; {sources.get('documents', 0):,} documents from {sources.get('files', 0):,} files"
            + "".join(f", {count} skipped ({reason})" for reason, count in skipped.items())
        )
    return f"{name} ({size:,} bytes{split})"


def _progress_table(run: Run) -> str:
    by_step = {r.step: r for r in run.evals}
    best = run.best
    lines = [
        "## Checkpoint Progress Chart",
        "",
        "| Step | Train Loss | Train PPL | Val Loss | Val PPL | LR | Best? |",
        "|------|------------|-----------|----------|---------|-----|-------|",
    ]
    for step in run.eval_steps():
        record = by_step.get(step)
        if record is None:
            lr = _lr(run.lr_at(step)) if step > 0 else "-"
            lines.append(f"| {step} | - | - | - | - | {lr} | - |")
            continue
        star = "⭐" if best is not None and record.step == best.step else "-"
        lines.append(
            f"| {step} | {_loss(record.train_loss)} | {_ppl(record.train_ppl)} | "
            f"{_loss(record.val_loss)} | {_ppl(record.val_ppl)} | {_lr(record.lr)} | {star} |"
        )
    return "\n".join(lines)


def _trend(run: Run) -> str:
    points = [(r.step, r.val_loss) for r in run.finite_evals]
    if not points:
        return "## Validation Loss Trend\n\nNo finite val loss recorded yet."
    return "\n".join(["## Validation Loss Trend", "", "```", val_loss_chart(points), "```"])


def val_loss_chart(points: list[tuple[int, float]], height: int = CHART_HEIGHT) -> str:
    """A box-drawing chart of val loss against step: the y-axis runs from the largest value
    (top row) to the smallest (bottom row); each point is a ● joined by lines, steps and values
    are written under the axis. Long runs show an even selection that keeps both extremes."""
    points = _chart_points(points)
    values = [v for _, v in points]
    top, bottom = max(values), min(values)
    rows = 1 if top == bottom else height
    row_of = [0 if rows == 1 else round((top - v) / (top - bottom) * (rows - 1)) for v in values]
    width = 8  # characters per point: room for "1.2345" and a step of up to six digits
    grid = [[" "] * (width * len(points)) for _ in range(rows)]
    columns = [width // 2 + width * i for i in range(len(points))]
    for i in range(len(points) - 1):
        _join(grid, columns[i], row_of[i], columns[i + 1], row_of[i + 1])
    for column, row in zip(columns, row_of, strict=True):
        grid[row][column] = "●"
    labels = [top - (top - bottom) * r / (rows - 1) if rows > 1 else top for r in range(rows)]
    lines = ["Val loss"]
    lines += [
        f"{label:7.4f} ┤{''.join(row).rstrip()}" for label, row in zip(labels, grid, strict=True)
    ]
    lines.append(" " * 8 + "└" + "─" * (width * len(points)) + "─ step")
    lines.append(" " * 9 + "".join(f"{step:^{width}d}" for step, _ in points).rstrip())
    lines.append(" " * 9 + "".join(f"{v:^{width}.4f}" for v in values).rstrip() + "   val loss")
    return "\n".join(lines)


def _chart_points(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    if len(points) <= CHART_MAX_COLUMNS:
        return points
    keep = set(np.linspace(0, len(points) - 1, CHART_MAX_COLUMNS - 2).round().astype(int).tolist())
    values = [v for _, v in points]
    keep |= {int(np.argmax(values)), int(np.argmin(values))}
    return [points[i] for i in sorted(keep)]


def _join(grid: list[list[str]], c1: int, r1: int, c2: int, r2: int) -> None:
    """Draw the line from the point at (r1, c1) to the next at (r2, c2); rows grow downwards."""
    if r2 > r1:  # falling: down from the first point, then across to the second
        for row in range(r1 + 1, r2):
            grid[row][c1] = "│"
        grid[r2][c1] = "└"
        for column in range(c1 + 1, c2):
            grid[r2][column] = "─"
    elif r2 < r1:  # rising: across from the first point, then up to the second
        for column in range(c1 + 1, c2):
            grid[r1][column] = "─"
        grid[r1][c2] = "┘"
        for row in range(r2 + 1, r1):
            grid[row][c2] = "│"
    else:
        for column in range(c1 + 1, c2):
            grid[r1][column] = "─"


def _observations(run: Run, forecast: Forecast) -> str:
    evals = run.finite_evals
    if not evals:
        first = run.eval_steps()[0]
        return (
            "## Key Observations\n\nNo finite val loss recorded yet; observations start with "
            f"the first eval at step {first}.\n\n" + "\n".join(_learning_rate(run))
        )
    sections = [
        ("Loss Progression", _progression(run)),
        ("Over-fitting Check", _gap(run, forecast)),
        ("Perplexity", _perplexity(evals)),
        ("Sample Quality Evolution", _samples(run)),
        ("Learning Rate", _learning_rate(run)),
        ("Throughput", _throughput(run)),
    ]
    parts = ["## Key Observations"]
    parts += [f"### {title}\n" + "\n".join(lines) for title, lines in sections if lines]
    return "\n\n".join(parts)


def _progression(run: Run) -> list[str]:
    evals = run.finite_evals
    first, last = evals[0], evals[-1]
    lines = [
        f"- **Val loss**: {_series([r.val_loss for r in evals])}"
        + _change(first.val_loss, last.val_loss, first.step, last.step),
        f"- **Train loss** (eval on the train split): "
        f"{_series([r.train_loss for r in evals])}"
        + _change(first.train_loss, last.train_loss, first.step, last.step),
    ]
    if len(evals) >= 2:
        previous = evals[-2]
        delta = last.val_loss - previous.val_loss
        lines.append(
            f"- **Latest eval**: val loss {delta:+.4f} ({100 * delta / previous.val_loss:+.1f} %) "
            f"from step {previous.step} to step {last.step}"
        )
    best = run.best
    lines.append(f"- **Best val loss**: {best.val_loss:.4f} at step {best.step}")
    bad = [r.step for r in run.evals if not math.isfinite(r.val_loss)]
    if bad:
        lines.append(
            f"- **Non-finite val loss** at step{'s' if len(bad) > 1 else ''} "
            f"{', '.join(map(str, bad))}: left out of the trend, the best and the forecast"
            + (" — the run has diverged" if bad[-1] == run.evals[-1].step else "")
        )
    return lines


def _gap(run: Run, forecast: Forecast) -> list[str]:
    evals = [r for r in run.finite_evals if math.isfinite(r.train_loss)]
    threshold = (
        f"threshold: val loss rising for 2 evals by more than 0.01 nats, or a gap above "
        f"{GAP_NATS} nats that has grown by more than {GAP_GROWTH_NATS} since the first eval"
    )
    if not evals:
        return ["- **Gap**: no eval with both losses finite yet"]
    first, last = evals[0], evals[-1]
    gap, growth = (
        last.val_loss - last.train_loss,
        (last.val_loss - last.train_loss) - (first.val_loss - first.train_loss),
    )
    lines = [
        f"- **Gap**: val {last.val_loss:.4f} − train {last.train_loss:.4f} = {gap:.4f} nats at "
        f"step {last.step}"
        + (f" ({growth:+.4f} since step {first.step})" if len(evals) > 1 else "")
    ]
    if forecast.status == "rising":
        verdict = "over-fitting — val loss has turned upward (see Predictions)"
    elif gap > GAP_NATS and growth > GAP_GROWTH_NATS:
        verdict = "early over-fitting — the gap is widening while val loss still falls"
    else:
        verdict = "no over-fitting"
    lines.append(f"- **Verdict**: {verdict} ({threshold})")
    return lines


def _perplexity(evals: list[EvalRecord]) -> list[str]:
    lines = []
    for label, values in (
        ("Val PPL", [r.val_ppl for r in evals]),
        ("Train PPL", [r.train_ppl for r in evals]),
    ):
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            change = f" ({_percent(finite[0], finite[-1])})" if len(finite) > 1 else ""
            lines.append(f"- **{label}**: {finite[0]:.2f} → {finite[-1]:.2f}{change}")
    return lines


def _samples(run: Run) -> list[str]:
    with_sample = [r for r in run.evals if r.sample]
    if not with_sample:
        return []
    picks = np.linspace(0, len(with_sample) - 1, min(SAMPLES_SHOWN, len(with_sample)))
    lines = []
    for index in sorted(set(picks.round().astype(int).tolist())):
        record = with_sample[index]
        words = re.findall(r"[a-z]+", record.sample.lower())
        known = ""
        if run.dataset_words and words:
            share = sum(w in run.dataset_words for w in words) / len(words)
            known = (
                f" — {100 * share:.0f} % of its {len(words)} words occur in "
                f"{_size(run.words_sampled_bytes)} of the training text"
            )
        lines.append(f"- Step {record.step}: {_code(_shorten(record.sample))}{known}")
    return lines


def _learning_rate(run: Run) -> list[str]:
    train, step = run.train, run.last_step
    if step == 0:
        return [f"- Warmup to the peak {_lr(train.lr)} over {train.warmup_steps} steps, not begun"]
    lr = run.lr_at(step)
    share = 100 * lr / train.lr
    floor = f"the floor {_lr(train.min_lr)}, {100 * train.min_lr / train.lr:.0f} % of peak"
    if step <= train.warmup_steps:
        phase = f"linear warmup (step {step} of {train.warmup_steps})"
    elif step >= train.max_steps:
        phase = f"finished, at {floor}"
    else:
        decay = (step - train.warmup_steps) / (train.max_steps - train.warmup_steps)
        left = (lr - train.min_lr) / (train.lr - train.min_lr) if train.lr > train.min_lr else 0
        stage = "final annealing" if left < FINAL_ANNEALING else "cosine decay"
        phase = f"{stage}: {100 * decay:.0f} % of the decay done; it ends at {floor}"
    return [
        f"- **Current**: {_lr(lr)} at step {step} ({share:.0f} % of the {_lr(train.lr)} peak)",
        f"- **Phase**: {phase}",
    ]


def _throughput(run: Run) -> list[str]:
    logs = [r for r in run.train_logs if math.isfinite(r.tokens_per_s) and r.tokens_per_s > 0]
    if not logs:
        return []
    rate = float(np.median([r.tokens_per_s for r in logs[-10:]]))
    lines = [f"- **Speed**: {rate:,.0f} tokens/s (median of the last {min(10, len(logs))} logs)"]
    elapsed = run.train_logs[-1].elapsed_s
    if math.isfinite(elapsed):
        lines.append(f"- **Elapsed**: {format_duration(elapsed)} at step {run.train_logs[-1].step}")
    remaining = run.train.max_steps - run.last_step
    if remaining > 0:
        left = remaining * run.train.tokens_per_step / rate
        lines.append(f"- **Remaining**: about {format_duration(left)} for {remaining:,} steps")
    return lines


def _predictions(run: Run, forecast: Forecast) -> str:
    title = "## Predictions for Remaining Training"
    ignored = (
        f"\n\nLeft out of the fit: non-finite val loss at step(s) "
        f"{', '.join(map(str, forecast.ignored_steps))}."
        if forecast.ignored_steps
        else ""
    )
    if forecast.status != "ok":
        return f"{title}\n\nNo forecast: {forecast.message}.{ignored}"
    lines = [
        title,
        "",
        f"| Step | Predicted Val Loss | {PERCENT} Interval | Predicted Val PPL |",
        "|------|--------------------|---------------|-------------------|",
    ]
    for step, value, low, high in zip(
        forecast.steps, forecast.predicted, forecast.lower, forecast.upper, strict=True
    ):
        lines.append(f"| {step} | {value:.4f} | {low:.4f} – {high:.4f} | {_ppl(math.exp(value))} |")
    last = run.finite_evals[-1]
    final, final_step = forecast.predicted[-1], forecast.steps[-1]
    lines += [
        "",
        f"Expected final improvement: val loss {last.val_loss:.4f} → {final:.4f} "
        f"({_percent(last.val_loss, final)}), val PPL {math.exp(last.val_loss):.2f} → "
        f"{math.exp(final):.2f} ({_percent(math.exp(last.val_loss), math.exp(final))}) "
        f"from step {last.step} to step {final_step}.",
        "",
        f"Interval: {PERCENT} probability; {MEASURED_COVERAGE} (docs/forecast.md).",
        "",
        f"Model: {forecast.message}: the train-loss curve of the LR-annealing law (Tissue et "
        "al. 2024) in the LR area S1 and the lagged LR drop D, and val moving with it; the "
        f"central variant is `{forecast.central.formula()}`.",
    ]
    return "\n".join(lines) + ignored


def _keep_or_stop(run: Run, forecast: Forecast) -> str:
    """The verdict at the latest eval: expected gain of the remaining steps, their time, val
    against its best, and the early stop (nexus.verdict decides)."""
    return "\n".join(["### Keep or Stop", "", *report_lines(decide(run, forecast), run.stopped)])


def _checkpoints(run: Run) -> str:
    title = "## Checkpoints Saved"
    if not run.checkpoints:
        return f"{title}\n\nNo checkpoint files in the run directory yet."
    best = run.best
    lines = [title]
    for checkpoint in run.checkpoints:
        line = f"- `{checkpoint.name}` ({_size(checkpoint.size_bytes)})"
        if checkpoint.name == BEST_FILE:
            line += _best_file_note(checkpoint, best)
        elif best is not None and checkpoint.step == best.step:
            line += f" ← current best (val loss {best.val_loss:.4f})"
        lines.append(line)
    if not any(c.name == BEST_FILE for c in run.checkpoints):
        lines.append("- no `best.bin` yet")
    return "\n".join(lines)


def _best_file_note(checkpoint: CheckpointFile, best: EvalRecord | None) -> str:
    if checkpoint.step is None:
        return " ← its header names no step (unreadable)"
    note = f" ← holds step {checkpoint.step}"
    if best is not None and best.step != checkpoint.step:
        note += f" (the records' best val loss is at step {best.step})"
    return note


# ---------------------------------------------------------------------------- formatting


def _count(parameters: int) -> str:
    if parameters >= 1_000_000:
        return f"{parameters / 1e6:.2f}M"
    return f"{parameters / 1e3:.1f}K" if parameters >= 1000 else str(parameters)


def _lr(value: float) -> str:
    if not math.isfinite(value):
        return "-" if math.isnan(value) else str(value)
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _loss(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else _non_finite(value)


def _ppl(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else _non_finite(value)


def _non_finite(value: float) -> str:
    return "NaN" if math.isnan(value) else ("Inf" if value > 0 else "-Inf")


def _series(values: list[float]) -> str:
    """Up to six values joined by arrows: the first, then the latest five."""
    shown = [_loss(v) for v in values]
    return " → ".join(shown if len(shown) <= 6 else [shown[0], "…", *shown[-5:]])


def _change(first: float, last: float, first_step: int, last_step: int) -> str:
    if first_step == last_step or not (math.isfinite(first) and math.isfinite(last)):
        return ""
    return f" ({_percent(first, last)} from step {first_step} to step {last_step})"


def _percent(before: float, after: float) -> str:
    return f"{100 * (after - before) / before:+.1f} %" if before else "n/a"


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size:,} bytes"


def _shorten(sample: str) -> str:
    """One line of at most SAMPLE_CHARS characters, with newlines and controls made visible."""
    text = sample.replace("\r\n", "\n").replace("\n", "⏎").replace("\t", "→")
    text = "".join(ch if ch.isprintable() else "·" for ch in text)
    return text if len(text) <= SAMPLE_CHARS else text[: SAMPLE_CHARS - 1] + "…"


def _code(text: str) -> str:
    """Inline code that holds any text: a fence longer than the longest run of backticks in it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    padded = f" {text} " if text.startswith("`") or text.endswith("`") or not text.strip() else text
    return f"{fence}{padded}{fence}"
