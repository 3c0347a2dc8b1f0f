"""The training data: a file read as bytes (every byte 0-255 is a token), its contiguous
train/val split, the deterministic batches drawn from it, and where the file comes from
(an explicit path, NEXUS_DATA, the cache, or a checksum-verified download of Tiny Shakespeare)."""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from nexus.cache import cache_dir
from nexus.errors import NexusError

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_FILE = "tinyshakespeare.txt"
DATA_ENV = "NEXUS_DATA"
_HOW_TO_GIVE_DATA = f"pass --data PATH to a local file (or set {DATA_ENV})"


@dataclass(frozen=True)
class FileBytes:
    """A stretch of a file's bytes, read window by window with pread: a corpus of any size
    costs no memory beyond the windows drawn. (A memory map costs more than it seems: each
    fault maps the page cache's whole large folio, ~1.3 MB per 129-byte window, measured.)"""

    path: Path
    start: int
    length: int

    def numel(self) -> int:
        return self.length

    def __len__(self) -> int:
        return self.length

    def windows(self, starts: torch.Tensor, size: int) -> torch.Tensor:
        """The `size` bytes from each offset in `starts`, shaped (*starts.shape, size)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            rows = [os.pread(fd, size, self.start + offset) for offset in starts.flatten().tolist()]
        finally:
            os.close(fd)
        data = torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8)
        return data.view(*starts.shape, size)


@dataclass(frozen=True)
class ByteCorpus:
    """A file's bytes split into the first 90 % (train) and the last 10 % (val)."""

    train: torch.Tensor | FileBytes  # uint8, 1-D, in memory or read from a prepared store
    val: torch.Tensor | FileBytes
    name: str
    path: Path
    size_bytes: int

    @classmethod
    def from_parts(
        cls,
        train: torch.Tensor | FileBytes,
        val: torch.Tensor | FileBytes,
        seq_len: int,
        name: str,
        path: Path,
    ) -> ByteCorpus:
        """Train and validation data from two sources (--val_data), each whole."""
        _check_positive("seq_len", seq_len)
        for what, part in (("training", train), ("validation", val)):
            if len(part) < seq_len + 1:
                raise NexusError(
                    f"the {what} data has {len(part)} bytes, fewer than one window of "
                    f"seq_len + 1 = {seq_len + 1} bytes; use more data or a smaller seq_len"
                )
        return cls(train=train, val=val, name=name, path=path, size_bytes=len(train) + len(val))

    @classmethod
    def from_store(cls, data_file: Path, seq_len: int, name: str) -> ByteCorpus:
        """A prepared store, read window by window: memory does not grow with the corpus."""
        _check_positive("seq_len", seq_len)
        size = data_file.stat().st_size
        n_train = cls._split_point(size, seq_len, data_file)
        return cls(
            train=FileBytes(data_file, 0, n_train),
            val=FileBytes(data_file, n_train, size - n_train),
            name=name,
            path=data_file,
            size_bytes=size,
        )

    @classmethod
    def from_file(cls, path: str | Path, seq_len: int, name: str | None = None) -> ByteCorpus:
        """Read `path` whole; both splits must hold at least one window of seq_len + 1 bytes."""
        _check_positive("seq_len", seq_len)
        path = Path(path).expanduser()
        raw = _read_bytes(path)
        if not raw:
            raise NexusError(f"data file {str(path)!r} is empty; {_HOW_TO_GIVE_DATA} with text")
        n_train = cls._split_point(len(raw), seq_len, path)
        # bytearray: torch.frombuffer wants a writable buffer it can share without copying.
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return cls(
            train=data[:n_train],
            val=data[n_train:],
            name=name if name is not None else dataset_name(path),
            path=path,
            size_bytes=len(raw),
        )

    @staticmethod
    def _split_point(size: int, seq_len: int, path: Path) -> int:
        """The first 90 % trains, the rest validates; each must hold one window."""
        window = seq_len + 1
        if size < window:
            raise NexusError(
                f"data file {str(path)!r} has {size} bytes, fewer than one window of "
                f"seq_len + 1 = {window} bytes; use a longer file or a smaller seq_len"
            )
        n_train = size * 9 // 10  # integer arithmetic: the split is exact and reproducible
        n_val = size - n_train
        if n_val < window:
            # ceil(n / 10) >= window  <=>  n >= 10 * (window - 1) + 1
            needed = 10 * (window - 1) + 1
            raise NexusError(
                f"data file {str(path)!r} has {size} bytes, so its validation split (the last "
                f"10 %) is {n_val} bytes, fewer than one window of {window} bytes; the file needs "
                f"at least {needed} bytes at seq_len {seq_len}: use a longer file or a smaller "
                "seq_len"
            )
        return n_train


def whole_file(path: Path) -> torch.Tensor:
    """A file's bytes in memory, as a uint8 tensor; a missing, empty or unreadable file is named."""
    raw = _read_bytes(path)
    if not raw:
        raise NexusError(f"data file {str(path)!r} is empty; {_HOW_TO_GIVE_DATA} with text")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise NexusError(
            f"data file {str(path)!r} does not exist; check the path given by --data or {DATA_ENV}"
        )
    if path.is_dir():
        raise NexusError(f"data path {str(path)!r} is a directory; {_HOW_TO_GIVE_DATA}")
    try:
        return path.read_bytes()
    except PermissionError as error:
        raise NexusError(
            f"data file {str(path)!r} is not readable (permission denied); fix its permissions "
            "or copy it somewhere readable"
        ) from error
    except OSError as error:
        raise NexusError(
            f"data file {str(path)!r} could not be read ({_one_line(error)}); {_HOW_TO_GIVE_DATA}"
        ) from error


def train_batch(
    corpus: ByteCorpus, *, seed: int, step: int, micro_step: int, batch_size: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the train split for one micro-batch. The generator is seeded from
    (seed, step, micro_step) alone, so a resumed run draws exactly the batches the
    uninterrupted run would, whatever the global RNG state."""
    _check_positive("batch_size", batch_size)
    generator = _generator(seed, "train", step, micro_step)
    starts = torch.randint(
        0, _n_windows(corpus.train, seq_len, "train"), (batch_size,), generator=generator
    )
    return _windows(corpus.train, starts, seq_len)


def eval_batches(
    data: torch.Tensor | FileBytes, *, seed: int, n_batches: int, batch_size: int, seq_len: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of n_batches batches of `data` (a split), the same on every call with the
    same arguments. Windows are drawn with replacement, so a split with fewer windows than
    requested still works."""
    _check_positive("n_batches", n_batches)
    _check_positive("batch_size", batch_size)
    n_windows = _n_windows(data, seq_len, "evaluation")
    generator = _generator(seed, "eval", n_batches, batch_size, seq_len)
    starts = torch.randint(0, n_windows, (n_batches, batch_size), generator=generator)
    return [_windows(data, row, seq_len) for row in starts]


def _generator(seed: int, *key: object) -> torch.Generator:
    """A CPU generator seeded by a hash of the key: neighbouring keys get unrelated streams."""
    text = ":".join(str(part) for part in (seed, *key))
    digest = hashlib.sha256(text.encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return generator


def _n_windows(data: torch.Tensor, seq_len: int, what: str) -> int:
    _check_positive("seq_len", seq_len)
    n_windows = data.numel() - seq_len
    if n_windows < 1:
        raise NexusError(
            f"the {what} split has {data.numel()} bytes, fewer than one window of seq_len + 1 = "
            f"{seq_len + 1} bytes; use a longer data file or a smaller seq_len"
        )
    return n_windows


def _windows(
    data: torch.Tensor | FileBytes, starts: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, FileBytes):
        chunks = data.windows(starts, seq_len + 1).long()
    else:
        chunks = data[starts.unsqueeze(1) + torch.arange(seq_len + 1)].long()
    # contiguous: callers flatten targets with .view for the loss
    return chunks[:, :-1].contiguous(), chunks[:, 1:].contiguous()


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise NexusError(f"data: {name} must be a positive integer, got {value!r}")


def dataset_name(path: str | Path) -> str:
    """A short name for logs and checkpoints: the file's stem ("tinyshakespeare" for the
    default, which is cached as tinyshakespeare.txt)."""
    path = Path(path)
    return path.stem or path.name


def resolve_dataset(
    path: str | None = None,
    *,
    url: str = TINY_SHAKESPEARE_URL,
    sha256: str = TINY_SHAKESPEARE_SHA256,
    cache: Path | None = None,
    timeout: float = 30.0,
) -> Path:
    """The data file to train on, by precedence: `path` (--data), $NEXUS_DATA, the cached Tiny
    Shakespeare (if its checksum matches), else a verified download into the cache."""
    if path:
        return Path(path).expanduser()
    from_env = os.environ.get(DATA_ENV)
    if from_env:
        return Path(from_env).expanduser()
    cache = cache_dir() if cache is None else Path(cache)
    target = cache / TINY_SHAKESPEARE_FILE
    if target.is_file() and _sha256_of(target) == sha256:
        return target
    # A missing or corrupt cached copy is replaced; the old one is only ever overwritten by a
    # download that has already passed the checksum.
    _download(url, target, sha256, timeout)
    return target


def _sha256_of(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None  # unreadable counts as absent: download a fresh copy
    return digest.hexdigest()


def _download(url: str, target: Path, sha256: str, timeout: float) -> None:
    """Fetch url into a temp file beside target, verify, fsync, then rename atomically."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".part"
        )
    except OSError as error:
        raise _cache_error(target, error) from error
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as file:
            got = _fetch_into(url, file, timeout)
            if got != sha256.lower():
                raise NexusError(
                    f"the download from {url} failed its checksum (sha256 {got}, expected "
                    f"{sha256}); nothing was cached. Try again later, or {_HOW_TO_GIVE_DATA}"
                )
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, target)
    except OSError as error:  # network errors are already NexusErrors: this is the local disk
        tmp.unlink(missing_ok=True)
        raise _cache_error(target, error) from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, ValueError)


def _fetch_into(url: str, file: BinaryIO, timeout: float) -> str:
    """Stream url into file; return the sha256 of what arrived. Network failures (and only
    they) become NexusErrors, so a failing disk write is not reported as being offline."""
    digest = hashlib.sha256()
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except _NETWORK_ERRORS as error:
        raise _network_error(url, error) from error
    with response:
        while True:
            try:
                block = response.read(1 << 16)
            except _NETWORK_ERRORS as error:
                raise _network_error(url, error) from error
            if not block:
                return digest.hexdigest()
            digest.update(block)
            file.write(block)


def _network_error(url: str, error: BaseException) -> NexusError:
    return NexusError(
        f"could not download the default dataset from {url} ({_one_line(error)}); "
        f"offline? {_HOW_TO_GIVE_DATA}"
    )


def _cache_error(target: Path, error: OSError) -> NexusError:
    return NexusError(
        f"cannot write the dataset cache {str(target.parent)!r} ({_one_line(error)}); set "
        f"XDG_CACHE_HOME to a writable directory, or {_HOW_TO_GIVE_DATA}"
    )


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable; not every platform can open a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _one_line(error: BaseException) -> str:
    """The error's reason on one line: the CLI prints NexusError messages as a single line."""
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        error_text = str(error.reason)  # str(URLError) wraps the reason in "<urlopen error ...>"
    else:
        error_text = str(error)
    return " ".join(error_text.split()) or type(error).__name__
