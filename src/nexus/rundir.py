"""The run directory a training run lives in: the names of its files, the one atomic write,
metrics.jsonl (append, read, truncate), the checkpoints on disk (by step, the latest, best.bin),
setting a directory up for a run, and the temp files a killed write leaves behind. The trainer,
the report, the CLI and the exports all reach a run's files through RunDir."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nexus.errors import NexusError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
BEST_FILE = "best.bin"
REPORT_FILE = "TRAINING_PROGRESS.md"
PLOT_FILE = "training_progress.png"
TENSORBOARD_DIR = "tensorboard"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, BEST_FILE, REPORT_FILE, PLOT_FILE)
STOP_KIND = "stop"  # the metrics record an early stop leaves


def _file_mode() -> int:
    """The mode an ordinary new file gets under the process's umask (0644 under 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, payload: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename over `path`, fsync the
    directory: a crash at any instant leaves the old file or the new one, never half of one.
    The file gets the umask's mode, like any file the user creates (mkstemp's is 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _as_json_lines(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


@dataclass(frozen=True)
class RunDir:
    """One run's directory. Creating the object touches nothing on disk."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def existing(cls, path: str | Path) -> RunDir:
        """The run directory at `path`, which must exist; a NexusError says so otherwise."""
        run_dir = cls(Path(path))
        if not run_dir.path.is_dir():
            raise NexusError(
                f"run directory {str(run_dir.path)!r} does not exist; pass the out_dir of a "
                "training run"
            )
        return run_dir

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def best_file(self) -> Path:
        return self.path / BEST_FILE

    @property
    def report_file(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def plot_file(self) -> Path:
        return self.path / PLOT_FILE

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD_DIR

    def checkpoint(self, step: int) -> Path:
        return self.path / f"step_{step}.bin"

    def checkpoint_steps(self) -> list[int]:
        """The steps of the step_<N>.bin files on disk, in order."""
        if not self.path.is_dir():
            return []
        steps = []
        for path in self.path.glob("step_*.bin"):
            suffix = path.stem.removeprefix("step_")
            if suffix.isdigit():
                steps.append(int(suffix))
        return sorted(steps)

    def latest_checkpoint(self) -> Path | None:
        steps = self.checkpoint_steps()
        return self.checkpoint(steps[-1]) if steps else None

    def holds_run(self) -> bool:
        """Whether a run has written here: its config, metrics, best.bin or a checkpoint."""
        if not self.path.is_dir():
            return False
        written = (self.config_file, self.metrics_file, self.best_file)
        return any(p.exists() for p in written) or bool(self.checkpoint_steps())

    # --- config.json ------------------------------------------------------------------------

    def read_config(self) -> dict[str, Any]:
        """config.json as the trainer wrote it; a NexusError says what is missing or damaged."""
        path = self.config_file
        if not path.is_file():
            raise NexusError(
                f"no config.json in {str(self.path)!r}: not a Nexus run directory "
                "(the trainer writes config.json when a run starts)"
            )
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise NexusError(
                f"{str(path)!r} is not valid JSON ({error}); rerun or restore it"
            ) from None
        if not isinstance(config, dict) or not isinstance(config.get("train"), dict):
            raise NexusError(f"{str(path)!r} has no 'train' table; it was not written by Nexus")
        return config

    # --- metrics.jsonl ----------------------------------------------------------------------

    def read_metrics(self) -> tuple[list[dict[str, Any]], int]:
        """The records of metrics.jsonl in file order, and how many lines were unreadable (a
        line cut short by a crash, or one that is no record)."""
        path = self.metrics_file
        if not path.is_file():
            return [], 0
        records, skipped = [], 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, int) and not isinstance(step, bool):
                records.append(record)
            else:
                skipped += 1
        return records, skipped

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One JSON line; a kill mid-write leaves at most a cut last line, which reading skips."""
        with self.metrics_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_metrics(self, after: int) -> None:
        """Drop the records of steps after `after` (a resumed run redoes them) and any early
        stop's record (the resumed run is no longer stopped)."""
        if not self.metrics_file.exists():
            return
        records, _ = self.read_metrics()
        kept = [r for r in records if r["step"] <= after and r.get("kind") != STOP_KIND]
        atomic_write(self.metrics_file, _as_json_lines(kept))

    # --- branching -----------------------------------------------------------------------------

    def abandon_after(self, step: int, best_is_later: bool) -> tuple[Path, list[int]]:
        """Move the run's future after `step` out of the way, into a new abandoned-<UTC time>/
        folder: the later step_<N>.bin files, their metrics records, and best.bin when it comes
        from them. Returns the folder and the steps of the checkpoints moved."""
        folder = self.path / time.strftime("abandoned-%Y%m%d-%H%M%S", time.gmtime())
        while folder.exists():  # a second branch within the same second
            folder = folder.with_name(folder.name + "x")
        folder.mkdir()
        records, _ = self.read_metrics()
        later = [r for r in records if r["step"] > step]
        atomic_write(folder / METRICS_FILE, _as_json_lines(later))
        moved = [s for s in self.checkpoint_steps() if s > step]
        for moved_step in moved:
            os.replace(self.checkpoint(moved_step), folder / self.checkpoint(moved_step).name)
        if best_is_later and self.best_file.is_file():
            os.replace(self.best_file, folder / BEST_FILE)
        self.truncate_metrics(after=step)
        return folder, moved

    # --- setting up and cleaning --------------------------------------------------------------

    def make_writable(self) -> None:
        """Create the directory and check that files can be written in it."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".nexus-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise NexusError(
                f"--out_dir {str(self.path)!r} is not writable ({error.strerror or error}); "
                "choose another"
            ) from None

    def clear(self) -> None:
        """Delete the run's files (for --force); other files in the directory stay."""
        for path in [self.path / name for name in RUN_FILES] + list(self.path.glob("step_*.bin")):
            path.unlink(missing_ok=True)
        if self.tensorboard_dir.is_dir():
            shutil.rmtree(self.tensorboard_dir)

    def remove_stale_temp_files(self) -> None:
        """Temp files of writes that a kill -9 cut short; the files they were for are intact."""
        owned = (*(f".{name}." for name in RUN_FILES), ".step_")
        for path in self.path.glob(".*.tmp"):
            if path.name.startswith(owned) and path.is_file():
                path.unlink(missing_ok=True)
