"""The Mamba-1 selective scan as Triton kernels, forward and backward, for CUDA tensors.

Owns the kernels, their launchers and the two `torch.library` custom ops around them
(`nexus::selective_scan_triton_fwd` / `_bwd`), with fake (shape-only) implementations and
the autograd registration, so that autograd sees one node per scan and `torch.compile` keeps
each scan whole instead of unrolling its time loop. `selective_scan_triton` is the entry
point; `nexus.scan.selective_scan` calls it for CUDA tensors. The recurrence and its meaning
are those of `nexus.scan` (the sequential reference there is what the tests hold this to).

Algorithm. The grid is (batch, blocks of `block_d` channels). Each program keeps its state,
a (block_d, N) tile, in fp32 registers and walks time, one step per iteration: it loads
x_t, dt_t (applying softplus when `dt_softplus`), Bm_t and Cm_t, updates the state and writes
y_t = Cm_t . h_t + Dskip * x_t. Every `chunk` steps it also writes the state that enters the
chunk to a checkpoint tensor, which is the op's third output and what the backward keeps.

The backward runs the same grid and walks the chunks in reverse. For each chunk it reloads
the checkpoint, recomputes the chunk's states into a scratch tile private to the program,
then walks the chunk's steps backwards carrying dL/dh. Per-channel gradients (x, dt) are
written directly. Gradients that sum over channels (Bm, Cm) or over the batch (A, Dskip) are
written as per-program partials and summed in a second small pass, in a fixed order: the
result is bit-for-bit reproducible from run to run, which exact resume relies on (atomics
would sum in whatever order the programs finish).

Inputs may be float32 or bfloat16, each its own; the kernels load every value as fp32 and
accumulate in fp32. y and h_last take the promoted dtype of the inputs, each gradient its
input's dtype.

Triton is optional: without it (or on a machine where it cannot be imported) this module
still imports and `AVAILABLE` is False. With `TRITON_INTERPRET=1` set before this module is
imported, the kernels are built for Triton's interpreter and run on CPU tensors; the tests
use that. `INTERPRETED` records which build this process has.
"""

import contextlib

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:
    triton = None

AVAILABLE: bool = triton is not None
"""Whether the Triton kernels exist in this process (triton imported)."""

CHUNK_STEPS = 64
"""Steps between two checkpointed states. The backward holds one chunk of recomputed states
per program, so this trades checkpoint memory (T / chunk states) against scratch (chunk)."""

BLOCK_D = 32
"""Channels per program; the state tile is (BLOCK_D, next power of two >= N)."""

_SUM_BLOCK = 256  # elements per program in the partial-sum pass

# Fused multiply-adds on, said explicitly: Triton 3.10 turns its default off, and the bits a
# run reproduces should not change with the Triton release. The interpreter ignores it.
_COMPILE_OPTIONS = {"enable_fp_fusion": True}


def selective_scan_triton(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    Bm: Tensor,
    Cm: Tensor,
    Dskip: Tensor,
    dt_softplus: bool = False,
    chunk: int = CHUNK_STEPS,
    block_d: int = BLOCK_D,
) -> tuple[Tensor, Tensor]:
    """The scan through the Triton ops: returns (y (B,T,D), h_last (B,D,N)).

    Shapes and meaning as `nexus.scan.selective_scan`; with `dt_softplus`, dt is the raw
    value and the kernels use softplus(dt) (and its derivative in the backward). `chunk` and
    `block_d` change only the work split and memory, never the result beyond rounding.
    """
    y, h_last, _ = selective_scan_triton_fwd(x, dt, A, Bm, Cm, Dskip, dt_softplus, chunk, block_d)
    return y, h_last


def _num_chunks(steps: int, chunk: int) -> int:
    return max(1, -(-steps // chunk))


@torch.library.custom_op("nexus::selective_scan_triton_fwd", mutates_args=())
def selective_scan_triton_fwd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    Bm: Tensor,
    Cm: Tensor,
    Dskip: Tensor,
    dt_softplus: bool = False,
    chunk: int = CHUNK_STEPS,
    block_d: int = BLOCK_D,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> y (B,T,D), h_last (B,D,N), checkpoints (B, chunks, D, N) fp32 for the backward."""
    _require_triton()
    x, dt, A, Bm, Cm, Dskip = (t.contiguous() for t in (x, dt, A, Bm, Cm, Dskip))
    batch, steps, dim = x.shape
    n_state = A.shape[1]
    out_dtype = _promoted_dtype(x, dt, A, Bm, Cm, Dskip)
    n_chunks = _num_chunks(steps, chunk)
    y = x.new_empty(batch, steps, dim, dtype=out_dtype)
    h_last = x.new_empty(batch, dim, n_state, dtype=out_dtype)
    checkpoints = x.new_empty(batch, n_chunks, dim, n_state, dtype=torch.float32)
    grid = (batch, triton.cdiv(dim, block_d))
    with _on_device(x):
        _scan_fwd_kernel[grid](
            x, dt, A, Bm, Cm, Dskip, y, h_last, checkpoints,
            steps, dim, n_state, chunk, n_chunks,
            SOFTPLUS=dt_softplus, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(n_state),
            **_COMPILE_OPTIONS,
        )  # fmt: skip
    return y, h_last, checkpoints


@selective_scan_triton_fwd.register_fake
def _(x, dt, A, Bm, Cm, Dskip, dt_softplus=False, chunk=CHUNK_STEPS, block_d=BLOCK_D):
    batch, steps, dim = x.shape
    n_state = A.shape[1]
    out_dtype = _promoted_dtype(x, dt, A, Bm, Cm, Dskip)
    return (
        x.new_empty(batch, steps, dim, dtype=out_dtype),
        x.new_empty(batch, dim, n_state, dtype=out_dtype),
        x.new_empty(batch, _num_chunks(steps, chunk), dim, n_state, dtype=torch.float32),
    )


@torch.library.custom_op("nexus::selective_scan_triton_bwd", mutates_args=())
def selective_scan_triton_bwd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    Bm: Tensor,
    Cm: Tensor,
    Dskip: Tensor,
    checkpoints: Tensor,
    grad_y: Tensor,
    grad_h_last: Tensor,
    dt_softplus: bool = False,
    chunk: int = CHUNK_STEPS,
    block_d: int = BLOCK_D,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> gradients of x, dt, A, Bm, Cm, Dskip, each in its input's dtype."""
    _require_triton()
    tensors = (x, dt, A, Bm, Cm, Dskip, checkpoints, grad_y, grad_h_last)
    x, dt, A, Bm, Cm, Dskip, checkpoints, grad_y, grad_h_last = (t.contiguous() for t in tensors)
    batch, steps, dim = x.shape
    n_state = A.shape[1]
    n_blocks = triton.cdiv(dim, block_d)
    block_n = triton.next_power_of_2(n_state)
    f32 = torch.float32
    grad_x = torch.empty_like(x)
    grad_dt = torch.empty_like(dt)
    # Partials, summed below: Bm/Cm per channel block, A/Dskip per batch row.
    grad_B_parts = x.new_empty(n_blocks, batch, steps, n_state, dtype=f32)
    grad_C_parts = x.new_empty(n_blocks, batch, steps, n_state, dtype=f32)
    grad_A_parts = x.new_empty(batch, dim, n_state, dtype=f32)
    grad_D_parts = x.new_empty(batch, dim, dtype=f32)
    # One chunk of recomputed states per program; rows beyond the steps are never touched.
    scratch_rows = min(chunk, max(steps, 1))
    scratch = x.new_empty(batch, n_blocks, scratch_rows, block_d, block_n, dtype=f32)
    with _on_device(x):
        _scan_bwd_kernel[(batch, n_blocks)](
            x, dt, A, Bm, Cm, Dskip, checkpoints, grad_y, grad_h_last, scratch,
            grad_x, grad_dt, grad_A_parts, grad_B_parts, grad_C_parts, grad_D_parts,
            batch, steps, dim, n_state, chunk, checkpoints.shape[1], n_blocks, scratch_rows,
            SOFTPLUS=dt_softplus, BLOCK_D=block_d, BLOCK_N=block_n, **_COMPILE_OPTIONS,
        )  # fmt: skip
        grad_A = _sum_parts(grad_A_parts, A.dtype)
        grad_B = _sum_parts(grad_B_parts, Bm.dtype)
        grad_C = _sum_parts(grad_C_parts, Cm.dtype)
        grad_D = _sum_parts(grad_D_parts, Dskip.dtype)
    return grad_x, grad_dt, grad_A, grad_B, grad_C, grad_D


@selective_scan_triton_bwd.register_fake
def _(x, dt, A, Bm, Cm, Dskip, checkpoints, grad_y, grad_h_last, *settings):
    return tuple(t.new_empty(t.shape) for t in (x, dt, A, Bm, Cm, Dskip))  # contiguous


def _save_for_backward(ctx, inputs, output) -> None:
    x, dt, A, Bm, Cm, Dskip, dt_softplus, chunk, block_d = inputs
    checkpoints = output[2]
    ctx.mark_non_differentiable(checkpoints)
    ctx.save_for_backward(x, dt, A, Bm, Cm, Dskip, checkpoints)
    ctx.settings = (dt_softplus, chunk, block_d)


def _backward(ctx, grad_y: Tensor | None, grad_h_last: Tensor | None, _grad_checkpoints):
    x, dt, A, Bm, Cm, Dskip, checkpoints = ctx.saved_tensors
    out_dtype = _promoted_dtype(x, dt, A, Bm, Cm, Dskip)
    if grad_y is None:
        grad_y = x.new_zeros(x.shape, dtype=out_dtype)
    if grad_h_last is None:
        grad_h_last = x.new_zeros(x.shape[0], x.shape[2], A.shape[1], dtype=out_dtype)
    grads = selective_scan_triton_bwd(
        x, dt, A, Bm, Cm, Dskip, checkpoints, grad_y, grad_h_last, *ctx.settings
    )
    return (*grads, None, None, None)


selective_scan_triton_fwd.register_autograd(_backward, setup_context=_save_for_backward)


def _promoted_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton selective scan needs triton: pip install 'nexus[triton]'")


def _on_device(x: Tensor) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device; make it the inputs' device.
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _sum_parts(parts: Tensor, dtype: torch.dtype) -> Tensor:
    """Sum over the leading dimension, in its order, into a tensor of `dtype`."""
    out = parts.new_empty(parts.shape[1:], dtype=dtype)
    size = out.numel()
    grid = (triton.cdiv(size, _SUM_BLOCK),)
    _sum_parts_kernel[grid](parts, out, parts.shape[0], size, BLOCK=_SUM_BLOCK, **_COMPILE_OPTIONS)
    return out


if triton is not None:

    @triton.jit
    def _softplus(v):
        # max(v, 0) + log1p(exp(-|v|)), with log1p(e) = log(u) * e / (u - 1), u = 1 + e
        # (Goldberg): accurate for tiny e, where log(1 + e) would round to 0.
        e = tl.exp(-tl.abs(v))
        u = 1.0 + e
        is_one = u == 1.0
        log1p = tl.where(is_one, e, tl.log(u) * e / tl.where(is_one, 1.0, u - 1.0))
        return tl.maximum(v, 0.0) + log1p

    @triton.jit
    def _sigmoid(v):
        # The derivative of softplus, without overflow for either sign of v.
        e = tl.exp(-tl.abs(v))
        return tl.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))

    @triton.jit
    def _scan_fwd_kernel(
        X, DT, A, BM, CM, DSKIP, Y, H_LAST, CKPT,
        steps, dim, n_state, chunk, n_chunks,
        SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < dim
        mask_n = offs_n < n_state
        mask_dn = mask_d[:, None] & mask_n[None, :]
        tile_dn = offs_d[:, None] * n_state + offs_n[None, :]  # (BLOCK_D, BLOCK_N) in (D, N)
        # Padding lanes load zeros, so their states stay 0 and add nothing to y.
        a = tl.load(A + tile_dn, mask=mask_dn, other=0.0).to(tl.float32)
        dskip = tl.load(DSKIP + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for c in range(0, n_chunks):
            tl.store(CKPT + (b * n_chunks + c) * dim * n_state + tile_dn, h, mask=mask_dn)
            t_end = tl.minimum(steps, (c + 1) * chunk)
            for t in range(c * chunk, t_end):
                row = b * steps + t
                x = tl.load(X + row * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                dt = tl.load(DT + row * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                if SOFTPLUS:
                    dt = _softplus(dt)
                bm = tl.load(BM + row * n_state + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                cm = tl.load(CM + row * n_state + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                decay = tl.exp(dt[:, None] * a)
                h = decay * h + (dt * x)[:, None] * bm[None, :]
                y = tl.sum(h * cm[None, :], axis=1) + dskip * x  # (BLOCK_D,)
                tl.store(Y + row * dim + offs_d, y.to(Y.dtype.element_ty), mask=mask_d)
        h_out = H_LAST + b * dim * n_state + tile_dn
        tl.store(h_out, h.to(H_LAST.dtype.element_ty), mask=mask_dn)

    @triton.jit
    def _scan_bwd_kernel(
        X, DT, A, BM, CM, DSKIP, CKPT, GY, GH_LAST, SCRATCH,
        GX, GDT, GA_PARTS, GB_PARTS, GC_PARTS, GD_PARTS,
        batch, steps, dim, n_state, chunk, n_chunks, n_blocks, scratch_rows,
        SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        offs_d = block * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < dim
        mask_n = offs_n < n_state
        mask_dn = mask_d[:, None] & mask_n[None, :]
        tile_dn = offs_d[:, None] * n_state + offs_n[None, :]
        a = tl.load(A + tile_dn, mask=mask_dn, other=0.0).to(tl.float32)
        dskip = tl.load(DSKIP + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        # dL/dh_t from the steps after t (and from h_last), carried backwards through time.
        g_carry = tl.load(GH_LAST + b * dim * n_state + tile_dn, mask=mask_dn, other=0.0)
        g_carry = g_carry.to(tl.float32)
        g_a = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        g_dskip = tl.zeros((BLOCK_D,), dtype=tl.float32)
        # This program's scratch: (scratch_rows, BLOCK_D, BLOCK_N), the states entering each
        # step of the current chunk. Private and padded, so it needs no mask.
        tile_local = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]
        scratch = SCRATCH + (b * n_blocks + block) * scratch_rows * BLOCK_D * BLOCK_N
        gb_rows = GB_PARTS + (block * batch + b) * steps * n_state
        gc_rows = GC_PARTS + (block * batch + b) * steps * n_state
        for c_rev in range(0, n_chunks):
            c = n_chunks - 1 - c_rev
            t_start = c * chunk
            t_end = tl.minimum(steps, t_start + chunk)
            ckpt = CKPT + (b * n_chunks + c) * dim * n_state + tile_dn
            h = tl.load(ckpt, mask=mask_dn, other=0.0)
            for t in range(t_start, t_end):
                tl.store(scratch + (t - t_start) * BLOCK_D * BLOCK_N + tile_local, h)
                row = b * steps + t
                x = tl.load(X + row * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                dt = tl.load(DT + row * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                if SOFTPLUS:
                    dt = _softplus(dt)
                bm = tl.load(BM + row * n_state + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                h = tl.exp(dt[:, None] * a) * h + (dt * x)[:, None] * bm[None, :]
            # The threads that read a scratch element need not be the ones that wrote it.
            tl.debug_barrier()
            for t_back in range(t_start, t_end):
                t = t_end - 1 - (t_back - t_start)
                h_prev = tl.load(scratch + (t - t_start) * BLOCK_D * BLOCK_N + tile_local)
                row = b * steps + t
                x = tl.load(X + row * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                dt_in = tl.load(DT + row * dim + offs_d, mask=mask_d, other=0.0)
                dt_in = dt_in.to(tl.float32)
                dt = dt_in
                if SOFTPLUS:
                    dt = _softplus(dt_in)
                bm = tl.load(BM + row * n_state + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                cm = tl.load(CM + row * n_state + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                gy = tl.load(GY + row * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                decay = tl.exp(dt[:, None] * a)
                dtx = dt * x
                h = decay * h_prev + dtx[:, None] * bm[None, :]  # the state after step t
                g_h = gy[:, None] * cm[None, :] + g_carry  # dL/dh_t
                g_c = tl.sum(gy[:, None] * h, axis=0)  # this block's part of dL/dCm_t
                g_b = tl.sum(g_h * dtx[:, None], axis=0)  # this block's part of dL/dBm_t
                tl.store(gc_rows + t * n_state + offs_n, g_c, mask=mask_n)
                tl.store(gb_rows + t * n_state + offs_n, g_b, mask=mask_n)
                g_arg = g_h * decay * h_prev  # dL/d(dt * A)
                g_a += g_arg * dt[:, None]
                g_dtx = tl.sum(g_h * bm[None, :], axis=1)  # dL/d(dt * x)
                g_dt = tl.sum(g_arg * a, axis=1) + g_dtx * x
                if SOFTPLUS:
                    g_dt = g_dt * _sigmoid(dt_in)
                g_x = g_dtx * dt + dskip * gy
                g_dskip += gy * x
                tl.store(GX + row * dim + offs_d, g_x.to(GX.dtype.element_ty), mask=mask_d)
                tl.store(GDT + row * dim + offs_d, g_dt.to(GDT.dtype.element_ty), mask=mask_d)
                g_carry = g_h * decay
            # The next chunk's recompute overwrites the scratch that this one read.
            tl.debug_barrier()
        tl.store(GA_PARTS + b * dim * n_state + tile_dn, g_a, mask=mask_dn)
        tl.store(GD_PARTS + b * dim + offs_d, g_dskip, mask=mask_d)

    @triton.jit
    def _sum_parts_kernel(PARTS, OUT, n_parts, size, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < size
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for p in range(0, n_parts):
            total += tl.load(PARTS + p * size + offs, mask=mask, other=0.0)
        tl.store(OUT + offs, total.to(OUT.dtype.element_ty), mask=mask)


INTERPRETED: bool = AVAILABLE and isinstance(_scan_fwd_kernel, InterpretedFunction)
"""Whether the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""
