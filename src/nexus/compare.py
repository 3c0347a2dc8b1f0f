"""`nexus compare`: several runs side by side, as COMPARISON.md (one table row per run) and
comparison.png (their losses and forecasts against steps and against tokens seen).

Every number comes from the runs' records, read with `nexus.report.load_run`; the figure is drawn
on matplotlib's Agg canvas and saved without metadata, as plot.py does, so the same records give
the same bytes."""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter

from nexus.forecast import PERCENT, Forecast
from nexus.report import Run, load_run, run_forecast
from nexus.rundir import atomic_write

COMPARISON_NAME = "COMPARISON.md"
COMPARISON_PLOT_NAME = "comparison.png"
REASON_CHARS = 48  # a forecast's reason for being absent, shortened to fit a table cell


@dataclass(frozen=True)
class ComparedRun:
    label: str  # unique among the runs compared
    path: Path
    run: Run
    forecast: Forecast


def compare_runs(run_dirs: Sequence[Path], out_dir: Path = Path(".")) -> tuple[Path, Path]:
    """Write COMPARISON.md and comparison.png into `out_dir`; return their paths."""
    runs = load_compared(run_dirs)
    out_dir = Path(out_dir)
    markdown, plot = out_dir / COMPARISON_NAME, out_dir / COMPARISON_PLOT_NAME
    # The figure first: the page links to it and should never point at a missing file.
    atomic_write(plot, plot_comparison(runs))
    atomic_write(markdown, render_comparison(runs).encode("utf-8"))
    return markdown, plot


def load_compared(run_dirs: Sequence[Path]) -> list[ComparedRun]:
    """Each run with its label and forecast, in the order given; a NexusError names a path
    that is not a run directory."""
    paths = [Path(p) for p in run_dirs]
    labels = run_labels(paths)
    compared = []
    for label, path in zip(labels, paths, strict=True):
        run = load_run(path)
        compared.append(ComparedRun(label, path, run, run_forecast(run)))
    return compared


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Each run's directory name; where names repeat, with as many parent directories as set
    them apart (a/run, b/run), and a number where the same directory is given twice."""
    parts = [Path(p).resolve().parts[1:] for p in run_dirs]  # [1:]: without the root "/"
    depth = [1] * len(parts)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
        paths_of: dict[str, set[tuple[str, ...]]] = {}
        for label, path in zip(labels, parts, strict=True):
            paths_of.setdefault(label, set()).add(path)
        longer = [
            i
            for i, label in enumerate(labels)
            if len(paths_of[label]) > 1 and depth[i] < len(parts[i])
        ]
        if not longer:
            break
        for i in longer:
            depth[i] += 1
    seen: Counter[str] = Counter()
    unique = []
    for label in labels:
        seen[label] += 1
        unique.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return unique


# ---------------------------------------------------------------------------- the numbers


def tokens_at(run: Run, step: int) -> float:
    """Tokens trained on by `step`: the eval record's own count where it holds one (a run
    resumed with another batch size counts differently), else step × tokens_per_step."""
    for record in run.evals:
        if record.step == step and math.isfinite(record.tokens_seen):
            return record.tokens_seen
    return float(step * run.train.tokens_per_step)


def wall_time(run: Run) -> float:
    """elapsed_s of the run's last record (the eval, where a step has both); NaN if none."""
    records = [(r.step, 0, r.elapsed_s) for r in run.train_logs]
    records += [(r.step, 1, r.elapsed_s) for r in run.evals]
    return max(records, key=lambda r: r[:2])[2] if records else math.nan


# ---------------------------------------------------------------------------- the page


def render_comparison(runs: Sequence[ComparedRun]) -> str:
    """The whole COMPARISON.md text: a pure function of the runs' records and forecasts."""
    lines = [
        "# Nexus Run Comparison",
        "",
        f"{len(runs)} run{'' if len(runs) == 1 else 's'}, in the order given.",
        "",
        "| Run | Parameters | Step | Tokens seen | Wall time | Best val loss | Final val loss "
        "| Forecast final val loss |",
        "|-----|-----------:|-----:|------------:|----------:|---------------|----------------"
        "|-------------------------|",
    ]
    lines += [_row(compared) for compared in runs]
    lines += [
        "",
        f"![Val and train loss of each run against steps and tokens seen]({COMPARISON_PLOT_NAME})",
        "",
        "Solid: val loss; dashed, same colour: train loss measured at each eval; dotted with a "
        "band: the forecast of the evals still to come and its interval. Left against steps, "
        "right against tokens seen, where runs with different batch sizes line up.",
        "",
        "Best val loss: the lowest finite one recorded. Final val loss: the last eval's. Wall "
        "time: elapsed_s of the last record (h:mm:ss).",
        "",
        "## Run directories",
        "",
    ]
    # absolute: the page is read from --out, not from where the command ran
    lines += [f"- {_cell(compared.label)}: `{compared.path.resolve()}`" for compared in runs]
    return "\n".join(lines) + "\n"


def _row(compared: ComparedRun) -> str:
    run = compared.run
    parameters = f"{run.parameters:,}" if run.parameters is not None else "—"
    step = run.last_step
    best = run.best
    final = run.evals[-1] if run.evals else None
    cells = [
        _cell(compared.label),
        parameters,
        f"{step:,} of {run.train.max_steps:,}",
        _tokens(tokens_at(run, step)),
        _duration(wall_time(run)),
        f"{_loss(best.val_loss)} (step {best.step})" if best else "—",
        f"{_loss(final.val_loss)} (step {final.step})" if final else "—",
        _forecast(compared.forecast),
    ]
    return "| " + " | ".join(cells) + " |"


def _forecast(forecast: Forecast) -> str:
    if forecast.status != "ok":
        return f"— ({_cell(_reason(forecast.message))})"
    return (
        f"{forecast.predicted[-1]:.4f} ({forecast.lower[-1]:.4f} – {forecast.upper[-1]:.4f}) "
        f"at step {forecast.steps[-1]}"
    )


def _reason(message: str) -> str:
    """The first clause of a forecast's message ("too few points to forecast: 1 finite ...")."""
    clause = re.split(r"[:;]", message, maxsplit=1)[0].strip()
    return clause if len(clause) <= REASON_CHARS else clause[: REASON_CHARS - 1] + "…"


def _cell(text: str) -> str:
    """Text that stays inside its Markdown table cell."""
    return " ".join(text.splitlines()).replace("|", "\\|")


def _loss(value: float) -> str:
    if math.isfinite(value):
        return f"{value:.4f}"
    return "NaN" if math.isnan(value) else ("Inf" if value > 0 else "-Inf")


def _tokens(value: float) -> str:
    return f"{value:,.0f}" if math.isfinite(value) else "—"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "—"
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


# ---------------------------------------------------------------------------- the figure


def plot_comparison(runs: Sequence[ComparedRun]) -> bytes:
    """The PNG bytes: every run's losses and forecast against steps (left) and tokens (right)."""
    figure = Figure(figsize=(13, 5.6), dpi=100)
    FigureCanvasAgg(figure)
    by_step, by_tokens = figure.subplots(1, 2, sharey=True)
    for index, compared in enumerate(runs):
        colour = f"C{index % 10}"  # matplotlib's default cycle; beyond ten runs colours repeat
        _draw_run(by_step, compared, colour, lambda run, step: float(step))
        _draw_run(by_tokens, compared, colour, tokens_at)
    by_step.set_xlabel("step")
    by_tokens.set_xlabel("tokens seen")
    by_tokens.xaxis.set_major_formatter(EngFormatter())
    by_step.set_ylabel("loss (nats per byte)")
    for axis in (by_step, by_tokens):
        axis.set_xlim(left=0)
        axis.grid(alpha=0.25)
    runs_legend = [Line2D([], [], color=f"C{i % 10}", lw=2) for i in range(len(runs))]
    styles = [
        Line2D([], [], color="tab:gray", ls="-", label="val loss"),
        Line2D([], [], color="tab:gray", ls="--", label="train loss (eval)"),
        Line2D([], [], color="tab:gray", ls=":", label="val forecast"),
        Patch(color="tab:gray", alpha=0.18, label=f"forecast {PERCENT} interval"),
    ]
    by_step.legend(runs_legend, [c.label for c in runs], loc="upper right", fontsize=9)
    by_tokens.legend(handles=styles, loc="upper right", fontsize=9)
    figure.suptitle(f"Nexus runs compared: {', '.join(c.label for c in runs)}", fontsize=12)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _draw_run(axis, compared: ComparedRun, colour: str, x_of) -> None:
    run = compared.run
    val = [(x_of(run, r.step), r.val_loss) for r in run.finite_evals]
    if val:
        axis.plot(*zip(*val, strict=True), "-", color=colour, marker="o", ms=3)
    train = [(x_of(run, r.step), r.train_loss) for r in run.evals if math.isfinite(r.train_loss)]
    if train:
        axis.plot(*zip(*train, strict=True), "--", color=colour, alpha=0.8)
    forecast = compared.forecast
    if forecast.status != "ok":
        return
    # From the last eval, where the loss is known, so the forecast reads as its continuation.
    last = run.finite_evals[-1]
    xs = [x_of(run, last.step), *(x_of(run, s) for s in forecast.steps)]
    axis.fill_between(xs, [last.val_loss, *forecast.lower], [last.val_loss, *forecast.upper],
                      color=colour, alpha=0.18, lw=0)  # fmt: skip
    axis.plot(xs, [last.val_loss, *forecast.predicted], ":", color=colour, lw=2)
