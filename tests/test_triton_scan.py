"""Tests for nexus.triton_scan: the Triton selective scan against the float64 reference and the
numba kernel, forward and every gradient, on awkward shapes.

Where to run the kernels. On a machine without CUDA this file sets TRITON_INTERPRET=1 before
anything imports nexus.triton_scan, and the kernels run on CPU tensors in Triton's
interpreter; with CUDA they run on the GPU. Triton reads the flag when a kernel is decorated,
i.e. when nexus.triton_scan is imported, not when triton is. Nothing in Nexus imports that
module on a CPU-only machine (`selective_scan` imports it for CUDA tensors only), so within a
pytest run this file is the first to import it and the flag takes, whichever test modules
ran before. Should the module nonetheless have been built without the flag and no GPU be
there, the kernel tests skip saying so, rather than running in a subprocess: a second way to
run them would hide that something imported the module too early.

The interpreter runs numpy per kernel operation, slowly, and has no bfloat16 arithmetic, so
channel counts are small and the bfloat16 input path is tested by rounding inputs to bfloat16
and handing the kernel float32 (what its loads do on the GPU). Tolerances: the kernels keep
every value in fp32 (unit roundoff u = 2**-24), and rounding errors add up along the T steps
of the recurrence and the sums over N and over the channels, so results are held to
2 (T + N + D) u relative to the largest value: 2e-6 at T = 1, 2e-5 at T = 130 (where
test_scan holds the numba kernel to 1e-5); the kernels stay 12 times or more inside it.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from test_scan import NAMES, make_inputs, outputs_and_grads, rel_err

from nexus import scan, triton_scan
from nexus.scan import selective_scan, selective_scan_reference

if not triton_scan.AVAILABLE:
    DEVICE, SKIP_REASON = None, "triton cannot be imported (pip install -e '.[triton]')"
elif triton_scan.INTERPRETED:
    DEVICE, SKIP_REASON = "cpu", ""
elif torch.cuda.is_available():
    DEVICE, SKIP_REASON = "cuda", ""
else:
    DEVICE, SKIP_REASON = None, "nexus.triton_scan was imported before TRITON_INTERPRET=1 was set"

needs_triton = pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)
needs_cuda = pytest.mark.skipif(
    DEVICE != "cuda", reason="needs a CUDA GPU with triton (bfloat16 tensors, dispatch)"
)


def tolerance(inputs: list[torch.Tensor]) -> float:
    """The fp32 bound of the module docstring for these inputs' T, N and D."""
    _, steps, dim = inputs[0].shape
    return 2 * (steps + inputs[2].shape[1] + dim) * 2.0**-24


def on_device(inputs: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> list:
    return [t.detach().to(DEVICE, dtype).requires_grad_() for t in inputs]


def triton_fn(**settings):
    """selective_scan_triton with `settings`, in outputs_and_grads's calling convention."""

    def scan_fn(*inputs, return_state):
        return triton_scan.selective_scan_triton(*inputs, **settings)

    return scan_fn


def assert_close(results, expected, bound, label="", names=NAMES):
    for name, a, b in zip(names, results, expected, strict=True):
        a = a.detach().cpu().double()
        assert a.shape == b.shape, f"{label}{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.isfinite(a).all(), f"{label}{name} has NaN/Inf"
        error = rel_err(a, b.double().cpu())
        assert error < bound, f"{label}{name}: rel err {error:.2e} > {bound:.1e}"


# (B, T, D, N, regime, chunk, block_d): T = 1, 5, 130; D smaller than a block, or not a
# multiple of it; N = 8 and 16; batch 1 and 3; T above the chunk and not a multiple of it.
CASES = [
    (1, 1, 5, 8, "normal", 64, 32),
    (3, 5, 13, 16, "normal", 2, 8),  # two channel blocks, the last part-filled; chunks 2,2,1
    (1, 130, 10, 16, "realistic", 64, 8),  # chunks of 64, 64, 2
    (2, 130, 3, 8, "strong", 48, 32),  # decays down to exp(-250); chunks 48, 48, 34
]


@needs_triton
@pytest.mark.parametrize(("batch", "steps", "dim", "n_state", "regime", "chunk", "block_d"), CASES)
def test_matches_reference_and_numba(batch, steps, dim, n_state, regime, chunk, block_d):
    inputs = make_inputs(batch, steps, dim, n_state, regime, torch.float64)
    expected = outputs_and_grads(selective_scan_reference, inputs)
    results = outputs_and_grads(triton_fn(chunk=chunk, block_d=block_d), on_device(inputs))
    for r in results:
        assert r.dtype == torch.float32 and r.device.type == DEVICE
    assert_close(results, expected, tolerance(inputs))
    if scan.FAST_PATH_ENABLED:  # numba holds to the same bound, so both are within twice it
        cpu_inputs = [t.detach().float().requires_grad_() for t in inputs]
        numba_results = outputs_and_grads(selective_scan, cpu_inputs)
        assert_close(results, numba_results, 2 * tolerance(inputs), "vs numba: ")


@needs_triton
@pytest.mark.parametrize("raw_dt", ["small", "tails"])
def test_fused_softplus_matches_softplus_then_scan(raw_dt):
    inputs = make_inputs(2, 9, 6, 8, "normal", torch.float64)
    gen = torch.Generator().manual_seed(3)
    if raw_dt == "small":
        # softplus(v) around 1e-3, the small end of Mamba's dt init, where log(1 + exp(v))
        # taken literally in fp32 is off by up to 1e-4 relative: every channel is there, so
        # such an error would show in y and the gradients (h_last: 1e-5, 4x the tolerance).
        dt_raw = -7.0 + 0.5 * torch.randn(2, 9, 6, generator=gen, dtype=torch.float64)
    else:
        dt_raw = torch.linspace(-30.0, 30.0, 2 * 9 * 6, dtype=torch.float64).reshape(2, 9, 6)
    inputs[1] = dt_raw.requires_grad_()

    def softplus_then_reference(x, dt, *rest, return_state):
        return selective_scan_reference(x, F.softplus(dt), *rest, return_state=return_state)

    expected = outputs_and_grads(softplus_then_reference, inputs)
    results = outputs_and_grads(triton_fn(dt_softplus=True, chunk=4), on_device(inputs))
    assert_close(results, expected, tolerance(inputs))


@needs_triton
def test_bfloat16_inputs_accumulate_in_fp32():
    inputs = make_inputs(3, 5, 13, 16, "normal", torch.float64)
    rounded = [t.detach().to(torch.bfloat16).double().requires_grad_() for t in inputs]
    expected = outputs_and_grads(selective_scan_reference, rounded)
    if DEVICE == "cpu":  # no bfloat16 arithmetic in the interpreter: the values, as float32
        results = outputs_and_grads(triton_fn(chunk=2, block_d=8), on_device(rounded))
        assert_close(results, expected, tolerance(inputs))
        return
    results = outputs_and_grads(triton_fn(chunk=2, block_d=8), on_device(inputs, torch.bfloat16))
    assert all(r.dtype == torch.bfloat16 for r in results)
    # Outputs, the upstream gradients (cast to y's dtype) and the gradients are bfloat16, each
    # rounded to 2**-9 relative; the gradients sum rounded terms with some cancellation.
    assert_close(results, expected, 2**-6)


@needs_cuda
def test_mixed_dtypes_as_under_autocast():
    # Under autocast the mixer hands over x in bfloat16 and dt, A, Bm, Cm, Dskip in float32.
    inputs = make_inputs(2, 70, 40, 16, "realistic", torch.float64)
    x = inputs[0].detach().to(torch.bfloat16).double().requires_grad_()
    expected = outputs_and_grads(selective_scan_reference, [x, *inputs[1:]])
    mixed = [inputs[0].detach().to(DEVICE, torch.bfloat16).requires_grad_()]
    mixed += on_device(inputs[1:])
    results = outputs_and_grads(selective_scan, mixed)
    assert results[0].dtype == torch.float32 and results[2].dtype == torch.bfloat16
    fp32 = [0, 1, 3, 4, 5, 6, 7]  # all but grad_x
    assert_close(
        [results[i] for i in fp32],
        [expected[i] for i in fp32],
        tolerance(inputs),
        names=[NAMES[i] for i in fp32],
    )
    assert rel_err(results[2].double().cpu(), expected[2]) < 2**-8  # fp32, rounded once


@needs_cuda
def test_selective_scan_sends_cuda_tensors_to_triton(monkeypatch):
    calls = []
    original = triton_scan.selective_scan_triton
    monkeypatch.setattr(
        triton_scan, "selective_scan_triton", lambda *a: calls.append(1) or original(*a)
    )
    inputs = on_device(make_inputs(2, 8, 8, 4, "normal", torch.float64))
    selective_scan(*inputs)
    assert calls == [1]


def test_cpu_tensors_never_reach_triton(monkeypatch):
    # Training on CPU stays on numba (or the reference): the Triton path is for CUDA only.
    def refuse(*args, **kwargs):
        raise AssertionError("CPU tensors were sent to the Triton kernels")

    monkeypatch.setattr(triton_scan, "selective_scan_triton", refuse)
    inputs = make_inputs(2, 8, 8, 4, "normal")
    outputs_and_grads(selective_scan, inputs)


@needs_triton
def test_determinism_strides_and_gradients_without_one_output():
    inputs = make_inputs(3, 5, 13, 8, "normal", torch.float64)
    scan_fn = triton_fn(chunk=2, block_d=8)
    first = outputs_and_grads(scan_fn, on_device(inputs))
    # Again, with x and A in transposed (non-contiguous) storage: the same bits.
    x, dt, A, *rest = (t.detach().to(DEVICE, torch.float32) for t in inputs)
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2), dt, A.t().contiguous().t(), *rest]
    assert not strided[0].is_contiguous() and not strided[2].is_contiguous()
    again = outputs_and_grads(scan_fn, [t.requires_grad_() for t in strided])
    for name, a, b in zip(NAMES, first, again, strict=True):
        assert torch.equal(a, b), f"{name} differs between two runs on the same values"
    # Only y, then only h_last, reaches the loss: autograd hands the op None for the other.
    for output in (0, 1):
        loss = selective_scan_reference(*inputs, return_state=True)[output].sum()
        # Without y, Cm and Dskip are unused: their gradient is 0.
        expected_grads = torch.autograd.grad(loss, inputs, materialize_grads=True)
        device_inputs = on_device(inputs)
        loss = triton_scan.selective_scan_triton(*device_inputs, chunk=2, block_d=8)[output]
        grads = torch.autograd.grad(loss.sum(), device_inputs)
        for name, a, b in zip(NAMES[2:], grads, expected_grads, strict=True):
            error = rel_err(a.double().cpu(), b)
            assert error < tolerance(inputs), f"output {output} only, {name}: rel err {error:.2e}"


@needs_triton
def test_custom_ops_are_well_formed():
    # Schema, fake (shape-only) kernels and autograd registration, as torch.compile needs them.
    inputs = on_device(make_inputs(1, 3, 5, 4, "normal", torch.float64))
    torch.library.opcheck(triton_scan.selective_scan_triton_fwd, (*inputs, False, 2, 4))


@needs_triton
def test_compiled_scan_is_one_opaque_node():
    inputs = on_device(make_inputs(1, 6, 5, 8, "normal", torch.float64))
    graphs = []

    def record_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def scan_fn(*inputs, return_state):
        return triton_scan.selective_scan_triton(*inputs, chunk=4)

    compiled = torch.compile(scan_fn, backend=record_graph, fullgraph=True, dynamic=False)
    for name, a, b in zip(
        NAMES, outputs_and_grads(compiled, inputs), outputs_and_grads(scan_fn, inputs), strict=True
    ):
        assert torch.equal(a, b), name
    (graph,) = graphs
    ops = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert ops.count(torch.ops.nexus.selective_scan_triton_fwd.default) == 1
    assert len(ops) <= 4, f"the time loop was traced: {ops}"  # the op and its getitems


def test_nexus_imports_and_scans_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import torch\n"
        "from nexus import scan, triton_scan\n"
        "assert not triton_scan.AVAILABLE\n"
        "x, Bm, Cm = torch.randn(1, 4, 3), *torch.randn(2, 1, 4, 2)\n"
        "y = scan.selective_scan(x, x.abs(), -torch.ones(3, 2), Bm, Cm, x[0, 0])\n"
        "assert y.shape == (1, 4, 3)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
