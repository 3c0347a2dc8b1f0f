"""The hybrid model: parameter layout and count, initialisation, causality, GQA attention
against a hand-written reference, cached decoding, and a safetensors round trip."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from nexus.config import ModelConfig, preset
from nexus.generation import generate, sample_next
from nexus.model import Attention, NexusLM, RMSNorm


@pytest.fixture(scope="module")
def tiny_model() -> NexusLM:
    torch.manual_seed(0)
    return NexusLM(preset("nexus-tiny")).eval()


def test_reference_preset_parameter_count() -> None:
    config = preset("nexus-6m")
    model = NexusLM(config)
    # Hugging Face Jamba at these sizes: 2,421,744 + 4,608·I, plus 65,536 for an untied head.
    expected = 2_421_744 + 4_608 * config.mlp_hidden + (0 if config.tie_embeddings else 65_536)
    assert model.num_parameters() == expected
    assert abs(model.num_parameters() - 6_740_000) / 6_740_000 < 0.01


def test_parameter_names_follow_the_jamba_layout() -> None:
    names = dict(NexusLM(preset("nexus-6m")).named_parameters())
    assert names["model.layers.0.mamba.in_proj.weight"].shape == (1024, 256)
    assert names["model.layers.0.mamba.conv1d.weight"].shape == (512, 1, 4)
    assert names["model.layers.0.mamba.x_proj.weight"].shape == (48, 512)
    assert names["model.layers.0.mamba.dt_proj.bias"].shape == (512,)
    assert names["model.layers.0.mamba.b_layernorm.weight"].shape == (16,)
    assert names["model.layers.0.mamba.A_log"].shape == (512, 16)
    assert names["model.layers.3.self_attn.k_proj.weight"].shape == (64, 256)
    assert names["model.layers.3.feed_forward.down_proj.weight"].shape == (256, 928)
    assert "model.final_layernorm.weight" in names and "lm_head.weight" in names
    assert not any(n.startswith("model.layers.3.mamba") for n in names)


def test_tied_embeddings_share_one_tensor() -> None:
    model = NexusLM(ModelConfig(tie_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_parameters() == 2_421_744 + 4_608 * 928


def test_mamba_initialisation() -> None:
    mixer = NexusLM(preset("nexus-6m")).model.layers[0].mamba
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    assert torch.allclose(mixer.A_log[5], torch.log(torch.arange(1, 17, dtype=torch.float32)))
    assert torch.equal(mixer.D, torch.ones(512))


def test_rmsnorm_matches_formula() -> None:
    norm = RMSNorm(8, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_grouped_query_attention_matches_explicit_computation() -> None:
    torch.manual_seed(1)
    config = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, attention_layers=(1,))
    attention = Attention(config)
    x = torch.randn(2, 5, 32)
    q = attention.q_proj(x).view(2, 5, 4, 8).transpose(1, 2)
    k = attention.k_proj(x).view(2, 5, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    v = attention.v_proj(x).view(2, 5, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 32)
    torch.testing.assert_close(attention(x), attention.o_proj(out), atol=1e-5, rtol=1e-5)


def test_changing_a_future_byte_never_changes_earlier_logits(tiny_model: NexusLM) -> None:
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (2, 24))
    changed = ids.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 256
    with torch.no_grad():
        before, after = tiny_model(ids), tiny_model(changed)
    torch.testing.assert_close(before[:, :15], after[:, :15], atol=0, rtol=0)
    assert not torch.allclose(before[:, 15:], after[:, 15:])


def test_cached_steps_match_the_full_forward(tiny_model: NexusLM) -> None:
    torch.manual_seed(3)
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = tiny_model(ids)
        logits, cache = tiny_model.prefill(ids[:, :3])  # shorter than d_conv
        stepped = [logits[:, -1]]
        for position in range(3, 20):
            step_logits, cache = tiny_model.step(ids[:, position], cache)
            stepped.append(step_logits)
    torch.testing.assert_close(logits, full[:, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(stepped[:-1], 1), full[:, 2:19], atol=1e-4, rtol=1e-4)


def test_greedy_generation_with_cache_equals_recomputation(tiny_model: NexusLM) -> None:
    prompt = b"To be"
    cached = generate(tiny_model, prompt, 40, temperature=0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(40):
            logits = tiny_model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    assert cached == bytes(ids[len(prompt) :])


def test_sampling_is_reproducible_and_respects_top_k() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    picks = {
        int(sample_next(logits, top_k=2, generator=torch.Generator().manual_seed(s)))
        for s in range(50)
    }
    assert picks == {3, 4}
    first = sample_next(logits.repeat(8, 1), generator=torch.Generator().manual_seed(5))
    second = sample_next(logits.repeat(8, 1), generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, second)
    # top_p=0.5: byte 4 alone holds 64 % of the mass, so it is the only one left.
    only = sample_next(logits, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert int(only) == 4


def test_safetensors_round_trip_gives_identical_logits(tiny_model: NexusLM, tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file(tiny_model.state_dict(), path)
    restored = NexusLM(preset("nexus-tiny")).eval()
    restored.load_state_dict(load_file(path))
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(tiny_model(ids), restored(ids))


def test_causal_conv_matches_torch_conv1d() -> None:
    torch.manual_seed(4)
    mixer = NexusLM(preset("nexus-tiny")).model.layers[0].mamba
    x = torch.randn(2, 9, mixer.d_inner)
    padded = F.pad(x, (0, 0, mixer.d_conv - 1, 0))
    expected = mixer.conv1d(x.transpose(1, 2))[..., :9].transpose(1, 2)
    torch.testing.assert_close(mixer._causal_conv(padded, 9), expected, atol=1e-6, rtol=1e-5)
