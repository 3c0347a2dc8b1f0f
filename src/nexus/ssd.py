"""The Mamba-2 state-space duality (SSD) scan, forward in PyTorch, backward by autograd.

Owns three public functions, all batch-first and time-major:

- `ssd_scan_reference`: a plain sequential loop over time, the definition.
- `ssd_scan`: the chunked algorithm (matrix products inside chunks of `chunk_size` steps and a
  short recurrence over the chunks), the fast path on CPU.
- `ssd_step`: one recurrent step, for cached generation.

Recurrence per batch row and head h (group g = h // (H / G)), with S_0 = 0:
    a_t = exp(dt_t[h] · A[h])                                   (a scalar per head, A < 0)
    S_t = a_t · S_{t-1} + dt_t[h] · x_t[h] ⊗ Bm_t[g]              (P × N)
    y_t[h] = S_t · Cm_t[g] + D[h] · x_t[h]

Unrolled, y_t[h] = Σ_{s ≤ t} (Cm_t[g] · Bm_s[g]) · exp(Σ_{k=s+1..t} dt_k·A) · dt_s · x_s[h] +
D·x_t: inside a chunk this is a masked (attention-like) matrix product, which is what makes
Mamba-2 fast on hardware built for matmuls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_SIZE = 64
"""Default chunk length of `ssd_scan` (measured fastest at B=4, T=128 of the 6M preset)."""

# Decays below these are flushed to exactly 0, per dtype (1e-15 as in nexus.scan). Besides
# keeping subnormals out of the products, it keeps exp's arguments in range: on CPU, torch.exp
# of float32 arguments below about -87.3 (or -inf) leaves the vectorised path and runs
# 10-80x slower.
_MIN_LOG_DECAY = {torch.float32: math.log(1e-15), torch.float64: math.log(1e-150)}


def ssd_step(
    state: Tensor,
    x_t: Tensor,
    dt_t: Tensor,
    A: Tensor,
    B_t: Tensor,
    C_t: Tensor,
    D: Tensor,
) -> tuple[Tensor, Tensor]:
    """One step: state (B,H,P,N), x_t (B,H,P), dt_t (B,H), A/D (H,), B_t/C_t (B,G,N) ->
    (y_t (B,H,P), new state)."""
    heads_per_group = x_t.shape[1] // B_t.shape[1]
    B_h = B_t.repeat_interleave(heads_per_group, dim=1)  # (B, H, N)
    C_h = C_t.repeat_interleave(heads_per_group, dim=1)  # (B, H, N)
    decay = torch.exp(dt_t * A)[..., None, None]  # (B, H, 1, 1)
    dtx = (dt_t.unsqueeze(-1) * x_t).unsqueeze(-1)  # (B, H, P, 1)
    state = decay * state + dtx * B_h.unsqueeze(2)  # (B, H, P, N)
    y_t = (state @ C_h.unsqueeze(-1)).squeeze(-1) + D.unsqueeze(-1) * x_t  # (B, H, P)
    return y_t, state


def ssd_scan_reference(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    Bm: Tensor,
    Cm: Tensor,
    D: Tensor,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential loop over time. Returns y (B,T,H,P), or (y, S_last (B,H,P,N))."""
    batch, _, heads, head_dim = x.shape
    state = x.new_zeros(batch, heads, head_dim, Bm.shape[-1])  # (B, H, P, N)
    ys = []
    steps = zip(x.unbind(1), dt.unbind(1), Bm.unbind(1), Cm.unbind(1), strict=True)
    for x_t, dt_t, B_t, C_t in steps:
        y_t, state = ssd_step(state, x_t, dt_t, A, B_t, C_t, D)
        ys.append(y_t)
    y = torch.stack(ys, dim=1)  # (B, T, H, P)
    return (y, state) if return_state else y


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    Bm: Tensor,
    Cm: Tensor,
    D: Tensor,
    chunk_size: int = CHUNK_SIZE,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD scan, equal to `ssd_scan_reference` up to rounding.

    x: (B,T,H,P); dt: (B,T,H) with dt >= 0; A: (H,) negative; Bm, Cm: (B,T,G,N) with G
    dividing H; D: (H,). Returns y (B,T,H,P), or (y, S_last (B,H,P,N)) if return_state.
    Gradients flow to all six inputs and through S_last.
    """
    _check_shapes(x, dt, A, Bm, Cm, D)
    batch, steps, heads, head_dim = x.shape
    groups, n_state = Bm.shape[2], Bm.shape[3]
    L = chunk_size
    pad = -steps % L
    if pad:
        # dt = 0 pads are exact no-ops: decay exp(0) = 1 and no input, so S_last is unchanged.
        x, Bm, Cm = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, Bm, Cm))
        dt = F.pad(dt, (0, 0, 0, pad))
    chunks = (steps + pad) // L
    hg = heads // groups

    log_decay = (dt * A).view(batch, chunks, L, heads).transpose(2, 3)  # (B, c, H, L)
    decay = _flushed_exp(_segsum(log_decay))  # (B, c, H, L, L): a_{s+1}···a_l at [l, s]
    from_start = _flushed_exp(log_decay.cumsum(-1))  # (B, c, H, L): a_0···a_l
    to_end = decay[..., -1, :]  # (B, c, H, L): a_{s+1}···a_{L-1}
    chunk_decay = from_start[..., -1]  # (B, c, H): the whole chunk's decay

    # x stays in its (B, c, L, G, hg·P) layout where heads share B and C: the state products
    # then become one (N × L)·(L × hg·P) matrix product per group instead of one per head.
    Bg = Bm.view(batch, chunks, L, groups, n_state).transpose(2, 3)  # (B, c, G, L, N)
    Cg = Cm.view(batch, chunks, L, groups, n_state).transpose(2, 3)  # (B, c, G, L, N)
    dtx = (x * dt.unsqueeze(-1)).view(batch, chunks, L, heads, head_dim)  # (B, c, L, H, P)

    # Inside each chunk: Y = (decay ∘ C Bᵀ) · (dt·X), per head, sharing C Bᵀ within a group.
    scores = Cg @ Bg.transpose(-1, -2)  # (B, c, G, L, L)
    mixing = decay.view(batch, chunks, groups, hg, L, L) * scores.unsqueeze(3)
    y_diag = mixing.view(batch, chunks, heads, L, L) @ dtx.transpose(2, 3)  # (B, c, H, L, P)

    y = y_diag.view(batch, chunks, groups, hg, L, head_dim).permute(0, 1, 4, 2, 3, 5)
    # Chunk 0 starts from S = 0, and only the last chunk's end state is unused unless asked for.
    n_ends = chunks if return_state else chunks - 1
    if n_ends:
        # Each chunk's own contribution to the state at its end: Bᵀ · (dt·X decayed to the end).
        weighted = dtx[:, :n_ends] * to_end[:, :n_ends].transpose(2, 3).unsqueeze(-1)
        weighted = weighted.view(batch, n_ends, L, groups, hg * head_dim).transpose(2, 3)
        local = Bg[:, :n_ends].transpose(-1, -2) @ weighted  # (B, n, G, N, hg·P)
        local = local.view(batch, n_ends, groups, n_state, hg, head_dim)

        # States at the end of each chunk: a recurrence over the (few) chunks.
        chunk_decay = chunk_decay.view(batch, chunks, groups, 1, hg, 1)
        ends = [local[:, 0]]  # (B, G, N, hg, P) each
        for c in range(1, n_ends):
            ends.append(chunk_decay[:, c] * ends[-1] + local[:, c])

    if chunks > 1:
        # The carried-in state's part of each output: read by C, decayed from the chunk start.
        carried = torch.stack(ends[: chunks - 1], dim=1).flatten(-2)  # (B, c-1, G, N, hg·P)
        from_state = (Cg[:, 1:] @ carried).view(batch, chunks - 1, groups, L, hg, head_dim)
        scale = from_start[:, 1:].view(batch, chunks - 1, groups, hg, L).transpose(3, 4)
        from_state = (from_state * scale.unsqueeze(-1)).transpose(2, 3)  # (B, c-1, L, G, hg, P)
        y = torch.cat([y[:, :1], y[:, 1:] + from_state], dim=1)  # (B, c, L, G, hg, P)

    y = y.reshape(batch, chunks * L, heads, head_dim)[:, :steps]
    y = y + D.unsqueeze(-1) * x[:, :steps]  # (B, T, H, P)
    if not return_state:
        return y
    # (B, G, N, hg, P) -> the step layout (B, H, P, N)
    return y, ends[-1].permute(0, 1, 3, 4, 2).reshape(batch, heads, head_dim, n_state)


def _segsum(log_decay: Tensor) -> Tensor:
    """out[..., l, s] = Σ_{k=s+1..l} log_decay[..., k] for s <= l, -inf above the diagonal.

    Summed directly per (l, s) rather than as cumsum[l] - cumsum[s], which would cancel
    catastrophically once the cumulative log-decay is large."""
    L = log_decay.shape[-1]
    ones = torch.ones(L, L, dtype=torch.bool, device=log_decay.device)
    strictly_below = ones.tril(-1).to(log_decay.dtype)
    above = torch.zeros(L, L, dtype=log_decay.dtype, device=log_decay.device)
    above.masked_fill_(~ones.tril(), -torch.inf)
    # terms[..., k, s] = log_decay[k] for k > s, else 0; a product and an add instead of
    # masked_fill, which is several times slower on CPU.
    terms = log_decay.unsqueeze(-1) * strictly_below  # (..., L, L)
    return terms.cumsum(-2) + above


def _flushed_exp(log_decay: Tensor) -> Tensor:
    """exp(log_decay), exactly 0 where it would be below the dtype's flush threshold (and for
    -inf), without evaluating exp out of its fast range."""
    floor = _MIN_LOG_DECAY.get(log_decay.dtype, -80.0)
    return torch.where(log_decay > floor, torch.exp(log_decay.clamp(min=floor)), 0.0)


def _check_shapes(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, D: Tensor) -> None:
    if x.dim() != 4 or Bm.dim() != 4:
        raise ValueError(
            f"expected x (B,T,H,P) and Bm (B,T,G,N), got {tuple(x.shape)}, {tuple(Bm.shape)}"
        )
    batch, steps, heads, _ = x.shape
    groups, n_state = Bm.shape[2], Bm.shape[3]
    if heads % groups:
        raise ValueError(f"{groups} groups do not divide {heads} heads")
    expected = {
        "dt": (dt, (batch, steps, heads)),
        "A": (A, (heads,)),
        "Bm": (Bm, (batch, steps, groups, n_state)),
        "Cm": (Cm, (batch, steps, groups, n_state)),
        "D": (D, (heads,)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
