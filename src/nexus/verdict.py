"""The keep-or-stop verdict at an eval: what the remaining steps are expected to gain (from the
forecast, with its interval), what they cost in time, and whether val loss has turned upward;
and the early-stop rule that turns these into "keep" or "stop". This module owns the rule; the
trainer logs the verdict and, under --early_stop, acts on it, and the report renders it."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

from nexus.forecast import PERCENT

if TYPE_CHECKING:  # the report renders verdicts, so this module imports it for types only
    from nexus.forecast import Forecast
    from nexus.report import Run, TrainRecord

RECENT_LOGS = 10  # train logs whose step times give the seconds per step


@dataclass(frozen=True)
class Verdict:
    """Keep or stop, decided at the eval of `step` from the records up to it."""

    action: str  # "keep", "stop", or "finished" (the eval of max_steps: nothing left to decide)
    reason: str  # one sentence
    step: int  # the latest eval
    final_step: int  # max_steps
    seconds_left: float | None  # the remaining steps × the recent median seconds per step
    gain: float | None  # expected val-loss drop (nats) by final_step; None without a forecast
    gain_interval: tuple[float, float] | None  # the forecast's interval, as a drop
    best_step: int | None
    best_loss: float | None
    evals_since_best: int  # evals after the best one; a non-finite val loss is no improvement
    forecast_status: str  # the forecast's status: "ok", or why there is no gain
    no_forecast: str  # the forecast's message when it is not "ok"
    early_stop: bool  # whether the trainer acts on a "stop"
    patience: int
    min_gain: float

    @property
    def remaining_steps(self) -> int:
        return self.final_step - self.step

    @property
    def rising(self) -> bool:
        """Val loss sits above its best at the latest eval (over-fitting, once it lasts)."""
        return self.evals_since_best > 0


def decide(
    run: Run,
    forecast: Forecast,
    *,
    patience: int | None = None,
    min_gain: float | None = None,
    early_stop: bool | None = None,
) -> Verdict:
    """The verdict on `run` at its latest eval, given the forecast of its remaining evals.
    The settings default to the run's own (early_stop_patience, early_stop_min_gain,
    early_stop). "stop" when val loss has not improved on its best for `patience` evals, or
    when even the optimistic end of the gain's interval is below `min_gain`."""
    train = run.train
    patience = train.early_stop_patience if patience is None else patience
    min_gain = train.early_stop_min_gain if min_gain is None else min_gain
    early_stop = train.early_stop if early_stop is None else early_stop
    step = run.evals[-1].step if run.evals else run.last_step
    final_step = train.max_steps  # the forecast's last step, by its contract
    best = run.best
    since = sum(1 for r in run.evals if r.step > best.step) if best is not None else 0
    per_step = seconds_per_step(run.train_logs)
    finite = run.finite_evals
    gain = interval = None
    if forecast.status == "ok" and forecast.predicted and finite:
        last = finite[-1].val_loss
        gain = last - forecast.predicted[-1]
        interval = (last - forecast.upper[-1], last - forecast.lower[-1])
    common = {
        "step": step,
        "final_step": final_step,
        "seconds_left": None if per_step is None else per_step * max(final_step - step, 0),
        "gain": gain,
        "gain_interval": interval,
        "best_step": None if best is None else best.step,
        "best_loss": None if best is None else best.val_loss,
        "evals_since_best": since,
        "forecast_status": forecast.status,
        "no_forecast": "" if gain is not None else forecast.message,
        "early_stop": early_stop,
        "patience": patience,
        "min_gain": min_gain,
    }
    if step >= train.max_steps:
        return Verdict("finished", f"the run has reached max_steps {train.max_steps}", **common)
    if best is not None and since >= patience:
        reason = (
            f"val loss has stayed above its best {best.val_loss:.4f} (step {best.step}) for "
            f"{_evals(since)}, the patience of {patience}: the model is over-fitting"
        )
        return Verdict("stop", reason, **common)
    if interval is not None and interval[1] < min_gain:
        reason = (
            f"even the optimistic end of the forecast's {PERCENT} interval gains only "
            f"{interval[1]:.4f} nats by step {final_step}, below early_stop_min_gain {min_gain:g}"
        )
        return Verdict("stop", reason, **common)
    if interval is not None:
        reason = (
            f"the optimistic end of the forecast's gain, {interval[1]:.4f} nats, is not below "
            f"early_stop_min_gain {min_gain:g}, and val loss is {_since_best(since, patience)}"
        )
    else:
        reason = f"there is no forecast to weigh, and val loss is {_since_best(since, patience)}"
    return Verdict("keep", reason, **common)


def _since_best(since: int, patience: int) -> str:
    if since == 0:
        return "at its best"
    return f"{_evals(since)} past its best, under the patience of {patience}"


def seconds_per_step(logs: Sequence[TrainRecord]) -> float | None:
    """The median seconds per step between consecutive recent train logs: a median, so that
    the odd window that also held an eval or a checkpoint write does not count. With a single
    log, its elapsed time over its step; None with none."""
    points = [(r.step, r.elapsed_s) for r in logs if math.isfinite(r.elapsed_s)]
    points = points[-(RECENT_LOGS + 1) :]
    rates = [(t2 - t1) / (s2 - s1) for (s1, t1), (s2, t2) in pairwise(points) if s2 > s1]
    if not rates and points and points[-1][0] > 0:
        rates = [points[-1][1] / points[-1][0]]
    return statistics.median(rates) if rates else None


# ---------------------------------------------------------------------------- formatting


def format_duration(seconds: float) -> str:
    """12m 30s, or 1h 05m from an hour on."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def format_log(verdict: Verdict) -> str:
    """The verdict as a fragment of the trainer's eval log line, e.g. `keep: +0.0420 nats
    expected by step 2000 (80 % 0.0210–0.0650), 12m 30s left`."""
    if verdict.action == "finished":
        best = f": best val {verdict.best_loss:.4f} at step {verdict.best_step}"
        return "finished" + (best if verdict.best_step is not None else "")
    action = verdict.action
    if action == "stop" and not verdict.early_stop:
        action = "would stop (--early_stop is off)"
    if verdict.action == "stop" and verdict.evals_since_best >= verdict.patience:
        return f"{action}: {_rise(verdict)}, patience {verdict.patience}"
    if verdict.gain is not None:
        low, high = verdict.gain_interval
        parts = [
            f"{verdict.gain:+.4f} nats expected by step {verdict.final_step} "
            f"({PERCENT} {low:.4f}–{high:.4f})"
        ]
        if verdict.action == "stop":
            parts.append(f"under the {verdict.min_gain:g} threshold")
    else:
        parts = [f"no forecast ({verdict.forecast_status})"]
    if verdict.seconds_left is not None:
        parts.append(f"{format_duration(verdict.seconds_left)} left")
    rise = f"; {_rise(verdict)}" if verdict.rising else ""
    return f"{action}: " + ", ".join(parts) + rise


def _rise(verdict: Verdict) -> str:
    return (
        f"val rising for {_evals(verdict.evals_since_best)} (best {verdict.best_loss:.4f} at "
        f"step {verdict.best_step})"
    )


def _evals(count: int) -> str:
    return f"{count} eval{'' if count == 1 else 's'}"


def report_lines(verdict: Verdict, stopped: tuple[int, str] | None = None) -> list[str]:
    """Markdown bullet lines for the report's Keep or Stop section; `stopped` is the run's stop
    record (step, reason) when --early_stop ended it."""
    if stopped is not None:
        lines = [f"- **Stopped early** at step {stopped[0]} by `--early_stop`: {stopped[1]}."]
    elif verdict.action == "finished":
        lines = [f"- **Verdict**: finished — {verdict.reason}; nothing is left to decide."]
    else:
        off = verdict.action == "stop" and not verdict.early_stop
        advice = " (advice only: `--early_stop` is off)" if off else ""
        lines = [
            f"- **Verdict at step {verdict.step}**: {verdict.action}{advice} — {verdict.reason}."
        ]
    if verdict.gain is not None:
        low, high = verdict.gain_interval
        lines.append(
            f"- **Expected gain** by step {verdict.final_step}: {verdict.gain:+.4f} nats of val "
            f"loss ({PERCENT} interval {low:+.4f} to {high:+.4f})"
        )
    elif verdict.remaining_steps > 0:
        lines.append(f"- **Expected gain**: unknown, no forecast: {verdict.no_forecast}")
    if verdict.seconds_left is not None and verdict.remaining_steps > 0:
        lines.append(
            f"- **Time it costs**: about {format_duration(verdict.seconds_left)} for the "
            f"remaining {verdict.remaining_steps:,} steps (the median seconds per step of the "
            "recent train logs)"
        )
    if verdict.best_step is not None:
        since = (
            f"above it for the {_evals(verdict.evals_since_best)} since"
            if verdict.rising
            else "the latest eval is the best"
        )
        lines.append(
            f"- **Val vs its best**: best {verdict.best_loss:.4f} at step {verdict.best_step}; "
            + since
        )
    if verdict.early_stop:
        rule = (
            f"on: stop when val loss stays above its best for {_evals(verdict.patience)}, or "
            f"when even the optimistic end of the gain's interval is below "
            f"{verdict.min_gain:g} nats"
        )
    else:
        rule = "off: the run trains to max_steps whatever the verdict"
    lines.append(f"- **Early stop**: {rule}")
    return lines
