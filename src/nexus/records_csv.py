"""The CSV export of a run's records (`nexus report RUN_DIR --csv`): every train log and eval of
metrics.jsonl as one row, for spreadsheets and notebooks. It reads metrics.jsonl itself because
the report's records drop what the export keeps: the gradient norm, and whether a field was
recorded at all (the report reads an absent one as NaN)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from nexus.rundir import RunDir, atomic_write

COLUMNS = (
    "kind",
    "step",
    "loss",
    "train_loss",
    "val_loss",
    "train_ppl",
    "val_ppl",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "tokens_seen",
    "elapsed_s",
)
KINDS = ("eval", "train")


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The train and eval records of metrics.jsonl, sorted by step then kind. A step logged
    twice (a resumed run redoes the steps after its checkpoint) keeps the later record, as the
    report does; unreadable lines (a truncated last line) are left out."""
    run = RunDir.existing(run_dir)
    run.read_config()  # not a run directory: say so, as the report does
    records, _ = run.read_metrics()
    latest = {(r["step"], r["kind"]): r for r in records if r.get("kind") in KINDS}
    return [latest[key] for key in sorted(latest)]


def records_csv(run_dir: Path) -> str:
    """The CSV text: a header of COLUMNS, then one row per record; a field the record lacks, or
    holds as something other than a number, is an empty cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for record in read_records(run_dir):
        writer.writerow(
            [record["kind"], record["step"], *(_cell(record.get(c)) for c in COLUMNS[2:])]
        )
    return buffer.getvalue()


def write_records_csv(run_dir: Path, path: Path) -> Path:
    """Write the CSV to `path` atomically; return the path."""
    path = Path(path)
    atomic_write(path, records_csv(run_dir).encode("utf-8"))
    return path


def _cell(value: Any) -> str:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    # repr keeps every digit of a float, so the value read back equals the one recorded; NaN
    # and infinities become nan / inf / -inf, which float() and pandas read back.
    return repr(value) if is_number else ""
