"""The forecast: a synthetic run with a known answer, the held-out learning curves it was never
tuned on (error and coverage of its stated interval), the physical limits, and the cases where
it must say there is no forecast."""

import math
from pathlib import Path

import numpy as np
import pytest

from nexus.config import TrainConfig
from nexus.forecast import (
    PROBABILITY,
    Schedule,
    backtest,
    detect_rise,
    forecast_val_loss,
    format_backtest,
)
from nexus.report import load_run
from nexus.schedule import lr_at

HELD_OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "curves" / "test"
TINY_RUN = TrainConfig(preset="nexus-tiny", max_steps=1000, warmup_steps=100, eval_interval=100)


def synthetic_run(config: TrainConfig, noise: float, seed: int = 0):
    """Train losses every 10 steps and evals every eval_interval from a known law: the train
    loss 1.6 + 2.2·S1^(−0.45) − 0.15·(LR drop felt), val = 0.3 + 0.8·train, where S1 and the
    felt drop are computed here step by step, independently of nexus.forecast."""
    lrs = np.array([lr_at(s, config) for s in range(1, config.max_steps + 1)]) / config.lr
    area = np.cumsum(lrs)
    felt, carried, drop = [], 0.0, 0.0
    for i in range(config.max_steps):
        decrease = max(lrs[i - 1] - lrs[i], 0.0) if i >= max(1, config.warmup_steps) else 0.0
        carried = 0.97 * carried + decrease
        drop += 0.03 * carried
        felt.append(drop)
    felt = np.array(felt)

    def train_loss(step: int) -> float:
        return 1.6 + 2.2 * area[step - 1] ** -0.45 - 0.15 * felt[step - 1]

    rng = np.random.default_rng(seed)
    log_steps = list(range(10, config.max_steps + 1, 10))
    logs = [train_loss(s) + rng.normal(0, noise) for s in log_steps]
    eval_steps = list(range(config.eval_interval, config.max_steps + 1, config.eval_interval))
    vals = [0.3 + 0.8 * train_loss(s) + rng.normal(0, noise / 4) for s in eval_steps]
    return log_steps, logs, eval_steps, vals, 0.3 + 0.8 * train_loss(config.max_steps)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_a_synthetic_run_with_a_known_answer_is_forecast_within_its_interval(schedule):
    config = TrainConfig(**{**TINY_RUN.to_dict(), "schedule": schedule})
    log_steps, logs, eval_steps, vals, final = synthetic_run(config, noise=0.02)
    result = backtest(log_steps, logs, eval_steps, vals, config, cutoff_step=500)
    assert result.forecast.status == "ok"
    assert result.actual == pytest.approx(final, abs=0.02)  # the recorded val: noise 0.005
    assert abs(result.forecast.predicted[-1] - final) < 0.03
    assert result.forecast.lower[-1] < final < result.forecast.upper[-1]


def test_later_forecasts_are_narrower_and_closer():
    log_steps, logs, eval_steps, vals, final = synthetic_run(TINY_RUN, noise=0.02)
    widths, errors = [], []
    for cutoff in (300, 500, 700, 900):
        forecast = backtest(log_steps, logs, eval_steps, vals, TINY_RUN, cutoff).forecast
        widths.append(forecast.upper[-1] - forecast.lower[-1])
        errors.append(abs(forecast.predicted[-1] - final))
    assert widths == sorted(widths, reverse=True)
    assert errors[-1] < errors[0]


def test_every_future_eval_gets_a_prediction_and_the_last_is_max_steps():
    log_steps, logs, eval_steps, vals, _ = synthetic_run(TINY_RUN, noise=0.01)
    seen = (
        [s for s in log_steps if s <= 600],
        [v for s, v in zip(log_steps, logs, strict=True) if s <= 600],
    )
    result = forecast_val_loss(*seen, eval_steps[:6], vals[:6], TINY_RUN, [500, 700, 800, 1000])
    assert result.steps == (700, 800, 1000)  # 500 is in the past
    assert list(result.predicted) == sorted(result.predicted, reverse=True)
    assert all(
        lo < p < hi for lo, p, hi in zip(result.lower, result.predicted, result.upper, strict=True)
    )


def held_out_backtests(fraction: float) -> list:
    results = []
    for run_dir in sorted(p for p in HELD_OUT.iterdir() if p.is_dir()):
        run = load_run(run_dir)
        results.append(
            backtest(
                [r.step for r in run.train_logs], [r.loss for r in run.train_logs],
                [r.step for r in run.evals], [r.val_loss for r in run.evals],
                run.train, int(fraction * run.train.max_steps),
            )
        )  # fmt: skip
    return results


# Measured on the 32 held-out runs (docs/forecast.md: 0.150, 0.106, 0.037, 0.021 nats; 86, 78,
# 84, 78 % inside; 21, 32, 32, 32 forecasts). The bounds add a margin for another platform's
# last digits and one run more or less inside (coverage never outside the goal's 73–87 % by
# more than one run), not room for a worse forecast.
HELD_OUT_BOUNDS = {  # fraction: (mean absolute error, coverage low, coverage high, forecasts)
    0.2: (0.165, 0.73, 0.91, 20),
    0.3: (0.115, 0.73, 0.88, 31),
    0.5: (0.042, 0.73, 0.88, 32),
    0.7: (0.024, 0.73, 0.88, 32),
}


@pytest.mark.parametrize("fraction", sorted(HELD_OUT_BOUNDS))
def test_held_out_runs_error_and_coverage(fraction):
    results = held_out_backtests(fraction)
    assert len(results) == 32
    made = [r for r in results if r.forecast.status == "ok"]
    errors = [abs(r.error) for r in made]
    coverage = np.mean([r.inside for r in made])
    max_error, low, high, at_least = HELD_OUT_BOUNDS[fraction]
    assert len(made) >= at_least
    assert np.mean(errors) <= max_error
    assert low <= coverage <= high
    # The forecast beats assuming the loss stays where it is.
    assert np.mean(errors) < np.mean([abs(r.last_value - r.actual) for r in made])


def test_predictions_never_go_below_zero():
    config = TrainConfig(preset="nexus-tiny", max_steps=400, warmup_steps=0, eval_interval=50)
    steps = list(range(10, 201, 10))
    logs = [max(0.0, 0.5 - 0.0024 * s) for s in steps]  # heading straight through zero
    result = forecast_val_loss(steps, logs, [50, 100, 150, 200], [0.45, 0.3, 0.18, 0.05], config,
                               [250, 300, 400])  # fmt: skip
    if result.status == "ok":
        assert min(result.lower) >= 0.0 and min(result.predicted) >= 0.0
        assert all(math.exp(p) >= 1.0 for p in result.predicted)  # perplexity
    else:
        assert result.status == "too_early"


def test_one_eval_is_too_early_and_says_why():
    result = forecast_val_loss([10, 20, 30], [5.0, 4.0, 3.5], [100], [3.2], TINY_RUN, [1000])
    assert result.status == "too_early"
    assert "1 finite val loss recorded" in result.message and "needs 2" in result.message
    assert result.predicted == ()


def test_too_few_train_logs_after_the_warmup_is_too_early():
    result = forecast_val_loss([100, 200], [3.0, 2.5], [100, 200], [3.1, 2.6], TINY_RUN, [1000])
    assert result.status == "too_early"
    assert "train-loss log" in result.message


def test_records_that_cannot_pin_the_curve_down_are_too_early():
    # A loss still in free fall at 12 % of the run: the curves that fit it disagree by nats.
    steps = list(range(110, 121, 1))
    logs = [5.4 - 0.2 * (s - 110) for s in steps]
    result = forecast_val_loss(steps, logs, [60, 120], [5.5, 3.4], TINY_RUN, [1000])
    assert result.status == "too_early"
    assert "nat" in result.message and "interval" in result.message


def test_non_finite_val_losses_are_left_out_and_named():
    log_steps, logs, eval_steps, vals, _ = synthetic_run(TINY_RUN, noise=0.01)
    vals = list(vals)
    vals[2] = math.nan
    cut = [s for s in log_steps if s <= 600]
    result = forecast_val_loss(cut, logs[: len(cut)], eval_steps[:6], vals[:6], TINY_RUN, [1000])
    assert result.status == "ok"
    assert result.ignored_steps == (300,)
    assert 300 not in result.used_steps


def test_a_u_shaped_val_curve_is_over_fitting_not_a_forecast():
    steps = [100, 200, 300, 400, 500]
    result = forecast_val_loss(
        list(range(10, 501, 10)), [2.0 - 0.001 * s for s in range(10, 501, 10)],
        steps, [2.0, 1.8, 1.75, 1.79, 1.83], TINY_RUN, [1000],
    )  # fmt: skip
    assert result.status == "rising"
    assert "turned upward" in result.message and "step 300" in result.message


def test_one_worse_eval_is_noise_not_a_rise():
    assert detect_rise([100, 200, 300, 400], [2.0, 1.8, 1.7, 1.75]) is None
    assert detect_rise([100, 200, 300, 400], [2.0, 1.7, 1.705, 1.709]) is None  # within 0.01


def test_the_lagged_drop_ends_near_the_lr_taken_away():
    cosine = Schedule.of(TINY_RUN)
    assert cosine.drop[100] == 0.0  # the warmup's rise is not annealing
    assert cosine.drop[-1] == pytest.approx(1.0, abs=0.02)  # the end of a cosine is slow
    floor = Schedule.of(TrainConfig(**{**TINY_RUN.to_dict(), "min_lr": 0.1 * TINY_RUN.lr}))
    assert floor.drop[-1] == pytest.approx(0.9, abs=0.02)
    wsd = Schedule.of(TrainConfig(**{**TINY_RUN.to_dict(), "schedule": "wsd"}))
    # A ramp of 1/200 per step followed with lag λ/(1−λ) steps ends that far behind it.
    assert wsd.drop[800] == 0.0
    assert wsd.drop[-1] == pytest.approx(1 - (0.97 / 0.03) / 200, abs=0.01)
    np.testing.assert_allclose(np.diff(cosine.area)[1:], [lr_at(s, TINY_RUN) / TINY_RUN.lr
                                                          for s in range(2, 1001)])  # fmt: skip


def test_backtest_text_names_the_forecast_the_actual_and_the_last_value():
    log_steps, logs, eval_steps, vals, _ = synthetic_run(TINY_RUN, noise=0.01)
    text = format_backtest(backtest(log_steps, logs, eval_steps, vals, TINY_RUN, 500))
    assert f"{100 * PROBABILITY:.0f} % interval" in text and "inside the interval" in text
    assert f"actual:     {vals[-1]:.4f}" in text
    assert f"last value: {vals[4]:.4f}" in text


def test_backtest_without_the_final_eval_has_no_actual():
    log_steps, logs, eval_steps, vals, _ = synthetic_run(TINY_RUN, noise=0.01)
    result = backtest(log_steps[:80], logs[:80], eval_steps[:8], vals[:8], TINY_RUN, 500)
    assert result.actual is None and result.error is None and result.inside is None
    assert "not recorded yet" in format_backtest(result)
