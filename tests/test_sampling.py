"""The picking rule of nexus.sampling: the draws against splitmix64's published output, the numba
and PyTorch picks against each other and against a plain-Python computation of the rule, the
sampled frequencies against the probabilities, and stop sequences and turns of a Session."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from nexus import decode
from nexus.config import preset
from nexus.generation import Session, as_text, generate, stream
from nexus.model import NexusLM
from nexus.sampling import Draws, Sampling, pick_torch

needs_numba = pytest.mark.skipif(not decode.FAST_DECODE_ENABLED, reason="numba is not available")

SETTINGS = [
    Sampling(temperature=t, top_k=k, top_p=p)
    for t in (0.5, 1.0, 1.7)
    for k in (0, 1, 5, 40)
    for p in (1.0, 0.9, 0.3, 0.01)
]


def expected_pick(logits: list[float], sampling: Sampling, u: float) -> int:
    """The rule of nexus.sampling written out over Python lists."""
    if sampling.temperature == 0:
        return max(range(len(logits)), key=lambda j: (logits[j], -j))
    z = [value / sampling.temperature for value in logits]
    kept = set(range(len(z)))
    if 0 < sampling.top_k < len(z):
        kth_best = sorted(z, reverse=True)[sampling.top_k - 1]
        kept = {j for j in kept if z[j] >= kth_best}
    top = max(z)
    weight = {j: math.exp(z[j] - top) for j in kept}
    if sampling.top_p < 1:
        limit = sampling.top_p * math.fsum(weight.values())
        mass_above, above = {}, 0.0
        by_rank = sorted(kept, key=lambda j: -z[j])
        for _, group in itertools.groupby(by_rank, key=lambda j: z[j]):
            members = list(group)
            mass_above.update(dict.fromkeys(members, above))
            above += math.fsum(weight[j] for j in members)
        kept = {j for j in kept if mass_above[j] < limit}
    total = math.fsum(weight[j] for j in kept)
    running = 0.0
    for j in sorted(kept):
        running += weight[j]
        if running > u * total:
            return j
    return max(kept)


def test_draws_follow_splitmix64() -> None:
    # splitmix64's first outputs from state 0 (as published with the generator).
    first, second = 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4
    draws = Draws(0)
    assert draws.next() == (first >> 11) * 2.0**-53
    assert draws.next() == (second >> 11) * 2.0**-53
    one_stream = Draws(3)
    values = [one_stream.next() for _ in range(5000)]
    assert min(values) >= 0 and max(values) < 1
    assert stats.kstest(values, "uniform").pvalue > 1e-3


@needs_numba
def test_kernel_draws_equal_the_python_draws() -> None:
    from nexus.sampling import _next_draw

    python, kernel = Draws(12345), Draws(12345)
    for _ in range(1000):
        assert _next_draw(kernel.state) == python.next()


@needs_numba
@pytest.mark.parametrize("sampling", SETTINGS, ids=str)
def test_numba_and_torch_picks_follow_the_rule(sampling: Sampling) -> None:
    from nexus.sampling import pick_numba

    generator = torch.Generator().manual_seed(hash(sampling) % 1000)
    for row in range(12):
        logits = torch.randn(256, generator=generator) * 3
        if row % 2:  # many ties
            logits = (logits * 2).round() / 2
        numba_draws, torch_draws, python_draws = Draws(row), Draws(row), Draws(row)
        for _ in range(4):
            want = expected_pick(logits.tolist(), sampling, python_draws.next())
            got_numba = pick_numba(
                logits.numpy(), sampling.temperature, sampling.top_k, sampling.top_p,
                numba_draws.state,
            )  # fmt: skip
            uniforms = torch.tensor(torch_draws.take(1), dtype=torch.float64)
            got_torch = int(pick_torch(logits[None], sampling, uniforms)[0])
            assert got_numba == got_torch == want


def test_torch_picks_each_row_with_its_own_draw() -> None:
    logits = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    sampling = Sampling(temperature=1.0, top_p=0.9)
    uniforms = torch.tensor(Draws(5).take(4), dtype=torch.float64)
    together = pick_torch(logits, sampling, uniforms).tolist()
    rows = zip(logits.tolist(), uniforms.tolist(), strict=True)
    assert together == [expected_pick(row, sampling, u) for row, u in rows]


@needs_numba
def test_sampled_frequencies_match_the_kept_probabilities() -> None:
    from nexus.sampling import pick_numba

    logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=np.float32))
    # top_p 0.75 keeps the first three (0.4 + 0.25 < 0.75 <= 0.8): renormalised 8:5:3.
    draws = Draws(99)
    picks = [pick_numba(logits, 1.0, 0, 0.75, draws.state) for _ in range(20000)]
    counts = np.bincount(picks, minlength=6)
    assert counts[3:].sum() == 0
    expected = np.array([8, 5, 3]) / 16 * 20000
    assert stats.chisquare(counts[:3], expected).pvalue > 1e-3


def test_bad_settings_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        Sampling(temperature=-1)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        Sampling(temperature=float("nan"))
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        Sampling(top_k=-3)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        Sampling(top_p=0)


@needs_numba
def test_sampled_bytes_are_the_same_on_any_thread_count() -> None:
    # nexus-6m's matrices are split across threads in the kernel; the picks must not move.
    torch.manual_seed(0)
    model = NexusLM(preset("nexus-6m")).eval()
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            runs.append(generate(model, b"ROMEO:", 48, temperature=1.0, top_p=0.95, seed=3))
    finally:
        torch.set_num_threads(threads)
    assert runs[0] == runs[1]


def tiny_model() -> NexusLM:
    torch.manual_seed(1)
    return NexusLM(preset("nexus-tiny")).eval()


def test_stop_sequences_end_the_stream_and_are_not_yielded() -> None:
    model = tiny_model()
    greedy = Sampling(temperature=0)
    full = b"".join(stream(model, b"To be", 64, greedy))
    stop = full[20:23]
    end = full.index(stop)
    pieces = list(stream(model, b"To be", 64, greedy, stop=[b"never there \xff", stop]))
    assert b"".join(pieces) == full[:end]
    # A stop sequence that begins as the text does but never completes holds nothing back.
    never = full[30:32] + b"\xff"
    assert b"".join(stream(model, b"To be", 64, greedy, stop=[never])) == full


def test_a_session_continued_over_turns_equals_one_pass_over_the_transcript() -> None:
    model = tiny_model()
    greedy = Sampling(temperature=0)
    session = Session(model, 200)
    session.feed(b"First line\n")
    first = b"".join(session.stream(30, greedy, Draws(0)))
    session.feed(b"\nSecond\n")
    second = b"".join(session.stream(30, greedy, Draws(0)))
    transcript = b"First line\n" + first + b"\nSecond\n"
    assert first == generate(model, b"First line\n", 30, temperature=0)
    assert second == generate(model, transcript, 30, temperature=0)
    assert session.room == 200 - len(transcript) - 30
    with pytest.raises(ValueError, match="do not fit"):
        session.feed(b"x" * (session.room + 1))
    session.reset()
    with pytest.raises(ValueError, match="feed the session a prompt first"):
        next(session.stream(1, greedy, Draws(0)))


def test_text_pieces_never_split_a_character() -> None:
    data = "né → 🙂".encode()
    pieces = list(as_text([data[i : i + 1] for i in range(len(data))] + [b"\xff"], prefix=b">"))
    assert "".join(pieces) == ">né → 🙂\ufffd"
    assert all("\ufffd" not in piece for piece in pieces[:-1])


def test_chunks_of_device_picks_give_the_bytes_of_one_at_a_time() -> None:
    # The PyTorch path as it runs on a GPU: 8 picks on the device per read-back.
    torch.manual_seed(0)
    model = NexusLM(preset("nexus-tiny-moe")).eval()
    assert not decode.supported(model)
    sampling = Sampling(temperature=0.9, top_k=50)

    def talk(chunk: int, stop: list[bytes]) -> tuple[bytes, bytes, bytes]:
        session = Session(model, 120, chunk=chunk)
        session.feed(b"To be")
        draws = Draws(4)
        first = b"".join(session.stream(21, sampling, draws))
        cut = b"".join(session.stream(30, sampling, draws, stop=stop))
        session.feed(b"\n")
        return first, cut, b"".join(session.stream(10, Sampling(temperature=0), draws))

    first, full, _ = talk(1, [])
    stop = full[9:11]
    end = full.index(stop)
    # The stop completes inside a chunk of 8: the feed after it must rewind.
    assert talk(8, [stop]) == talk(1, [stop]) == (first, full[:end], talk(1, [stop])[2])
    heard = b"To be" + first + full[: end + len(stop)] + b"\n"  # the stop was read, not shown
    assert talk(8, [stop])[2] == generate(model, heard, 10, temperature=0)


@pytest.mark.parametrize("name", ["nexus-tiny", "nexus-tiny-moe"])  # numba kernel, torch step
def test_generating_leaves_a_model_in_training_mode(name: str) -> None:
    # The trainer samples between its steps: the steps after must still train the model.
    model = NexusLM(preset(name)).train()
    generate(model, b"To be", 8, temperature=0.8, seed=1)
    assert model.training
