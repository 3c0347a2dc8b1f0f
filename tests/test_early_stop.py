"""The keep-or-stop verdict and --early_stop: the rule on hand-written run records (val rising
for `patience` evals, a forecast gain below the threshold, the time the remaining steps cost),
its log and report text, the settings' validation, and real tiny runs that stop early (or, with
early_stop off, do not)."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import tiny_config
from nexus.checkpoint import load_checkpoint, model_from_checkpoint
from nexus.config import TrainConfig
from nexus.errors import NexusError
from nexus.report import load_run, render_report, run_forecast
from nexus.training import Trainer
from nexus.verdict import decide, format_log, report_lines, seconds_per_step

SECONDS_PER_STEP = 1.7
NO_FORECAST = SimpleNamespace(status="too_early", message="too early to forecast", steps=())


def make_run(
    root: Path,
    val_losses: list[float],
    *,
    eval_interval: int = 100,
    max_steps: int = 2000,
    extra: list[dict] | None = None,
    **train: object,
) -> Path:
    """A run directory written by hand: evals every `eval_interval` steps with these val
    losses, and train logs every 10 steps at SECONDS_PER_STEP, each eval adding 30 s."""
    config = TrainConfig(max_steps=max_steps, eval_interval=eval_interval, **train)
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": config.to_dict()}))
    records: list[dict] = []
    elapsed = 0.0
    for index, val_loss in enumerate(val_losses):
        step = (index + 1) * eval_interval
        for log_step in range(step - eval_interval + 10, step + 1, 10):
            elapsed += 10 * SECONDS_PER_STEP
            records.append({"kind": "train", "step": log_step, "loss": val_loss - 0.1,
                            "lr": 3e-4, "grad_norm": 0.5, "tokens_per_s": 2000.0,
                            "elapsed_s": elapsed})  # fmt: skip
        records.append({"kind": "eval", "step": step, "train_loss": val_loss - 0.1,
                        "val_loss": val_loss, "lr": 3e-4, "sample": "To be",
                        "elapsed_s": elapsed})  # fmt: skip
        elapsed += 30.0  # the eval itself: one window per eval that the median leaves out
    text = "".join(json.dumps(r) + "\n" for r in records + (extra or []))
    (run / "metrics.jsonl").write_text(text)
    return run


def ok_forecast(steps: tuple[int, ...], predicted: float, lower: float, upper: float):
    """A stand-in for an "ok" Forecast: only the fields of its contract with the verdict."""
    count = len(steps)
    return SimpleNamespace(
        status="ok",
        message="fitted",
        steps=steps,
        predicted=(predicted,) * count,
        lower=(lower,) * count,
        upper=(upper,) * count,
    )


FALLING = [2.0, 1.8, 1.7, 1.65, 1.62]
RISING = [2.0, 1.8, 1.7, 1.72, 1.75, 1.79]  # best at step 300, then above it for 3 evals


def test_val_above_its_best_for_patience_evals_stops(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path, RISING, early_stop=True, early_stop_patience=3))
    verdict = decide(run, NO_FORECAST)
    assert verdict.action == "stop" and verdict.rising
    assert (verdict.evals_since_best, verdict.best_step, verdict.best_loss) == (3, 300, 1.7)
    assert "for 3 evals, the patience of 3" in verdict.reason
    assert "best 1.7000 (step 300)" in verdict.reason
    assert format_log(verdict) == (
        "stop: val rising for 3 evals (best 1.7000 at step 300), patience 3"
    )
    # One more eval of patience: the same records are a keep, with the rise still shown.
    patient = decide(run, NO_FORECAST, patience=4)
    assert patient.action == "keep" and patient.rising
    assert "3 evals past its best, under the patience of 4" in patient.reason
    assert format_log(patient).endswith("; val rising for 3 evals (best 1.7000 at step 300)")


def test_val_still_falling_keeps_and_reports_the_expected_gain(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path, FALLING))
    last = FALLING[-1]
    forecast = ok_forecast((600, 800, 1000, 2000), predicted=1.55, lower=1.52, upper=1.58)
    verdict = decide(run, forecast)
    assert verdict.action == "keep" and not verdict.rising and verdict.evals_since_best == 0
    assert verdict.gain == pytest.approx(last - 1.55)
    assert verdict.gain_interval == pytest.approx((last - 1.58, last - 1.52))
    assert verdict.final_step == 2000 and verdict.remaining_steps == 1500
    assert format_log(verdict) == (
        "keep: +0.0700 nats expected by step 2000 (80 % 0.0400–0.1000), 42m 30s left"
    )


def test_forecast_gain_below_the_threshold_stops_only_on_its_optimistic_end(
    tmp_path: Path,
) -> None:
    run = load_run(make_run(tmp_path, FALLING, early_stop=True, early_stop_min_gain=0.01))
    last = FALLING[-1]
    # The expected gain is 0.005, but the interval reaches 0.015: still worth training.
    hopeful = ok_forecast((2000,), predicted=last - 0.005, lower=last - 0.015, upper=last + 0.004)
    assert decide(run, hopeful).action == "keep"
    # Even the optimistic end gains 0.008 nats: stop.
    small = ok_forecast((2000,), predicted=last - 0.004, lower=last - 0.008, upper=last + 0.001)
    verdict = decide(run, small)
    assert verdict.action == "stop"
    assert "0.0080 nats by step 2000, below early_stop_min_gain 0.01" in verdict.reason
    assert "under the 0.01 threshold" in format_log(verdict)
    # With --early_stop off the verdict is the same, but the log says it is advice.
    off = decide(run, small, early_stop=False)
    assert off.action == "stop" and format_log(off).startswith("would stop (--early_stop is off)")


def test_time_cost_is_the_remaining_steps_times_the_seconds_per_step(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path, FALLING, max_steps=2000))
    verdict = decide(run, NO_FORECAST)
    remaining = 2000 - 100 * len(FALLING)
    assert verdict.seconds_left == pytest.approx(remaining * SECONDS_PER_STEP)
    assert seconds_per_step(run.train_logs) == pytest.approx(SECONDS_PER_STEP)
    assert format_log(verdict) == "keep: no forecast (too_early), 42m 30s left"  # 1500 × 1.7 s
    lines = report_lines(verdict)
    assert "- **Expected gain**: unknown, no forecast: too early to forecast" in lines
    assert "- **Time it costs**: about 42m 30s for the remaining 1,500 steps" in lines[2]


def test_the_last_eval_is_finished_not_stopped(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path, RISING, max_steps=600, early_stop=True))
    verdict = decide(run, NO_FORECAST)
    assert verdict.action == "finished" and verdict.seconds_left == 0
    assert format_log(verdict) == "finished: best val 1.7000 at step 300"


def test_report_says_the_run_stopped_early_and_why(tmp_path: Path) -> None:
    reason = "val loss has stayed above its best 1.7000 (step 300) for 3 evals"
    stop = {"kind": "stop", "step": 600, "reason": reason}
    run = load_run(make_run(tmp_path, RISING, early_stop=True, extra=[stop]))
    assert run.stopped == (600, reason) and run.skipped_lines == 0
    text = render_report(run, run_forecast(run))
    title = text.splitlines()[2]
    assert title.startswith("Run `run`: stopped early at step 600 of 2,000")
    section = text.split("### Keep or Stop")[1].split("---")[0]
    assert (
        text.index("## Predictions")
        < text.index("### Keep or Stop")
        < text.index("## Checkpoints Saved")
    )
    assert f"**Stopped early** at step 600 by `--early_stop`: {reason}." in section
    assert "above it for the 3 evals since" in section
    assert "about 39m 40s for the remaining 1,400 steps" in section  # 1400 × 1.7 s


def test_report_of_a_running_run_gives_the_verdict(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path, FALLING))
    text = render_report(run, run_forecast(run))
    section = text.split("### Keep or Stop")[1].split("---")[0]
    assert "- **Verdict at step 500**: keep — " in section
    assert "- **Expected gain** " in section or "- **Expected gain**: unknown, no " in section
    assert "- **Time it costs**: about 42m 30s for the remaining 1,500 steps" in section
    assert "- **Val vs its best**: best 1.6200 at step 500; the latest eval is the best" in section
    assert "- **Early stop**: off" in section
    assert "stopped early" not in text


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"early_stop_patience": 0}, "early_stop_patience must be a positive integer, got 0"),
        ({"early_stop_patience": 2.5}, "early_stop_patience must be a positive integer"),
        ({"early_stop_min_gain": -0.01}, "early_stop_min_gain must be a number >= 0, got -0.01"),
        ({"early_stop_min_gain": math.nan}, "early_stop_min_gain must be a number >= 0"),
        ({"early_stop_min_gain": math.inf}, "early_stop_min_gain must be a number >= 0"),
        ({"early_stop": "yes"}, "early_stop must be true or false, got 'yes'"),
    ],
)
def test_early_stop_settings_are_validated(settings: dict, message: str) -> None:
    with pytest.raises(NexusError, match=message):
        TrainConfig(**settings)


def test_configs_saved_before_early_stop_still_load(tmp_path: Path) -> None:
    old = {k: v for k, v in TrainConfig().to_dict().items() if not k.startswith("early_stop")}
    assert TrainConfig.from_dict(old) == TrainConfig()
    assert not TrainConfig().early_stop  # the reference run never stops early
    with pytest.raises(NexusError, match="early_stop_patience has the wrong type"):
        TrainConfig.from_dict({"early_stop_patience": "3"})


# ---------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def diverging_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train text of letters, val text of digits only: the more the model learns the train
    split, the less it expects the val bytes, so val loss rises from the first eval on."""
    train = ("abc def ghi jkl " * 225).encode()  # 3,600 bytes: the first 90 %
    val = ("0123456789" * 40).encode()  # 400 bytes: the last 10 %
    path = tmp_path_factory.mktemp("data") / "diverging.txt"
    path.write_bytes(train + val)
    return path


def quick_config(data: Path, out: Path, **overrides: object) -> TrainConfig:
    """The tiny preset at its smallest batches: an eval every 2 of 8 steps, patience 2."""
    settings = {"max_steps": 8, "micro_batch": 2, "grad_accum": 1, "eval_batches": 1,
                "eval_batch_size": 2, "early_stop_patience": 2, **overrides}  # fmt: skip
    return tiny_config(data, out, **settings)


def test_early_stop_ends_a_run_whose_val_rises_even_without_a_forecast(
    diverging_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_forecast(run: object) -> None:
        raise RuntimeError("no fit today")

    # The rise needs no forecast; one that raises must cost neither the verdict nor the report.
    monkeypatch.setattr("nexus.report.run_forecast", broken_forecast)
    out = tmp_path / "run"
    # save_interval above max_steps: no eval checkpoint at the stop step, the stop saves it.
    config = quick_config(diverging_data, out, save_interval=100, early_stop=True)
    log = io.StringIO()
    summary = Trainer(config, log=log, progress=False).run()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stop = records[-1]
    assert stop["kind"] == "stop" and stop["step"] == 6  # best at step 2, above it at 4 and 6
    assert max(r["step"] for r in records) == 6  # no training after the stop
    assert summary["step"] == 6 and summary["stopped_early"] == stop["reason"]
    assert "best" in stop["reason"] and "for 2 evals, the patience of 2" in stop["reason"]
    checkpoint = load_checkpoint(out / "step_6.bin")
    assert checkpoint.step == 6
    model_from_checkpoint(checkpoint, expected=config.model_config())
    text = log.getvalue()
    assert "stop: val rising for 2 evals (best" in text and "early stop after step 6: " in text
    assert "warning: the forecast failed (RuntimeError: no fit today)" in text
    assert "not updated" not in text and "TensorBoard logging stopped" not in text
    report = (out / "TRAINING_PROGRESS.md").read_text()
    assert "stopped early at step 6 of 8" in report
    assert f"**Stopped early** at step 6 by `--early_stop`: {stop['reason']}." in report
    assert "No forecast: the forecast failed (RuntimeError: no fit today)." in report
    # Resumed without early stop, the run trains on to max_steps and is no longer "stopped".
    resumed = replace(config, early_stop=False)
    assert Trainer(resumed, resume=True, log=io.StringIO(), progress=False).run()["step"] == 8
    kinds = [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "stop" not in kinds
    assert "stopped early" not in (out / "TRAINING_PROGRESS.md").read_text()


def test_without_early_stop_the_same_run_trains_to_max_steps(
    diverging_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    config = quick_config(diverging_data, out, tensorboard=False)
    log = io.StringIO()
    summary = Trainer(config, log=log, progress=False).run()
    assert summary["step"] == 8 and "stopped_early" not in summary
    assert "would stop (--early_stop is off): val rising for 2 evals" in log.getvalue()
    kinds = [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "stop" not in kinds and (out / "step_8.bin").is_file()
    report = (out / "TRAINING_PROGRESS.md").read_text()
    assert "stopped early" not in report and "**Early stop**: off" in report
