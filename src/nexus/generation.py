"""Text generation with the recurrent cache: a `Session` is fed bytes and streams the model's
continuation a byte at a time, picked by the rule of `nexus.sampling`; `generate` and `stream`
do one prompt."""

from __future__ import annotations

import codecs
import itertools
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch

from nexus import decode
from nexus.model import NexusLM
from nexus.sampling import Draws, Sampling, pick_torch


@contextmanager
def _inference(model: NexusLM, on_cpu: bool) -> Iterator[None]:
    """No autograd, eval mode (the model's own mode restored after: a model being trained is
    sampled between its steps), and on the CPU one PyTorch thread: batch-1 decode operations
    are too small to share, and a second thread only adds synchronisation, which costs whole
    time slices on a busy machine."""
    threads, was_training = torch.get_num_threads(), model.training
    if on_cpu:
        torch.set_num_threads(1)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if on_cpu:
            torch.set_num_threads(threads)


class Session:
    """One sequence being decoded, up to `max_len` positions: `feed` it bytes (a prompt, a
    user's turn), `stream` the continuation, feed more, and so on; `reset` empties it.

    A float32 model on the CPU runs in the numba kernel of `nexus.decode` (the whole loop of
    step and pick inside it, its matrix products on torch's thread count at construction), any
    other model with `NexusLM.step`. Both pick with `nexus.sampling`, so a seed gives the same
    bytes on either path and on any thread count. On a GPU the step's picks stay on the device
    for `chunk` bytes (default 16), read back once per chunk: no host synchronisation per byte.
    When a stop sequence ends a chunk early, the next `feed` rewinds the caches to the last
    byte streamed (a prefill of the text so far)."""

    def __init__(self, model: NexusLM, max_len: int, chunk: int | None = None) -> None:
        self.model = model
        self.max_len = max_len
        self.device = next(model.parameters()).device
        self.on_cpu = self.device.type == "cpu"
        self.chunk = chunk or (1 if self.on_cpu else 16)
        self.decoder = (
            decode.Decoder(model, max_len, threads=torch.get_num_threads())
            if decode.supported(model)
            else None
        )
        self.reset()

    def reset(self) -> None:
        self.text: list[int] = []  # every byte fed or streamed, in order
        self.length = 0  # positions in the caches
        self._unfed: int | None = None  # the last streamed byte: in the text, not yet fed
        self._cache = None  # NexusLM.step's, off the fast path
        self._logits: torch.Tensor | None = None  # (1, vocab), off the fast path

    @property
    def room(self) -> int:
        """How many more bytes fit."""
        return self.max_len - len(self.text)

    def feed(self, data: bytes) -> None:
        """Append `data` to the sequence; the first feed after a reset prefills."""
        if len(data) > self.room:
            raise ValueError(f"{len(data)} bytes do not fit: {self.room} of {self.max_len} left")
        if self.length > len(self.text):  # a chunk ran past what was streamed: rewind
            self.length = 0
        self.text += data
        unfed = self.text[self.length :]
        self._unfed = None
        if not unfed:
            return
        with _inference(self.model, self.on_cpu):
            if self.length == 0:
                self._prefill(unfed)
            else:
                for token in unfed:
                    self._step(torch.tensor([token], device=self.device))
        self.length = len(self.text)

    def stream(
        self, count: int, sampling: Sampling, draws: Draws, stop: Sequence[bytes] = ()
    ) -> Iterator[bytes]:
        """Up to `count` new bytes, one at a time; none before anything was fed. With `stop`,
        generation ends where one of those byte strings is complete, and it is not yielded;
        bytes that could begin one are held back until they cannot."""
        if not self.text:
            raise ValueError("feed the session a prompt first")
        self.feed(b"")  # a rewind, if the last stream left one
        count = min(count, self.room)
        held = b""
        for token in self._picks(count, sampling, draws):
            held += bytes([token])
            if any(s and held.endswith(s) for s in stop):
                return
            keep = max((_overlap(held, s) for s in stop), default=0)
            if len(held) > keep:
                yield held[: len(held) - keep]
                held = held[len(held) - keep :]
        if held:
            yield held

    def _picks(self, count: int, sampling: Sampling, draws: Draws) -> Iterator[int]:
        """`count` picks, each appended to the text and fed before the next is made."""
        if self.decoder is not None:
            for _ in range(count):
                if self._unfed is None:
                    token = self.decoder.pick(sampling, draws)
                else:  # one kernel call feeds it and picks the next: no Python in between
                    (token,) = self.decoder.generate(self._unfed, 1, sampling, draws)
                    self.length += 1
                self.text.append(token)
                self._unfed = token
                yield token
            return
        while count > 0:
            size = min(self.chunk, count)
            count -= size
            with _inference(self.model, self.on_cpu):
                picks = self._chunk_of_picks(size, sampling, draws)
            for token in picks:
                self.text.append(token)
                self._unfed = token
                yield token

    def _chunk_of_picks(self, size: int, sampling: Sampling, draws: Draws) -> list[int]:
        """`size` picks by `NexusLM.step` on the model's device, read back together. All but
        the last are fed; until the caller has taken them all, `length` runs ahead of the
        text, and the next `feed` rewinds."""
        uniforms = None
        if not sampling.greedy:
            uniforms = torch.tensor(draws.take(size), dtype=torch.float64).to(self.device)
        picks = []
        for i in range(size):
            if self._unfed is not None:
                self._step(torch.tensor([self._unfed], device=self.device))
                self._unfed = None
            elif picks:
                self._step(picks[-1])
            assert self._logits is not None
            row = None if uniforms is None else uniforms[i : i + 1]
            picks.append(pick_torch(self._logits, sampling, row))
        self.length = len(self.text) + size - 1
        return torch.cat(picks).tolist()

    def _prefill(self, tokens: list[int]) -> None:
        if self.decoder is not None:
            self.decoder.prefill(tokens)
            return
        logits, self._cache = self.model.prefill(torch.tensor([tokens], device=self.device))
        self._logits = logits[:, -1]

    def _step(self, token: torch.Tensor) -> None:
        """Feed one byte, a (1,) long tensor on the model's device."""
        if self.decoder is not None:
            self.decoder.step(int(token))
            return
        self._logits, self._cache = self.model.step(token, self._cache)


def _overlap(text: bytes, stop: bytes) -> int:
    """The length of the longest end of `text` that is a proper beginning of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0


def stream(
    model: NexusLM,
    prompt: bytes,
    max_new_tokens: int,
    sampling: Sampling,
    *,
    seed: int = 0,
    stop: Sequence[bytes] = (),
) -> Iterator[bytes]:
    """The prompt's continuation, streamed (see `Session.stream`). An empty prompt is a line
    break: the model needs one byte to condition on."""
    if max_new_tokens <= 0:
        return iter(())
    prompt = prompt or b"\n"
    session = Session(model, len(prompt) + max_new_tokens)
    session.feed(prompt)
    return session.stream(max_new_tokens, sampling, Draws(seed), stop)


def as_text(chunks: Iterable[bytes], prefix: bytes = b"") -> Iterator[str]:
    """Text pieces of `prefix` and then a byte stream, never splitting a UTF-8 character;
    bytes that are not UTF-8 become U+FFFD, as Python's errors="replace" decides."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in itertools.chain([prefix], chunks):
        text = decoder.decode(chunk)
        if text:
            yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def generate(
    model: NexusLM,
    prompt: bytes,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> bytes:
    """The prompt's continuation (new bytes only)."""
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    return b"".join(stream(model, prompt, max_new_tokens, sampling, seed=seed))
