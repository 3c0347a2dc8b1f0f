"""Where a run's validation loss is going: a prediction of the val loss at the evals still to
come with a calibrated 80 % interval, "too early to forecast" while the records cannot pin it
down, a check for val loss that has turned upward, and the backtest of one run.

The train loss, logged every few steps, is far denser than the evals, so the curve is fitted to
it: the LR-annealing law of Tissue et al. (2024), L = E + A·S1^(−α) − B·D(t), where S1 is the
area under the LR schedule (in steps at the peak LR) and D the fraction of the peak LR that has
been taken away so far, followed with a lag of ~1/(1−λ) steps. The annealing bonus B cannot be
read from a run whose LR has not dropped yet, so it is a prior: a share of what the run has
learned so far (3–10 % on most design runs' full curves). Val loss falls slower than train loss
as the model starts to memorise: the forecast moves val by c times the fitted train curve's
change, c a prior (0.6–0.9 on the design runs) until the run's own evals show it.

Every choice the records cannot settle (where the power law starts, the largest exponent, B,
c) is kept as a set of variants; the prediction is their median and the interval their spread
times a factor calibrated on the design runs, so that it holds the final val loss in 80 % of
them. `benchmarks/forecast.py` measures both on held-out runs; docs/forecast.md has the table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from nexus.config import TrainConfig
from nexus.schedule import ScheduleHistory, lr_at

PROBABILITY = 0.8
PERCENT = f"{100 * PROBABILITY:.0f} %"
# The interval's half-width is a scale × (the variants' half-spread + CHANGE_SHARE × the
# predicted change from the latest val loss): the spread is what the records leave open, the
# change how far the forecast reaches. The scale depends on the share of the run seen (early
# forecasts miss by more than their spread shows) and is read off INTERVAL_SCALES between the
# points. All calibrated on the design runs, so that PROBABILITY of their final val losses fall
# inside at each share of the run (`python benchmarks/forecast.py --calibrate`).
CHANGE_SHARE = 0.1
INTERVAL_SCALES = (  # (share of max_steps seen, scale), 30 design runs
    (0.15, 1.68), (0.20, 1.68), (0.25, 1.68), (0.30, 1.56), (0.35, 1.50), (0.40, 1.49),
    (0.45, 1.30), (0.50, 1.10), (0.55, 0.96), (0.60, 0.84), (0.65, 0.83), (0.70, 0.78),
    (0.75, 0.78), (0.80, 0.77), (0.85, 0.75), (0.90, 0.69),
)  # fmt: skip
# What the held-out test runs measured for that interval (`python benchmarks/forecast.py`).
MEASURED_COVERAGE = (
    "from 20, 30, 50 and 70 % of 32 held-out runs it held the final val loss in 78–86 % of them"
)
TOO_WIDE_NATS = 1.0  # an interval wider than this says nothing a user can act on: "too early"
LAG_MOMENTUM = 0.97  # the loss follows an LR drop over ~1/(1-λ) = 33 steps
FIT_STARTS = (0.25, 0.5)  # the power law is fitted from this fraction of the steps seen
ALPHA_CAPS = (0.5, 0.8, 1.5)  # largest exponent allowed; early on a steep fit flattens too soon
# B, the nats gained by taking the LR from the peak to 0, as a share of what the run has
# learned so far (the uniform guess's ln(vocab) minus the train loss now).
ANNEALING_BONUS = (0.02, 0.05)
VAL_PER_TRAIN = (0.65, 0.85)  # c, val loss change per unit of train loss change
ALPHA_GRID = np.geomspace(0.05, 2.0, 40)
# From OWN_SLOPE_EVALS evals on, c is the run's own slope of val against the train curve, kept
# in OWN_SLOPE_RANGE and shrunk toward the prior as if the prior were OWN_SLOPE_PRIOR_EVALS evals.
OWN_SLOPE_EVALS = 3
OWN_SLOPE_PRIOR_EVALS = 3
OWN_SLOPE_RANGE = (0.3, 1.0)
LEVEL_LOGS = 3  # the latest train logs that say where the train loss is now
MIN_TRAIN_LOGS = 5
MIN_EVALS = 2
OFFSET_EVALS = 3  # the latest evals that place the val curve against the train curve
# Val loss "has turned upward" when the last evals sit above the best by more than this.
RISE_TOLERANCE_NATS = 0.01
RISE_EVALS = 2


@dataclass(frozen=True)
class Schedule:
    """The LR schedule as the curve sees it, at every step 0..last: the LR area S1 and the
    lagged LR drop D (0 at the peak, 1 − min_lr/lr once the decay is over and felt)."""

    area: np.ndarray
    drop: np.ndarray

    @classmethod
    def of(
        cls,
        config: TrainConfig,
        last_step: int | None = None,
        history: ScheduleHistory | None = None,
    ) -> Schedule:
        """From `config`'s schedule, or from `history` (the LR each past step ran with, when a
        resume changed it), in units of `config`'s peak LR."""
        last = max(config.max_steps, last_step or 0)
        lr = history.lr if history is not None else (lambda step: lr_at(step, config))
        lrs = np.array([lr(step) for step in range(1, last + 1)]) / config.lr
        decrease = np.zeros(last)
        decrease[1:] = np.maximum(lrs[:-1] - lrs[1:], 0.0)
        decrease[: config.warmup_steps] = 0.0  # the warmup's rise is not annealing
        felt = np.empty(last)  # each decrease felt at 1 − λ^(steps since): a first-order lag
        carried = 0.0
        for i, amount in enumerate(decrease):
            carried = LAG_MOMENTUM * carried + amount
            felt[i] = carried
        drop = np.cumsum(felt) * (1 - LAG_MOMENTUM)
        return cls(area=np.concatenate([[0.0], np.cumsum(lrs)]), drop=np.concatenate([[0], drop]))


@dataclass(frozen=True)
class Variant:
    """One reading of the records: a train curve E + A·S1^(−α) − B·D and the val curve on it."""

    floor: float  # E
    scale: float  # A
    alpha: float
    bonus: float  # B
    val_per_train: float  # c
    offset: float  # val = offset + c·train curve

    def train_curve(self, steps: np.ndarray, schedule: Schedule) -> np.ndarray:
        power = self.scale * schedule.area[steps] ** -self.alpha
        return self.floor + power - self.bonus * schedule.drop[steps]

    def val_curve(self, steps: np.ndarray, schedule: Schedule) -> np.ndarray:
        return self.offset + self.val_per_train * self.train_curve(steps, schedule)

    def formula(self) -> str:
        return (
            f"L_train = {self.floor:.4f} + {self.scale:.4g}·S1^(−{self.alpha:.3f}) − "
            f"{self.bonus:.4f}·D; L_val = {self.offset:+.4f} + {self.val_per_train:.3f}·L_train"
        )


@dataclass(frozen=True)
class Forecast:
    """Predicted val loss at future eval steps with a PROBABILITY interval, or the reason
    there is none."""

    status: str  # "ok", "too_early", "rising", "finished"
    message: str
    used_steps: tuple[int, ...]  # the evals read
    ignored_steps: tuple[int, ...]  # evals with a NaN or infinite val loss, left out
    steps: tuple[int, ...] = ()
    predicted: tuple[float, ...] = ()
    lower: tuple[float, ...] = ()
    upper: tuple[float, ...] = ()
    central: Variant | None = None  # the variant nearest the median at the last step


def forecast_val_loss(
    train_steps: Sequence[int],
    train_losses: Sequence[float],
    eval_steps: Sequence[int],
    val_losses: Sequence[float],
    config: TrainConfig,
    future_steps: Sequence[int],
    schedule: Schedule | None = None,
) -> Forecast:
    """Predict the val loss at `future_steps` from the train losses logged and the evals so
    far; each prediction comes with a PROBABILITY interval."""
    evals, ignored = _finite(eval_steps, val_losses)
    logs, _ = _finite(train_steps, train_losses)
    seen = max([s for s, _ in evals] + [s for s, _ in logs] + [0])
    future = tuple(sorted(s for s in set(future_steps) if seen < s <= config.max_steps))
    common = {"used_steps": tuple(s for s, _ in evals), "ignored_steps": ignored}
    if len(evals) < MIN_EVALS:
        return Forecast(
            "too_early",
            f"too early to forecast: {len(evals)} finite val loss"
            f"{'' if len(evals) == 1 else 'es'} recorded, the forecast needs {MIN_EVALS}",
            **common,
        )
    rise = detect_rise([s for s, _ in evals], [v for _, v in evals])
    if rise is not None:
        return Forecast("rising", rise, **common)
    if not future:
        return Forecast(
            "finished", "the run has reached its last eval step; nothing is left to predict",
            **common,
        )  # fmt: skip
    schedule = schedule or Schedule.of(config, max(future[-1], seen))
    variants = _variants(logs, evals, config, schedule)
    if not variants:
        start = _fit_start(FIT_STARTS[0], seen, config)
        after = sum(1 for s, _ in logs if s >= start)
        return Forecast(
            "too_early",
            f"too early to forecast: {after} train-loss log{'' if after == 1 else 's'} from "
            f"step {start} (past the warmup and the first {100 * FIT_STARTS[0]:.0f} % of the steps "
            f"seen); the curve fit needs {MIN_TRAIN_LOGS}",
            **common,
        )
    steps = np.asarray(future)
    curves = np.stack([v.val_curve(steps, schedule) for v in variants])  # (variants, steps)
    predicted = np.median(curves, axis=0)
    change = np.abs(predicted - evals[-1][1])
    half_spread = (curves.max(axis=0) - curves.min(axis=0)) / 2
    scale = np.interp(seen / config.max_steps, *zip(*INTERVAL_SCALES, strict=True))
    half_width = scale * (half_spread + CHANGE_SHARE * change)
    width = 2 * half_width[-1]
    if width > TOO_WIDE_NATS:
        return Forecast(
            "too_early",
            f"too early to forecast: the curves that fit the records so far put the val loss "
            f"at step {future[-1]} anywhere in a {width:.2f}-nat {PERCENT} interval "
            f"(a forecast needs it under {TOO_WIDE_NATS} nats); it narrows as the run goes on",
            **common,
        )
    # Cross-entropy is never below 0, so neither is a prediction or an interval.
    predicted = np.maximum(predicted, 0.0)
    lower = np.maximum(predicted - half_width, 0.0)
    upper = predicted + half_width
    central = variants[int(np.argmin(np.abs(curves[:, -1] - predicted[-1])))]
    return Forecast(
        "ok",
        f"{len(variants)} curve variants fitted to {len(logs)} train-loss logs and "
        f"{len(evals)} evals (steps up to {seen})",
        steps=future,
        predicted=tuple(float(v) for v in predicted),
        lower=tuple(float(v) for v in lower),
        upper=tuple(float(v) for v in upper),
        central=central,
        **common,
    )


def _variants(
    logs: list[tuple[int, float]],
    evals: list[tuple[int, float]],
    config: TrainConfig,
    schedule: Schedule,
) -> list[Variant]:
    seen = max(logs[-1][0] if logs else 0, evals[-1][0])
    uniform = math.log(config.model_config().vocab_size)
    learned = max(uniform - float(np.mean([v for _, v in logs[-LEVEL_LOGS:]] or [uniform])), 0)
    variants = []
    for start_fraction in FIT_STARTS:
        start = _fit_start(start_fraction, seen, config)
        fitted = [(s, v) for s, v in logs if s >= start]
        if len(fitted) < MIN_TRAIN_LOGS:
            continue
        train_steps = np.array([s for s, _ in fitted])
        train_values = np.array([v for _, v in fitted])
        # The evals inside the fitted range place the val curve; at least the latest one.
        placed = [(s, v) for s, v in evals if s >= start] or evals[-1:]
        eval_steps = np.array([s for s, _ in placed[-OFFSET_EVALS:]])
        eval_values = np.array([v for _, v in placed[-OFFSET_EVALS:]])
        for share in ANNEALING_BONUS:
            bonus = share * learned
            lifted = train_values + bonus * schedule.drop[train_steps]
            floors, scales, errors = _power_law_fits(schedule.area[train_steps], lifted)
            for cap in ALPHA_CAPS:
                best = int(np.argmin(np.where(cap >= ALPHA_GRID, errors, np.inf)))
                curve = Variant(floors[best], scales[best], ALPHA_GRID[best], bonus, 1.0, 0.0)
                for c in _val_per_train(curve, placed, schedule):
                    train_at_evals = curve.train_curve(eval_steps, schedule)
                    offset = float(np.mean(eval_values - c * train_at_evals))
                    variants.append(replace(curve, val_per_train=c, offset=offset))
    return variants


def _fit_start(fraction: float, seen: int, config: TrainConfig) -> int:
    """The first step of the power-law fit: past the warmup and `fraction` of the steps seen."""
    return max(config.warmup_steps + 1, int(fraction * seen))


def _val_per_train(
    curve: Variant, evals: list[tuple[int, float]], schedule: Schedule
) -> tuple[float, ...]:
    """c as this run's own evals show it, once there are enough of them: the slope of val
    loss against the train curve, kept within what the design runs showed."""
    if len(evals) < OWN_SLOPE_EVALS:
        return VAL_PER_TRAIN
    train = curve.train_curve(np.array([s for s, _ in evals]), schedule)
    if np.ptp(train) < 1e-6:
        return VAL_PER_TRAIN
    slope = float(np.clip(np.polyfit(train, [v for _, v in evals], 1)[0], *OWN_SLOPE_RANGE))
    weight = len(evals) / (len(evals) + OWN_SLOPE_PRIOR_EVALS)
    centre = weight * slope + (1 - weight) * float(np.mean(VAL_PER_TRAIN))
    half = (VAL_PER_TRAIN[1] - VAL_PER_TRAIN[0]) / 2
    return (centre - half, centre + half)


def _power_law_fits(area: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """Least squares of y = E + A·area^(−α) with E, A ≥ 0, for every α of ALPHA_GRID at once:
    E, A and the squared error, each an array over the grid."""
    z = area[:, None] ** -ALPHA_GRID[None, :]  # (points, grid)
    z_mean, y_mean = z.mean(axis=0), y.mean()
    centred = z - z_mean
    scale = (centred * (y - y_mean)[:, None]).sum(axis=0) / np.maximum(
        (centred**2).sum(axis=0), 1e-30
    )
    floor = y_mean - scale * z_mean
    # A loss that rises with training is no power law: a flat line is the best such curve.
    rising = scale < 0
    scale, floor = np.where(rising, 0.0, scale), np.where(rising, y_mean, floor)
    # A floor below 0 would let the curve reach impossible losses: refit through E = 0.
    below = floor < 0
    through_zero = (z * y[:, None]).sum(axis=0) / (z**2).sum(axis=0)
    scale, floor = np.where(below, through_zero, scale), np.where(below, 0.0, floor)
    errors = ((floor + scale * z - y[:, None]) ** 2).sum(axis=0)
    return floor, scale, errors


def _finite(
    steps: Sequence[int], values: Sequence[float]
) -> tuple[list[tuple[int, float]], tuple[int, ...]]:
    pairs = sorted(zip(steps, values, strict=True))
    kept = [(int(s), float(v)) for s, v in pairs if s > 0 and math.isfinite(v)]
    ignored = tuple(int(s) for s, v in pairs if not math.isfinite(v))
    return kept, ignored


def detect_rise(steps: Sequence[int], losses: Sequence[float]) -> str | None:
    """A sentence saying val loss has turned upward, or None while it still falls (within noise).

    Rising means the last RISE_EVALS evals all came after the best one and the latest sits more
    than RISE_TOLERANCE_NATS above it; one bad eval alone is treated as noise.
    """
    best = int(np.argmin(losses))
    evals_since = len(losses) - 1 - best
    climb = losses[-1] - losses[best]
    if evals_since < RISE_EVALS or climb <= RISE_TOLERANCE_NATS:
        return None
    return (
        f"val loss has turned upward: {losses[-1]:.4f} at step {steps[-1]}, up {climb:.4f} nats "
        f"from its best {losses[best]:.4f} at step {steps[best]} over {evals_since} evals "
        f"(threshold: {RISE_EVALS} evals and {RISE_TOLERANCE_NATS} nats); a learning curve "
        "assumes the loss keeps falling, so there is no forecast: the model is over-fitting"
    )


@dataclass(frozen=True)
class Backtest:
    """A forecast made from a run's records up to a cutoff, beside what the run then reached."""

    cutoff_step: int
    target_step: int
    actual: float | None  # the val loss recorded at target_step; None if not (yet) recorded
    last_value: float | None  # the val loss of the last eval at or before the cutoff
    forecast: Forecast

    @property
    def error(self) -> float | None:
        if self.actual is None or self.forecast.status != "ok":
            return None
        return self.forecast.predicted[-1] - self.actual

    @property
    def inside(self) -> bool | None:
        if self.actual is None or self.forecast.status != "ok":
            return None
        return self.forecast.lower[-1] <= self.actual <= self.forecast.upper[-1]


def backtest(
    train_steps: Sequence[int],
    train_losses: Sequence[float],
    eval_steps: Sequence[int],
    val_losses: Sequence[float],
    config: TrainConfig,
    cutoff_step: int,
    schedule: Schedule | None = None,
) -> Backtest:
    """Forecast the val loss at max_steps from the records up to `cutoff_step` alone."""
    evals, _ = _finite(eval_steps, val_losses)
    known = [(s, v) for s, v in zip(eval_steps, val_losses, strict=True) if s <= cutoff_step]
    logs = [(s, v) for s, v in zip(train_steps, train_losses, strict=True) if s <= cutoff_step]
    target = config.max_steps
    forecast = forecast_val_loss(
        [s for s, _ in logs], [v for _, v in logs], [s for s, _ in known], [v for _, v in known],
        config, [target], schedule,
    )  # fmt: skip
    actual = next((v for s, v in evals if s == target), None)
    last = [v for s, v in evals if s <= cutoff_step]
    return Backtest(cutoff_step, target, actual, last[-1] if last else None, forecast)


def format_backtest(result: Backtest) -> str:
    """The backtest as a few plain lines for the terminal."""
    forecast = result.forecast
    lines = [
        f"Backtest: records up to step {result.cutoff_step} → val loss at step "
        f"{result.target_step}",
        f"  actual:     {result.actual:.4f}" if result.actual is not None
        else "  actual:     not recorded yet (the run has no eval at its last step)",
    ]  # fmt: skip
    if forecast.status == "ok":
        inside = {True: "inside", False: "OUTSIDE", None: "-"}[result.inside]
        error = "" if result.error is None else f"error {result.error:+.4f} ({inside} the interval)"
        lines.append(
            f"  forecast:   {forecast.predicted[-1]:.4f}, {PERCENT} interval "
            f"{forecast.lower[-1]:.4f}–{forecast.upper[-1]:.4f}  {error}".rstrip()
        )
    else:
        lines.append(f"  forecast:   none — {forecast.message}")
    if result.last_value is not None:
        error = "" if result.actual is None else f"  error {result.last_value - result.actual:+.4f}"
        lines.append(f"  last value: {result.last_value:.4f}{error}")
    return "\n".join(lines)
