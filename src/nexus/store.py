"""The prepared byte store: a source's documents concatenated once, with a separator, into one
flat file of bytes plus a small JSON index in the Nexus cache, reused while the sources'
fingerprint (paths, sizes, modification times, the reading settings) is unchanged. Training and
evaluation read windows from it one at a time (nexus.data.FileBytes), so memory does not grow
with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nexus.cache import cache_dir
from nexus.errors import NexusError
from nexus.sources import SourceSpec, SourceSummary, documents

DATA_FILE = "data.bin"
INDEX_FILE = "index.json"
STORE_VERSION = 1


@dataclass(frozen=True)
class Store:
    """A prepared store on disk: its bytes file and what went into it."""

    directory: Path
    index: dict[str, Any]

    @property
    def data_file(self) -> Path:
        return self.directory / DATA_FILE

    @property
    def summary(self) -> dict[str, Any]:
        return self.index["summary"]

    def describe(self) -> str:
        """One line: the file, what went in, the separators' share, what was skipped."""
        summary = self.summary
        skipped = ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()) or "none"
        return (
            f"{self.data_file}: {summary['documents']:,} documents from {summary['files']:,} "
            f"files, {self.index['bytes']:,} bytes ({summary['bytes']:,} of text, the rest "
            f"separators); skipped: {skipped}"
        )


def file_states(spec: SourceSpec) -> list[list]:
    """Every file's path, size and mtime (None, None for one that cannot be read): what tells
    that the sources changed."""
    entries = []
    for path in spec.files():
        try:
            status = path.stat()
        except OSError:
            entries.append([str(path), None, None])  # unreadable: skipped, but it counts
            continue
        entries.append([str(path), status.st_size, status.st_mtime_ns])
    return entries


def fingerprint(spec: SourceSpec, separator: str, states: list[list]) -> str:
    """What the store depends on: the files' states and the reading settings."""
    settings = [STORE_VERSION, str(spec.path.resolve()), spec.text_field, spec.include,
                spec.exclude, separator]  # fmt: skip
    return hashlib.sha256(json.dumps([settings, states]).encode()).hexdigest()


def changed_files(before: list[list], after: list[list]) -> list[str]:
    """The paths added, removed or changed in size or mtime between two file_states."""
    old = {path: state for path, *state in before}
    new = {path: state for path, *state in after}
    return sorted(path for path in old.keys() | new.keys() if old.get(path) != new.get(path))


def prepare(
    spec: SourceSpec, separator: str = "\n\n", root: Path | None = None, log: Any = print
) -> Store:
    """The store for `spec`, prepared now unless an up-to-date one is in the cache. It appears
    whole or not at all: it is written in a temp folder and renamed into place."""
    states = file_states(spec)
    key = fingerprint(spec, separator, states)
    root = (cache_dir() / "stores") if root is None else Path(root)
    target = root / key[:24]
    if (target / INDEX_FILE).is_file():
        index = json.loads((target / INDEX_FILE).read_text())
        if index.get("fingerprint") == key:
            store = Store(target, index)
            log(f"reusing the prepared store {store.describe()}")
            return store
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key[:24]}.", dir=root))
    try:
        summary = SourceSummary(str(spec.path))
        joiner = separator.encode("utf-8")
        with (staging / DATA_FILE).open("wb") as out:
            for number, document in enumerate(documents(spec, summary)):
                out.write(joiner + document if number else document)
            out.flush()
            os.fsync(out.fileno())
        if summary.documents == 0:
            raise NexusError(
                f"data path {str(spec.path)!r} holds no text to train on "
                f"({summary.describe()}); check --data and the include/exclude patterns"
            )
        changed = changed_files(states, file_states(spec))
        if changed:
            more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
            raise NexusError(
                f"{changed[0]!r}{more} changed while {str(spec.path)!r} was being prepared; "
                "nothing was kept: run again once the files are stable"
            )
        index = {
            "fingerprint": key,
            "version": STORE_VERSION,
            "separator": separator,
            "bytes": (staging / DATA_FILE).stat().st_size,
            "summary": summary.to_dict(),
        }
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2))
        if target.exists():
            shutil.rmtree(target)  # a stale or half-replaced store of the same key
        os.replace(staging, target)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):  # reading errors are skipped or named in nexus.sources
            raise NexusError(
                f"could not write the prepared store under {str(root)!r} "
                f"({error.strerror or error}); nothing was kept: free disk space there or point "
                "XDG_CACHE_HOME at a disk with room, then run again"
            ) from None
        raise
    store = Store(target, index)
    log(f"prepared {store.describe()}")
    return store
