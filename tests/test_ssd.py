"""Tests for the Mamba-2 path: nexus.ssd's chunked scan against the sequential reference
(values and gradients), the reference against an explicit numpy loop, cached stepping, and
a small `ssm="mamba2"` model: causality, cached generation, parameter layout and count, and
config validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nexus.config import ModelConfig, preset
from nexus.errors import NexusError
from nexus.generation import generate
from nexus.info import flops_per_token, parameter_breakdown
from nexus.model import Mamba2Mixer, Mamba2State, NexusLM
from nexus.ssd import ssd_scan, ssd_scan_reference, ssd_step

# Largest error allowed, relative to the largest magnitude of the reference tensor.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def make_inputs(batch, steps, heads, head_dim, groups, n_state, regime, dtype, seed=0):
    """x, dt, A, Bm, Cm, D as leaf tensors that require grad (drawn in float64)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    x = randn(batch, steps, heads, head_dim)
    if regime == "normal":
        dt = F.softplus(randn(batch, steps, heads) - 1.0)
        A = -torch.exp(randn(heads))
    elif regime == "strong":  # per-step decays down to exp(-250): far below float32's range
        dt = 0.5 + 4.5 * rand(batch, steps, heads)
        A = -(1.0 + 49.0 * rand(heads))
    else:
        raise ValueError(regime)
    Bm = randn(batch, steps, groups, n_state)
    Cm = randn(batch, steps, groups, n_state)
    D = randn(heads)
    return [t.to(dtype).requires_grad_() for t in (x, dt, A, Bm, Cm, D)]


def outputs_and_grads(fn, inputs, **kwargs):
    """y, S_last and the gradients of all six inputs under random weights on y and S_last."""
    for t in inputs:
        t.grad = None
    y, state = fn(*inputs, return_state=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    weight_y = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    weight_state = torch.randn(state.shape, generator=gen, dtype=state.dtype)
    ((y * weight_y).sum() + (state * weight_state).sum()).backward()
    return [y.detach(), state.detach()] + [t.grad.clone() for t in inputs]


def assert_all_close(got, expected, tolerance):
    names = ["y", "S_last", "dx", "ddt", "dA", "dBm", "dCm", "dD"]
    for name, a, b in zip(names, got, expected, strict=True):
        assert torch.isfinite(a).all(), f"{name} has NaN/Inf"
        scale = b.abs().max().clamp(min=1e-30)
        error = ((a - b).abs().max() / scale).item()
        assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance:.0e}"


@pytest.mark.parametrize(
    ("steps", "chunk", "groups", "regime", "dtype"),
    [
        (100, 32, 1, "normal", torch.float32),  # T not a multiple of the chunk
        (100, 32, 2, "normal", torch.float64),
        (64, 16, 2, "normal", torch.float32),  # an exact number of chunks
        (5, 64, 1, "normal", torch.float64),  # shorter than one chunk
        (200, 64, 2, "strong", torch.float32),
        (200, 64, 1, "strong", torch.float64),
        (1040, 64, 2, "normal", torch.float32),  # long: 17 chunks, the last one partial
    ],
)
def test_chunked_scan_matches_the_reference(steps, chunk, groups, regime, dtype) -> None:
    inputs = make_inputs(2, steps, 4, 3, groups, 5, regime, dtype)
    got = outputs_and_grads(ssd_scan, inputs, chunk_size=chunk)
    expected = outputs_and_grads(ssd_scan_reference, inputs)
    assert_all_close(got, expected, TOLERANCE[dtype])


def test_extreme_decays_stay_finite() -> None:
    # Per-step log-decays of -1e4 next to steps with dt = 0 (no decay, no input).
    x, dt, A, Bm, Cm, D = make_inputs(1, 96, 2, 3, 1, 4, "normal", torch.float32)
    with torch.no_grad():
        dt[:, ::3] = 0.0
        dt[:, 1::3] = 200.0
        A.copy_(torch.tensor([-50.0, -1e-3]))
    got = outputs_and_grads(ssd_scan, [x, dt, A, Bm, Cm, D], chunk_size=32)
    expected = outputs_and_grads(ssd_scan_reference, [x, dt, A, Bm, Cm, D])
    assert_all_close(got, expected, TOLERANCE[torch.float32])


def test_reference_matches_an_explicit_numpy_loop() -> None:
    x, dt, A, Bm, Cm, D = (
        t.detach().numpy() for t in make_inputs(2, 7, 4, 3, 2, 5, "normal", torch.float64)
    )
    batch, steps, heads, head_dim = x.shape
    per_group = heads // Bm.shape[2]
    y = np.zeros_like(x)
    state = np.zeros((batch, heads, head_dim, Bm.shape[3]))
    for b in range(batch):
        for h in range(heads):
            g = h // per_group
            for t in range(steps):
                decay = np.exp(dt[b, t, h] * A[h])
                state[b, h] = decay * state[b, h] + dt[b, t, h] * np.outer(x[b, t, h], Bm[b, t, g])
                y[b, t, h] = state[b, h] @ Cm[b, t, g] + D[h] * x[b, t, h]
    inputs = [torch.from_numpy(a) for a in (x, dt, A, Bm, Cm, D)]
    y_ref, state_ref = ssd_scan_reference(*inputs, return_state=True)
    np.testing.assert_allclose(y_ref.numpy(), y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state_ref.numpy(), state, rtol=1e-12, atol=1e-12)


def test_stepping_equals_the_scan() -> None:
    x, dt, A, Bm, Cm, D = (
        t.detach() for t in make_inputs(2, 37, 4, 3, 2, 5, "normal", torch.float32)
    )
    y_scan, state_scan = ssd_scan(x, dt, A, Bm, Cm, D, chunk_size=16, return_state=True)
    state = torch.zeros(2, 4, 3, 5)
    ys = []
    for t in range(37):
        y_t, state = ssd_step(state, x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], D)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y_scan, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, state_scan, atol=1e-5, rtol=1e-5)


def test_scan_rejects_mismatched_shapes() -> None:
    x, dt, A, Bm, Cm, D = make_inputs(1, 8, 4, 3, 2, 5, "normal", torch.float32)
    with pytest.raises(ValueError, match="Cm has shape"):
        ssd_scan(x, dt, A, Bm, Cm[:, :-1], D)
    with pytest.raises(ValueError, match="3 groups do not divide 4 heads"):
        ssd_scan(x, dt, A, Bm[:, :, :1].expand(1, 8, 3, 5), Cm, D)


# --- the Mamba-2 model -------------------------------------------------------------------

SMALL = ModelConfig(
    d_model=64,
    n_layers=3,
    attention_layers=(1,),
    n_heads=4,
    n_kv_heads=2,
    d_state=8,
    mlp_hidden=128,
    seq_len=32,
    ssm="mamba2",
    ssm_head_dim=16,  # 8 SSM heads
    n_groups=2,
)


@pytest.fixture(scope="module")
def small_model() -> NexusLM:
    torch.manual_seed(0)
    return NexusLM(SMALL).eval()


def test_mamba2_parameters_follow_the_bamba_layout() -> None:
    model = NexusLM(preset("nexus-6m-ssd"))
    names = dict(model.named_parameters())
    # in_proj rows: z 512, x 512, B 64, C 64, Δ 8; the conv runs over x, B and C.
    assert names["model.layers.0.mamba.in_proj.weight"].shape == (1160, 256)
    assert names["model.layers.0.mamba.conv1d.weight"].shape == (640, 1, 4)
    assert names["model.layers.0.mamba.conv1d.bias"].shape == (640,)
    for name in ("dt_bias", "A_log", "D"):
        assert names[f"model.layers.0.mamba.{name}"].shape == (8,)
    assert names["model.layers.0.mamba.norm.weight"].shape == (512,)
    assert names["model.layers.0.mamba.out_proj.weight"].shape == (256, 512)
    assert isinstance(model.model.layers[0].mamba, Mamba2Mixer)
    assert not any(n.startswith("model.layers.3.mamba") for n in names)


def test_ssd_preset_parameter_count_and_breakdown() -> None:
    model = NexusLM(preset("nexus-6m-ssd"))
    assert abs(model.num_parameters() - 6_740_000) / 6_740_000 < 0.01
    mixer = sum(p.numel() for p in model.model.layers[0].mamba.parameters())
    assert parameter_breakdown(model)["mamba"] == 5 * mixer
    assert flops_per_token(preset("nexus-6m-ssd"))["forward"] > 0


def test_mamba2_initialisation() -> None:
    torch.manual_seed(0)
    mixer = NexusLM(preset("nexus-6m-ssd")).model.layers[0].mamba
    dt = F.softplus(mixer.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    A = torch.exp(mixer.A_log)
    assert A.min() >= 1.0 and A.max() <= 16.0
    assert torch.equal(mixer.D, torch.ones(8))
    assert torch.equal(mixer.norm.weight, torch.ones(512))
    # out_proj writes into the residual stream: scaled like the other residual projections.
    assert mixer.out_proj.weight.std() < 0.5 * mixer.in_proj.weight.std()


def test_mamba2_model_is_causal(small_model: NexusLM) -> None:
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (2, 90))  # two chunks of the default 64
    changed = ids.clone()
    changed[:, 70] = (changed[:, 70] + 1) % 256
    with torch.no_grad():
        before, after = small_model(ids), small_model(changed)
    torch.testing.assert_close(before[:, :70], after[:, :70], atol=0, rtol=0)
    assert not torch.allclose(before[:, 70:], after[:, 70:])


def test_mamba2_cached_steps_match_the_full_forward(small_model: NexusLM) -> None:
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (2, 80))
    with torch.no_grad():
        full = small_model(ids)
        logits, cache = small_model.prefill(ids[:, :3])  # shorter than d_conv
        assert isinstance(cache[0], Mamba2State) and cache[0].ssm.shape == (2, 8, 16, 8)
        stepped = [logits[:, -1]]
        for position in range(3, 80):
            step_logits, cache = small_model.step(ids[:, position], cache)
            stepped.append(step_logits)
        long_logits, _ = small_model.prefill(ids[:, :70])  # a prefill across chunks
    torch.testing.assert_close(logits, full[:, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(stepped[:-1], 1), full[:, 2:79], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(long_logits, full[:, :70], atol=1e-5, rtol=1e-5)


def test_mamba2_greedy_generation_with_cache_equals_recomputation(small_model: NexusLM) -> None:
    prompt = b"To be"
    cached = generate(small_model, prompt, 24, temperature=0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(24):
            logits = small_model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    assert cached == bytes(ids[len(prompt) :])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ssm": "mamba3"}, r"ssm must be one of mamba1, mamba2, got 'mamba3'"),
        ({"ssm": "Mamba2"}, "ssm must be one of"),
        ({"ssm": "mamba2", "ssm_head_dim": 96}, "not divisible by ssm_head_dim 96"),
        ({"ssm": "mamba2", "n_groups": 3}, "not divisible by n_groups 3"),
        ({"ssm": "mamba2", "ssm_head_dim": 0}, "ssm_head_dim must be a positive integer"),
        ({"n_groups": -1}, "n_groups must be a positive integer"),
    ],
)
def test_model_config_rejects_bad_ssm_settings(overrides: dict, message: str) -> None:
    with pytest.raises(NexusError, match=message):
        ModelConfig(**overrides)


def test_model_config_rejects_a_non_string_ssm() -> None:
    with pytest.raises(NexusError, match="ssm has the wrong type"):
        ModelConfig.from_dict({"ssm": 2})
