"""Tests for nexus.scan: the fast numba scan against the reference, the reference against an
explicit numpy loop, finite-difference gradients, cached stepping and the fallback path."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nexus import scan
from nexus.scan import (
    selective_scan,
    selective_scan_reference,
    selective_scan_step,
)

needs_numba = pytest.mark.skipif(not scan.FAST_PATH_ENABLED, reason="numba fast path unavailable")

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def make_inputs(batch, steps, dim, n_state, regime="normal", dtype=torch.float32, seed=0):
    """x, dt, A, Bm, Cm, Dskip as leaf tensors that require grad."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    x = randn(batch, steps, dim)
    if regime == "normal":
        dt = F.softplus(randn(batch, steps, dim) - 1.0)
        A = -torch.exp(randn(dim, n_state))
    elif regime == "strong":  # decays down to exp(-250): underflow territory
        dt = 0.5 + 4.5 * rand(batch, steps, dim)
        A = -(1.0 + 49.0 * rand(dim, n_state))
    elif regime == "realistic":  # Mamba's dt init: softplus(bias) log-uniform in [1e-3, 1e-1]
        target = torch.exp(np.log(1e-3) + (np.log(1e-1) - np.log(1e-3)) * rand(dim))
        bias = target + torch.log(-torch.expm1(-target))  # inverse softplus
        dt = F.softplus(bias + 0.5 * randn(batch, steps, dim))
        A = -torch.arange(1, n_state + 1, dtype=torch.float64).repeat(dim, 1)  # S4D-real
    else:
        raise ValueError(regime)
    Bm = randn(batch, steps, n_state)
    Cm = randn(batch, steps, n_state)
    Dskip = randn(dim)
    return [t.to(dtype).requires_grad_() for t in (x, dt, A, Bm, Cm, Dskip)]


def outputs_and_grads(fn, inputs, seed=1):
    """y, h_last and the gradients of all six inputs for random upstream gradients."""
    for t in inputs:
        t.grad = None
    y, h_last = fn(*inputs, return_state=True)
    gen = torch.Generator().manual_seed(seed)
    g_y = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    g_h = torch.randn(h_last.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    ((y * g_y).sum() + (h_last * g_h).sum()).backward()
    return [y.detach(), h_last.detach()] + [t.grad.clone() for t in inputs]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


NAMES = ["y", "h_last", "grad_x", "grad_dt", "grad_A", "grad_Bm", "grad_Cm", "grad_Dskip"]

CASES = [
    # (B, T, D, N, regime, dtype)
    (2, 16, 8, 4, "normal", torch.float32),
    (2, 16, 8, 4, "normal", torch.float64),
    (4, 128, 512, 16, "realistic", torch.float32),  # the reference training shape
    (4, 128, 64, 16, "realistic", torch.float64),
    (1, 1024, 32, 8, "realistic", torch.float32),  # long sequence, B = 1
    (1, 1024, 32, 8, "strong", torch.float32),
    (2, 64, 16, 8, "strong", torch.float64),
    (1, 8, 1030, 4, "normal", torch.float32),  # D not a multiple of chunks or lanes
    (3, 5, 37, 3, "normal", torch.float64),
]


@needs_numba
@pytest.mark.parametrize(("batch", "steps", "dim", "n_state", "regime", "dtype"), CASES)
def test_fast_matches_reference(batch, steps, dim, n_state, regime, dtype):
    inputs = make_inputs(batch, steps, dim, n_state, regime, dtype)
    fast = outputs_and_grads(selective_scan, inputs)
    ref = outputs_and_grads(selective_scan_reference, inputs)
    for name, a, b in zip(NAMES, fast, ref, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name} has NaN/Inf"
        assert rel_err(a, b) < TOLERANCE[dtype], f"{name}: rel err {rel_err(a, b):.2e}"


@needs_numba
def test_fast_gradients_match_finite_differences():
    inputs = make_inputs(2, 6, 5, 3, "normal", torch.float64)
    assert torch.autograd.gradcheck(
        lambda *args: selective_scan(*args, return_state=True),
        inputs,
        eps=1e-6,
        atol=1e-7,
        fast_mode=True,
    )


@needs_numba
def test_fast_handles_non_contiguous_inputs_and_thread_counts():
    inputs = make_inputs(2, 32, 48, 8, "normal")
    ref = outputs_and_grads(selective_scan, inputs)
    # Same values through transposed (non-contiguous) storage.
    x, dt, A, Bm, Cm, Dskip = (t.detach() for t in inputs)
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2), dt, A.t().contiguous().t()]
    strided = [t.requires_grad_() for t in [*strided, Bm.clone(), Cm.clone(), Dskip.clone()]]
    assert not strided[0].is_contiguous() and not strided[2].is_contiguous()
    for a, b in zip(outputs_and_grads(selective_scan, strided), ref, strict=True):
        assert torch.equal(a, b)
    # The work split does not depend on the thread count, so results are bit-identical.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = outputs_and_grads(selective_scan, inputs)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, ref, strict=True):
        assert torch.equal(a, b)


@needs_numba
def test_fast_scan_is_a_well_formed_custom_op():
    # Fake (shape-only) kernels, autograd registration and schema, as torch.compile needs them.
    inputs = make_inputs(2, 8, 8, 4, "normal", torch.float64)
    torch.library.opcheck(scan._scan_forward_op, inputs)


@needs_numba
def test_compiled_scan_has_one_graph_and_the_same_results():
    inputs = make_inputs(2, 16, 8, 4, "normal")
    compiled = torch.compile(selective_scan, fullgraph=True, dynamic=False)  # no graph break
    for name, a, b in zip(
        NAMES,
        outputs_and_grads(compiled, inputs),
        outputs_and_grads(selective_scan, inputs),
        strict=True,
    ):
        assert torch.equal(a, b), name


def explicit_scan(x, dt, A, Bm, Cm, Dskip):
    """The recurrence written out element by element in float64 numpy."""
    batch, steps, dim = x.shape
    n_state = A.shape[1]
    y = np.zeros((batch, steps, dim))
    h = np.zeros((batch, dim, n_state))
    for b in range(batch):
        for d in range(dim):
            for t in range(steps):
                total = 0.0
                for n in range(n_state):
                    decay = np.exp(dt[b, t, d] * A[d, n])
                    h[b, d, n] = decay * h[b, d, n] + dt[b, t, d] * Bm[b, t, n] * x[b, t, d]
                    total += Cm[b, t, n] * h[b, d, n]
                y[b, t, d] = total + Dskip[d] * x[b, t, d]
    return y, h


@pytest.mark.parametrize("regime", ["normal", "strong"])
def test_reference_matches_explicit_loop(regime):
    inputs = make_inputs(2, 7, 3, 4, regime, torch.float64)
    arrays = [t.detach().numpy() for t in inputs]
    y_expected, h_expected = explicit_scan(*arrays)
    y, h_last = selective_scan_reference(*inputs, return_state=True)
    np.testing.assert_allclose(y.detach().numpy(), y_expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h_last.detach().numpy(), h_expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stepping_matches_scan_final_state(dtype):
    x, dt, A, Bm, Cm, Dskip = (t.detach() for t in make_inputs(2, 40, 24, 8, "normal", dtype))
    y_scan, h_scan = selective_scan(x, dt, A, Bm, Cm, Dskip, return_state=True)
    state = torch.zeros_like(h_scan)
    ys = []
    for t in range(x.shape[1]):
        y_t, state = selective_scan_step(state, x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], Dskip)
        ys.append(y_t)
    assert rel_err(torch.stack(ys, dim=1), y_scan) < TOLERANCE[dtype]
    assert rel_err(state, h_scan) < TOLERANCE[dtype]


def test_fallback_equals_reference(monkeypatch):
    monkeypatch.setattr(scan, "FAST_PATH_ENABLED", False)
    inputs = make_inputs(2, 16, 8, 4, "normal")
    for a, b in zip(
        outputs_and_grads(selective_scan, inputs),
        outputs_and_grads(selective_scan_reference, inputs),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_env_var_disables_numba():
    env = {**os.environ, "NEXUS_DISABLE_NUMBA": "1"}
    code = "import nexus.scan as s; print(s.FAST_PATH_ENABLED)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_return_convention_and_shape_errors():
    x, dt, A, Bm, Cm, Dskip = (t.detach() for t in make_inputs(2, 5, 6, 3))
    assert selective_scan(x, dt, A, Bm, Cm, Dskip).shape == (2, 5, 6)
    y, h_last = selective_scan(x, dt, A, Bm, Cm, Dskip, return_state=True)
    assert y.shape == (2, 5, 6) and h_last.shape == (2, 6, 3)
    with pytest.raises(ValueError, match="Bm"):
        selective_scan(x, dt, A, Bm[:, :4], Cm, Dskip)
    with pytest.raises(ValueError, match="A has shape"):
        selective_scan(x, dt, A.t(), Bm, Cm, Dskip)


# The scan's forward and backward and the decoder's logits, digested, with whether numba
# compiled the kernels in this process or loaded them from its on-disk cache.
KERNEL_DIGEST = r"""
import hashlib, torch
from nexus import decode, scan
from nexus.config import preset
from nexus.model import NexusLM
torch.manual_seed(0)
x, dt, Bm, Cm = torch.randn(2, 64, 128), torch.rand(2, 64, 128) * 0.2, *torch.randn(2, 2, 64, 16)
A, Dskip = -torch.rand(128, 16) * 4 - 0.5, torch.randn(128)
inputs = [t.requires_grad_() for t in (x, dt, A, Bm, Cm, Dskip)]
y, h_last = scan.selective_scan(*inputs, return_state=True)
(y.square().sum() + h_last.sum()).backward()
decoder = decode.Decoder(NexusLM(preset("nexus-tiny")).eval(), 16)
logits = [decoder.prefill(list(b"To be")).clone()] + [decoder.step(b).clone() for b in b" or not"]
digest = hashlib.sha256()
for t in [y, h_last, *(t.grad for t in inputs), *logits]:
    digest.update(t.detach().numpy().tobytes())
kernels = (scan._scan_fwd, scan._scan_bwd, decode._decode)
print(digest.hexdigest(), all(sum(k.stats.cache_hits.values()) for k in kernels))
"""


@needs_numba
def test_compiling_and_cache_loading_processes_agree(tmp_path):
    """Issue 13: a process that compiles the numba kernels and one that loads them from the
    on-disk cache compute the same bits (with fastmath `contract` they did not: numba
    optimises a prange body twice, and the two copies fused different products into FMAs)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    command = [sys.executable, "-c", KERNEL_DIGEST]
    compiled, loaded = (
        subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.split()
        for _ in range(2)
    )
    assert compiled[1] == "False" and loaded[1] == "True"  # the first compiled, the second loaded
    assert compiled[0] == loaded[0]
