"""training_progress.png: the run's losses, learning rate and forecast in one headless figure.

Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend), and saved without
the software/date metadata, so the same records give the same bytes."""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nexus.forecast import PERCENT

if TYPE_CHECKING:
    from nexus.forecast import Forecast
    from nexus.report import Run


def plot_progress(run: Run, forecast: Forecast) -> bytes:
    """The PNG bytes: train/val loss and the forecast band on the left axis, LR on the right."""
    figure = Figure(figsize=(10, 5.6), dpi=100)
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    _draw_losses(axis, run)
    _draw_forecast(axis, run, forecast)
    _limit_losses(axis, run, forecast)
    lr_axis = axis.twinx()
    _draw_lr(lr_axis, run)
    axis.set_xlim(0, run.train.max_steps * 1.02)
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats per byte)")
    axis.grid(alpha=0.25)
    handles, labels = axis.get_legend_handles_labels()
    lr_handles, lr_labels = lr_axis.get_legend_handles_labels()
    axis.legend(handles + lr_handles, labels + lr_labels, loc="upper right", fontsize=9)
    axis.set_title(
        f"Nexus run {run.name}: step {run.last_step:,} of {run.train.max_steps:,}", fontsize=12
    )
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _draw_losses(axis, run: Run) -> None:
    logs = [(r.step, r.loss) for r in run.train_logs if math.isfinite(r.loss)]
    if logs:
        steps, losses = zip(*logs, strict=True)
        axis.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8, label="train loss (logged)")
    evals = run.evals
    train = [(r.step, r.train_loss) for r in evals if math.isfinite(r.train_loss)]
    if train:
        steps, losses = zip(*train, strict=True)
        axis.plot(steps, losses, "o-", color="tab:blue", ms=4, label="train loss (eval)")
    val = [(r.step, r.val_loss) for r in run.finite_evals]
    if val:
        steps, losses = zip(*val, strict=True)
        axis.plot(steps, losses, "o-", color="tab:orange", ms=4, label="val loss")
    best = run.best
    if best is not None:
        axis.plot([best.step], [best.val_loss], "*", color="gold", mec="black", ms=14,
                  label=f"best val {best.val_loss:.4f} (step {best.step})")  # fmt: skip


def _draw_forecast(axis, run: Run, forecast: Forecast) -> None:
    if forecast.status != "ok":
        return
    # Start the band at the last eval, where the loss is known, so it reads as a continuation.
    last = run.finite_evals[-1]
    steps = [last.step, *forecast.steps]
    axis.fill_between(steps, [last.val_loss, *forecast.lower], [last.val_loss, *forecast.upper],
                      color="tab:orange", alpha=0.18,
                      label=f"forecast, {PERCENT} interval")  # fmt: skip
    axis.plot(steps, [last.val_loss, *forecast.predicted], "--", color="tab:orange")
    axis.plot(forecast.steps, forecast.predicted, "o", color="tab:orange", mfc="white", ms=4,
              label="val forecast")  # fmt: skip


def _limit_losses(axis, run: Run, forecast: Forecast) -> None:
    """Frame the evals and forecast; the first logged losses (~ln 256) would squash them."""
    values = [r.val_loss for r in run.finite_evals]
    values += [r.train_loss for r in run.evals if math.isfinite(r.train_loss)]
    values += list(forecast.lower) + list(forecast.upper)
    if not values:
        return
    low, high = min(values), max(values)
    margin = max(0.05, 0.15 * (high - low))
    logged = [r.loss for r in run.train_logs if math.isfinite(r.loss)]
    top = high + margin if not logged else min(max(logged), high + 3 * margin)
    axis.set_ylim(low - margin, max(top, high + margin))


def _draw_lr(axis, run: Run) -> None:
    train = run.train
    steps = np.linspace(1, train.max_steps, min(train.max_steps, 400)).round().astype(int)
    axis.plot(steps, [run.lr_at(int(s)) for s in steps], ":", color="tab:gray",
              label="learning rate (schedule)")  # fmt: skip
    if run.last_step:
        axis.axvline(run.last_step, color="tab:gray", lw=0.8, alpha=0.5)
    axis.set_ylabel("learning rate")
    axis.set_ylim(0, train.lr * 1.1)
    axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
