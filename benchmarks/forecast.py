"""How good the forecast is on runs it never saw: for every run of a folder (by default the
held-out runs in benchmarks/curves/test), cut the records at 20, 30, 50 and 70 % of the run,
forecast the final val loss, and compare with what the run reached. Beside Nexus's forecast, in
the same run, the baselines: the last val loss, a plain power law in steps (a straight line in
log-log), a power law in tokens with a floor fitted by least squares, and a Domhan-style
ensemble of parametric curve families weighted by their fit. The baselines read the evals only;
Nexus reads the train-loss logs too, since that is what a run records.

Run: python benchmarks/forecast.py [FOLDER ...] [--markdown] [--calibrate]

--calibrate prints the interval factor the forecast uses, measured on the design runs
(benchmarks/curves/design) at cutoffs of 15 … 90 %; never on the test runs.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

import nexus.forecast as forecast_module
from nexus.forecast import PERCENT, PROBABILITY, Schedule, backtest
from nexus.report import Run, load_run

CURVES = Path(__file__).resolve().parent / "curves"
CUTOFFS = (0.2, 0.3, 0.5, 0.7)
CALIBRATION_CUTOFFS = tuple(round(0.15 + 0.05 * i, 2) for i in range(16))


@dataclass(frozen=True)
class Prediction:
    value: float
    lower: float | None = None  # an interval, where the method states one
    upper: float | None = None


Method = Callable[[Run, int, Schedule], Prediction | None]


def nexus_forecast(run: Run, cutoff: int, schedule: Schedule) -> Prediction | None:
    result = backtest(
        [r.step for r in run.train_logs], [r.loss for r in run.train_logs],
        [r.step for r in run.evals], [r.val_loss for r in run.evals],
        run.train, cutoff, schedule,
    )  # fmt: skip
    forecast = result.forecast
    if forecast.status != "ok":
        return None
    return Prediction(forecast.predicted[-1], forecast.lower[-1], forecast.upper[-1])


def _known_evals(run: Run, cutoff: int) -> tuple[np.ndarray, np.ndarray]:
    rows = [(r.step, r.val_loss) for r in run.finite_evals if r.step <= cutoff]
    return np.array([s for s, _ in rows], float), np.array([v for _, v in rows], float)


def last_value(run: Run, cutoff: int, schedule: Schedule) -> Prediction | None:
    _, values = _known_evals(run, cutoff)
    return Prediction(float(values[-1])) if len(values) else None


def power_law_in_steps(run: Run, cutoff: int, schedule: Schedule) -> Prediction | None:
    steps, values = _known_evals(run, cutoff)
    if len(steps) < 2:
        return None
    slope, intercept = np.polyfit(np.log(steps), np.log(values), 1)
    return Prediction(float(np.exp(intercept + slope * math.log(run.train.max_steps))))


def power_law_in_tokens(run: Run, cutoff: int, schedule: Schedule) -> Prediction | None:
    steps, values = _known_evals(run, cutoff)
    if len(steps) < 3:
        return None
    tokens = steps * run.train.tokens_per_step / 1e6  # millions, so the fit is well scaled

    def curve(x: np.ndarray, floor: float, scale: float, alpha: float) -> np.ndarray:
        return floor + scale * x ** (-alpha)

    start = (values.min() * 0.9, values[0] - values.min() * 0.9, 0.5)
    fitted = _fit(curve, tokens, values, start, ([0, 0, 0.01], [values.min(), np.inf, 5]))
    if fitted is None:
        return None
    params, _ = fitted
    final = run.train.max_steps * run.train.tokens_per_step / 1e6
    return Prediction(float(curve(np.array(final), *params)))


# Domhan, Springenberg and Hutter (2015) combine parametric families of learning curves under a
# prior that the curve improves monotonically, sampling the weights and parameters by MCMC. Here
# each family is fitted by least squares, kept only if it does not rise after the cutoff or go
# below 0, and weighted by its likelihood under the best fit's noise level with a BIC penalty;
# the interval is the PROBABILITY range of the mixture of the members' Gaussian predictions,
# each as wide as the eval noise plus its parameters' uncertainty (the fit's covariance carried
# to the final step by the delta method; MCMC would sample it).
# Curves of x = step/1000.
FAMILIES: dict[str, tuple[Callable[..., np.ndarray], tuple[float, ...]]] = {
    "pow3": (lambda x, c, a, alpha: c + a * x ** (-alpha), (1.5, 1.0, 0.5)),
    "exp3": (lambda x, c, a, b: c + a * np.exp(-b * x), (1.5, 2.0, 1.0)),
    "ilog2": (lambda x, c, a: c + a / np.log(x + math.e), (1.0, 1.0)),
    "janoschek": (lambda x, c, a, k, d: c + (a - c) * np.exp(-k * x**d), (1.5, 4.0, 1.0, 1.0)),
    "mmf": (lambda x, c, a, k, d: c + (a - c) / (1 + (k * x) ** d), (1.5, 4.0, 1.0, 1.0)),
    "log-power": (lambda x, c, a, b: c + a / (1 + x / b) ** 0.5, (1.0, 2.0, 0.2)),
}


def domhan_ensemble(run: Run, cutoff: int, schedule: Schedule) -> Prediction | None:
    steps, values = _known_evals(run, cutoff)
    x, target = steps / 1000, run.train.max_steps / 1000
    n = len(x)
    members = []  # (prediction, squared error, parameter count)
    for curve, start in FAMILIES.values():
        if n <= len(start):
            continue  # as many parameters as points: the fit says nothing
        fitted = _fit(curve, x, values, start, (-np.inf, np.inf))
        if fitted is None:
            continue
        params, covariance = fitted
        now, final = curve(np.array([x[-1], target]), *params)
        if not (0 <= final <= now):
            continue  # the prior: a learning curve does not get worse, nor go below 0
        squared = float(np.sum((curve(x, *params) - values) ** 2))
        gradient = np.array([
            (curve(np.array(target), *(params + step)) - final) / 1e-6
            for step in np.eye(len(params)) * 1e-6
        ])  # fmt: skip
        with np.errstate(invalid="ignore"):  # an infinite covariance times a zero slope
            variance = float(gradient @ covariance @ gradient)
        if not math.isfinite(variance):
            continue  # the data leave a parameter free: the family says nothing yet
        members.append((float(final), squared, len(start), variance))
    if not members:
        return None
    predictions, squared, counts, variances = map(np.array, zip(*members, strict=True))
    noise = max(float(np.min(squared)) / n, 1e-8)
    log_weights = -squared / (2 * noise) - counts * math.log(n) / 2
    weights = np.exp(log_weights - log_weights.max())
    weights /= weights.sum()
    spreads = np.sqrt(noise + np.maximum(variances, 0))
    reach = 5 * float(spreads.max())
    grid = np.linspace(predictions.min() - reach, predictions.max() + reach, 4001)
    mixture = sum(
        w * 0.5 * (1 + _erf((grid - p) / (math.sqrt(2) * spread)))
        for w, p, spread in zip(weights, predictions, spreads, strict=True)
    )
    tail = (1 - PROBABILITY) / 2
    lower, upper = grid[np.searchsorted(mixture, tail)], grid[np.searchsorted(mixture, 1 - tail)]
    return Prediction(float(weights @ predictions), float(lower), float(upper))


def _erf(values: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(values)


def _fit(
    curve: Callable[..., np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    start: tuple[float, ...],
    bounds: tuple,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Least-squares parameters and their covariance, or None where the fit fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (OptimizeWarning, RuntimeWarning))
        try:
            params, covariance = curve_fit(curve, x, y, p0=start, bounds=bounds, maxfev=5000)
        except (RuntimeError, ValueError):
            return None
    return (params, covariance) if np.all(np.isfinite(params)) else None


METHODS: dict[str, Method] = {
    "Nexus forecast": nexus_forecast,
    "last value": last_value,
    "power law in steps (log-log line)": power_law_in_steps,
    "power law in tokens (least squares)": power_law_in_tokens,
    "Domhan-style ensemble": domhan_ensemble,
}


@dataclass(frozen=True)
class Score:
    runs: int
    forecasts: int
    mean_abs_error: float
    coverage: float | None
    mean_width: float | None


def evaluate(
    runs: list[Run], method: Method, fraction: float, only_where: Method | None = None
) -> Score:
    """The method's score at `fraction` of each run; with `only_where`, on the runs where that
    method makes a forecast (to compare on the same runs)."""
    errors, inside, widths = [], [], []
    for run in runs:
        if only_where is not None:
            cutoff = int(fraction * run.train.max_steps)
            if only_where(run, cutoff, Schedule.of(run.train)) is None:
                continue
        final = run.evals[-1].val_loss
        cutoff = int(fraction * run.train.max_steps)
        prediction = method(run, cutoff, Schedule.of(run.train))
        if prediction is None or not math.isfinite(prediction.value):
            continue
        errors.append(abs(prediction.value - final))
        if prediction.lower is not None and prediction.upper is not None:
            inside.append(prediction.lower <= final <= prediction.upper)
            widths.append(prediction.upper - prediction.lower)
    return Score(
        runs=len(runs),
        forecasts=len(errors),
        mean_abs_error=float(np.mean(errors)) if errors else math.nan,
        coverage=float(np.mean(inside)) if inside else None,
        mean_width=float(np.mean(widths)) if widths else None,
    )


def load_runs(folders: list[Path]) -> list[Run]:
    runs = []
    for folder in folders:
        for run_dir in sorted(p for p in folder.iterdir() if (p / "config.json").is_file()):
            run = load_run(run_dir)
            if run.evals and run.evals[-1].step == run.train.max_steps:
                runs.append(run)
    return runs


def table(runs: list[Run]) -> str:
    header = "| method | " + " | ".join(f"{100 * f:.0f} %" for f in CUTOFFS) + " |"
    lines = [header, "|---" * (len(CUTOFFS) + 1) + "|"]
    rows = [(name, method, None) for name, method in METHODS.items()]
    rows.insert(1, ("last value, on the runs Nexus forecast", last_value, nexus_forecast))
    for name, method, only_where in rows:
        cells = []
        for fraction in CUTOFFS:
            score = evaluate(runs, method, fraction, only_where)
            cell = f"{score.mean_abs_error:.3f}"
            if score.coverage is not None:
                cell += f", {100 * score.coverage:.0f} % in, width {score.mean_width:.2f}"
            cell += f" ({score.forecasts}/{score.runs})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibrate(runs: list[Run]) -> tuple[float, tuple[tuple[float, float], ...]]:
    """CHANGE_SHARE and INTERVAL_SCALES from the design runs: for each share on a grid and each
    of CALIBRATION_CUTOFFS, the PROBABILITY quantile of |error| / (half-spread + share × change)
    over the forecasts made within ±0.05 of that cutoff, made non-increasing in the cutoff (a
    later forecast is never less sure); the share is the one with the narrowest intervals."""
    forecast_module.CHANGE_SHARE, forecast_module.TOO_WIDE_NATS = 0.0, math.inf
    forecast_module.INTERVAL_SCALES = ((0.0, 1.0), (1.0, 1.0))
    rows = []  # (fraction, |error|, half-spread, predicted change)
    for run in runs:
        schedule = Schedule.of(run.train)
        for fraction in CALIBRATION_CUTOFFS:
            cutoff = int(fraction * run.train.max_steps)
            prediction = nexus_forecast(run, cutoff, schedule)
            if prediction is None:
                continue
            latest = last_value(run, cutoff, schedule)
            half_spread = (prediction.upper - prediction.lower) / 2
            change = abs(prediction.value - latest.value)
            error = abs(prediction.value - run.evals[-1].val_loss)
            rows.append((fraction, error, half_spread, change))
    fractions, errors, spreads, changes = map(np.array, zip(*rows, strict=True))
    best = None
    for share in np.linspace(0.0, 1.0, 11):
        base = np.maximum(spreads + share * changes, 1e-9)
        scales = []
        for fraction in CALIBRATION_CUTOFFS:
            near = np.abs(fractions - fraction) <= 0.05 + 1e-9
            scales.append(float(np.quantile((errors / base)[near], PROBABILITY)))
        scales = np.maximum.accumulate(scales[::-1])[::-1]  # non-increasing in the cutoff
        width = float(np.mean(2 * np.interp(fractions, CALIBRATION_CUTOFFS, scales) * base))
        if best is None or width < best[0]:
            best = (width, float(share), tuple(zip(CALIBRATION_CUTOFFS, scales, strict=True)))
    return best[1], best[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path, help="default: benchmarks/curves/test")
    parser.add_argument("--calibrate", action="store_true", help="fit the interval factor")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.calibrate:
        runs = load_runs(args.folders or [CURVES / "design"])
        share, scales = calibrate(runs)
        pairs = ", ".join(f"({fraction:.2f}, {scale:.2f})" for fraction, scale in scales)
        print(f"{len(runs)} design runs\nCHANGE_SHARE = {share:.1f}\nINTERVAL_SCALES = ({pairs})")
        return
    folders = args.folders or [CURVES / "test"]
    runs = load_runs(folders)
    print(f"{len(runs)} runs from {', '.join(map(str, folders))}: mean absolute error of the")
    print("final val loss (nats); for methods with an interval, the share of runs inside")
    print(f"it ({PERCENT} stated) and its mean width; (forecasts made / runs)\n")
    print(table(runs))
    print(f"\n{time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
