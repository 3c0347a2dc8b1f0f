"""Where a run's text comes from when `--data` is more than one plain file: a directory walked
recursively with include/exclude patterns, JSON Lines records (one field each), gzip-compressed
text; the documents they hold in a fixed order, and what was skipped and why."""

from __future__ import annotations

import fnmatch
import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nexus.errors import NexusError

DEFAULT_EXCLUDE = "*.bin,*.pt,*.safetensors,*.png,*.jpg,*.jpeg,*.gif,*.pdf,*.zip,*.tar,*.so,*.pyc"
SNIFF_BYTES = 8192  # a file with a NUL byte in its first 8 KB is taken for binary, not text
SKIPPED_SHOWN = 5


@dataclass
class SourceSummary:
    """What a source held: documents and bytes kept, files skipped by reason (with a few
    examples each), for the log, config.json and the report."""

    source: str
    files: int = 0
    documents: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, path: Path) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < SKIPPED_SHOWN:
            shown.append(str(path))

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "files": self.files,
            "documents": self.documents,
            "bytes": self.bytes,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": self.examples,
        }

    def describe(self) -> str:
        skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        return (
            f"{self.source}: {self.documents:,} documents from {self.files:,} files, "
            f"{self.bytes:,} bytes" + (f"; skipped {skipped}" if skipped else "")
        )


@dataclass(frozen=True)
class SourceSpec:
    """How to read a source: the JSON Lines field, which files of a directory to take."""

    path: Path
    text_field: str = "text"
    include: str = "*"  # comma-separated glob patterns on the file name
    exclude: str = DEFAULT_EXCLUDE

    def files(self) -> list[Path]:
        """The files the source reads, in a fixed (sorted) order; a missing path is named."""
        if self.path.is_file():
            return [self.path]
        if not self.path.is_dir():
            raise NexusError(f"data path {str(self.path)!r} does not exist; check --data")
        return sorted(p for p in self.path.rglob("*") if p.is_file() or p.is_symlink())


def is_plain_file(path: Path) -> bool:
    """A single file read as it is (the reference path): not a directory, JSON Lines or gzip."""
    return path.is_file() and not path.name.endswith((".jsonl", ".gz"))


def documents(spec: SourceSpec, summary: SourceSummary) -> Iterator[bytes]:
    """Every document of the source in order, counting what is kept and skipped in `summary`."""
    includes = [p.strip() for p in spec.include.split(",") if p.strip()]
    excludes = [p.strip() for p in spec.exclude.split(",") if p.strip()]
    for path in spec.files():
        relative = path.relative_to(spec.path) if path != spec.path else Path(path.name)
        if any(part.startswith(".") for part in relative.parts):
            summary.skip("hidden", path)
            continue
        if not any(fnmatch.fnmatch(path.name, p) for p in includes) or any(
            fnmatch.fnmatch(path.name, p) for p in excludes
        ):
            summary.skip("not matched by include/exclude", path)
            continue
        try:
            read = _read(path, spec.text_field)
        except OSError:  # permission denied, an I/O error, a dangling link: listed, not fatal
            summary.skip("unreadable", path)
            continue
        if read is None:
            summary.skip("binary", path)
            continue
        found = list(read)
        summary.files += 1
        for document in found:
            if document:
                summary.documents += 1
                summary.bytes += len(document)
                yield document


def _read(path: Path, text_field: str) -> Iterator[bytes] | None:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _json_lines(path, _bytes(path), text_field)
    raw = _bytes(path)
    if b"\0" in raw[:SNIFF_BYTES]:
        return None
    return iter([raw])


def _bytes(path: Path) -> bytes:
    if not path.name.endswith(".gz"):
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as error:
        raise NexusError(
            f"{str(path)!r} is not a readable gzip file ({error}); repair or remove it"
        ) from None


def _json_lines(path: Path, raw: bytes, text_field: str) -> Iterator[bytes]:
    texts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise NexusError(
                f"{str(path)!r} line {number} is not JSON; fix or remove that line"
            ) from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise NexusError(
                f"{str(path)!r} line {number} has no string field {text_field!r}; pass "
                "--text_field NAME for the field that holds the text"
            )
        texts.append(text.encode("utf-8"))
    return iter(texts)
