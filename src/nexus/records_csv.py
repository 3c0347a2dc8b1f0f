"""The CSV export of a run's records (`nexus report RUN_DIR --csv`): every train log and eval of
metrics.jsonl as one row, for spreadsheets and notebooks. It reads metrics.jsonl itself because
the report's records drop what the export keeps: the gradient norm, and whether a field was
recorded at all (the report reads an absent one as NaN)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from nexus.errors import NexusError

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
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NexusError(
            f"run directory {str(run_dir)!r} does not exist; pass the out_dir of a training run"
        )
    if not (run_dir / "config.json").is_file():
        raise NexusError(
            f"no config.json in {str(run_dir)!r}: not a Nexus run directory "
            "(the trainer writes config.json when a run starts)"
        )
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []  # a run that has not logged a step yet
    latest: dict[tuple[int, str], dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or record.get("kind") not in KINDS:
            continue
        step = record.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            latest[(step, record["kind"])] = record
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
    # Imported here: printing the CSV to stdout should not wait for torch to load.
    from nexus.checkpoint import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, records_csv(run_dir).encode("utf-8"))
    return path


def _cell(value: Any) -> str:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    # repr keeps every digit of a float, so the value read back equals the one recorded; NaN
    # and infinities become nan / inf / -inf, which float() and pandas read back.
    return repr(value) if is_number else ""
