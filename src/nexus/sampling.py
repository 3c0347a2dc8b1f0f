"""How the next byte is picked: greedy, or sampled with temperature, top-k and top-p from a
seeded stream of uniform draws.

Two implementations of one rule, so that the numba decoder and the PyTorch step give the same
bytes for the same seed: `pick_numba` (called inside the decode kernel, one row of logits) and
`pick_torch` (rows of logits on any device). The rule, in float64:
- temperature 0: the first largest logit;
- else z = logits / temperature; top-k keeps the bytes whose z is at least the k-th largest
  (ties kept); top-p keeps a byte when the probability of the bytes ranked strictly above it is
  below top_p (so the best always stays, and ties share one fate);
- one draw u in [0, 1) per sampled byte; the pick is the first kept byte, in byte order, at
  which the running sum of exp(z - max z) over kept bytes exceeds u times their total.
The draws come from splitmix64 on a 64-bit counter seeded with the seed (`Draws`): one number
per sampled byte, in order, so the output never depends on the thread count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from nexus import scan

_MASK = (1 << 64) - 1
_GAMMA, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_UNIT = 2.0**-53  # 53 random bits scaled into [0, 1)


@dataclass(frozen=True)
class Sampling:
    """The settings of one generation. temperature 0 is greedy; top_k 0 and top_p 1 keep all."""

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature must be >= 0 (0 means greedy), not {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps every byte), not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Draws:
    """A seeded stream of uniform numbers in [0, 1): splitmix64. Its whole state is `state`, a
    one-element uint64 array that the numba kernel advances in place as it samples."""

    def __init__(self, seed: int) -> None:
        self.state = np.array([seed & _MASK], dtype=np.uint64)

    def take(self, count: int) -> list[float]:
        return [self.next() for _ in range(count)]

    def next(self) -> float:
        counter = (int(self.state[0]) + _GAMMA) & _MASK
        self.state[0] = counter
        z = ((counter ^ (counter >> 30)) * _MIX1) & _MASK
        z = ((z ^ (z >> 27)) * _MIX2) & _MASK
        z ^= z >> 31
        return (z >> 11) * _UNIT


def pick_torch(logits: Tensor, sampling: Sampling, uniforms: Tensor | None) -> Tensor:
    """The pick for each row of logits (B, vocab) on their device; `uniforms` (B,) float64,
    a draw per row (from `Draws.take`), on the same device, is unused when greedy."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    z = logits.double() / sampling.temperature
    kept = torch.ones_like(z, dtype=torch.bool)
    if 0 < sampling.top_k < z.shape[-1]:
        kth_best = torch.topk(z, sampling.top_k, dim=-1).values[:, -1:]
        kept = z >= kth_best
    weights = torch.exp(z - z.max(dim=-1, keepdim=True).values) * kept
    if sampling.top_p < 1:
        # weights[b, i] summed over the bytes j ranked strictly above i (z[j] > z[i]).
        above = (weights[:, None, :] * (z[:, None, :] > z[:, :, None])).sum(-1)
        kept &= above < sampling.top_p * weights.cumsum(-1)[:, -1:]
        weights = weights * kept
    assert uniforms is not None, "sampling needs a draw per row"
    running = weights.cumsum(-1)  # summed in byte order, as pick_numba does
    picks = (running <= uniforms[:, None] * running[:, -1:]).sum(-1)
    # Rounding can put the target at the total: then the pick is the last kept byte.
    last_kept = z.shape[-1] - 1 - kept.flip(-1).int().argmax(-1)
    return torch.minimum(picks, last_kept)


if scan.numba is not None:
    _U_GAMMA, _U_MIX1, _U_MIX2 = np.uint64(_GAMMA), np.uint64(_MIX1), np.uint64(_MIX2)
    _S11, _S27, _S30, _S31 = np.uint64(11), np.uint64(27), np.uint64(30), np.uint64(31)

    @scan.numba_jit()
    def _next_draw(state):
        counter = state[0] + _U_GAMMA
        state[0] = counter
        z = (counter ^ (counter >> _S30)) * _U_MIX1
        z = (z ^ (z >> _S27)) * _U_MIX2
        z = z ^ (z >> _S31)
        return np.float64(z >> _S11) * _UNIT

    @scan.numba_jit()
    def pick_numba(logits, temperature, top_k, top_p, state):
        """The pick for one row of logits (vocab,) under the rule above; `state` is a `Draws`'s."""
        vocab = logits.shape[0]
        best = 0
        for j in range(1, vocab):
            if logits[j] > logits[best]:
                best = j
        if temperature == 0:
            return best
        z = logits.astype(np.float64) / temperature
        kept = np.ones(vocab, dtype=np.bool_)
        if 0 < top_k < vocab:
            kth_best = np.sort(z)[vocab - top_k]
            for j in range(vocab):
                kept[j] = z[j] >= kth_best
        top = z[best]
        weights = np.zeros(vocab, dtype=np.float64)
        total = 0.0
        for j in range(vocab):
            if kept[j]:
                weights[j] = np.exp(z[j] - top)
                total += weights[j]
        if top_p < 1:
            # Walk the bytes from the largest z down, a group of equal z at a time.
            order = np.argsort(-z, kind="mergesort")
            above = 0.0
            limit = top_p * total
            start = 0
            while start < vocab:
                stop = start
                group = 0.0
                while stop < vocab and z[order[stop]] == z[order[start]]:
                    group += weights[order[stop]]
                    stop += 1
                if above >= limit:
                    for r in range(start, stop):
                        kept[order[r]] = False
                        weights[order[r]] = 0.0
                above += group
                start = stop
            total = 0.0
            for j in range(vocab):
                total += weights[j]
        target = _next_draw(state) * total
        running = 0.0
        last_kept = best
        for j in range(vocab):
            if kept[j]:
                running += weights[j]
                last_kept = j
                if running > target:
                    return j
        return last_kept  # rounding put the target at the total
