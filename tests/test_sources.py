"""Your own data: a directory walked with its hidden, binary and unmatched files skipped and
counted, JSON Lines and gzip sources, the prepared store (bytes equal to the documents joined,
reused while the sources are unchanged, rebuilt when they change), the errors for bad input
(an unreadable file skipped and listed, sources that change while they are read, a disk that
fills up while the store is written), and a run that trains from a directory."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nexus.sources as sources
from conftest import WITHOUT_ROOT_READ, tiny_config
from nexus.cli import main
from nexus.errors import NexusError
from nexus.report import load_run, render_report, run_forecast
from nexus.sources import SourceSpec
from nexus.store import prepare
from nexus.training import Trainer

SEPARATOR = "\n\n"
PYTHON = sys.executable
# The kernel's own "disk full": a file-size limit. With SIGXFSZ ignored (as Python sets it)
# the write that crosses it fails with EFBIG, as a write to a full disk fails with ENOSPC;
# with the signal's default action the process is killed mid-write, as by a power cut.
FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN if sys.argv[1] == "ignored" else signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
from nexus.cli import main
sys.exit(main(sys.argv[3:]))
"""


def make_tree(root: Path, text_corpus: Path) -> list[bytes]:
    """A nested folder of text files, plus files that must be skipped; returns the documents
    that must be kept, in the sorted-path order the store uses."""
    text = text_corpus.read_bytes()
    files = {
        "a/one.txt": text[:20_000],
        "a/b/two.md": text[20_000:40_000],
        "c/three.txt": text[40_000:],
        "c/empty.txt": b"",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_bytes(b"ref: refs/heads/main\n")  # hidden: skipped
    (root / "a" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))  # excluded
    (root / "a" / "blob.dat").write_bytes(b"abc\0def" * 10)  # binary: skipped
    kept = sorted(n for n, d in files.items() if d)
    return [files[name] for name in kept]


def test_a_directory_becomes_one_store_of_its_text_files(text_corpus: Path, tmp_path: Path):
    kept = make_tree(tmp_path / "notes", text_corpus)
    store = prepare(SourceSpec(tmp_path / "notes"), SEPARATOR, root=tmp_path / "cache")
    assert store.data_file.read_bytes() == SEPARATOR.encode().join(kept)
    summary = store.summary
    assert (summary["documents"], summary["files"]) == (3, 4)  # the empty file has no document
    assert summary["skipped"] == {
        "binary": 1, "hidden": 1, "not matched by include/exclude": 1
    }  # fmt: skip
    # Unchanged sources: the same store, not prepared again, and the same summary told.
    told: list[str] = []
    again = prepare(
        SourceSpec(tmp_path / "notes"), SEPARATOR, root=tmp_path / "cache", log=told.append
    )
    assert again.directory == store.directory
    text_bytes = sum(len(document) for document in kept)
    assert told == [
        f"reusing the prepared store {store.data_file}: 3 documents from 4 files, "
        f"{text_bytes + 2 * len(SEPARATOR):,} bytes ({text_bytes:,} of text, the rest separators); "
        "skipped: 1 binary, 1 hidden, 1 not matched by include/exclude"
    ]
    # A changed file: a new store with the new bytes.
    (tmp_path / "notes" / "c" / "three.txt").write_bytes(b"changed text " * 100)
    changed = prepare(SourceSpec(tmp_path / "notes"), SEPARATOR, root=tmp_path / "cache")
    assert changed.directory != store.directory
    assert changed.data_file.read_bytes().endswith(b"changed text " * 100)


def test_json_lines_and_gzip_sources(tmp_path: Path):
    records = [{"text": "first record"}, {"text": "second, with \u00e9"}, {"id": 3, "text": ""}]
    source = tmp_path / "data.jsonl.gz"
    source.write_bytes(gzip.compress("\n".join(map(json.dumps, records)).encode()))
    store = prepare(SourceSpec(source), "|", root=tmp_path / "cache")
    assert store.data_file.read_bytes() == "first record|second, with \u00e9".encode()
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"body": "x"}) + "\n")
    store = prepare(SourceSpec(other, text_field="body"), "|", root=tmp_path / "cache")
    assert store.data_file.read_bytes() == b"x"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", b'{"text": "fine"}\n{not json\n', r"bad\.jsonl' line 2 is not JSON"),
        (
            "field.jsonl",
            b'{"body": "x"}\n',
            r"line 1 has no string field 'text'; pass --text_field",
        ),
        ("broken.txt.gz", b"\x1f\x8b\x08\x00garbage", r"is not a readable gzip file"),
    ],
)
def test_bad_sources_name_the_file_and_the_fix(tmp_path: Path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(NexusError, match=message):
        prepare(SourceSpec(tmp_path / name), SEPARATOR, root=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no half store left


def test_a_directory_without_text_is_refused(tmp_path: Path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "x.png").write_bytes(b"png")
    with pytest.raises(NexusError, match=r"holds no text to train on .*1 not matched"):
        prepare(SourceSpec(tmp_path / "empty"), SEPARATOR, root=tmp_path / "cache")


def test_a_run_trains_from_a_directory(text_corpus: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    make_tree(tmp_path / "notes", text_corpus)
    out = tmp_path / "run"
    last = Trainer(tiny_config(tmp_path / "notes", out), progress=False).run()
    assert last["step"] == 8 and last["val_loss"] < 5.5
    dataset = json.loads((out / "config.json").read_text())["dataset"]
    assert dataset["sources"]["documents"] == 3 and dataset["path"].endswith("data.bin")
    run = load_run(out)
    assert "3 documents from 4 files, 1 skipped (binary)" in render_report(run, run_forecast(run))


def test_nexus_prepare_prints_the_summary(text_corpus: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    make_tree(tmp_path / "notes", text_corpus)
    assert main(["prepare", "--data", str(tmp_path / "notes")]) == 0
    out = capsys.readouterr().out
    assert "3 documents from 4 files" in out and "1 binary" in out and "1 hidden" in out
    data_file = Path(out.split(":")[0])
    assert data_file.is_relative_to(tmp_path / "xdg" / "nexus" / "stores")
    assert main(["prepare", "--data", str(tmp_path / "absent")]) == 2
    assert "absent' does not exist" in capsys.readouterr().err


def test_an_unreadable_file_in_a_directory_is_skipped_and_listed(text_corpus: Path, tmp_path):
    """Skipped, not refused: one file a user cannot read should not stop a run over thousands;
    the summary (printed, in config.json and the report) counts it and names it."""
    kept = make_tree(tmp_path / "notes", text_corpus)
    secret = tmp_path / "notes" / "a" / "secret.txt"
    secret.write_bytes(b"private text " * 50)
    secret.chmod(0)
    gone = tmp_path / "notes" / "c" / "gone.txt"
    gone.symlink_to(tmp_path / "nowhere.txt")  # a dangling link: unreadable to anyone
    command = ["-m", "nexus", "prepare", "--data", str(tmp_path / "notes")]
    if os.geteuid() == 0:
        command = ["-c", WITHOUT_ROOT_READ, *command]
    result = subprocess.run(
        [PYTHON, *command], capture_output=True, text=True, timeout=60,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")},
    )  # fmt: skip
    if result.returncode == 77:
        pytest.skip("root here cannot give up CAP_DAC_OVERRIDE, so no file is unreadable to it")
    assert result.returncode == 0, result.stderr
    assert "3 documents from 4 files" in result.stdout and "2 unreadable" in result.stdout
    data_file = Path(result.stdout.split(":")[0])
    assert data_file.read_bytes() == SEPARATOR.encode().join(kept)
    summary = json.loads((data_file.parent / "index.json").read_text())["summary"]
    assert sorted(summary["skipped_examples"]["unreadable"]) == [str(secret), str(gone)]


@pytest.mark.parametrize("change", ["appended", "rewritten, same size", "added", "removed"])
def test_sources_changed_while_preparing_are_refused_by_name(
    text_corpus: Path, tmp_path: Path, monkeypatch, capsys, change
):
    """Another program writes to the tree while `nexus prepare` reads it: right after the first
    file is read (its bytes already copied into the staging store), the change happens on
    disk. The refusal names the file; nothing is published; the rerun takes the new text."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    notes = tmp_path / "notes"
    make_tree(notes, text_corpus)
    first, later = notes / "a" / "b" / "two.md", notes / "c" / "three.txt"
    changed = {"added": notes / "c" / "new.txt", "removed": later}.get(change, first)
    read_bytes = sources._bytes

    def read_then_change(path: Path) -> bytes:
        data = read_bytes(path)
        if path == first:
            if change == "appended":
                with first.open("ab") as file:
                    file.write(b" and one more line")
            elif change == "rewritten, same size":
                time.sleep(0.02)  # past the file system's timestamp tick: only the mtime moves
                first.write_bytes(data.upper())
            elif change == "added":
                changed.write_text("a file that appeared mid-way")
            else:
                later.unlink()
        return data

    monkeypatch.setattr(sources, "_bytes", read_then_change)
    assert main(["prepare", "--data", str(notes)]) == 2
    assert capsys.readouterr().err == (
        f"nexus: error: {str(changed)!r} changed while {str(notes)!r} was being prepared; "
        "nothing was kept: run again once the files are stable\n"
    )
    assert list((tmp_path / "xdg" / "nexus" / "stores").iterdir()) == []
    monkeypatch.setattr(sources, "_bytes", read_bytes)  # the files are stable now
    assert main(["prepare", "--data", str(notes)]) == 0
    text_files = ["a/b/two.md", "a/one.txt", "c/new.txt", "c/three.txt"]  # in the store's order
    now = [(notes / name).read_bytes() for name in text_files if (notes / name).exists()]
    assert Path(capsys.readouterr().out.split(":")[0]).read_bytes() == SEPARATOR.encode().join(now)


@pytest.mark.parametrize("sigxfsz", ["ignored", "default"])
def test_a_full_disk_while_writing_the_store_leaves_no_store_to_use(
    text_corpus: Path, tmp_path: Path, monkeypatch, capsys, sigxfsz
):
    """A real write failure from the kernel part-way through data.bin. Either the write fails
    (one line, exit 2, the staging folder removed) or the process dies mid-write (its staging
    folder stays, unnamed, and is never read); the next prepare with room builds the store."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    notes = tmp_path / "notes"
    expected = SEPARATOR.encode().join(make_tree(notes, text_corpus))
    limit = 16_000
    assert len(expected) > 2 * limit
    result = subprocess.run(
        [PYTHON, "-c", FILE_SIZE_LIMIT, sigxfsz, str(limit), "prepare", "--data", str(notes)],
        capture_output=True, text=True, timeout=60, env=os.environ,
    )  # fmt: skip
    stores = tmp_path / "xdg" / "nexus" / "stores"
    assert result.stdout == ""
    if sigxfsz == "ignored":
        assert result.returncode == 2
        assert result.stderr == (
            f"nexus: error: could not write the prepared store under {str(stores)!r} (File "
            "too large); nothing was kept: free disk space there or point XDG_CACHE_HOME at a "
            "disk with room, then run again\n"
        )
        assert list(stores.iterdir()) == []
    else:
        assert result.returncode == -signal.SIGXFSZ
        [staging] = stores.iterdir()
        assert staging.name.startswith(".") and not (staging / "index.json").exists()
        assert (staging / "data.bin").stat().st_size == limit  # the half store, cut off
    assert main(["prepare", "--data", str(notes)]) == 0
    data_file = Path(capsys.readouterr().out.split(":")[0])
    assert data_file.read_bytes() == expected and not data_file.parent.name.startswith(".")
    if sigxfsz == "ignored":  # and a run trains on the store the rerun made
        out = tmp_path / "run"
        config = tiny_config(
            notes, out, max_steps=2, eval_interval=2, eval_batches=1, micro_batch=2, grad_accum=1
        )
        last = Trainer(config, progress=False).run()
        assert last["step"] == 2 and last["val_loss"] < 6.0
        dataset = json.loads((out / "config.json").read_text())["dataset"]
        assert dataset["path"] == str(data_file) and dataset["sources"]["documents"] == 3


def test_windows_read_from_a_store_equal_those_of_the_same_bytes_in_memory(
    text_corpus: Path, tmp_path: Path
):
    from nexus.data import ByteCorpus, eval_batches, train_batch

    store_file = tmp_path / "data.bin"
    store_file.write_bytes(text_corpus.read_bytes())
    stored = ByteCorpus.from_store(store_file, 32, "words")
    loaded = ByteCorpus.from_file(text_corpus, 32)
    assert (len(stored.train), len(stored.val)) == (len(loaded.train), len(loaded.val))
    for step in (1, 7):
        a = train_batch(stored, seed=3, step=step, micro_step=1, batch_size=5, seq_len=32)
        b = train_batch(loaded, seed=3, step=step, micro_step=1, batch_size=5, seq_len=32)
        assert all(x.equal(y) for x, y in zip(a, b, strict=True))
    for x, y in zip(
        eval_batches(stored.val, seed=3, n_batches=2, batch_size=4, seq_len=32),
        eval_batches(loaded.val, seed=3, n_batches=2, batch_size=4, seq_len=32),
        strict=True,
    ):
        assert x[0].equal(y[0]) and x[1].equal(y[1])


def test_val_data_validates_on_its_own_source(text_corpus: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("\n".join(json.dumps({"text": "queen " * 40 + str(i)}) for i in range(50)))
    out = tmp_path / "run"
    Trainer(tiny_config(text_corpus, out, val_data=str(held_out)), progress=False).run()
    dataset = json.loads((out / "config.json").read_text())["dataset"]
    texts = [json.loads(line)["text"].encode() for line in held_out.read_text().splitlines()]
    expected_val = len(SEPARATOR.encode().join(texts))  # the records joined by a blank line
    assert dataset["train_bytes"] == text_corpus.stat().st_size  # --data trains whole
    assert dataset["val_bytes"] == expected_val and dataset["val_data"] == str(held_out)
    run = load_run(out)
    assert f"validated on `{held_out}`" in render_report(run, run_forecast(run))
    with pytest.raises(NexusError, match="the validation data has 5 bytes"):
        (tmp_path / "tiny.txt").write_text("hello")
        Trainer(tiny_config(text_corpus, tmp_path / "r2", val_data=str(tmp_path / "tiny.txt")))
