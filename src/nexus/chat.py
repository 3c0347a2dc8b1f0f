"""`nexus chat CKPT`: talk to a checkpoint in the terminal. This module owns the session's rules
(turns, the window, the commands) and its terminal side (readline, history, Ctrl-C).

Turns. Each line typed is fed to the model as a line of its own (with its line break, and after
one when the last reply stopped mid-line), and the continuation streams back until a blank line
(two line breaks in a row; `--stop` chooses others) or `/length` bytes, whichever comes first.
Enter on an empty line feeds nothing and lets the model go on from where it stopped. The screen
shows what the model reads, the stop that ended a reply included (unlike `nexus sample --stop`:
here the next turn follows it); the line break printed after a reply cut mid-line reaches the
model with the next line, not with an empty one.

State. The conversation is one byte sequence decoded by one `generation.Session`, fed turn after
turn, so the recurrent state (Mamba states, attention keys and values) carries every earlier
turn. `/reset` empties it; `--no_carry` (or `/carry off`) empties it before every line, so each
line is continued on its own.

Window. The model was trained on `seq_len`-byte windows; it has no positional encodings and runs
past them, untrained there. Measured on Tiny Shakespeare's validation text, nexus-6m (at step
400) predicts bytes 128 to 4096 as well as those before 128, and nexus-tiny is about 0.15 nats
worse past its 32 and no worse beyond. The session holds at most `--context` bytes (default
4 x seq_len). When a turn (its line plus `/length` bytes of reply) would not fit, the session is
prefilled afresh from the last `context - length` bytes of the conversation, the new line
included: the reply just fits, and the model reads as much of the recent past as the window
allows (a prefill is one forward pass, cheap at these sizes). The first restart says so.

Sampling. Every turn draws from one `Draws(--seed)`, so the same lines and commands replay the
same session. Greedy turns draw nothing.

Keys. Ctrl-C during a reply stops it (what was written stays in the conversation); at the prompt
it clears the line. Ctrl-D or /quit ends the session. Line editing and history come from
readline; the history is kept in the Nexus cache directory (`chat_history`), and simply not kept
where that cannot be read or written."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

from nexus.cache import cache_dir
from nexus.cli import ctrl_c_sets
from nexus.errors import NexusError
from nexus.generation import Session, as_text
from nexus.model import NexusLM
from nexus.sampling import Draws, Sampling

STOP = b"\n\n"  # by default a reply ends at a blank line
WINDOW_IN_SEQ_LENS = 4  # the default --context, in training windows
DEFAULT_LENGTH = 200  # bytes per reply, unless half the window is less
PROMPT = "> "
HISTORY_FILE = "chat_history"
HISTORY_LENGTH = 1000


class Conversation:
    """The model's side of a chat: one session fed turn after turn within `context` bytes."""

    def __init__(self, model: NexusLM, context: int, seed: int) -> None:
        self.session = Session(model, context)
        self.context = context
        self.draws = Draws(seed)
        self.restarts = 0  # how often the window was full since the last reset

    @property
    def text(self) -> bytes:
        """What the model has read, in order."""
        return bytes(self.session.text)

    def reset(self) -> None:
        self.session.reset()
        self.restarts = 0

    def feed_line(self, line: bytes, length: int) -> int | None:
        """Feed `line` and make room for `length` bytes of reply. Returns the number of bytes the
        session restarted from when the window was full, else None."""
        text = self.text
        if not text:
            line = line or b"\n"  # the model needs a byte to start from
        elif line and not text.endswith(b"\n"):
            line = b"\n" + line  # the reply stopped mid-line: the screen broke it there too
        if len(line) + length <= self.session.room:
            self.session.feed(line)
            return None
        kept = (text + line)[-(self.context - length) :]
        self.session.reset()
        self.session.feed(kept)
        self.restarts += 1
        return len(kept)

    def reply(
        self,
        length: int,
        sampling: Sampling,
        stops: Sequence[bytes],
        interrupted: Callable[[], bool],
    ) -> Iterator[bytes]:
        """The continuation, up to `length` bytes or the first of `stops`, which is yielded
        too; `interrupted` is asked after every piece whether to end there."""
        start, shown = len(self.session.text), 0
        for chunk in self.session.stream(length, sampling, self.draws, stops):
            shown += len(chunk)
            yield chunk
            if interrupted():
                break
        # The session has read the bytes it held back as the start of a stop (all of one, when
        # the reply ended there): they belong on the screen too.
        held = bytes(self.session.text[start + shown :])
        if held:
            yield held


@dataclass
class Settings:
    """What the commands change."""

    sampling: Sampling
    length: int
    carry: bool
    stops: list[bytes]


class Chat:
    """The terminal side: reads lines, runs commands, streams replies to `out`."""

    def __init__(self, conversation: Conversation, settings: Settings, seed: int) -> None:
        self.conversation = conversation
        self.settings = settings
        self.seed = seed
        self.out = sys.stdout.buffer

    def say(self, text: str) -> None:
        self.out.write(text.encode(errors="replace"))
        self.out.flush()

    def loop(self) -> int:
        """Lines until /quit or Ctrl-D; the exit code."""
        while True:
            try:
                line = input(PROMPT)
                if line.startswith("/") and not line.startswith("//"):
                    if not self.command(line[1:]):
                        return 0
                else:
                    self.turn(line[1:] if line.startswith("//") else line)
            except KeyboardInterrupt:  # at the prompt (a reply catches its own): a new line
                self.say("\n")
            except EOFError:  # Ctrl-D
                self.say("\n")
                return 0

    def turn(self, line: str) -> None:
        settings = self.settings
        if not settings.carry:
            self.conversation.reset()
        with ctrl_c_sets() as pressed:
            data = (line.encode(errors="surrogateescape") + b"\n") if line else b""
            kept = self.conversation.feed_line(data, settings.length)
            if kept is not None and self.conversation.restarts == 1:  # said once, not each turn
                self.say(f"[window full: the model now reads the last {kept} bytes; see /help]\n")
            pieces = self.conversation.reply(
                settings.length, settings.sampling, settings.stops, pressed.is_set
            )
            for text in as_text(pieces):
                self.say(text)
        if not self.conversation.text.endswith(b"\n"):
            self.say("\n")

    def command(self, text: str) -> bool:
        """Run one command (without its /); False ends the session."""
        name, _, value = text.strip().partition(" ")
        value = value.strip()
        if name in ("quit", "exit"):
            return False
        if name == "help":
            self.say(self.help())
        elif name == "settings":
            self.say(self.describe() + "\n")
        elif name == "reset":
            self.conversation.reset()
            self.say("[forgotten: the next line starts a new conversation]\n")
        elif name in SETTINGS:
            self.say((self.change(name, value) if value else self.current(name)) + "\n")
        else:
            self.say(f"unknown command /{name}; /help lists the commands\n")
        return True

    def current(self, name: str) -> str:
        if name == "carry":
            return f"carry {'on' if self.settings.carry else 'off'}"
        if name == "length":
            return f"length {self.settings.length}"
        return f"{name} {getattr(self.settings.sampling, name)}"

    def change(self, name: str, value: str) -> str:
        """Apply `/name value`; the new setting, or why it was refused (nothing changes)."""
        parse, wanted = SETTINGS[name]
        try:
            new = parse(value)
        except ValueError:
            return f"{name} takes {wanted}, not {value!r}"
        if name == "carry":
            self.settings.carry = new
        elif name == "length":
            most = self.conversation.context // 2
            if not 1 <= new <= most:
                return f"length must be 1 to {most} (half the window), not {new}"
            self.settings.length = new
        else:
            try:
                self.settings.sampling = replace(self.settings.sampling, **{name: new})
            except ValueError as error:
                return str(error)
        return self.current(name)

    def describe(self) -> str:
        sampling = self.settings.sampling
        return (
            f"temperature {sampling.temperature}, top_k {sampling.top_k}, "
            f"top_p {sampling.top_p}, length {self.settings.length}, "
            f"carry {'on' if self.settings.carry else 'off'}, "
            f"stop {_describe_stops(self.settings.stops)}, seed {self.seed}; "
            f"{len(self.conversation.text)} of {self.conversation.context} bytes of the "
            "window in use"
        )

    def help(self) -> str:
        context = self.conversation.context
        return f"""\
Type a line and the model continues it, until {_describe_stops(self.settings.stops)} or
/length bytes; an empty line lets it go on. Earlier turns are carried unless carry is off.
  /temperature T   0 is greedy             /top_k K    keep the K likeliest bytes (0: all)
  /top_p P         in (0, 1]               /length N   reply bytes, 1 to {context // 2}
  /carry on|off    keep earlier turns, or continue each line on its own
  /reset           forget the conversation /settings   show the settings
  /help            this text               /quit       end the session (or Ctrl-D)
A command without a value shows it; a line that starts with // sends one /.
Ctrl-C stops a reply, or clears the line at the prompt. The model reads at most {context} bytes:
when a turn would not fit, it restarts from the last {context} - length bytes of the
conversation, the new line included.
"""


def _describe_stops(stops: Sequence[bytes]) -> str:
    if list(stops) == [STOP]:
        return "a blank line"
    return " or ".join(repr(s.decode(errors="replace")) for s in stops if s) or "no stop"


def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise ValueError(value)
    return value == "on"


# What each `/name value` command parses its value with, and says it wants when that fails.
SETTINGS: dict[str, tuple[Callable[[str], Any], str]] = {
    "temperature": (float, "a number"),
    "top_k": (int, "a whole number"),
    "top_p": (float, "a number"),
    "length": (int, "a whole number"),
    "carry": (_on_off, "on or off"),
}


def _readline() -> ModuleType | None:
    """readline on a terminal; None on a pipe (it would write escape codes into the output) or
    where Python was built without it."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:
        return None
    return readline


@contextlib.contextmanager
def _line_editing() -> Iterator[None]:
    """readline's editing and history, kept across sessions where the cache can hold it."""
    readline = _readline()
    if readline is None:
        yield
        return
    path = cache_dir() / HISTORY_FILE
    readline.set_history_length(HISTORY_LENGTH)
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)


def run(args: argparse.Namespace) -> int:
    from nexus.cli import load_model_for_use, sampling_from

    sampling = sampling_from(args)
    if args.context is not None and args.context < 2:
        raise NexusError("--context must be at least 2 bytes")
    model, _ = load_model_for_use(args.checkpoint, args.threads)
    seq_len = model.config.seq_len
    context = WINDOW_IN_SEQ_LENS * seq_len if args.context is None else args.context
    length = args.max_new_tokens
    if length is None:
        length = min(DEFAULT_LENGTH, context // 2)
    if not 1 <= length <= context // 2:
        raise NexusError(f"--max_new_tokens must be 1 to {context // 2}, half of --context")
    stops = [STOP] if args.stop is None else [os.fsencode(text) for text in args.stop]
    conversation = Conversation(model, context, args.seed)
    settings = Settings(sampling, length, carry=not args.no_carry, stops=stops)
    chat = Chat(conversation, settings, args.seed)
    chat.say(
        f"nexus chat: {args.checkpoint}; a {context}-byte window (seq_len {seq_len}), replies "
        f"up to {length} bytes or {_describe_stops(stops)}. /help lists the commands; Ctrl-D "
        "quits.\n"
    )
    with _line_editing():
        return chat.loop()
