"""Runs side by side (`nexus compare`) and the CSV export (`nexus report --csv`): the numbers of
the table and of the CSV against the records written, the PNG, labels for runs of the same name,
and the one-line error for a path that is no run."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import stat
from pathlib import Path

import pytest

from nexus.cli import main
from nexus.compare import COMPARISON_NAME, COMPARISON_PLOT_NAME, compare_runs, run_labels
from nexus.config import TrainConfig
from nexus.records_csv import COLUMNS, records_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (step, train loss, val loss): falling, with the best val loss before the last eval
FALLING = [(200, 1.78, 1.91), (400, 1.53, 1.72), (600, 1.47, 1.652), (800, 1.43, 1.611)]
TURNING = [(100, 2.1, 2.2), (200, 1.9, 2.05), (300, 1.8, 2.01), (400, 1.75, 2.03)]


def eval_line(step: int, train: float, val: float, tokens_per_step: int | None) -> dict:
    line = {
        "kind": "eval", "step": step, "train_loss": train, "train_ppl": math.exp(train),
        "val_loss": val, "val_ppl": math.exp(val), "lr": 2.5e-4, "sample": "To be or",
        "elapsed_s": step * 1.5 + 0.25,
    }  # fmt: skip
    if tokens_per_step is not None:  # older runs recorded no tokens_seen
        line["tokens_seen"] = step * tokens_per_step
    return line


def train_line(step: int, loss: float) -> dict:
    return {
        "kind": "train", "step": step, "loss": loss, "lr": 2.5e-4, "grad_norm": 0.4 + step / 1e4,
        "tokens_per_s": 2000.0 + step, "elapsed_s": step * 1.5,
    }  # fmt: skip


def make_run(
    path: Path,
    evals: list[tuple[int, float, float]],
    train: TrainConfig,
    parameters: int = 6_738_672,
    record_tokens: bool = True,
) -> tuple[Path, list[dict]]:
    """A run directory as the trainer leaves it (config.json, metrics.jsonl); returns the
    directory and the records in the order written."""
    path.mkdir(parents=True)
    config = {"train": train.to_dict(), "model": train.model_config().to_dict(),
              "parameters": parameters}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    tokens = train.tokens_per_step if record_tokens else None
    records = []
    previous_step, previous_loss = 0, None
    for step, train_loss, val_loss in evals:
        if previous_loss is None:
            previous_loss = train_loss + 0.004 * step  # the loss falls faster before
        for log_step in range(previous_step + 10, step + 1, 10):  # the forecast reads these
            share = (log_step - previous_step) / (step - previous_step)
            loss = previous_loss + share * (train_loss - previous_loss)
            records.append(train_line(log_step, loss + 0.05))
        records.append(eval_line(step, train_loss, val_loss, tokens))
        previous_step, previous_loss = step, train_loss
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| Run | Parameters")
    return [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in lines[1:]]


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    reference = TrainConfig(max_steps=2000, eval_interval=200)  # 2,048 tokens per step
    wide = TrainConfig(max_steps=400, eval_interval=100, micro_batch=8)  # 4,096, and finished
    first, _ = make_run(tmp_path / "runs" / "reference", FALLING, reference)
    # recorded without tokens_seen: the count comes from step × tokens_per_step
    second, _ = make_run(tmp_path / "runs" / "wide", TURNING, wide, 1_234, record_tokens=False)
    return first, second


def test_the_table_holds_each_runs_numbers_in_the_order_given(two_runs, tmp_path):
    reference, wide = two_runs
    out = tmp_path / "out"
    markdown, plot = compare_runs([wide, reference], out)
    assert (markdown, plot) == (out / COMPARISON_NAME, out / COMPARISON_PLOT_NAME)
    text = markdown.read_text()
    assert text.startswith("# Nexus Run Comparison\n")
    assert f"![Val and train loss of each run against steps and tokens seen]({plot.name})" in text
    wide_row, reference_row = table_rows(text)

    assert wide_row[:5] == ["wide", "1,234", "400 of 400", f"{400 * 4096:,}", "0:10:00"]
    assert wide_row[5:7] == ["2.0100 (step 300)", "2.0300 (step 400)"]
    assert wide_row[7].startswith("— (") and "last eval step" in wide_row[7]

    # 800 steps of 2,048 tokens; the eval at 800 is the last record, elapsed 1200.25 s
    assert reference_row[:5] == ["reference", "6,738,672", "800 of 2,000", "1,638,400", "0:20:00"]
    assert reference_row[5:7] == ["1.6110 (step 800)", "1.6110 (step 800)"]
    # the forecast for max_steps: "P (LOW – HIGH) at step 2000", below the last val loss
    predicted, rest = reference_row[7].split(" (")
    interval, at = rest.split(") ")
    low, high = (float(v) for v in interval.split(" – "))
    assert low <= float(predicted) <= high and float(predicted) < 1.611 and at == "at step 2000"
    assert f"- wide: `{wide.resolve()}`" in text and f"`{reference.resolve()}`" in text


def test_the_figure_is_a_png_of_two_panels_size(two_runs, tmp_path):
    from matplotlib.image import imread

    _, plot = compare_runs(list(two_runs), tmp_path)
    data = plot.read_bytes()
    assert data.startswith(PNG_MAGIC)
    height, width, _ = imread(io.BytesIO(data), format="png").shape
    assert (width, height) == (1300, 560)
    assert stat.S_IMODE(os.stat(plot).st_mode) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left
    compare_runs(list(two_runs), tmp_path)
    assert plot.read_bytes() == data  # same records, same bytes


def test_runs_with_the_same_directory_name_get_distinct_labels(tmp_path):
    train = TrainConfig(max_steps=2000, eval_interval=200)
    a, _ = make_run(tmp_path / "lr3e-4" / "run", FALLING[:1], train)
    b, _ = make_run(tmp_path / "lr1e-3" / "run", FALLING[:1], train)
    assert run_labels([a, b, tmp_path / "other"]) == ["lr3e-4/run", "lr1e-3/run", "other"]
    assert run_labels([a, a]) == ["run", "run (2)"]
    markdown, _ = compare_runs([a, b], tmp_path)
    labels = [row[0] for row in table_rows(markdown.read_text())]
    assert labels == ["lr3e-4/run", "lr1e-3/run"]
    # one eval: best and final are the same record; too early for a forecast
    row = table_rows(markdown.read_text())[0]
    assert row[5] == row[6] == "1.9100 (step 200)"
    assert row[7] == "— (too early to forecast)"


def test_compare_on_the_command_line(two_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # --out left out: the current directory
    assert main(["compare", *map(str, two_runs)]) == 0
    assert "COMPARISON.md" in capsys.readouterr().out
    assert (tmp_path / COMPARISON_NAME).is_file() and (tmp_path / COMPARISON_PLOT_NAME).is_file()


def test_a_path_that_is_no_run_is_one_line_naming_it(two_runs, tmp_path, capsys):
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    for args in (
        ["compare", str(two_runs[0]), str(not_a_run), "--out", str(tmp_path / "out")],
        ["report", str(not_a_run), "--csv"],
    ):
        assert main(args) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1, captured.err
        assert lines[0].startswith("nexus: error: ") and str(not_a_run) in lines[0]
        assert captured.out == ""
    assert not (tmp_path / "out").exists()  # nothing written when a run is missing


def read_csv(text: str) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows and list(rows[0]) == list(COLUMNS)
    return rows


def assert_rows_match(rows: list[dict[str, str]], records: list[dict]) -> None:
    expected = sorted(records, key=lambda r: (r["step"], r["kind"]))
    assert [(r["kind"], int(r["step"])) for r in rows] == [(r["kind"], r["step"]) for r in expected]
    for row, record in zip(rows, expected, strict=True):
        for column in COLUMNS[2:]:
            if column in record:
                assert float(row[column]) == record[column], (column, row)
            else:
                assert row[column] == "", (column, row)


def test_csv_to_stdout_holds_every_record(tmp_path, capsys):
    run, records = make_run(tmp_path / "run", FALLING, TrainConfig(max_steps=2000))
    assert main(["report", str(run), "--csv", "-"]) == 0
    out = capsys.readouterr().out
    rows = read_csv(out)
    assert len(rows) == len(records)
    assert_rows_match(rows, records)
    assert [r["kind"] for r in rows if r["step"] == "200"] == ["eval", "train"]
    assert main(["report", str(run), "--csv"]) == 0  # no PATH: stdout as well
    assert capsys.readouterr().out == out


def test_csv_file_keeps_a_resumed_steps_later_record_and_skips_bad_lines(tmp_path, capsys):
    run, records = make_run(tmp_path / "run", FALLING[:2], TrainConfig(max_steps=2000))
    redone = eval_line(400, 1.5, 1.7, None)  # a resumed run redid step 400, no tokens_seen
    redone["val_loss"] = math.nan
    with (run / "metrics.jsonl").open("a") as file:
        file.write(json.dumps(redone) + "\n" + '{"kind": "train", "step": 6')  # cut off
    target = tmp_path / "exports" / "records.csv"
    assert main(["report", str(run), "--csv", str(target)]) == 0
    assert str(target) in capsys.readouterr().out
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    rows = read_csv(target.read_text())
    kept = [r for r in records if not (r["kind"] == "eval" and r["step"] == 400)] + [redone]
    assert len(rows) == len(kept) == len(records)
    (redone_row,) = [r for r in rows if r["kind"] == "eval" and r["step"] == "400"]
    assert math.isnan(float(redone_row["val_loss"]))
    redone_row["val_loss"] = "0"
    redone["val_loss"] = 0.0  # NaN equals nothing; its cell was checked above
    assert_rows_match(rows, kept)
    assert target.read_text() == records_csv(run)


def test_csv_of_a_run_without_metrics_and_of_a_directory_that_is_no_run(tmp_path):
    from nexus.errors import NexusError

    run, _ = make_run(tmp_path / "run", [], TrainConfig())
    (run / "metrics.jsonl").unlink()  # the trainer has not logged a step yet
    assert records_csv(run) == ",".join(COLUMNS) + "\n"
    with pytest.raises(NexusError, match=r"no config\.json"):
        records_csv(tmp_path)
    with pytest.raises(NexusError, match="does not exist"):
        records_csv(tmp_path / "missing")
