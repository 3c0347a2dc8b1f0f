"""Reliability: every mistake a user can make ends in one clear line, and no fault loses
anything that was saved.

Bad inputs go through the command line, each in a process of its own (forked from one that
has imported nexus, see ForkServer; a sample of them through `python -m nexus` itself). Faults
are injected in process (a disk that fills up, non-finite losses and gradients) or by
signalling training processes (SIGINT, SIGTERM, and a loop of SIGKILLs at random moments).
Subprocesses run with one thread, so a resumed run can be compared bit for bit with an
uninterrupted one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import nexus.training as training
from conftest import WITHOUT_ROOT_READ, tiny_config
from nexus.checkpoint import load_checkpoint, save_checkpoint
from nexus.config import TrainConfig
from nexus.errors import NexusError
from nexus.rundir import RunDir
from nexus.training import Trainer

PYTHON = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = {
    "preset": "nexus-tiny",
    "max_steps": 2,
    "eval_interval": 2,
    "eval_batches": 1,
    "eval_batch_size": 2,
    "micro_batch": 2,
    "grad_accum": 1,
    "sample_bytes": 8,
    "warmup_steps": 1,
    "device": "cpu",
}
TINY_FLAGS = [part for key, value in TINY.items() for part in (f"--{key}", str(value))]
LONG_STEPS = 10  # the run that is interrupted: a checkpoint at every eval, every 2 steps
LONG_FLAGS = [*TINY_FLAGS, "--max_steps", str(LONG_STEPS), "--log_interval", "1"]
KILLS = 20


def read_records(metrics: Path) -> list[dict[str, Any]]:
    return RunDir(metrics.parent).read_metrics()[0]


def nexus(*args: str | Path | bytes, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("env", ENV)
    return subprocess.run(
        [PYTHON, "-m", "nexus", *map(_arg, args)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=600,
        **kwargs,
    )


def _arg(value: str | Path | bytes) -> str | bytes:
    return value if isinstance(value, bytes) else str(value)


def files_of(run_dir: Path) -> dict[str, bytes]:
    """Every finished file of a run directory (temp files start with a dot; the append-only
    event files in its tensorboard directory are not among them)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(run_dir.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


def temp_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob(".*.tmp"))


def evals(run_dir: Path) -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in read_records(run_dir / "metrics.jsonl") if r["kind"] == "eval"}


def assert_same_run(
    run_dir: Path, reference: Path, rel_tol: float = 0.0, stopped_at: tuple[int, ...] = ()
) -> None:
    """The run ended exactly (or within rel_tol) where the uninterrupted reference ended, with
    its checkpoints plus those that stops between checkpoint steps saved."""
    ours, theirs = (
        read_records(run_dir / "metrics.jsonl"),
        read_records(reference / "metrics.jsonl"),
    )
    keys = [(r["kind"], r["step"]) for r in ours]
    assert len(keys) == len(set(keys)), "a step was recorded twice"
    assert sorted(keys) == sorted((r["kind"], r["step"]) for r in theirs)
    mine_by_key = {(r["kind"], r["step"]): r for r in ours}
    for expected in theirs:  # every number but the clock's
        got = mine_by_key[(expected["kind"], expected["step"])]
        for key in expected.keys() - {"elapsed_s", "tokens_per_s"}:
            if rel_tol and isinstance(expected[key], float):
                assert math.isclose(got[key], expected[key], rel_tol=rel_tol), (expected, key)
            else:
                assert got[key] == expected[key], (expected["kind"], expected["step"], key)
    last = max(evals(reference))
    for name in (f"step_{last}.bin", "best.bin"):
        mine, want = load_checkpoint(run_dir / name), load_checkpoint(reference / name)
        assert mine.step == want.step, name
        for part in ("model_state", "optimizer_tensors"):
            a, b = getattr(mine, part), getattr(want, part)
            assert a.keys() == b.keys(), (name, part)
            for k in a:
                if rel_tol:
                    torch.testing.assert_close(a[k], b[k], rtol=rel_tol, atol=1e-6)
                else:
                    assert torch.equal(a[k], b[k]), (name, part, k)
    expected = {p.name for p in reference.glob("step_*.bin")}
    expected |= {f"step_{step}.bin" for step in stopped_at}
    assert sorted(p.name for p in run_dir.glob("step_*.bin")) == sorted(expected)


# --- running the CLI in fresh processes, quickly -------------------------------------------

FORK_SERVER = r"""
import json, os, sys, traceback
import nexus.cli, nexus.plot, nexus.report, nexus.training  # imported once, then forked
import matplotlib.font_manager  # finds the fonts once, not in every run
try:
    import torch.utils.tensorboard  # the trainer's event files, when tensorboard is installed
except ImportError:
    pass
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "run":
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                for fd, name in ((1, request["stdout"]), (2, request["stderr"])):
                    os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
                if request.get("die_renaming"):  # SIGKILL itself as it renames a written file
                    rename, target = os.replace, request["die_renaming"]
                    def replace(source, destination, *args, **kwargs):
                        if os.path.basename(destination).startswith(target):
                            os.kill(os.getpid(), 9)
                        rename(source, destination, *args, **kwargs)
                    os.replace = replace
                code = nexus.cli.main(request["argv"])  # what `python -m nexus` runs
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
    elif request["op"] == "wait":
        _, status = os.waitpid(request["pid"], 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class ForkServer:
    """Runs `nexus` commands as forks of one process that has imported nexus already, so the
    many runs here do not each pay for importing torch: each is `nexus.cli.main(argv)`, what
    `python -m nexus` runs, in a process of its own with its own stderr and exit status (and
    one the test may kill). `test_bad_input_through_python_m_nexus` checks that the real entry
    point answers the same."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        env = {**ENV, "MPLCONFIGDIR": str(workdir / "mpl")}
        self.process = subprocess.Popen(
            [PYTHON, "-c", FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=workdir,
        )
        assert self._reply() == "ready"
        self.runs = 0

    def _reply(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def _ask(self, **request: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self._reply())

    def start(self, argv: list[str], die_renaming: str | None = None) -> tuple[int, Path, Path]:
        self.runs += 1
        stdout, stderr = self.workdir / f"{self.runs}.out", self.workdir / f"{self.runs}.err"
        request = {"argv": argv, "stdout": str(stdout), "stderr": str(stderr)}
        pid = self._ask(op="run", die_renaming=die_renaming, **request)["pid"]
        return pid, stdout, stderr

    def wait(self, pid: int, timeout: float = 600.0) -> int:
        """The run's exit status; one still running after `timeout` seconds is killed."""
        deadline = time.monotonic() + timeout
        while not _has_exited(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        return self._ask(op="wait", pid=pid)["status"]

    def run(self, args: list) -> subprocess.CompletedProcess[str]:
        """`nexus ARGS` in a process of its own, to the end."""
        pid, stdout, stderr = self.start([str(arg) for arg in args])
        code = self.wait(pid)
        return subprocess.CompletedProcess(
            args, code, stdout.read_text(errors="replace"), stderr.read_text(errors="replace")
        )

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _has_exited(pid: int) -> bool:
    try:  # a child that has exited is a zombie ("Z") until the server collects it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:
        return True  # no /proc: let the server's waitpid block instead


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    server = ForkServer(tmp_path_factory.mktemp("forks"))
    yield server
    server.close()


# --- bad input: one line on stderr, exit 2, no traceback --------------------------------------


@dataclass
class Context:
    tmp: Path
    data: Path
    run: Path  # a finished two-step run of the tiny preset (step_2.bin, best.bin, ...)

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def train(self, *args: str | Path, data: Path | None = None, out: str = "out") -> list:
        return [
            "train",
            *TINY_FLAGS,
            "--data",
            data or self.data,
            "--out_dir",
            self.tmp / out,
            *args,
        ]

    def damaged(self, change: Callable[[bytearray], bytes | bytearray]) -> Path:
        payload = bytearray((self.run / "step_2.bin").read_bytes())
        return self.write("step_2.bin", bytes(change(payload)))

    def mkdir(self, name: str) -> str:
        (self.tmp / name).mkdir()
        return name

    def copy_of_run(self) -> Path:
        return Path(shutil.copytree(self.run, self.tmp / "copy"))


def flip_tensor_bit(payload: bytearray) -> bytearray:
    payload[-3] ^= 0x10  # inside the last tensor's bytes
    return payload


def flip_metadata_bit(payload: bytearray) -> bytearray:
    # a digit of the seed inside the JSON metadata: still valid JSON, a different run
    header_length = int.from_bytes(payload[:8], "little")
    at = payload.index(b'seed\\": 1337', 0, 8 + header_length) + len(b'seed\\": 1')
    payload[at] ^= 0x02  # '3' -> '1'
    return payload


def foreign_safetensors(ctx: Context) -> Path:
    path = ctx.tmp / "weights.safetensors"
    save_file({"w": torch.zeros(4)}, path)
    return path


def misfit(ctx: Context) -> Path:
    """A well-formed checkpoint whose config does not describe its tensors."""
    saved = load_checkpoint(ctx.run / "step_2.bin")
    meta = {**saved.meta, "model_config": {**saved.meta["model_config"], "mlp_hidden": 96}}
    path = ctx.tmp / "misfit.bin"
    save_checkpoint(path, saved.model_state, saved.optimizer_tensors, meta, saved.rng_state)
    return path


def toml(ctx: Context, text: str, name: str = "config.toml") -> Path:
    return ctx.write(name, text)


TRUNCATED = "is corrupted or truncated"
NOT_SAFETENSORS = "is not a readable safetensors file"
BAD_TENSORS = "is corrupted: its tensors do not match the checksum"
BAD_META = "is corrupted: its metadata does not match the checksum"
NOT_NEXUS = "is not a Nexus checkpoint"

BAD_INPUTS: dict[str, Callable[[Context], tuple[list, list[str]]]] = {
    # the data file
    "data missing": lambda c: (
        c.train(data=c.tmp / "nope.txt"),
        ["data file", "nope.txt' does not exist", "--data"],
    ),
    "data: a directory with no text": lambda c: (
        c.train(data=c.tmp / c.mkdir("no-text")),
        ["no-text' holds no text to train on", "check --data"],
    ),
    "data under a regular file": lambda c: (
        c.train(data=c.write("plain", "x") / "data.txt"),
        ["does not exist"],
    ),
    "data unreadable (I/O error)": lambda c: (
        c.train(data=Path("/proc/self/mem")),
        ["could not be read", "Input/output error"],
    ),
    "data empty": lambda c: (c.train(data=c.write("empty.txt", b"")), ["is empty"]),
    "data shorter than seq_len + 1": lambda c: (
        c.train(data=c.write("short.txt", b"x" * 32)),
        ["has 32 bytes, fewer than one window of seq_len + 1 = 33 bytes"],
    ),
    "val split too short": lambda c: (
        c.train(data=c.write("val.txt", b"x" * 320)),
        ["validation split", "32 bytes, fewer than one window of 33", "at least 321 bytes"],
    ),
    "eval on too little data": lambda c: (
        ["eval", c.run / "step_2.bin", "--data", c.write("tiny.txt", b"abc")],
        ["has 3 bytes, fewer than one window"],
    ),
    # values
    "max_steps 0": lambda c: (
        c.train("--max_steps", "0"),
        ["train config: max_steps must be a positive integer, got 0"],
    ),
    "micro_batch -1": lambda c: (
        c.train("--micro_batch", "-1"),
        ["micro_batch must be a positive integer, got -1"],
    ),
    "eval_batches 0": lambda c: (c.train("--eval_batches", "0"), ["eval_batches must be"]),
    "model d_model 0": lambda c: (
        c.train("--config", toml(c, "[model]\nd_model = 0\n")),
        ["model config: d_model must be a positive integer, got 0"],
    ),
    "model seq_len -5": lambda c: (
        c.train("--config", toml(c, "[model]\nseq_len = -5\n")),
        ["seq_len must be a positive integer, got -5"],
    ),
    "lr 0": lambda c: (c.train("--lr", "0"), ["train config: lr must be a number > 0, got 0.0"]),
    "lr negative": lambda c: (c.train("--lr", "-0.001"), ["lr must be a number > 0, got -0.001"]),
    "lr nan": lambda c: (c.train("--lr", "nan"), ["lr must be a number > 0, got nan"]),
    "warmup > max_steps": lambda c: (
        c.train("--warmup_steps", "5"),
        ["warmup_steps 5 exceeds max_steps 2", "shorten the warmup"],
    ),
    "heads % kv_heads": lambda c: (
        c.train("--config", toml(c, "[model]\nn_heads = 4\nn_kv_heads = 3\n")),
        ["n_heads 4 is not divisible by n_kv_heads 3"],
    ),
    "d_model % heads": lambda c: (
        c.train("--config", toml(c, "[model]\nn_heads = 5\nn_kv_heads = 1\n")),
        ["d_model 64 is not divisible by n_heads 5"],
    ),
    "unknown preset flag": lambda c: (
        c.train("--preset", "nexus-huge"),
        ["unknown preset 'nexus-huge'; choose one of: nexus-6m, ", "nexus-tiny"],
    ),
    "unknown preset in file": lambda c: (
        ["train", "--config", toml(c, 'preset = "nexus-70b"\n'), "--out_dir", c.tmp / "o"],
        ["unknown preset 'nexus-70b'"],
    ),
    "unknown key": lambda c: (
        c.train("--config", toml(c, "learning_rate = 0.1\n")),
        ["train config: unknown key 'learning_rate'; known keys:"],
    ),
    "unknown model key": lambda c: (
        c.train("--config", toml(c, "[model]\nd_modle = 64\n")),
        ["model config: unknown key 'd_modle'"],
    ),
    "wrong type (TOML)": lambda c: (
        c.train("--config", toml(c, 'log_interval = "ten"\n')),
        ["log_interval has the wrong type (str: 'ten'); expected int"],
    ),
    "wrong type (YAML)": lambda c: (
        c.train("--config", toml(c, "lr: fast\n", "config.yaml")),
        ["lr has the wrong type (str: 'fast')"],
    ),
    "boolean for a number": lambda c: (
        c.train("--config", toml(c, "seed = true\n")),
        ["seed must be a number, not a boolean"],
    ),
    "model table not a table": lambda c: (
        c.train("--config", toml(c, "model = 5\n")),
        ["model has the wrong type"],
    ),
    "malformed TOML": lambda c: (
        c.train("--config", toml(c, "max_steps = = 3\n")),
        ["config.toml' is malformed"],
    ),
    "malformed YAML": lambda c: (
        c.train("--config", toml(c, "lr: [1, 2\nmax_steps: 3\n", "config.yml")),
        ["config.yml' is malformed"],
    ),
    "YAML not a table": lambda c: (
        c.train("--config", toml(c, "- 1\n- 2\n", "config.yaml")),
        ["must hold a table of settings"],
    ),
    "config file missing": lambda c: (
        c.train("--config", c.tmp / "none.toml"),
        ["none.toml' does not exist"],
    ),
    "config file of unknown kind": lambda c: (
        c.train("--config", c.write("config.json", "{}")),
        ["use a .toml, .yaml or .yml file"],
    ),
    "flag not a number": lambda c: (
        c.train("--max_steps", "ten"),
        ["argument --max_steps: invalid int value: 'ten'", "nexus train --help"],
    ),
    "unknown flag": lambda c: (c.train("--learning_rate", "1"), ["unrecognized arguments"]),
    "device tpu": lambda c: (c.train("--device", "tpu"), ["device must be auto, cpu or cuda"]),
    "sample temperature < 0": lambda c: (
        ["sample", c.run / "step_2.bin", "--temperature", "-1"],
        ["--temperature must be >= 0"],
    ),
    # checkpoints
    "eval: checkpoint missing": lambda c: (
        ["eval", c.tmp / "step_9.bin"],
        ["step_9.bin' does not exist"],
    ),
    "sample: checkpoint missing": lambda c: (["sample", c.tmp / "x.bin"], ["does not exist"]),
    "resume: checkpoint missing": lambda c: (
        c.train("--resume", c.tmp / "step_9.bin"),
        ["does not exist"],
    ),
    "eval: truncated": lambda c: (["eval", c.damaged(lambda p: p[: len(p) // 2])], [TRUNCATED]),
    "sample: truncated": lambda c: (["sample", c.damaged(lambda p: p[:-100])], [TRUNCATED]),
    "resume: truncated": lambda c: (
        c.train("--resume", c.damaged(lambda p: p[: len(p) // 2])),
        [TRUNCATED],
    ),
    "eval: cut inside the header": lambda c: (
        ["eval", c.damaged(lambda p: p[:5])],
        [NOT_SAFETENSORS],
    ),
    "eval: empty file": lambda c: (["eval", c.write("step_1.bin", b"")], [NOT_SAFETENSORS]),
    "eval: bit flip in a tensor": lambda c: (["eval", c.damaged(flip_tensor_bit)], [BAD_TENSORS]),
    "sample: bit flip in a tensor": lambda c: (
        ["sample", c.damaged(flip_tensor_bit)],
        [BAD_TENSORS],
    ),
    "resume: bit flip in a tensor": lambda c: (
        c.train("--resume", c.damaged(flip_tensor_bit)),
        [BAD_TENSORS],
    ),
    "eval: bit flip in the metadata": lambda c: (
        ["eval", c.damaged(flip_metadata_bit)],
        [BAD_META],
    ),
    "resume: bit flip in the metadata": lambda c: (
        c.train("--resume", c.damaged(flip_metadata_bit)),
        [BAD_META],
    ),
    "eval: plain safetensors": lambda c: (["eval", foreign_safetensors(c)], [NOT_NEXUS]),
    "resume: plain safetensors": lambda c: (
        c.train("--resume", foreign_safetensors(c)),
        [NOT_NEXUS],
    ),
    "eval: text file": lambda c: (
        ["eval", c.write("notes.txt", "not a checkpoint")],
        [NOT_SAFETENSORS],
    ),
    "sample: text file": lambda c: (["sample", c.write("a.bin", "{}" * 40)], [NOT_SAFETENSORS]),
    "resume: text file": lambda c: (
        c.train("--resume", c.write("notes.txt", "hello, world: not a checkpoint")),
        [NOT_SAFETENSORS],
    ),
    "eval: a directory": lambda c: (["eval", c.tmp], ["is a directory"]),
    "sample: weights that do not fit the config": lambda c: (
        ["sample", misfit(c)],
        ["weights do not fit its config (size mismatch for", "not written by this version"],
    ),
    "resume with another preset": lambda c: (
        ["train", "--resume", "--out_dir", c.copy_of_run(), "--preset", "nexus-6m"],
        ["different model config", "d_model 64 (checkpoint) vs 256", "matching --preset"],
    ),
    "resume PATH with another model": lambda c: (
        c.train("--resume", c.run / "step_2.bin", "--config", toml(c, "[model]\nd_state = 4\n")),
        ["different model config", "d_state 8 (checkpoint) vs 4"],
    ),
    # --resume and --out_dir
    "resume with nothing to resume": lambda c: (c.train("--resume"), ["nothing to resume"]),
    "resume in an empty directory": lambda c: (
        c.train("--resume", out=c.mkdir("empty")),
        ["nothing to resume"],
    ),
    "resume with a damaged config.json": lambda c: (
        ["train", "--resume", "--out_dir", _damage_config(c.copy_of_run())],
        ["config.json' is damaged", "--resume PATH"],
    ),
    "out_dir holds a run": lambda c: (
        ["train", *TINY_FLAGS, "--data", c.data, "--out_dir", c.copy_of_run()],
        ["already holds a run; pass --resume"],
    ),
    "out_dir is a file": lambda c: (
        c.train(out=c.write("file.txt", "x").name),
        ["file.txt' is a file; pass a directory"],
    ),
    "out_dir under a file": lambda c: (
        c.train(out=c.write("plain", "x").name + "/run"),
        ["plain/run' is not writable (Not a directory)"],
    ),
    "out_dir under /proc": lambda c: (
        ["train", *TINY_FLAGS, "--data", c.data, "--out_dir", "/proc/nexus-run"],
        ["'/proc/nexus-run' is not writable"],
    ),
    "out_dir under /sys": lambda c: (
        ["train", *TINY_FLAGS, "--data", c.data, "--out_dir", "/sys/nexus-run"],
        ["'/sys/nexus-run' is not writable (Operation not permitted)"],
    ),
}


def _damage_config(run_dir: Path) -> Path:
    (run_dir / "config.json").write_text('{"train": {"max_st')
    return run_dir


@pytest.fixture(scope="module")
def small_run(text_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small") / "run"
    Trainer(TrainConfig.from_dict({**TINY, "data": str(text_corpus), "out_dir": str(out)})).run()
    return out


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nexus: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert result.returncode == 2, result.returncode
    return lines[0]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line(
    case: str, small_run: Path, text_corpus: Path, tmp_path: Path, fork_server: ForkServer
) -> None:
    ctx = Context(tmp_path, text_corpus, small_run)
    args, fragments = BAD_INPUTS[case](ctx)
    before = files_of(small_run)
    assert_one_line_error(fork_server.run(args), *fragments)
    assert files_of(small_run) == before  # a refused command changes nothing
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "case",
    [
        "val split too short",
        "malformed YAML",
        "flag not a number",
        "eval: bit flip in a tensor",
        "resume with nothing to resume",
    ],
)
def test_bad_input_through_python_m_nexus(
    case: str, small_run: Path, text_corpus: Path, tmp_path: Path
) -> None:
    args, fragments = BAD_INPUTS[case](Context(tmp_path, text_corpus, small_run))
    assert_one_line_error(nexus(*args), *fragments)


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = nexus("--debug", "train", "--lr", "0", "--out_dir", tmp_path / "o")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "NexusError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("nexus: error: train config: lr")


def test_unreadable_data_file(text_corpus: Path, tmp_path: Path) -> None:
    data = tmp_path / "secret.txt"
    data.write_bytes(text_corpus.read_bytes())
    data.chmod(0)
    command = ["-m", "nexus", "train", *TINY_FLAGS, "--data", str(data), "--out_dir", "out"]
    if os.geteuid() == 0:
        command = ["-c", WITHOUT_ROOT_READ, *command]
    result = subprocess.run(
        [PYTHON, *command], capture_output=True, text=True, timeout=600, env=ENV, cwd=tmp_path
    )
    if result.returncode == 77:
        pytest.skip("root here cannot give up CAP_DAC_OVERRIDE, so no file is unreadable to it")
    assert_one_line_error(result, "secret.txt' is not readable (permission denied)")
    assert not (tmp_path / "out").exists()


def test_binary_data_trains_and_samples(tmp_path: Path, fork_server: ForkServer) -> None:
    """Every byte value, NUL bytes and invalid UTF-8 are valid data (and a valid prompt)."""
    rng = random.Random(3)
    junk = bytes(rng.randrange(256) for _ in range(3000))
    data = tmp_path / "blob.bin"
    data.write_bytes(
        bytes(range(256)) * 4 + b"\x00" * 300 + b"\xff\xfe\xc3\x28\xa0\xa1" * 50 + junk
    )
    out = tmp_path / "run"
    result = fork_server.run(["train", *TINY_FLAGS, "--data", data, "--out_dir", out])
    assert result.returncode == 0, result.stderr
    last = evals(out)[2]
    assert math.isfinite(last["train_loss"]) and math.isfinite(last["val_loss"])
    prompt = b"\xff\xfe\xc3("  # not UTF-8 (argv cannot hold NUL bytes)
    sample = subprocess.run(
        [PYTHON, "-m", "nexus", "sample", str(out / "step_2.bin"), "--prompt", prompt,
         "--max_new_tokens", "5", "--json"],
        capture_output=True, timeout=600, env=ENV,
    )  # fmt: skip
    assert sample.returncode == 0, sample.stderr
    record = json.loads(sample.stdout)
    assert record["prompt"] == prompt.decode(errors="replace") and record["bytes"] == 5


# --- faults during training, in process --------------------------------------------------------


def small_config(data: Path, out: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, Any] = {**TINY, "max_steps": 6, "log_interval": 1}
    settings.update(overrides)
    return tiny_config(data, out, **settings)


class FullDisk:
    """Makes writes of chosen files fail as on a full disk: `write` stores half the bytes and
    raises ENOSPC (or `fsync` does). Before failing it records every finished file of the run
    directory, so the test can check that the failure changed none of them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.targets: dict[str, str] = {}  # file name -> "write" or "fsync"
        self.before_fault: dict[str, bytes] | None = None
        self.faults = 0
        real_fdopen, real_fsync = os.fdopen, os.fsync
        disk = self

        class HalfWritten:
            def __init__(self, handle: Any) -> None:
                self.handle = handle

            def __enter__(self) -> HalfWritten:
                return self

            def __exit__(self, *exc: object) -> None:
                self.handle.close()

            def write(self, data: bytes) -> int:
                self.handle.write(bytes(data[: len(data) // 2]))
                self.handle.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __getattr__(self, name: str) -> Any:
                return getattr(self.handle, name)

        def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
            handle = real_fdopen(fd, *args, **kwargs)
            return HalfWritten(handle) if disk._hit(fd, "write") else handle

        def fsync(fd: int) -> None:
            if disk._hit(fd, "fsync"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        monkeypatch.setattr(os, "fdopen", fdopen)
        monkeypatch.setattr(os, "fsync", fsync)

    def _hit(self, fd: int, how: str) -> bool:
        try:
            name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        except OSError:
            return False
        for target, kind in self.targets.items():
            if kind == how and name.startswith(f".{target}.") and name.endswith(".tmp"):
                self.before_fault = files_of(self.run_dir)
                self.faults += 1
                return True
        return False

    def fail(self, target: str, how: str = "write") -> None:
        self.targets, self.before_fault = {target: how}, None


@pytest.fixture(scope="module")
def small_reference(text_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    Trainer(small_config(text_corpus, out), progress=False).run()
    return out


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_disk_full_loses_nothing(
    text_corpus: Path, small_reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    config = small_config(text_corpus, out)
    disk = FullDisk(monkeypatch, out)

    def expect_failure(resume: bool, target: str, message: str) -> None:
        with pytest.raises(NexusError) as info:
            Trainer(config, resume=resume, progress=False).run()
        assert type(info.value) is NexusError
        assert f"could not write {out / target} (No space left on device); " in str(info.value)
        assert message in str(info.value)
        assert disk.before_fault is not None, f"{target} was never written"
        assert files_of(out) == disk.before_fault  # byte for byte
        assert temp_files(out) == []

    # 1. a later step checkpoint: step_2.bin and best.bin exist, step_4.bin cannot be written
    disk.fail("step_4.bin")
    expect_failure(False, "step_4.bin", "earlier checkpoints are intact")
    assert {"step_2.bin", "best.bin", "config.json", "metrics.jsonl"} <= set(files_of(out))
    assert not (out / "step_4.bin").exists()
    # 2. best.bin, right after step_4.bin was written
    disk.fail("best.bin")
    expect_failure(True, "best.bin", "the previous version is intact")
    assert (
        load_checkpoint(out / "best.bin").step == 2
        and load_checkpoint(out / "step_4.bin").step == 4
    )
    # 3. config.json on the next start, failing at fsync this time
    disk.fail("config.json", "fsync")
    expect_failure(True, "config.json", "the previous version is intact")
    # 4. metrics.jsonl rewritten on resume
    disk.fail("metrics.jsonl")
    expect_failure(True, "metrics.jsonl", "the previous version is intact")
    assert disk.faults == 4
    disk.fail("nothing")
    Trainer(config, resume=True, progress=False).run()
    assert_same_run(out, small_reference)
    assert temp_files(out) == []


class Sabotage:
    """Makes chosen training steps non-finite: NaN logits (so a NaN loss), or a finite loss
    whose gradients are infinite. Records the weights before every step."""

    def __init__(
        self, trainer: Trainer, monkeypatch: pytest.MonkeyPatch, **steps: set[int]
    ) -> None:
        self.nan_loss, self.inf_grad = steps.get("nan_loss", set()), steps.get("inf_grad", set())
        self.step = 0
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        model, real_batch = trainer.model, training.train_batch
        real_forward = model.forward

        def train_batch(*args: Any, **kwargs: Any) -> Any:
            self.step = kwargs["step"]
            if kwargs["micro_step"] == 0:
                self.weights[self.step] = {k: v.clone() for k, v in model.state_dict().items()}
            return real_batch(*args, **kwargs)

        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            logits = real_forward(*args, **kwargs)
            if model.training and self.step in self.nan_loss:
                return logits * float("nan")
            if model.training and self.step in self.inf_grad:
                logits.register_hook(lambda grad: grad * math.inf)
            return logits

        monkeypatch.setattr(training, "train_batch", train_batch)
        model.forward = forward

    def unchanged(self, before: int, after: int) -> bool:
        a, b = self.weights[before], self.weights[after]
        return all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_steps_are_skipped(
    text_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _Log()
    config = small_config(
        text_corpus, tmp_path / "run", max_steps=8, eval_interval=4, max_bad_steps=3
    )
    trainer = Trainer(config, progress=False, log=log)
    sabotage = Sabotage(trainer, monkeypatch, nan_loss={3, 6}, inf_grad={7})
    last = trainer.run()
    assert last["step"] == 8 and math.isfinite(last["val_loss"])
    assert not sabotage.unchanged(2, 3)  # a good step moves the weights
    assert sabotage.unchanged(3, 4) and sabotage.unchanged(6, 8)  # a skipped one does not
    assert (
        "step 3: non-finite loss (nan) or gradient norm (nan); update skipped (1 in a row)"
        in log.text
    )
    assert "step 7: non-finite loss" in log.text and "update skipped (2 in a row)" in log.text
    records = {
        r["step"]: r
        for r in read_records(tmp_path / "run" / "metrics.jsonl")
        if r["kind"] == "train"
    }
    assert math.isnan(records[3]["loss"]) and math.isfinite(records[7]["loss"])
    assert not math.isfinite(records[7]["grad_norm"])
    adam_steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {5.0}  # 8 steps, 3 of them skipped


def test_non_finite_steps_in_a_row_stop_the_run(
    text_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    config = small_config(text_corpus, out, max_steps=8, eval_interval=4, max_bad_steps=3)
    trainer = Trainer(config, progress=False, log=_Log())
    sabotage = Sabotage(trainer, monkeypatch, nan_loss={5, 7}, inf_grad={6})
    with pytest.raises(NexusError) as info:
        trainer.run()
    assert str(info.value) == (
        "training diverged: 3 steps in a row had non-finite loss or gradients (last good "
        "checkpoint: step_4.bin); lower --lr or check the data, then resume or start over"
    )
    saved = load_checkpoint(out / "step_4.bin")
    assert all(torch.equal(saved.model_state[k], v) for k, v in sabotage.weights[5].items())
    assert sorted(p.name for p in out.glob("step_*.bin")) == ["step_4.bin"]


class _Log:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


# --- faults during training, in subprocesses -------------------------------------------------


def wait_for_line(
    path: Path, prefix: str, stderr: Path, timeout: float | None = None, pid: int | None = None
) -> bool:
    """Wait until a line of `path` starts with `prefix` (True), or `timeout` seconds pass or
    process `pid` ends (False; without a timeout, ten minutes are an error)."""
    deadline = time.monotonic() + (600.0 if timeout is None else timeout)
    while time.monotonic() < deadline:
        if path.exists() and any(line.startswith(prefix) for line in path.read_text().splitlines()):
            return True
        if pid is not None and _has_exited(pid):
            return False
        if stderr.exists() and "nexus: " in stderr.read_text():
            raise AssertionError(stderr.read_text())
        time.sleep(0.01)
    assert timeout is not None, f"no line starting {prefix!r} in {path}"
    return False


@dataclass
class Reference:
    """The uninterrupted run, and how long its phases took here (median seconds), to spread
    the kills over them."""

    out: Path
    data: Path
    start_s: float  # start to the training loop
    step_s: float  # one step
    eval_s: float  # an eval
    after_eval_s: float  # checkpoint, best.bin, report and the next step


@pytest.fixture(scope="module")
def reference(
    fork_server: ForkServer, text_corpus: Path, tmp_path_factory: pytest.TempPathFactory
) -> Reference:
    """The uninterrupted run that every interrupted one must reproduce exactly."""
    out = tmp_path_factory.mktemp("long") / "reference"
    started = time.monotonic()
    pid, stdout, stderr = fork_server.start(
        ["train", *LONG_FLAGS, "--data", str(text_corpus), "--out_dir", str(out)]
    )
    first_seen: dict[str, float] = {}
    while not _has_exited(pid):
        for line in stdout.read_text().splitlines() if stdout.exists() else []:
            first_seen.setdefault(line, time.monotonic())
        time.sleep(0.01)
    assert fork_server.wait(pid) == 0, stderr.read_text()

    def at(prefix: str) -> float:
        return min(t for line, t in first_seen.items() if line.startswith(prefix))

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    evals_at = range(TINY["eval_interval"], LONG_STEPS, TINY["eval_interval"])
    return Reference(
        out,
        text_corpus,
        start_s=at("config:") - started,
        step_s=median([at(f"step {k}/") - at(f"step {k - 1}/") for k in evals_at]),
        eval_s=median([at(f"step {k}: train loss") - at(f"step {k}/") for k in evals_at]),
        after_eval_s=median([at(f"step {k + 1}/") - at(f"step {k}: train loss") for k in evals_at]),
    )


def test_sigint_and_sigterm_stop_cleanly(reference: Reference, tmp_path: Path) -> None:
    """Ctrl-C, then SIGTERM to the resumed run: each finishes its step, saves it and exits 130
    with the command that resumes; that command finishes the run exactly like the reference.
    The three processes run in an empty home and working directory, to show that nothing is
    written outside --out_dir and the cache directory."""
    home, work, scratch = tmp_path / "home", tmp_path / "work", tmp_path / "tmp"
    for folder in (home, work, scratch):
        folder.mkdir()
    env = {k: v for k, v in ENV.items() if not k.startswith(("XDG_", "MPLCONFIGDIR"))}
    env.update(HOME=str(home), TMPDIR=str(scratch))
    out = work / "run"
    args = ["train", *LONG_FLAGS, "--data", str(reference.data), "--out_dir", "run"]

    def interrupt(args: list[str], signum: int, after_step: int) -> tuple[int, str]:
        child = subprocess.Popen(
            [PYTHON, "-m", "nexus", *args],
            cwd=work,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            while child.poll() is None:  # wait for progress past after_step, then signal
                metrics = out / "metrics.jsonl"
                steps = [r["step"] for r in read_records(metrics)] if metrics.exists() else []
                if steps and max(steps) > after_step:
                    child.send_signal(signum)
                    break
                time.sleep(0.02)
            _, stderr = child.communicate(timeout=600)
        finally:
            if child.poll() is None:
                child.kill()
        return child.returncode, stderr

    # The baseline runs the same way (a fresh `python -m nexus`, same environment) as the
    # interrupted runs: a process forked from the test server may use another thread count,
    # and float sums in another order differ in the last bits.
    baseline = tmp_path / "baseline"
    baseline.mkdir()
    uninterrupted = nexus(*args, cwd=baseline, env=env)
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    command, stopped_at, stops = args, 0, []
    for signum in (signal.SIGINT, signal.SIGTERM):
        code, stderr = interrupt(command, signum, stopped_at)
        assert code == 130, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in stderr, stderr
        match = re.fullmatch(
            rf"nexus: {signal.Signals(signum).name} received: stopped after step (\d+) and saved "
            r"run/step_(\d+)\.bin; continue with `nexus (train --resume --out_dir run)`",
            lines[0],
        )
        assert match is not None, lines[0]
        step = int(match.group(1))
        assert step == int(match.group(2)) and stopped_at < step < LONG_STEPS
        assert load_checkpoint(out / f"step_{step}.bin").step == step
        assert max(r["step"] for r in read_records(out / "metrics.jsonl")) == step
        command, stopped_at = shlex.split(match.group(3)), step
        stops.append(step)
    finished = nexus(*command, cwd=work, env=env)
    assert finished.returncode == 0, finished.stderr
    # Exact across processes, though the baseline compiled the numba kernels into the empty
    # home's cache and the other two loaded them from it (issue 13).
    assert_same_run(out, baseline / "run", stopped_at=tuple(stops))
    assert [p.name for p in work.iterdir()] == ["run"]
    assert [p.name for p in home.iterdir()] == [".cache"]
    assert [p.name for p in scratch.iterdir()] == []


def test_kill_9_at_random_moments_loses_nothing(
    fork_server: ForkServer, reference: Reference, tmp_path: Path
) -> None:
    """Twenty SIGKILLs at random moments (start-up, mid-step, mid-eval, after the eval: mid-
    save or mid-report) and two at set ones (renaming a written step_<N>.bin, and best.bin) of
    `nexus train --resume` on one run directory, then a last resume to the end: the run ends
    exactly like the uninterrupted reference, and no finished checkpoint is ever lost, changed
    or unloadable. Each kill lands in the first eval interval its run does, and a run that
    logs its last step is killed at once, so the run cannot finish before its last resume."""
    rng = random.Random(20240607)
    interval = TINY["eval_interval"]
    plan: list[str] = ["random"] * (KILLS - 1) + ["step_", "best.bin"]
    rng.shuffle(plan)
    plan.insert(0, "random")
    out = tmp_path / "run"
    argv = ["train", *LONG_FLAGS, "--data", str(reference.data), "--out_dir", str(out)]
    last_step = f"step {LONG_STEPS}/"
    seen: dict[str, str] = {}  # step checkpoint -> sha256 when first seen
    best_seen = ""
    moments: Counter[str] = Counter()
    for kills, planned in enumerate(plan):
        done = max((int(p.stem[5:]) for p in out.glob("step_*.bin")), default=0)
        final_interval = done >= LONG_STEPS - interval  # its eval would end the run
        if planned == "random":
            choices = ["mid-step"] if final_interval else ["mid-step", "mid-eval", "after-eval"]
            if kills > 0:  # the first run must get as far as writing config.json
                choices.append("start-up")
            how = rng.choice(choices)
        else:
            how = "step_" if planned == "best.bin" and final_interval else planned
        temps_before = set(temp_files(out)) if out.is_dir() else set()
        renaming = how if how in ("step_", "best.bin") else None
        pid, stdout, stderr = fork_server.start(
            argv if kills == 0 else [*argv, "--resume"], renaming
        )
        if renaming:  # it kills itself just before it renames that file into place
            wait_for_line(stdout, last_step, stderr, pid=pid)
        elif how == "start-up":  # while it loads, checks and rewrites its files
            wait_for_line(stdout, last_step, stderr, rng.uniform(0, reference.start_s))
        else:
            wait_for_line(stdout, "config:", stderr)  # the loop starts
            span = reference.step_s
            if how == "mid-eval":
                wait_for_line(stdout, f"step {done + interval}/", stderr)
                span = reference.eval_s
            elif how == "after-eval":
                wait_for_line(stdout, f"step {done + interval}: train loss", stderr)
                span = reference.after_eval_s
            wait_for_line(stdout, last_step, stderr, rng.uniform(0, span))
        os.kill(pid, signal.SIGKILL)
        status = fork_server.wait(pid)
        assert status == -signal.SIGKILL, (status, stderr.read_text())
        moments[moment_of(out, stdout, temps_before)] += 1
        for path in sorted(out.glob("step_*.bin")):  # written once, never changed
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if path.name not in seen:
                assert load_checkpoint(path).step == int(path.stem[5:])
                seen[path.name] = digest
            assert seen[path.name] == digest, f"{path.name} changed"
        assert set(seen) <= {p.name for p in out.glob("step_*.bin")}, "a checkpoint vanished"
        if (out / "best.bin").exists():
            digest = hashlib.sha256((out / "best.bin").read_bytes()).hexdigest()
            if digest != best_seen:
                load_checkpoint(out / "best.bin")
                best_seen = digest
    assert sum(moments.values()) == KILLS + 2
    print(f"\n{KILLS + 2} SIGKILLs, by where they landed: {dict(moments)}")
    pid, stdout, stderr = fork_server.start([*argv, "--resume"])
    assert fork_server.wait(pid) == 0, stderr.read_text()
    assert_same_run(out, reference.out)
    assert temp_files(out) == []
    for name, digest in seen.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest


def moment_of(out: Path, stdout: Path, temps_before: set[str]) -> str:
    """Where a kill landed, from what the run had printed and the temp files it left."""
    left = set(temp_files(out)) - temps_before
    if any(name.startswith((".step_", ".best.bin.", ".metrics", ".config")) for name in left):
        return "mid-save"
    if left:
        return "mid-report"
    lines = stdout.read_text().splitlines() if stdout.exists() else []
    last = lines[-1] if lines else ""
    progress = re.match(r"step (\d+)/\d+ ", last)
    if progress:
        eval_step = int(progress.group(1)) % TINY["eval_interval"] == 0
        return "mid-eval" if eval_step else "mid-step"
    evaluated = [m for m in map(re.compile(r"step (\d+): train loss").match, lines) if m]
    if evaluated and last.startswith(("step ", "  sample:")):
        saved = (out / f"step_{evaluated[-1].group(1)}.bin").exists()
        return "mid-report" if saved else "mid-save"  # after an eval: checkpoint, then report
    if last.startswith(("config:", "resumed from", "no checkpoint")):
        return "mid-step"
    return "start-up"
