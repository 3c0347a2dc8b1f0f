"""The progress report: table numbers, ⭐, the text chart, checkpoints, robustness to the records a
run leaves behind, byte-identical regeneration, and the errors for a directory that is no run."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nexus.config import TrainConfig
from nexus.errors import NexusError
from nexus.report import (
    backtest,
    load_run,
    render_report,
    run_forecast,
    val_loss_chart,
    write_report,
)
from nexus.rundir import PLOT_FILE

REALISTIC = [(200, 1.78, 1.91), (400, 1.53, 1.72), (600, 1.47, 1.652), (800, 1.43, 1.611)]


def eval_line(step: int, train: float, val: float, sample: str = "To be or not") -> dict:
    return {
        "kind": "eval", "step": step, "train_loss": train, "train_ppl": math.exp(train),
        "val_loss": val, "val_ppl": math.exp(val), "lr": 2.5e-4, "sample": sample,
        "elapsed_s": step * 1.0, "tokens_seen": step * 2048,
    }  # fmt: skip


def train_line(step: int, loss: float) -> dict:
    return {
        "kind": "train", "step": step, "loss": loss, "lr": 2.5e-4, "grad_norm": 0.4,
        "tokens_per_s": 2000.0, "elapsed_s": step * 1.0,
    }  # fmt: skip


def make_run(
    root: Path, evals=REALISTIC, extra_lines: str = "", train: TrainConfig | None = None
) -> Path:
    train = train or TrainConfig(max_steps=2000, eval_interval=200)
    run = root / "run"
    run.mkdir(exist_ok=True)
    config = {
        "train": train.to_dict(),
        "model": train.model_config().to_dict(),
        "parameters": 6_738_672,
        "dataset": {"name": "tinyshakespeare", "path": str(root / "absent.txt"),
                    "bytes": 1_115_394, "train_bytes": 1_003_854, "val_bytes": 111_540},
        "nexus_version": "0.1.0",
    }  # fmt: skip
    (run / "config.json").write_text(json.dumps(config))
    lines = []
    previous_step, previous_loss = 0, None
    for step, train_loss, val_loss in evals:
        if previous_loss is None:
            previous_loss = train_loss + 0.004 * step  # the loss falls faster before
        for log_step in range(previous_step + 10, step + 1, 10):  # a train log every 10 steps
            share = (log_step - previous_step) / (step - previous_step)
            loss = previous_loss + share * (train_loss - previous_loss)
            lines.append(train_line(log_step, loss + 0.05))
        lines.append(eval_line(step, train_loss, val_loss))
        previous_step, previous_loss = step, train_loss
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (run / "metrics.jsonl").write_text(text + extra_lines)
    return run


def save_checkpoint(path: Path, step: int) -> None:
    save_file({"w": torch.zeros(1)}, str(path), metadata={"step": str(step)})


def report_of(run: Path) -> str:
    loaded = load_run(run)
    return render_report(loaded, run_forecast(loaded))


def table_rows(text: str) -> dict[int, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0].isdigit() and len(cells) == 7:
            rows[int(cells[0])] = cells
    return rows


def test_table_numbers_match_the_metrics(tmp_path):
    floor_at_10_percent = TrainConfig(max_steps=2000, eval_interval=200, min_lr=3e-5)
    text = report_of(make_run(tmp_path, train=floor_at_10_percent))
    rows = table_rows(text)
    assert sorted(rows) == list(range(200, 2001, 200))
    for step, train_loss, val_loss in REALISTIC:
        cells = rows[step]
        assert cells[1] == f"{train_loss:.4f}" and cells[3] == f"{val_loss:.4f}"
        assert cells[2] == f"{math.exp(train_loss):.2f}" and cells[4] == f"{math.exp(val_loss):.2f}"
        assert cells[5] == "2.5e-4"
    assert rows[2000][1:5] == ["-"] * 4 and rows[2000][5] == "3e-5"  # the scheduled LR
    assert rows[1200][5] == "1.32e-4"


def test_the_star_marks_the_lowest_finite_val_loss(tmp_path):
    evals = [(200, 1.8, 1.9), (400, 1.6, 1.65), (600, 1.5, math.nan), (800, 1.45, 1.7)]
    rows = table_rows(report_of(make_run(tmp_path, evals)))
    assert [step for step, cells in rows.items() if cells[6] == "⭐"] == [400]
    assert rows[600][3] == "NaN"


def test_chart_puts_the_extremes_on_the_top_and_bottom_rows():
    chart = val_loss_chart([(200, 1.91), (400, 1.72), (600, 1.80), (800, 1.61)]).splitlines()
    plotted = [line for line in chart if "┤" in line]
    assert len(plotted) == 10
    assert plotted[0].startswith(" 1.9100 ┤") and "●" in plotted[0]
    assert plotted[-1].startswith(" 1.6100 ┤") and "●" in plotted[-1]
    assert all(label in chart[-1] for label in ("1.9100", "1.7200", "1.8000", "1.6100"))
    assert "200" in chart[-2] and "800" in chart[-2]


def test_chart_handles_one_point_a_flat_curve_and_a_long_run():
    assert val_loss_chart([(200, 1.9)]).count("●") == 1
    flat = val_loss_chart([(200, 1.5), (400, 1.5), (600, 1.5)])
    assert flat.count("●") == 3 and flat.count("┤") == 1
    long = [(s, 2.0 - s / 10_000 + (0.3 if s == 1000 else 0)) for s in range(10, 2001, 10)]
    chart = val_loss_chart(long)
    assert " 2.2000 ┤" in chart and " 1.8000 ┤" in chart and chart.count("●") <= 20


def test_the_full_report_has_every_section(tmp_path):
    text = report_of(make_run(tmp_path))
    for heading in (
        "# Nexus Training Progress", "## Model Architecture", "## Training Configuration",
        "## Checkpoint Progress Chart", "## Validation Loss Trend", "## Key Observations",
        "## Predictions for Remaining Training", "## Checkpoints Saved",
    ):  # fmt: skip
        assert heading in text
    assert "**Parameters**: 6.74M" in text
    assert "8 (KV heads: 2 - GQA)" in text
    assert "6 (1 attention, 5 SSM - Jamba-style hybrid)" in text
    assert "4 (effective: 16 with grad_accum=4" in text
    assert "tinyshakespeare (1,115,394 bytes" in text
    assert "- **learning_rate**: 3e-4 (peak, cosine decay to 0)" in text
    assert "- **dropout**: 0" in text
    assert "- **optimizer**: AdamW\n" in text
    assert "| Step | Predicted Val Loss | 80 % Interval | Predicted Val PPL |" in text
    assert "Expected final improvement" in text
    # one sentence says the probability and what the held-out runs measured
    assert re.search(r"Interval: 80 % probability; from .* of \d+ held-out runs it held", text)
    assert re.search(r"Model: \d+ curve variants fitted to 80 train-loss logs and 4 evals", text)
    assert text.rstrip().endswith("*Last updated: Step 800*")


def test_the_configuration_names_the_schedule_optimizer_and_dropout_the_run_used(tmp_path):
    train = TrainConfig(
        max_steps=2000, eval_interval=200, schedule="wsd", dropout=0.15, optimizer="muon"
    )
    text = report_of(make_run(tmp_path, train=train))
    held = "held, then linear decay to 0 over the last 400 steps"  # 20 % of 2,000
    assert f"- **learning_rate**: 3e-4 (peak, {held})" in text
    assert "- **dropout**: 0.15" in text
    assert "- **optimizer**: Muon (the layers' weight matrices) + AdamW" in text


@pytest.mark.parametrize("count", [0, 1])
def test_zero_or_one_eval_gives_a_report_that_says_too_early(tmp_path, count):
    text = report_of(make_run(tmp_path, REALISTIC[:count]))
    assert "## Predictions for Remaining Training" in text
    assert f"No forecast: too early to forecast: {count} finite val loss" in text
    assert len(table_rows(text)) == 10


def test_nan_and_inf_losses_are_shown_and_left_out(tmp_path):
    evals = [*REALISTIC, (1000, 1.40, math.inf), (1200, math.nan, math.nan)]
    text = report_of(make_run(tmp_path, evals))
    rows = table_rows(text)
    assert rows[1000][3] == "Inf" and rows[1200][3] == "NaN"
    assert "Non-finite val loss** at steps 1000, 1200" in text
    assert "the run has diverged" in text
    assert "Left out of the fit: non-finite val loss at step(s) 1000, 1200" in text


def test_a_resumed_run_shows_each_step_once_with_the_later_record(tmp_path):
    again = json.dumps(eval_line(800, 1.42, 1.600)) + "\n"
    text = report_of(make_run(tmp_path, extra_lines=again))
    rows = table_rows(text)
    assert rows[800][3] == "1.6000"
    assert sum(1 for line in text.splitlines() if line.startswith("| 800 |")) == 1


def test_a_truncated_last_line_is_skipped_and_counted(tmp_path):
    text = report_of(make_run(tmp_path, extra_lines='{"kind": "eval", "step": 1000, "val_lo'))
    assert "1 unreadable line in metrics.jsonl" in text
    assert table_rows(text)[1000][3] == "-"


def test_a_different_eval_interval_and_an_early_stop(tmp_path):
    train = TrainConfig(max_steps=1000, eval_interval=300, warmup_steps=50)
    evals = [(300, 1.8, 1.9), (600, 1.6, 1.7)]
    text = report_of(make_run(tmp_path, evals, train=train))
    assert sorted(table_rows(text)) == [300, 600, 900, 1000]
    assert "step 600 of 1,000" in text


def test_over_fitting_is_called_out(tmp_path):
    evals = [(200, 1.8, 1.9), (400, 1.5, 1.7), (600, 1.3, 1.62), (800, 1.1, 1.66), (1000, 0.9, 1.7)]
    text = report_of(make_run(tmp_path, evals))
    assert "**Verdict**: over-fitting" in text
    assert "No forecast: val loss has turned upward" in text


def test_samples_are_quoted_on_one_line_and_safe_for_markdown(tmp_path):
    run = make_run(tmp_path)
    sample = "To be `or` not\n| to *be*\x07" + "x" * 200
    lines = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(
        lines + json.dumps(eval_line(1000, 1.4, 1.58, sample)) + "\n"
    )
    text = report_of(run)
    quoted = next(line for line in text.splitlines() if line.startswith("- Step 1000:"))
    assert "``To be `or` not⏎| to *be*·" in quoted and quoted.endswith("…``")


def test_checkpoints_mark_the_best_and_what_best_bin_holds(tmp_path):
    run = make_run(tmp_path)
    for step in (200, 400, 600, 800):
        save_checkpoint(run / f"step_{step}.bin", step)
    save_checkpoint(run / "best.bin", 600)
    lines = report_of(run).splitlines()
    assert any(line.startswith("- `step_800.bin`") and "← current best" in line for line in lines)
    best_line = next(line for line in lines if line.startswith("- `best.bin`"))
    assert "holds step 600" in best_line and "best val loss is at step 800" in best_line


def test_an_unreadable_best_bin_is_reported_not_raised(tmp_path):
    run = make_run(tmp_path)
    (run / "best.bin").write_bytes(b"\xff" * 5)
    assert "header names no step" in report_of(run)


def test_regeneration_is_byte_identical(tmp_path):
    run = make_run(tmp_path)
    save_checkpoint(run / "best.bin", 800)
    path = write_report(run)
    first = path.read_bytes(), (run / PLOT_FILE).read_bytes()
    assert write_report(run) == path
    assert (path.read_bytes(), (run / PLOT_FILE).read_bytes()) == first
    assert first[1].startswith(b"\x89PNG")


def test_a_report_for_a_run_with_no_metrics_yet(tmp_path):
    run = make_run(tmp_path, evals=[])
    (run / "metrics.jsonl").unlink()
    path = write_report(run)
    assert "No finite val loss recorded yet" in path.read_text()


def test_errors_for_a_directory_that_is_no_run(tmp_path):
    with pytest.raises(NexusError, match="does not exist"):
        write_report(tmp_path / "missing")
    with pytest.raises(NexusError, match=r"no config\.json"):
        write_report(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(NexusError, match="not valid JSON"):
        load_run(tmp_path)


def test_backtest_of_a_run_directory(tmp_path):
    run = make_run(tmp_path, train=TrainConfig(max_steps=800, eval_interval=200))
    result = backtest(run, cutoff_step=600)
    assert result.forecast.used_steps == (200, 400, 600)
    assert result.target_step == 800 and result.actual == pytest.approx(1.611)
    assert result.last_value == pytest.approx(1.652)


def test_the_sample_check_reads_a_bounded_sample_of_the_train_split(tmp_path):
    corpus = tmp_path / "big.txt"
    line = b"the king and the queen of verona, to be or not\n"
    train = line * (3_000_000 // len(line))
    corpus.write_bytes(train + b"zebra " * 1000)  # a word only the val split holds
    run = make_run(tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["dataset"] = {"name": "big", "path": str(corpus), "bytes": corpus.stat().st_size,
                         "train_bytes": len(train), "val_bytes": 6000}  # fmt: skip
    (run / "config.json").write_text(json.dumps(config))
    loaded = load_run(run)
    assert loaded.words_sampled_bytes == 1_000_000  # 16 pieces of 62,500 bytes, not 3 MB
    assert {"king", "verona"} <= loaded.dataset_words and "zebra" not in loaded.dataset_words
    text = render_report(loaded, run_forecast(loaded))
    assert "100 % of its 4 words occur in 1.0 MB of the training text" in text  # "To be or not"
