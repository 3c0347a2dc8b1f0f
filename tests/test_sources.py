"""Your own data: a directory walked with its hidden, binary and unmatched files skipped and
counted, JSON Lines and gzip sources, the prepared store (bytes equal to the documents joined,
reused while the sources are unchanged, rebuilt when they change), the errors for bad input,
and a run that trains from a directory through the memory map."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import tiny_config
from nexus.errors import NexusError
from nexus.report import load_run, render_report, run_forecast
from nexus.sources import SourceSpec
from nexus.store import prepare
from nexus.training import Trainer

SEPARATOR = "\n\n"


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
    # Unchanged sources: the same store, not prepared again.
    again = prepare(SourceSpec(tmp_path / "notes"), SEPARATOR, root=tmp_path / "cache")
    assert again.directory == store.directory
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
    from nexus.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    make_tree(tmp_path / "notes", text_corpus)
    assert main(["prepare", "--data", str(tmp_path / "notes")]) == 0
    out = capsys.readouterr().out
    assert "3 documents from 4 files" in out and "1 binary" in out and "1 hidden" in out
    data_file = Path(out.split(":")[0])
    assert data_file.is_relative_to(tmp_path / "xdg" / "nexus" / "stores")
    assert main(["prepare", "--data", str(tmp_path / "absent")]) == 2
    assert "absent' does not exist" in capsys.readouterr().err


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
