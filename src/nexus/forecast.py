"""Where a run's validation loss is going: a schedule-aware learning-curve fit to the val losses
seen so far, a prediction with an interval for each future eval, a check for val loss that has
turned upward, and the backtest that measures the forecast against what the run really did.

The curve is the learning-rate-annealing law of Tissue et al. (2024), "Scaling law with learning
rate annealing": L = L∞ + A·S1^(−α) − C·S2, where S1 is the area under the LR curve (in steps at
the peak LR) and S2 the annealing area, a momentum-smoothed sum of the LR drops. A plain power law
in steps cannot know that a cosine schedule still has its annealing drop to come; S1 and S2 do.

With a handful of evals such a four-parameter fit can swing, so each curve is the median over
four curve shapes (the annealing law with a fast and a slow response to LR drops, a power law in
S1, a power law in steps).

No such law knows that a run repeating its data over-fits: on the 2000-step reference run (about
4 epochs over 1 MB) val loss flattened from step 1400 while the train/val gap grew from 0.15 to
0.37, so the val-only curve forecast 0.024 nats too low from step 1000 and 0.09 from step 600.
When the run records its train loss, the forecast is therefore the mean of two readings of the
same records with opposite biases: the val curve itself (blind to over-fitting, so too low), and
the train curve plus the train/val gap extrapolated as a line in steps, i.e. in epochs (the gap
grows faster within the first epochs than later, so this reading runs high early on). Neither
weight is tuned to the reference run; the interval says how far off both may be.

The interval spans a residual bootstrap, every shape of both readings, and, for the model error
no bootstrap sees, a rolling-origin backtest on the run's own evals: from each earlier cutoff the
same forecast predicts the later evals already recorded, and its errors, scaled linearly from
their horizon to the one asked for, widen the band on the side they fell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from nexus.config import TrainConfig
from nexus.schedule import lr_at

MIN_POINTS = 3
BOOTSTRAP_SAMPLES = 100
BOOTSTRAP_SEED = 20240
INTERVAL_PERCENTILES = (5.0, 95.0)  # a 90 % band
ALPHA_GRID = np.geomspace(0.05, 4.0, 48)  # starting points for the exponent
# Momentum of the annealing area: the loss answers an LR drop over ~1/(1-λ) steps. Tissue et al.
# use 0.999 on runs of tens of thousands of steps; the shapes below bracket the response time.
ANNEALING_MOMENTA = (0.99, 0.999)
# Val loss "has turned upward" when the last evals sit above the best by more than this.
RISE_TOLERANCE_NATS = 0.01
RISE_EVALS = 2
# The rolling-origin backtest uses at most this many of the latest cutoffs (fast on long runs).
ROLLING_ORIGINS = 8


@dataclass(frozen=True)
class ScheduleAreas:
    """S1 (LR area) and S2 (annealing area) at every step 0..last, in units of peak-LR steps."""

    s1: np.ndarray
    s2: dict[float, np.ndarray]  # by annealing momentum λ

    @classmethod
    def of(cls, config: TrainConfig, last_step: int | None = None) -> ScheduleAreas:
        last = max(config.max_steps, last_step or 0)
        lrs = np.array([lr_at(step, config) for step in range(1, last + 1)]) / config.lr
        drops = np.zeros(last)
        drops[1:] = lrs[:-1] - lrs[1:]
        drops[: config.warmup_steps] = 0.0  # the warmup's rise is not annealing
        s2 = {
            lam: np.concatenate([[0.0], np.cumsum(_momentum(drops, lam))])
            for lam in ANNEALING_MOMENTA
        }
        return cls(s1=np.concatenate([[0.0], np.cumsum(lrs)]), s2=s2)


def _momentum(drops: np.ndarray, lam: float) -> np.ndarray:
    out = np.empty_like(drops)
    carried = 0.0
    for i, drop in enumerate(drops):
        carried = lam * carried + drop
        out[i] = carried
    return out


@dataclass(frozen=True)
class CurveShape:
    """One candidate learning-curve form, linear in (L∞, A, C) for a fixed exponent α."""

    name: str
    momentum: float | None  # None: no annealing term
    in_steps: bool = False  # the plain power law: steps in place of the LR area

    def features(self, steps: np.ndarray, areas: ScheduleAreas) -> tuple[np.ndarray, np.ndarray]:
        s2 = areas.s2[self.momentum][steps] if self.momentum is not None else np.zeros(len(steps))
        return (steps.astype(float) if self.in_steps else areas.s1[steps]), s2

    def formula(self, params: np.ndarray) -> str:
        floor, scale, alpha, anneal = params
        variable = "t" if self.in_steps else "S1"
        text = f"L = {floor:.4f} + {scale:.4g}·{variable}^(−{alpha:.3f})"
        if self.momentum is None:
            return text
        return text + f" − {anneal:.4g}·S2 (momentum {self.momentum})"


POWER_LAW_IN_STEPS = CurveShape("power law in steps", None, in_steps=True)
SHAPES = (
    CurveShape("LR-annealing law, fast response", 0.99),
    CurveShape("LR-annealing law, slow response", 0.999),
    CurveShape("power law in LR area", None),
    POWER_LAW_IN_STEPS,
)


@dataclass(frozen=True)
class CurveFit:
    shape: CurveShape
    params: np.ndarray  # L∞, A, α, C
    rmse: float
    scaled: np.ndarray  # the solver's own coordinates, to restart from in the bootstrap

    @property
    def floor(self) -> float:
        return float(self.params[0])

    @property
    def alpha(self) -> float:
        return float(self.params[2])

    def predict(self, steps: Sequence[int], areas: ScheduleAreas) -> np.ndarray:
        s1, s2 = self.shape.features(np.asarray(steps, dtype=int), areas)
        return _curve(self.params, s1, s2)

    def formula(self) -> str:
        return self.shape.formula(self.params)


def _curve(params: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    floor, scale, alpha, anneal = params
    return floor + scale * s1 ** (-alpha) - anneal * s2


def fit_curve(
    steps: Sequence[int], losses: Sequence[float], shape: CurveShape, areas: ScheduleAreas
) -> CurveFit:
    """Least-squares fit of one shape, started from the best exponent α on a grid."""
    problem = _Problem.of(
        np.asarray(steps, dtype=int), np.asarray(losses, dtype=float), shape, areas
    )
    return problem.solve(problem.grid_start())


@dataclass(frozen=True)
class _Problem:
    """One fit in scaled coordinates: L = L∞ + B·(S1/S1_last)^(−α) − D·(S2/S2_last), so that
    every parameter is of order one and the solver sees a well-conditioned problem."""

    shape: CurveShape
    y: np.ndarray
    s1: np.ndarray
    s2: np.ndarray  # all zero for a shape without annealing or before the LR has dropped
    s1_ref: float
    s2_ref: float

    @classmethod
    def of(
        cls, steps: np.ndarray, y: np.ndarray, shape: CurveShape, areas: ScheduleAreas
    ) -> _Problem:
        s1, s2 = shape.features(steps, areas)
        s2_ref = float(s2.max())
        scaled_s2 = s2 / s2_ref if s2_ref > 1e-9 else np.zeros_like(s2)
        return cls(shape, y, s1 / s1[-1], scaled_s2, float(s1[-1]), s2_ref)

    @property
    def anneals(self) -> bool:
        return bool(np.any(self.s2 > 0))

    def curve(self, free: np.ndarray) -> np.ndarray:
        anneal = free[3] * self.s2 if self.anneals else 0.0
        return free[0] + free[1] * self.s1 ** (-free[2]) - anneal

    def jacobian(self, free: np.ndarray) -> np.ndarray:
        power = self.s1 ** (-free[2])
        columns = [np.ones_like(self.y), power, -free[1] * power * np.log(self.s1)]
        return np.stack([*columns, -self.s2] if self.anneals else columns, axis=1)

    def bounds(self) -> tuple[list[float], list[float]]:
        # Without annealing L∞ is the floor the curve approaches from above; with it, the
        # annealing drop may carry the loss below L∞, so L∞ is only kept physical.
        top = float(self.y.max()) if self.anneals else float(self.y.min())
        lower, upper = [0.0, 0.0, 0.01], [top, np.inf, 6.0]
        return ([*lower, 0.0], [*upper, np.inf]) if self.anneals else (lower, upper)

    def grid_start(self) -> np.ndarray:
        best, best_cost = None, math.inf
        lower, upper = self.bounds()
        for alpha in ALPHA_GRID:
            columns = [np.ones_like(self.y), self.s1 ** (-alpha)]
            columns += [-self.s2] if self.anneals else []
            linear = np.linalg.lstsq(np.stack(columns, axis=1), self.y, rcond=None)[0]
            free = np.insert(linear, 2, alpha)
            free = np.clip(free, np.array(lower) + 1e-9, np.minimum(upper, 1e6))
            cost = float(np.sum((self.curve(free) - self.y) ** 2))
            if cost < best_cost:
                best, best_cost = free, cost
        return best

    def solve(self, start: np.ndarray) -> CurveFit:
        result = least_squares(
            lambda free: self.curve(free) - self.y, start, jac=self.jacobian,
            bounds=self.bounds(), xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=500,
        )  # fmt: skip
        floor, scaled, alpha = result.x[:3]
        anneal = result.x[3] / self.s2_ref if self.anneals else 0.0
        params = np.array([floor, scaled * self.s1_ref**alpha, alpha, anneal])
        rmse = float(np.sqrt(np.mean(result.fun**2)))
        return CurveFit(shape=self.shape, params=params, rmse=rmse, scaled=result.x)


@dataclass(frozen=True)
class Forecast:
    """Predicted val loss at future eval steps, or the reason there is no prediction."""

    status: str  # "ok", "too_few", "rising", "finished"
    message: str
    used_steps: tuple[int, ...]
    ignored_steps: tuple[int, ...]  # NaN or infinite val losses left out of the fit
    steps: tuple[int, ...] = ()
    predicted: tuple[float, ...] = ()
    lower: tuple[float, ...] = ()
    upper: tuple[float, ...] = ()
    fit: CurveFit | None = None  # the fast-response LR-annealing fit, the one bootstrapped
    interval_note: str = ""
    model_note: str = ""  # how the prediction is made, for the report


def forecast_val_loss(
    steps: Sequence[int],
    losses: Sequence[float],
    config: TrainConfig,
    future_steps: Sequence[int],
    areas: ScheduleAreas | None = None,
    train_losses: Sequence[float] | None = None,
) -> Forecast:
    """Fit the val losses seen so far (and, where given, the train losses recorded at the same
    evals) and predict `future_steps`, each with an interval."""
    used, values, ignored = _finite_points(steps, losses)
    future = tuple(sorted(s for s in set(future_steps) if not used or s > used[-1]))
    common = {"used_steps": tuple(used), "ignored_steps": ignored}
    if len(used) < MIN_POINTS:
        message = (
            f"too few points to forecast: {len(used)} finite val loss"
            f"{'' if len(used) == 1 else 'es'}, and a learning curve needs at least {MIN_POINTS}"
        )
        return Forecast(status="too_few", message=message, **common)
    rise = detect_rise(used, values)
    if rise is not None:
        return Forecast(status="rising", message=rise, **common)
    if not future:
        return Forecast(
            status="finished",
            message="the run has reached its last eval step; nothing is left to predict",
            **common,
        )
    areas = areas or ScheduleAreas.of(config, max(future[-1], used[-1]))
    pairs = _train_pairs(steps, losses, train_losses)
    point = _point_forecast(used, values, pairs, future, areas)
    bootstrap = _bootstrap(point.primary, used, values, future, areas)
    lower, upper = np.percentile(bootstrap, INTERVAL_PERCENTILES, axis=0)
    lower = np.minimum(lower, point.candidates.min(axis=0))
    upper = np.maximum(upper, point.candidates.max(axis=0))
    errors = _rolling_errors(used, values, pairs, future, areas)
    if len(errors):
        lower = np.minimum(lower, point.predicted + errors.min(axis=0))
        upper = np.maximum(upper, point.predicted + errors.max(axis=0))
    return Forecast(
        status="ok",
        message=f"fitted to {len(used)} val losses (steps {used[0]}–{used[-1]})",
        steps=future,
        predicted=tuple(float(v) for v in point.predicted),
        lower=tuple(float(v) for v in lower),
        upper=tuple(float(v) for v in upper),
        fit=point.primary,
        interval_note=_interval_note(point.primary, len(used), len(errors)),
        model_note=MODEL_NOTE_WITH_TRAIN if point.via_train else MODEL_NOTE_VAL_ONLY,
        **common,
    )


MODEL_NOTE_VAL_ONLY = (
    "the median prediction of four learning-curve shapes fitted to the val losses (no train "
    "losses recorded to read the train/val gap from)"
)
MODEL_NOTE_WITH_TRAIN = (
    "the mean of two readings, each the median of four learning-curve shapes: the val losses "
    "fitted directly, which cannot see over-fitting and so tends to forecast too low, and the "
    "train losses fitted the same way plus the train/val gap extrapolated as a line in steps "
    "(in epochs over the data), which tends to forecast too high while the gap still grows fast"
)
INTERVAL_NOTE = (
    "the 90 % residual bootstrap (fixed seed) of the fast-response LR-annealing fit, widened "
    "to take in every curve shape's prediction (LR-annealing law with fast and slow response, "
    "power law in LR area, power law in steps; for the val curve and, where recorded, the "
    "train curve plus gap)"
)


def _interval_note(fit: CurveFit, points: int, backtests: int) -> str:
    if backtests:
        note = (
            f"{INTERVAL_NOTE}, and by the errors of {backtests} rolling-origin backtest "
            "forecast(s) of this run's own later evals from its earlier ones, scaled linearly "
            "from their horizon to each step's; a band that covers model error, not a "
            "calibrated 90 % probability"
        )
    else:
        note = f"{INTERVAL_NOTE}; too few evals yet for a rolling-origin backtest of model error"
    if points > len(fit.scaled):
        return note
    # An exact fit leaves no residuals to resample: say the band is too narrow, not hide it.
    return (
        f"{note}; with {points} points and {len(fit.scaled)} fitted parameters the "
        "curve passes through every point, so the bootstrap measures no scatter and this band "
        "understates the uncertainty"
    )


@dataclass(frozen=True)
class _PointForecast:
    predicted: np.ndarray
    candidates: np.ndarray  # every shape's prediction of every reading; rows shapes, columns steps
    primary: CurveFit
    via_train: bool


def _train_pairs(
    steps: Sequence[int], losses: Sequence[float], train_losses: Sequence[float] | None
) -> tuple[list[int], list[float], list[float]] | None:
    """The evals with finite val and train loss, as steps, train losses and train/val gaps."""
    if train_losses is None or len(train_losses) != len(steps):
        return None
    rows = sorted(
        (s, t, v - t)
        for s, v, t in zip(steps, losses, train_losses, strict=True)
        if s > 0 and math.isfinite(v) and math.isfinite(t)
    )
    if len(rows) < MIN_POINTS:
        return None
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def _point_forecast(
    steps: list[int],
    values: list[float],
    pairs: tuple[list[int], list[float], list[float]] | None,
    future: Sequence[int],
    areas: ScheduleAreas,
) -> _PointForecast:
    fits = [fit_curve(steps, values, shape, areas) for shape in SHAPES]
    by_shape = np.stack([fit.predict(future, areas) for fit in fits])
    # With a handful of points a four-parameter fit can swing; the median of the shapes cannot.
    direct = np.median(by_shape, axis=0)
    if pairs is None or len(pairs[0]) < MIN_POINTS:
        return _PointForecast(direct, by_shape, fits[0], via_train=False)
    train_steps, train_values, gaps = pairs
    gap = np.polyval(np.polyfit(np.asarray(train_steps, float), gaps, 1), np.asarray(future))
    via_train = np.stack(
        [fit_curve(train_steps, train_values, shape, areas).predict(future, areas) + gap
         for shape in SHAPES]
    )  # fmt: skip
    predicted = 0.5 * (direct + np.median(via_train, axis=0))
    return _PointForecast(predicted, np.vstack([by_shape, via_train]), fits[0], via_train=True)


def _rolling_errors(
    steps: list[int],
    values: list[float],
    pairs: tuple[list[int], list[float], list[float]] | None,
    future: tuple[int, ...],
    areas: ScheduleAreas,
) -> np.ndarray:
    """Actual minus forecast for each later eval from each earlier cutoff with enough points,
    scaled linearly from its horizon to each future step's; rows are (cutoff, eval) pairs."""
    rows = []
    horizons = np.asarray(future, dtype=float) - steps[-1]
    first = max(MIN_POINTS, len(steps) - ROLLING_ORIGINS)
    for count in range(first, len(steps)):
        origin = steps[count - 1]
        known = None
        if pairs is not None:
            keep = [i for i, s in enumerate(pairs[0]) if s <= origin]
            known = tuple([part[i] for i in keep] for part in pairs)
        later = steps[count:]
        point = _point_forecast(steps[:count], values[:count], known, later, areas)
        for step, predicted, actual in zip(later, point.predicted, values[count:], strict=True):
            rows.append((actual - predicted) * horizons / (step - origin))
    return np.array(rows)


def _finite_points(
    steps: Sequence[int], losses: Sequence[float]
) -> tuple[list[int], list[float], tuple[int, ...]]:
    pairs = sorted(zip(steps, losses, strict=True))
    used = [(s, v) for s, v in pairs if s > 0 and math.isfinite(v)]
    ignored = tuple(s for s, v in pairs if not math.isfinite(v))
    return [s for s, _ in used], [v for _, v in used], ignored


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


def _bootstrap(
    fit: CurveFit,
    steps: list[int],
    losses: list[float],
    future: tuple[int, ...],
    areas: ScheduleAreas,
) -> np.ndarray:
    """Refits on the fitted curve plus resampled residuals; rows are samples, columns steps."""
    fitted = fit.predict(steps, areas)
    residuals = np.asarray(losses) - fitted
    n, k = len(steps), len(fit.scaled)
    residuals = residuals * math.sqrt(n / (n - k)) if n > k else residuals  # undo the fit's shrink
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    step_array = np.asarray(steps, dtype=int)
    rows = []
    for _ in range(BOOTSTRAP_SAMPLES):
        resampled = fitted + rng.choice(residuals, size=n, replace=True)
        problem = _Problem.of(step_array, resampled, fit.shape, areas)
        rows.append(problem.solve(fit.scaled).predict(future, areas))
    return np.array(rows)


def backtest_curve(
    steps: Sequence[int],
    losses: Sequence[float],
    config: TrainConfig,
    cutoff_step: int | None = None,
    train_losses: Sequence[float] | None = None,
) -> dict:
    """Forecast the last recorded val loss from the evals up to `cutoff_step` (default: half of
    max_steps) and score it, and the naive forecasts, against what the run really reached."""
    used, values, _ = _finite_points(steps, losses)
    cutoff = config.max_steps // 2 if cutoff_step is None else cutoff_step
    known = [(s, v) for s, v in zip(used, values, strict=True) if s <= cutoff]
    later = [(s, v) for s, v in zip(used, values, strict=True) if s > cutoff]
    target, actual = later[-1] if later else (config.max_steps, None)
    known_steps, known_values = [s for s, _ in known], [v for _, v in known]
    known_train = None
    if train_losses is not None and len(train_losses) == len(steps):
        by_step = dict(zip(steps, train_losses, strict=True))
        known_train = [by_step[s] for s in known_steps]
    result = forecast_val_loss(
        known_steps, known_values, config, [target], train_losses=known_train
    )
    forecast: dict = {"status": result.status, "message": result.message}
    if result.status == "ok":
        forecast.update(
            value=result.predicted[0], lower=result.lower[0], upper=result.upper[0],
            formula=result.fit.formula(), interval=result.interval_note,
            model=result.model_note,
        )  # fmt: skip
        _score(forecast, actual)
        forecast["inside"] = (
            None if actual is None else result.lower[0] <= actual <= result.upper[0]
        )
    naive = {name: _score({"value": value}, actual) for name, value in _naive(known, target)}
    return {
        "cutoff_step": cutoff,
        "target_step": target,
        "fit_steps": known_steps,
        "actual": actual,
        "forecast": forecast,
        "naive": naive,
    }


def _score(entry: dict, actual: float | None) -> dict:
    value = entry["value"]
    entry["error"] = None if actual is None or value is None else value - actual
    return entry


def _naive(known: list[tuple[int, float]], target: int) -> list[tuple[str, float | None]]:
    """The forecasts to beat: the last value, straight lines, and a power law in plain steps."""
    if not known:
        return [("last value", None)]
    steps = np.array([s for s, _ in known], dtype=float)
    values = np.array([v for _, v in known])
    out: list[tuple[str, float | None]] = [("last value", float(values[-1]))]
    if len(known) >= 2:
        slope = (values[-1] - values[-2]) / (steps[-1] - steps[-2])
        out.append(
            ("line through the last two evals", float(values[-1] + slope * (target - steps[-1])))
        )
        line = np.polyfit(steps, values, 1)
        out.append(("line fitted to all evals", float(np.polyval(line, target))))
    if len(known) >= MIN_POINTS:
        no_schedule = ScheduleAreas(s1=np.zeros(1), s2={})  # the plain power law needs none
        fit = fit_curve(steps.astype(int), values, POWER_LAW_IN_STEPS, no_schedule)
        out.append(("power law in steps", float(fit.predict([target], no_schedule)[0])))
    return out


def format_backtest(result: dict) -> str:
    """The backtest as a few plain lines for the terminal."""
    actual = result["actual"]
    lines = [
        f"Backtest: evals up to step {result['cutoff_step']} "
        f"({len(result['fit_steps'])} points) → val loss at step {result['target_step']}",
        f"  actual:   {_number(actual)}" if actual is not None
        else "  actual:   not recorded yet (the run has no finite val loss after the cutoff)",
    ]  # fmt: skip
    forecast = result["forecast"]
    if forecast["status"] == "ok":
        inside = {True: "inside", False: "OUTSIDE", None: "-"}[forecast["inside"]]
        lines += [
            f"  forecast: {forecast['value']:.4f}  interval [{forecast['lower']:.4f}, "
            f"{forecast['upper']:.4f}]  error {_signed(forecast['error'])}  "
            f"({inside} the interval)",
            f"            {forecast['formula']}",
        ]
    else:
        lines.append(f"  forecast: none — {forecast['message']}")
    lines.append("  naive forecasts:")
    for name, entry in result["naive"].items():
        lines.append(f"    {name:<32} {_number(entry['value'])}  error {_signed(entry['error'])}")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"
