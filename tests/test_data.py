"""Byte corpus, batches and dataset resolution (downloads go to a local HTTP server only)."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from nexus import data
from nexus.data import (
    TINY_SHAKESPEARE_SHA256,
    ByteCorpus,
    cache_dir,
    dataset_name,
    eval_batches,
    resolve_dataset,
    train_batch,
)
from nexus.errors import NexusError

REAL_SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")


def write(tmp_path: Path, content: bytes, name: str = "corpus.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.fixture
def text_corpus(tmp_path: Path) -> tuple[ByteCorpus, bytes]:
    content = bytes(range(256)) * 8  # 2048 bytes, every position's value is known
    return ByteCorpus.from_file(write(tmp_path, content), seq_len=16), content


# --- corpus and split ------------------------------------------------------------------------


def test_split_is_contiguous_90_10(tmp_path: Path) -> None:
    content = b"".join(f"line {i}\n".encode() for i in range(300))
    corpus = ByteCorpus.from_file(write(tmp_path, content, "lines.txt"), seq_len=8)
    n_train = len(content) * 9 // 10
    assert corpus.size_bytes == len(content)
    assert corpus.train.numel() == n_train
    assert corpus.val.numel() == len(content) - n_train
    assert corpus.train.dtype == corpus.val.dtype == torch.uint8
    assert corpus.train.dim() == corpus.val.dim() == 1
    assert bytes(corpus.train.tolist()) == content[:n_train]
    assert bytes(corpus.val.tolist()) == content[n_train:]
    assert corpus.name == "lines"
    assert corpus.path == tmp_path / "lines.txt"


def test_every_byte_value_survives(tmp_path: Path) -> None:
    # All 256 values, NUL runs and invalid UTF-8 (lone continuation bytes, truncated sequences).
    content = (bytes(range(256)) + b"\x00" * 50 + b"\x80\xbf\xc3\xff\xfe" + b"\xe2\x82") * 10
    corpus = ByteCorpus.from_file(write(tmp_path, content, "blob.bin"), seq_len=4, name="blob")
    joined = torch.cat([corpus.train, corpus.val])
    assert bytes(joined.tolist()) == content
    assert set(joined.tolist()) == set(range(256))
    assert corpus.name == "blob"


def test_train_batch_windows_match_source(text_corpus: tuple[ByteCorpus, bytes]) -> None:
    corpus, content = text_corpus
    train_bytes = content[: corpus.train.numel()]
    x, y = train_batch(corpus, seed=1, step=3, micro_step=0, batch_size=8, seq_len=16)
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        start = train_bytes.find(bytes(row_x))
        assert start >= 0
        # y is x shifted by one: the window of seq_len + 1 bytes at `start`
        assert bytes(row_x + row_y[-1:]) == train_bytes[start : start + 17]
        assert row_y[:-1] == row_x[1:]


def test_windows_never_cross_into_val(tmp_path: Path) -> None:
    # train is all 'a', val all 'b': any 'b' in a train batch means the window crossed over
    content = b"a" * 900 + b"b" * 100
    corpus = ByteCorpus.from_file(write(tmp_path, content), seq_len=32)
    for step in range(20):
        x, y = train_batch(corpus, seed=0, step=step, micro_step=0, batch_size=16, seq_len=32)
        assert torch.all(x == ord("a")) and torch.all(y == ord("a"))
    for x, y in eval_batches(corpus.val, seed=0, n_batches=4, batch_size=8, seq_len=32):
        assert torch.all(x == ord("b")) and torch.all(y == ord("b"))


def test_train_batch_deterministic_and_keyed(text_corpus: tuple[ByteCorpus, bytes]) -> None:
    corpus, _ = text_corpus
    args = {"batch_size": 8, "seq_len": 16}
    first = train_batch(corpus, seed=7, step=10, micro_step=1, **args)
    torch.manual_seed(12345)  # the global RNG must not matter
    torch.rand(100)
    again = train_batch(corpus, seed=7, step=10, micro_step=1, **args)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    others = [
        train_batch(corpus, seed=8, step=10, micro_step=1, **args),
        train_batch(corpus, seed=7, step=11, micro_step=1, **args),
        train_batch(corpus, seed=7, step=10, micro_step=0, **args),
        train_batch(corpus, seed=7, step=1, micro_step=10, **args),  # not a sum of the keys
    ]
    for x, _ in others:
        assert not torch.equal(first[0], x)


def test_train_batch_leaves_global_rng_alone(text_corpus: tuple[ByteCorpus, bytes]) -> None:
    corpus, _ = text_corpus
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    train_batch(corpus, seed=1, step=0, micro_step=0, batch_size=4, seq_len=16)
    assert torch.equal(torch.rand(4), expected)


def test_eval_batches_fixed(text_corpus: tuple[ByteCorpus, bytes]) -> None:
    corpus, content = text_corpus
    first = eval_batches(corpus.val, seed=3, n_batches=5, batch_size=4, seq_len=16)
    torch.manual_seed(99)
    second = eval_batches(corpus.val, seed=3, n_batches=5, batch_size=4, seq_len=16)
    assert len(first) == 5
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert x1.shape == y1.shape == (4, 16) and x1.dtype == torch.int64
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(x1[:, 1:], y1[:, :-1])
    # the batches are not all the same window
    assert len({tuple(x[0].tolist()) for x, _ in first}) > 1
    val_bytes = content[corpus.train.numel() :]
    for x, y in first:
        for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
            assert bytes(row_x + row_y[-1:]) in val_bytes


def test_eval_batches_with_fewer_windows_than_requested(tmp_path: Path) -> None:
    content = bytes(range(200))  # val is 20 bytes: 20 - 16 = 4 windows of 17
    corpus = ByteCorpus.from_file(write(tmp_path, content), seq_len=16)
    batches = eval_batches(corpus.val, seed=0, n_batches=10, batch_size=8, seq_len=16)
    assert len(batches) == 10
    starts = {x[i, 0].item() for x, _ in batches for i in range(8)}
    assert starts <= {180, 181, 182, 183}


def test_batch_seq_len_longer_than_split_is_an_error(text_corpus: tuple[ByteCorpus, bytes]) -> None:
    corpus, _ = text_corpus
    with pytest.raises(NexusError, match="fewer than one window"):
        eval_batches(corpus.val, seed=0, n_batches=1, batch_size=1, seq_len=1000)
    with pytest.raises(NexusError, match="batch_size must be a positive integer"):
        train_batch(corpus, seed=0, step=0, micro_step=0, batch_size=0, seq_len=16)


def test_real_tiny_shakespeare() -> None:
    if not REAL_SHAKESPEARE.is_file():
        pytest.skip(f"{REAL_SHAKESPEARE} is not present")
    content = REAL_SHAKESPEARE.read_bytes()
    assert len(content) == 1_115_394
    assert hashlib.sha256(content).hexdigest() == TINY_SHAKESPEARE_SHA256
    corpus = ByteCorpus.from_file(REAL_SHAKESPEARE, seq_len=128)
    assert corpus.train.numel() == 1_003_854 and corpus.val.numel() == 111_540
    assert corpus.name == "tinyshakespeare"


# --- corpus errors ---------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(NexusError, match="does not exist") as info:
        ByteCorpus.from_file(missing, seq_len=8)
    assert str(missing) in str(info.value) and "--data" in str(info.value)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(NexusError, match="is a directory") as info:
        ByteCorpus.from_file(tmp_path, seq_len=8)
    assert str(tmp_path) in str(info.value)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root reads files whatever their mode; the next test covers the message",
)
def test_unreadable_by_mode(tmp_path: Path) -> None:
    path = write(tmp_path, b"x" * 1000)
    path.chmod(0)
    try:
        with pytest.raises(NexusError, match="not readable") as info:
            ByteCorpus.from_file(path, seq_len=8)
    finally:
        path.chmod(0o600)
    assert str(path) in str(info.value)


def test_unreadable_permission_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # chmod 000 does not stop root, so simulate the PermissionError the read would raise.
    path = write(tmp_path, b"x" * 1000)

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(NexusError, match="not readable") as info:
        ByteCorpus.from_file(path, seq_len=8)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_path_under_a_file(tmp_path: Path) -> None:
    # a real OS error that root cannot bypass: a "directory" that is a regular file
    parent = write(tmp_path, b"not a directory")
    with pytest.raises(NexusError, match="does not exist") as info:
        ByteCorpus.from_file(parent / "child.txt", seq_len=8)
    assert str(parent / "child.txt") in str(info.value)


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, b"")
    with pytest.raises(NexusError, match="is empty") as info:
        ByteCorpus.from_file(path, seq_len=8)
    assert str(path) in str(info.value)


def test_shorter_than_one_window(tmp_path: Path) -> None:
    path = write(tmp_path, b"x" * 8)
    with pytest.raises(NexusError, match="has 8 bytes, fewer than one window") as info:
        ByteCorpus.from_file(path, seq_len=8)
    assert "9 bytes" in str(info.value) and str(path) in str(info.value)


def test_val_split_too_short(tmp_path: Path) -> None:
    # seq_len 8 -> window 9; the last 10 % needs >= 9 bytes, so at least 81 bytes in all
    path = write(tmp_path, b"x" * 80)
    with pytest.raises(NexusError, match="validation split") as info:
        ByteCorpus.from_file(path, seq_len=8)
    assert "at least 81 bytes" in str(info.value) and str(path) in str(info.value)
    corpus = ByteCorpus.from_file(write(tmp_path, b"x" * 81, "ok.txt"), seq_len=8)
    assert corpus.val.numel() == 9


def test_bad_seq_len(tmp_path: Path) -> None:
    with pytest.raises(NexusError, match="seq_len must be a positive integer"):
        ByteCorpus.from_file(write(tmp_path, b"x" * 100), seq_len=0)


# --- resolution and download -----------------------------------------------------------------


class _Server:
    """A one-file HTTP server on 127.0.0.1 in a thread; counts requests."""

    def __init__(self, body: bytes) -> None:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

        self.requests = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/input.txt"
        # a short poll interval keeps shutdown (and so each test) fast
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def serve() -> Iterator[Callable[[bytes], _Server]]:
    servers: list[_Server] = []

    def start(body: bytes) -> _Server:
        servers.append(_Server(body))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # never touch the real ~/.cache, and ignore a NEXUS_DATA set in the developer's shell
    monkeypatch.delenv("NEXUS_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/input.txt"


BODY = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
BODY_SHA = hashlib.sha256(BODY).hexdigest()


def test_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_dir() == tmp_path / "xdg" / "nexus"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "nexus"


def test_explicit_path_then_env_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = closed_port_url()  # reaching the network would fail these
    monkeypatch.setenv("NEXUS_DATA", str(tmp_path / "env.txt"))
    assert resolve_dataset(str(tmp_path / "arg.txt"), url=url) == tmp_path / "arg.txt"
    assert resolve_dataset(None, url=url) == tmp_path / "env.txt"


def test_good_download_is_cached(tmp_path: Path, serve: Callable[[bytes], _Server]) -> None:
    server = serve(BODY)
    path = resolve_dataset(url=server.url, sha256=BODY_SHA, timeout=5)
    assert path == tmp_path / "xdg" / "nexus" / "tinyshakespeare.txt"
    assert path.read_bytes() == BODY
    assert server.requests == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["tinyshakespeare.txt"]
    server.stop()
    # the second call is served by the cache: the server is gone
    assert resolve_dataset(url=server.url, sha256=BODY_SHA, timeout=5) == path
    assert dataset_name(path) == "tinyshakespeare"


def test_corrupt_download_is_rejected(tmp_path: Path, serve: Callable[[bytes], _Server]) -> None:
    server = serve(BODY[:-1] + b"?")
    cache = tmp_path / "cache"
    with pytest.raises(NexusError, match="checksum") as info:
        resolve_dataset(url=server.url, sha256=BODY_SHA, cache=cache, timeout=5)
    assert "--data" in str(info.value) and "\n" not in str(info.value)
    assert list(cache.iterdir()) == []  # nothing cached, no temp file left


def test_corrupt_cached_copy_is_replaced(tmp_path: Path, serve: Callable[[bytes], _Server]) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tinyshakespeare.txt").write_bytes(b"truncated")
    server = serve(BODY)
    path = resolve_dataset(url=server.url, sha256=BODY_SHA, cache=cache, timeout=5)
    assert path.read_bytes() == BODY and server.requests == 1


def test_corrupt_cached_copy_offline_is_an_error(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tinyshakespeare.txt").write_bytes(b"truncated")
    with pytest.raises(NexusError, match="--data"):
        resolve_dataset(url=closed_port_url(), sha256=BODY_SHA, cache=cache, timeout=5)
    assert sorted(p.name for p in cache.iterdir()) == ["tinyshakespeare.txt"]


def test_offline_says_pass_data(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(NexusError) as info:
        resolve_dataset(url=closed_port_url(), sha256=BODY_SHA, cache=cache, timeout=5)
    message = str(info.value)
    assert "--data PATH" in message and "NEXUS_DATA" in message
    assert "\n" not in message and "Traceback" not in message and "<urlopen" not in message
    assert "refused" in message.lower()
    assert list(cache.iterdir()) == []


def test_download_error_keeps_disk_errors_apart(
    tmp_path: Path, serve: Callable[[bytes], _Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a failing rename is the local disk, not the network: the message says so
    server = serve(BODY)
    cache = tmp_path / "cache"

    def no_space(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data.os, "replace", no_space)
    with pytest.raises(NexusError, match="cannot write the dataset cache"):
        resolve_dataset(url=server.url, sha256=BODY_SHA, cache=cache, timeout=5)
    assert list(cache.iterdir()) == []
