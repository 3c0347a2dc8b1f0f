"""Fast batch-1 decoding on CPU: one whole recurrent step of a `NexusLM` as a numba kernel.

At batch 1 a decode step is a few dozen matrix-vector products over small matrices and many
tiny element-wise operations; in PyTorch its time goes to per-operation overhead (hundreds of
dispatches per byte), not to arithmetic. `Decoder` runs the embedding, every layer (Mamba-1,
Mamba-2 or attention, each with its MLP), the final norm and the head in one compiled call
per byte, on the weights copied once per generation into one flat float32 buffer, with the
caches (conv windows, SSM states, a preallocated key/value buffer of the full length)
updated in place.
Picking the next byte (greedy or sampled, `nexus.sampling.pick_numba`) runs inside the kernel
too, and `Decoder.generate` loops there, so a byte costs no Python. What is left
is reading the weights (27 MB per byte at nexus-6m): the kernel runs at the speed of its
matrix-vector products alone.

It computes what `NexusLM.step` computes (the tests compare both with the full forward), for
a float32 model on the CPU; `supported` says when it applies, else generation uses the
PyTorch step. The prompt goes through `NexusLM.prefill` (the fast scans) and its cache is
copied in.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from nexus import scan
from nexus.model import AttentionState, Mamba2Mixer, Mamba2State, MambaMixer, MambaState, NexusLM
from nexus.sampling import Draws, Sampling

if scan.numba is not None:
    from nexus.sampling import pick_numba

FAST_DECODE_ENABLED: bool = scan.numba is not None
"""Whether generation may use the numba decoder (False when numba is missing/disabled)."""

MAMBA1, MAMBA2, ATTENTION = 0, 1, 2

# A matrix-vector product with at least this many weights is split into _MATVEC_PARTS blocks of
# rows run in parallel (a fixed count, so results never depend on the thread count); smaller
# ones cost less than a parallel launch (~1 µs) saves.
_PARALLEL_MIN_WEIGHTS = 16384
_MATVEC_PARTS = 2

_GREEDY = Sampling(temperature=0.0)

KERNEL_PREFILL_MAX = 32
"""Prompts up to this many bytes are prefilled by the kernel, longer ones by PyTorch."""

# Indices into the `dims` array the kernel gets.
_VOCAB, _D_MODEL, _MLP, _E, _N, _R, _K, _HEADS, _KV_HEADS, _HEAD_DIM = range(10)
_SSM_HEADS, _SSM_HEAD_DIM, _GROUPS, _MAX_LEN, _N_DIMS = 10, 11, 12, 13, 14

# Every layer's parameters are packed in this order: the two norms and the MLP, then its
# mixer's (see `_mixer_tensors`). The globals come first.
_EMBED, _FINAL_NORM, _HEAD = 0, 1, 2
_IN_NORM, _FF_NORM, _GATE, _UP, _DOWN, _MIXER = 0, 1, 2, 3, 4, 5
# Mamba-1's parameters (offsets from _MIXER).
_M1_IN, _M1_CONV_W, _M1_CONV_B, _M1_X, _M1_DT_NORM, _M1_B_NORM, _M1_C_NORM = range(7)
_M1_DT_W, _M1_DT_B, _M1_A, _M1_D, _M1_OUT = 7, 8, 9, 10, 11
# Mamba-2's.
_M2_IN, _M2_CONV_W, _M2_CONV_B, _M2_DT_BIAS, _M2_A, _M2_D, _M2_NORM, _M2_OUT = range(8)
# Attention's.
_AT_Q, _AT_K, _AT_V, _AT_O = range(4)


def supported(model: NexusLM) -> bool:
    """Whether `Decoder` can run this model: numba present, every parameter float32 on CPU,
    and dense MLPs (an MoE layer's routing is left to `NexusLM.step`)."""
    return (
        FAST_DECODE_ENABLED
        and not model.has_moe
        and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    )


def _mixer_tensors(layer) -> tuple[int, list[Tensor]]:
    """The layer kind and its mixer's parameters in packing order (A as -exp(A_log))."""
    if layer.is_attention:
        at = layer.self_attn
        return ATTENTION, [at.q_proj.weight, at.k_proj.weight, at.v_proj.weight, at.o_proj.weight]
    m = layer.mamba
    A = -torch.exp(m.A_log.float())
    if isinstance(m, Mamba2Mixer):
        return MAMBA2, [
            m.in_proj.weight, m.conv1d.weight, m.conv1d.bias, m.dt_bias, A, m.D,
            m.norm.weight, m.out_proj.weight,
        ]  # fmt: skip
    assert isinstance(m, MambaMixer)
    return MAMBA1, [
        m.in_proj.weight, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight,
        m.dt_layernorm.weight, m.b_layernorm.weight, m.c_layernorm.weight,
        m.dt_proj.weight, m.dt_proj.bias, A, m.D, m.out_proj.weight,
    ]  # fmt: skip


class _Packed:
    """The model's weights in one flat float32 array, with the layout tables of the kernel."""

    def __init__(self, model: NexusLM) -> None:
        stack = model.model
        tensors = [stack.embed_tokens.weight, stack.final_layernorm.weight, model.lm_head.weight]
        kinds, bases = [], []
        for layer in stack.layers:
            kind, mixer = _mixer_tensors(layer)
            kinds.append(kind)
            bases.append(len(tensors))
            ff = layer.feed_forward
            tensors += [layer.input_layernorm.weight, layer.pre_ff_layernorm.weight]
            tensors += [ff.gate_proj.weight, ff.up_proj.weight, ff.down_proj.weight, *mixer]
        with torch.no_grad():
            flat = [t.detach().reshape(-1) for t in tensors]
            self.weights = torch.cat(flat).numpy()
        sizes = [t.numel() for t in flat]
        self.offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=self.offsets[1:])
        self.kinds = np.array(kinds, dtype=np.int64)
        self.bases = np.array(bases, dtype=np.int64)


class Decoder:
    """Batch-1 recurrent decoding of `model` for up to `max_len` positions (prompt included).

    `prefill` the prompt, then `step` one byte at a time or `generate`. Reads the model's
    weights as they were at construction."""

    def __init__(self, model: NexusLM, max_len: int, threads: int | None = None) -> None:
        if not supported(model):
            raise ValueError("the fast decoder needs numba and a float32 model on the CPU")
        c = model.config
        self.model = model
        # The large matrix-vector products use this many threads (default: torch's count).
        self.threads = threads or torch.get_num_threads()
        self.packed = _Packed(model)  # ~20 ms at nexus-6m
        dims = np.zeros(_N_DIMS, dtype=np.int64)
        dims[_VOCAB], dims[_D_MODEL], dims[_MLP] = c.vocab_size, c.d_model, c.mlp_hidden
        dims[_E], dims[_N], dims[_R], dims[_K] = c.d_inner, c.d_state, c.dt_rank, c.d_conv
        dims[_HEADS], dims[_KV_HEADS], dims[_HEAD_DIM] = c.n_heads, c.n_kv_heads, c.head_dim
        dims[_SSM_HEADS], dims[_SSM_HEAD_DIM], dims[_GROUPS] = (
            c.ssm_heads,
            c.ssm_head_dim,
            c.n_groups,
        )
        dims[_MAX_LEN] = max_len
        self.dims = dims
        self.max_len = max_len
        self.eps = np.float32(c.norm_eps)
        self.min_arg, self.tiny = scan.ftz_args(torch.float32)
        # Two state regions per layer: (conv window, SSM state) or (keys, values).
        sizes = []
        for kind in self.packed.kinds:
            if kind == ATTENTION:
                sizes += [c.n_kv_heads * max_len * c.head_dim] * 2
            elif kind == MAMBA2:
                conv_dim = c.d_inner + 2 * c.n_groups * c.d_state
                sizes += [conv_dim * c.d_conv, c.d_inner * c.d_state]
            else:
                sizes += [c.d_inner * c.d_conv, c.d_inner * c.d_state]
        self.state_offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=self.state_offsets[1:])
        self.state = np.zeros(int(self.state_offsets[-1]), dtype=np.float32)
        self.length = 0  # positions in the cache
        self.logits = np.zeros(c.vocab_size, dtype=np.float32)

    def _region(self, index: int) -> np.ndarray:
        return self.state[self.state_offsets[index] : self.state_offsets[index + 1]]

    def prefill(self, prompt: list[int]) -> Tensor:
        """Run the prompt from empty caches and fill them; the last position's logits.

        A prompt of up to KERNEL_PREFILL_MAX bytes goes through the kernel a byte at a time
        (a 6-byte prompt: ~4 ms against ~11 ms for the PyTorch forward); a longer one through
        `NexusLM.prefill`, whose scans cover all positions at once."""
        if not 0 < len(prompt) <= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} positions for a decoder of {self.max_len}")
        self.state[:] = 0
        self.length = 0
        if len(prompt) <= KERNEL_PREFILL_MAX:
            for token in prompt:
                self._run(token, 1, _GREEDY, None)
            return torch.from_numpy(self.logits)
        logits, cache = self.model.prefill(torch.tensor([prompt], dtype=torch.long))
        T = len(prompt)
        for layer, state in enumerate(cache):
            first, second = self._region(2 * layer), self._region(2 * layer + 1)
            if isinstance(state, AttentionState):
                for region, cached in ((first, state.keys), (second, state.values)):
                    view = region.reshape(cached.shape[1], self.max_len, cached.shape[3])
                    view[:, :T] = cached[0].numpy()
            else:
                assert isinstance(state, (MambaState, Mamba2State))
                first[:] = state.conv[0].reshape(-1).numpy()
                second[:] = state.ssm[0].reshape(-1).numpy()
        self.length = T
        self.logits[:] = logits[0, -1].numpy()
        return torch.from_numpy(self.logits)

    def _run(self, token: int, count: int, sampling: Sampling, draws: Draws | None) -> np.ndarray:
        if self.length + count > self.max_len:
            raise ValueError(f"the decoder holds {self.max_len} positions")
        picks = np.zeros(count, dtype=np.int64)
        p = self.packed
        draw_state = draws.state if draws is not None else np.zeros(1, dtype=np.uint64)
        scan.use_numba_threads(self.threads)
        _decode(
            p.weights, p.offsets, p.bases, p.kinds, self.dims, self.state, self.state_offsets,
            self.eps, self.min_arg, self.tiny, token, self.length, count,
            np.float64(sampling.temperature), sampling.top_k, np.float64(sampling.top_p),
            draw_state, picks, self.logits,
        )  # fmt: skip
        self.length += count
        return picks

    def step(self, token: int) -> Tensor:
        """Feed one byte; the next position's logits (vocab,), a buffer the next call reuses."""
        self._run(token, 1, _GREEDY, None)
        return torch.from_numpy(self.logits)

    def pick(self, sampling: Sampling, draws: Draws) -> int:
        """The pick from the last logits (after `prefill` or `step`), as the kernel picks."""
        return int(pick_numba(self.logits, sampling.temperature, sampling.top_k,
                              sampling.top_p, draws.state))  # fmt: skip

    def generate(self, token: int, count: int, sampling: Sampling, draws: Draws) -> list[int]:
        """Feed `token`, then `count - 1` times the pick from the last logits; the `count`
        picks (the last one is not fed). Loops inside the kernel: no Python per byte."""
        if count <= 0:
            return []
        return self._run(token, count, sampling, draws).tolist()


if scan.numba is not None:
    _jit = scan.numba_jit
    _exp = scan.kernel_exp
    # No nnan/ninf: NaN and Inf still propagate. No contract, as in scan._KERNEL_OPTIONS: the
    # logits would depend on whether this process compiled the kernels or loaded them.
    _FASTMATH = {"reassoc"}
    _F0, _F1, _F20 = np.float32(0.0), np.float32(1.0), np.float32(20.0)
    _NEG_INF = np.float32(-np.inf)
    prange = scan.prange

    @_jit(fastmath=_FASTMATH)
    def _param(W, off, index):
        return W[off[index] : off[index + 1]]

    @_jit(fastmath=_FASTMATH)
    def _matvec_rows(M, x, out, start, stop):
        """out[start:stop] = M[start:stop] @ x. Four rows at a time, so each load of x serves
        four products (~5-10 % faster than one row at a time)."""
        cols = M.shape[1]
        j = start
        while j + 4 <= stop:
            acc0 = acc1 = acc2 = acc3 = _F0
            for i in range(cols):
                xi = x[i]
                acc0 += M[j, i] * xi
                acc1 += M[j + 1, i] * xi
                acc2 += M[j + 2, i] * xi
                acc3 += M[j + 3, i] * xi
            out[j], out[j + 1], out[j + 2], out[j + 3] = acc0, acc1, acc2, acc3
            j += 4
        for r in range(j, stop):
            acc = _F0
            for i in range(cols):
                acc += M[r, i] * x[i]
            out[r] = acc

    @_jit(parallel=True, fastmath=_FASTMATH)
    def _matvec_parallel(M, x, out):
        """_matvec_rows over _MATVEC_PARTS blocks of rows (multiples of 4, so every row is
        summed as in one serial call) on numba's threads."""
        rows = M.shape[0]
        block = -(-(rows // 4) // _MATVEC_PARTS) * 4
        for part in prange(_MATVEC_PARTS):
            _matvec_rows(M, x, out, min(rows, part * block), min(rows, (part + 1) * block))

    @_jit(fastmath=_FASTMATH)
    def _matvec(W, rows, cols, x, out):
        """out (rows,) = W (rows, cols) @ x (cols,), W flat row-major; large matrices on
        several threads (reading the weights is the bottleneck, and each core brings its own
        bandwidth)."""
        M = W.reshape((rows, cols))
        if rows * cols >= _PARALLEL_MIN_WEIGHTS:
            _matvec_parallel(M, x, out)
        else:
            _matvec_rows(M, x, out, 0, rows)

    @_jit(fastmath=_FASTMATH)
    def _rmsnorm(x, weight, eps, out):
        n = x.shape[0]
        acc = _F0
        for i in range(n):
            acc += x[i] * x[i]
        scale = _F1 / np.sqrt(acc / np.float32(n) + eps)
        for i in range(n):
            out[i] = weight[i] * (x[i] * scale)

    @_jit(fastmath=_FASTMATH)
    def _silu(v):
        return v / (_F1 + _exp(-v))

    @_jit(fastmath=_FASTMATH)
    def _softplus(v):
        # torch's softplus with its default threshold of 20
        return v if v > _F20 else np.float32(np.log1p(_exp(v)))

    @_jit(fastmath=_FASTMATH)
    def _conv_step(window, weight, bias, x, out):
        """Shift x into each channel's window (C, K) and out = silu(causal conv)."""
        channels = out.shape[0]
        K = weight.shape[0] // channels
        win = window.reshape((channels, K))
        w = weight.reshape((channels, K))
        for c in range(channels):
            for k in range(K - 1):
                win[c, k] = win[c, k + 1]
            win[c, K - 1] = x[c]
            acc = _F0
            for k in range(K):
                acc += win[c, k] * w[c, k]
            out[c] = _silu(acc + bias[c])

    @_jit(fastmath=_FASTMATH)
    def _mamba1(W, off, base, dims, xn, window, ssm, eps, min_arg, tiny, out):
        d, E, N, R = dims[_D_MODEL], dims[_E], dims[_N], dims[_R]
        b = base + _MIXER
        xz = np.empty(2 * E, dtype=np.float32)
        _matvec(_param(W, off, b + _M1_IN), 2 * E, d, xn, xz)
        x = np.empty(E, dtype=np.float32)
        _conv_step(window, _param(W, off, b + _M1_CONV_W), _param(W, off, b + _M1_CONV_B), xz, x)
        dbc = np.empty(R + 2 * N, dtype=np.float32)
        _matvec(_param(W, off, b + _M1_X), R + 2 * N, E, x, dbc)
        dt_low = np.empty(R, dtype=np.float32)
        Bn = np.empty(N, dtype=np.float32)
        Cn = np.empty(N, dtype=np.float32)
        _rmsnorm(dbc[:R], _param(W, off, b + _M1_DT_NORM), eps, dt_low)
        _rmsnorm(dbc[R : R + N], _param(W, off, b + _M1_B_NORM), eps, Bn)
        _rmsnorm(dbc[R + N :], _param(W, off, b + _M1_C_NORM), eps, Cn)
        dt = np.empty(E, dtype=np.float32)
        _matvec(_param(W, off, b + _M1_DT_W), E, R, dt_low, dt)
        dt_bias = _param(W, off, b + _M1_DT_B)
        A = _param(W, off, b + _M1_A).reshape((E, N))
        D = _param(W, off, b + _M1_D)
        h = ssm.reshape((E, N))
        y = np.empty(E, dtype=np.float32)
        for e in range(E):
            dte = _softplus(dt[e] + dt_bias[e])
            dx = dte * x[e]
            acc = _F0
            for n in range(N):
                arg = dte * A[e, n]
                decay = _exp(arg) if arg >= min_arg else _F0
                hv = decay * h[e, n] + dx * Bn[n]
                hv = hv if abs(hv) >= tiny else _F0
                h[e, n] = hv
                acc += hv * Cn[n]
            y[e] = (acc + D[e] * x[e]) * _silu(xz[E + e])
        _matvec(_param(W, off, b + _M1_OUT), d, E, y, out)

    @_jit(fastmath=_FASTMATH)
    def _mamba2(W, off, base, dims, xn, window, ssm, eps, min_arg, tiny, out):
        d, E, N = dims[_D_MODEL], dims[_E], dims[_N]
        H, P, G = dims[_SSM_HEADS], dims[_SSM_HEAD_DIM], dims[_GROUPS]
        conv_dim = E + 2 * G * N
        b = base + _MIXER
        rows = E + conv_dim + H  # [z; x, B, C; Δ]
        proj = np.empty(rows, dtype=np.float32)
        _matvec(_param(W, off, b + _M2_IN), rows, d, xn, proj)
        xbc = np.empty(conv_dim, dtype=np.float32)
        conv_w, conv_b = _param(W, off, b + _M2_CONV_W), _param(W, off, b + _M2_CONV_B)
        _conv_step(window, conv_w, conv_b, proj[E : E + conv_dim], xbc)
        dt_bias = _param(W, off, b + _M2_DT_BIAS)
        A = _param(W, off, b + _M2_A)
        D = _param(W, off, b + _M2_D)
        S = ssm.reshape((H, P, N))
        Bm = xbc[E : E + G * N].reshape((G, N))
        Cm = xbc[E + G * N :].reshape((G, N))
        y = np.empty(E, dtype=np.float32)
        heads_per_group = H // G
        for hd in range(H):
            g = hd // heads_per_group
            dt = _softplus(proj[E + conv_dim + hd] + dt_bias[hd])
            arg = dt * A[hd]
            decay = _exp(arg) if arg >= min_arg else _F0
            for p in range(P):
                xv = xbc[hd * P + p]
                dx = dt * xv
                acc = _F0
                for n in range(N):
                    hv = decay * S[hd, p, n] + dx * Bm[g, n]
                    hv = hv if abs(hv) >= tiny else _F0
                    S[hd, p, n] = hv
                    acc += hv * Cm[g, n]
                y[hd * P + p] = (acc + D[hd] * xv) * _silu(proj[hd * P + p])  # · silu(z)
        # The gated norm: rms-normalise each group of E / G channels.
        norm_w = _param(W, off, b + _M2_NORM)
        size = E // G
        gated = np.empty(E, dtype=np.float32)
        for g in range(G):
            _rmsnorm(y[g * size : (g + 1) * size], norm_w[g * size : (g + 1) * size], eps,
                     gated[g * size : (g + 1) * size])  # fmt: skip
        _matvec(_param(W, off, b + _M2_OUT), d, E, gated, out)

    @_jit(fastmath=_FASTMATH)
    def _attention(W, off, base, dims, xn, keys, values, pos, out):
        d, heads, kv_heads, hd = dims[_D_MODEL], dims[_HEADS], dims[_KV_HEADS], dims[_HEAD_DIM]
        max_len = dims[_MAX_LEN]
        b = base + _MIXER
        q = np.empty(heads * hd, dtype=np.float32)
        k = np.empty(kv_heads * hd, dtype=np.float32)
        v = np.empty(kv_heads * hd, dtype=np.float32)
        _matvec(_param(W, off, b + _AT_Q), heads * hd, d, xn, q)
        _matvec(_param(W, off, b + _AT_K), kv_heads * hd, d, xn, k)
        _matvec(_param(W, off, b + _AT_V), kv_heads * hd, d, xn, v)
        K3 = keys.reshape((kv_heads, max_len, hd))
        V3 = values.reshape((kv_heads, max_len, hd))
        for kv in range(kv_heads):
            for j in range(hd):
                K3[kv, pos, j] = k[kv * hd + j]
                V3[kv, pos, j] = v[kv * hd + j]
        T = pos + 1
        scale = _F1 / np.sqrt(np.float32(hd))
        scores = np.empty(T, dtype=np.float32)
        mixed = np.zeros(heads * hd, dtype=np.float32)
        group = heads // kv_heads
        for h in range(heads):
            kv = h // group
            best = _NEG_INF
            for t in range(T):
                acc = _F0
                for j in range(hd):
                    acc += q[h * hd + j] * K3[kv, t, j]
                acc *= scale
                scores[t] = acc
                best = max(best, acc)
            total = _F0
            for t in range(T):
                e = _exp(scores[t] - best)
                scores[t] = e
                total += e
            for t in range(T):
                weight = scores[t] / total
                for j in range(hd):
                    mixed[h * hd + j] += weight * V3[kv, t, j]
        _matvec(_param(W, off, b + _AT_O), d, heads * hd, mixed, out)

    @_jit(fastmath=_FASTMATH)
    def _mlp(W, off, base, dims, xn, out):
        d, hidden = dims[_D_MODEL], dims[_MLP]
        gate = np.empty(hidden, dtype=np.float32)
        up = np.empty(hidden, dtype=np.float32)
        _matvec(_param(W, off, base + _GATE), hidden, d, xn, gate)
        _matvec(_param(W, off, base + _UP), hidden, d, xn, up)
        for i in range(hidden):
            gate[i] = _silu(gate[i]) * up[i]
        _matvec(_param(W, off, base + _DOWN), d, hidden, gate, out)

    @_jit(fastmath=_FASTMATH)
    def _decode(
        W, off, bases, kinds, dims, state, state_off, eps, min_arg, tiny, token, length, count,
        temperature, top_k, top_p, draw_state, picks, logits,
    ):  # fmt: skip
        """Feed `token` at position `length` and `count - 1` more, each the pick (see
        nexus.sampling) from the logits before it; logits gets the last position's."""
        vocab, d = dims[_VOCAB], dims[_D_MODEL]
        embed = _param(W, off, _EMBED).reshape((vocab, d))
        hidden = np.empty(d, dtype=np.float32)
        xn = np.empty(d, dtype=np.float32)
        mixed = np.empty(d, dtype=np.float32)
        for i in range(count):
            for j in range(d):
                hidden[j] = embed[token, j]
            for layer in range(kinds.shape[0]):
                base = bases[layer]
                first = state[state_off[2 * layer] : state_off[2 * layer + 1]]
                second = state[state_off[2 * layer + 1] : state_off[2 * layer + 2]]
                _rmsnorm(hidden, _param(W, off, base + _IN_NORM), eps, xn)
                kind = kinds[layer]
                if kind == ATTENTION:
                    _attention(W, off, base, dims, xn, first, second, length + i, mixed)
                elif kind == MAMBA2:
                    _mamba2(W, off, base, dims, xn, first, second, eps, min_arg, tiny, mixed)
                else:
                    _mamba1(W, off, base, dims, xn, first, second, eps, min_arg, tiny, mixed)
                for j in range(d):
                    hidden[j] += mixed[j]
                _rmsnorm(hidden, _param(W, off, base + _FF_NORM), eps, xn)
                _mlp(W, off, base, dims, xn, mixed)
                for j in range(d):
                    hidden[j] += mixed[j]
            _rmsnorm(hidden, _param(W, off, _FINAL_NORM), eps, xn)
            _matvec(_param(W, off, _HEAD), vocab, d, xn, logits)
            token = pick_numba(logits, temperature, top_k, top_p, draw_state)
            picks[i] = token
