"""`nexus chat` driven as a terminal program: pexpect runs the real command in a pseudo-terminal,
types lines, commands and keys, and reads the screen. Every reply is checked against `generate`
over the conversation as the chat's rules say it stands (greedy), or against a `Session` fed
each line with one `Draws(seed)` for the whole session (sampled)."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest
import torch

from nexus.cache import cache_dir
from nexus.checkpoint import checkpoint_meta, model_state_for_saving, save_checkpoint
from nexus.cli import load_model_for_use
from nexus.config import TrainConfig, preset
from nexus.generation import Session, generate
from nexus.model import NexusLM
from nexus.sampling import Draws, Sampling

pexpect = pytest.importorskip("pexpect")

# A cycle of lines in which "to be or not" comes back after each of the others, so what follows
# it depends on the line before: a model that learned it answers differently with the
# conversation carried than without.
POEM = [
    "the king speaks to romeo",
    "to be or not",
    "juliet waits at the window",
    "to be or not",
    "the queen of verona",
    "to be or not",
    "whether tis nobler in the mind",
    "to be or not",
]
SEED = 7
STOP = b"\n\n"
UP = "\x1b[A"
ESCAPE_CODE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """nexus-tiny trained 80 steps on the poem: it recites it, and the line before
    "to be or not" decides what comes after."""
    torch.manual_seed(0)
    data = torch.tensor(list(("\n".join(POEM * 40) + "\n").encode()))
    config = preset("nexus-tiny")
    model = NexusLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    windows = torch.Generator().manual_seed(0)
    for _ in range(80):
        starts = torch.randint(0, len(data) - config.seq_len - 1, (16,), generator=windows)
        x = torch.stack([data[s : s + config.seq_len] for s in starts])  # (B, T)
        y = torch.stack([data[s + 1 : s + config.seq_len + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("chat") / "poem.bin"
    meta = checkpoint_meta(
        step=80, train_config=TrainConfig(), model_config=config, optimizer_param_groups=[]
    )
    save_checkpoint(path, model_state_for_saving(model), {}, meta)
    return path


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> NexusLM:
    return load_model_for_use(str(checkpoint))[0]  # as `nexus chat` loads it


def reply(model: NexusLM, text: bytes, length: int, stops: tuple[bytes, ...] = (STOP,)) -> bytes:
    """The greedy continuation of `text` as a chat turn shows it: up to `length` bytes, or up
    to and including the first of `stops` to appear in it."""
    made = generate(model, text, length, temperature=0)
    return made[: min([made.find(s) + len(s) for s in stops if s in made] or [length])]


def on_screen(made: bytes) -> str:
    """A reply of a turn on its own as the screen shows it, with a line break before the next
    prompt."""
    return made.decode() + ("\n" if made and not made.endswith(b"\n") else "")


class Terminal:
    """`nexus chat CHECKPOINT FLAGS` in a pseudo-terminal, its history under `cache`."""

    def __init__(self, checkpoint: Path, *flags: str, cache: Path) -> None:
        env = dict(os.environ, TERM="xterm-256color", XDG_CACHE_HOME=str(cache))
        env["NUMBA_CACHE_DIR"] = str(cache_dir() / "numba")  # the compiled kernels stay warm
        # One decode thread, as in this process: on a busy 2-core machine a second one spins
        # whole time slices away at every byte (see conftest.one_torch_thread).
        env["OMP_NUM_THREADS"] = "1"
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "nexus", "chat", str(checkpoint), *flags],
            env=env,
            dimensions=(40, 1000),  # no line of this test wraps
            timeout=120,  # a busy machine; nothing waits this long when all is well
        )
        self.screen = ""
        self.banner = self.until_prompt()

    def until_prompt(self) -> str:
        self.child.expect(r"\n> ")
        return self.read(self.child.before + self.child.after[:-2])

    def read(self, raw: bytes) -> str:
        text = ESCAPE_CODE.sub("", raw.decode(errors="replace")).replace("\r\n", "\n")
        self.screen += text
        return text

    def type(self, line: str) -> str:
        """Type `line` and Enter; what the screen shows after the line, up to the prompt."""
        self.child.send(line + "\r")
        shown = self.until_prompt()
        assert shown.startswith(line + "\n"), shown
        return shown[len(line) + 1 :]

    def exit_status(self) -> int:
        self.child.expect(pexpect.EOF)
        self.read(self.child.before)
        self.child.close()
        assert "Traceback" not in self.screen, self.screen
        return self.child.exitstatus


class Mirror:
    """The conversation as the chat's documented rules say the model reads it."""

    def __init__(self, context: int, length: int) -> None:
        self.context, self.length = context, length
        self.text, self.note, self.restarts = b"", "", 0

    def reset(self) -> None:
        self.text, self.restarts = b"", 0

    def add(self, line: bytes) -> bytes:
        """Append a typed line; the text the next reply continues."""
        if not self.text:
            line = line or b"\n"
        elif line and not self.text.endswith(b"\n"):
            line = b"\n" + line
        self.note = ""
        if len(self.text) + len(line) + self.length <= self.context:
            self.text += line
            return self.text
        self.text = (self.text + line)[-(self.context - self.length) :]
        self.restarts += 1
        if self.restarts == 1:
            self.note = f"[window full: the model now reads the last {len(self.text)} bytes; "
            self.note += "see /help]\n"
        return self.text

    def screen(self, made: bytes) -> str:
        """What a turn shows: the note, the reply, a line break before the prompt."""
        self.text += made
        return self.note + made.decode() + ("" if self.text.endswith(b"\n") else "\n")


def test_turns_carry_the_conversation_and_the_window_keeps_its_end(
    checkpoint: Path, model: NexusLM, tmp_path: Path
) -> None:
    terminal = Terminal(
        checkpoint, "--temperature", "0", "--context", "96", "--max_new_tokens", "16",
        "--stop", "nobler", "--stop", "queen of", cache=tmp_path,
    )  # fmt: skip
    assert "96-byte window" in terminal.banner
    assert "replies up to 16 bytes or 'nobler' or 'queen of'" in terminal.banner
    mirror = Mirror(context=96, length=16)
    stops = (b"nobler", b"queen of")

    def turn(line: str) -> bytes:
        """Type `line`; the reply it gets, checked against the documented rules."""
        text = mirror.add(line.encode() + b"\n" if line else b"")
        made = reply(model, text, mirror.length, stops)
        assert terminal.type(line) == mirror.screen(made)
        return made

    turn("juliet waits at the window")
    # Carried: "to be or not" comes after every other line of the poem; the conversation
    # says which one is next.
    assert turn("to be or not") != reply(model, b"to be or not\n", 16, stops)
    assert mirror.note == ""
    turn("the queen of verona")  # the window is full: the model reads its last 80 bytes
    assert mirror.note  # the first time only
    turn("whether tis nobler in the mind " * 4)  # longer than the window: its end
    turn("")  # an empty line lets the model go on
    turn("")

    assert "forgotten" in terminal.type("/reset")
    mirror.reset()
    turn("to be or not")

    terminal.child.send("the queen of verona")  # Ctrl-C at the prompt clears the line
    terminal.child.expect_exact("the queen of verona")  # read, as a person's Ctrl-C would find it
    terminal.child.sendintr()
    terminal.until_prompt()
    turn("romeo")
    terminal.child.send(UP + "\r")  # readline's history recalls the last line
    text = mirror.add(b"romeo\n")
    assert terminal.until_prompt().endswith(mirror.screen(reply(model, text, 16, stops)))

    assert terminal.type("/length 40") == "length 40\n"
    mirror.length = 40
    made = turn("juliet waits at the window")
    assert made.endswith(b"queen of") and len(made) < 40  # a stop ended it, shown whole

    settings = terminal.type("/settings")
    assert "top_p 1.0, length 40, carry on, stop 'nobler' or 'queen of'" in settings
    assert f"{len(mirror.text)} of 96 bytes" in settings
    help_text = terminal.type("/help")
    assert "/temperature" in help_text and "96 - length" in help_text
    terminal.child.sendeof()
    assert terminal.exit_status() == 0


def test_ctrl_c_stops_a_reply_and_history_outlives_the_session(
    checkpoint: Path, model: NexusLM, tmp_path: Path
) -> None:
    (tmp_path / "nexus").mkdir()
    (tmp_path / "nexus/chat_history").write_text("/settings\n")
    terminal = Terminal(
        checkpoint, "--temperature", "0", "--context", "100000", "--max_new_tokens", "50000",
        cache=tmp_path,
    )  # fmt: skip
    terminal.child.send(UP + "\r")
    assert "length 50000" in terminal.until_prompt()

    line = "the king speaks to romeo"
    terminal.child.send(line + "\r")
    terminal.child.expect(line + r"\r\n.{40}")  # the reply has begun
    # SIGINT as Ctrl-C delivers it, sent to the process rather than typed: a typed ^C is echoed
    # by the terminal wherever the reply's output happens to be, which garbles the screen.
    terminal.child.kill(signal.SIGINT)
    begun = terminal.read(terminal.child.before + terminal.child.after)
    shown = begun + terminal.until_prompt()
    made = shown[shown.index("\n") + 1 :].removesuffix("\n").encode()
    assert 0 < len(made) < 50000
    assert made == generate(model, line.encode() + b"\n", len(made), temperature=0)

    # What was made before Ctrl-C stays in the conversation.
    assert terminal.type("/length 20") == "length 20\n"
    text = line.encode() + b"\n" + made + b"\nromeo\n"
    assert terminal.type("romeo") == on_screen(reply(model, text, 20))
    terminal.child.send("/quit\r")
    assert terminal.exit_status() == 0
    history = (tmp_path / "nexus/chat_history").read_text().splitlines()
    assert history == ["/settings", line, "/length 20", "romeo", "/quit"]


def test_commands_change_the_sampling_and_bad_values_say_why(
    checkpoint: Path, model: NexusLM, tmp_path: Path
) -> None:
    unwritable = tmp_path / "a-file"  # the history cannot be kept: the chat goes on without it
    unwritable.write_text("")
    terminal = Terminal(
        checkpoint, "--temperature", "0", "--seed", str(SEED), "--no_carry", cache=unwritable
    )
    for command, answer in [
        ("/temperature 0.9", "temperature 0.9"),
        ("/top_k 3", "top_k 3"),
        ("/top_p 0.95", "top_p 0.95"),
        ("/length 12", "length 12"),
        ("/temperature -1", "temperature must be >= 0 (0 means greedy), not -1.0"),
        ("/top_k many", "top_k takes a whole number, not 'many'"),
        ("/top_p 2", "top_p must be in (0, 1], not 2.0"),
        ("/length 65", "length must be 1 to 64 (half the window), not 65"),
        ("/carry maybe", "carry takes on or off, not 'maybe'"),
        ("/frobnicate", "unknown command /frobnicate; /help lists the commands"),
        ("/temperature", "temperature 0.9"),
    ]:
        assert terminal.type(command) == answer + "\n"
    assert "length 12, carry off" in terminal.type("/settings")

    # Without carry each line is continued on its own; the draws go on from one seed, so the
    # same line sampled twice gets two replies.
    sampling, draws = Sampling(temperature=0.9, top_k=3, top_p=0.95), Draws(SEED)
    expected = []
    for line in [b"to be or not\n"] * 2:
        session = Session(model, len(line) + 12)
        session.feed(line)
        expected.append(b"".join(session.stream(12, sampling, draws)))
    assert expected[0] != expected[1] and STOP not in b"".join(expected)
    for made in expected:
        assert terminal.type("to be or not") == on_screen(made)

    assert terminal.type("/temperature 0") == "temperature 0.0\n"
    escaped = reply(model, b"/to be or not\n", 12)  # a line that begins with / is text after //
    assert terminal.type("//to be or not") == on_screen(escaped)
    terminal.child.sendeof()
    assert terminal.exit_status() == 0
