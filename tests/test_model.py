"""The hybrid model: parameter layout and count, initialisation, causality, GQA attention
against a hand-written reference, cached decoding, a safetensors round trip, and the sparse
MoE MLP (routing, load-balancing loss, parameter and FLOP counts) against hand computations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from nexus.config import ModelConfig, preset
from nexus.generation import generate
from nexus.info import flops_per_token, model_info
from nexus.model import MLP, Attention, NexusLM, RMSNorm, SparseMoE


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


# --- sparse mixture of experts ----------------------------------------------------------------

# Four layers, MoE on layers 1 (attention) and 3 (Mamba): 4 experts, top-2.
MOE = ModelConfig(
    d_model=32, n_layers=4, attention_layers=(1,), n_heads=4, n_kv_heads=2, d_state=4,
    dt_rank=2, mlp_hidden=24, num_experts=4, experts_per_token=2, seq_len=16,
)  # fmt: skip


@pytest.fixture(scope="module")
def moe_model() -> NexusLM:
    torch.manual_seed(5)
    model = NexusLM(MOE).eval()
    with torch.no_grad():
        for layer in MOE.moe_layers:  # a decisive router, so that tokens disagree on experts
            model.model.layers[layer].feed_forward.router.weight.normal_(0.0, 0.2)
    return model


def test_moe_layers_follow_the_period_and_offset(moe_model: NexusLM) -> None:
    assert MOE.moe_layers == (1, 3)
    kinds = [type(layer.feed_forward) for layer in moe_model.model.layers]
    assert kinds == [MLP, SparseMoE, MLP, SparseMoE]
    names = dict(moe_model.named_parameters())
    assert names["model.layers.1.feed_forward.router.weight"].shape == (4, 32)
    assert names["model.layers.3.feed_forward.experts.gate_up_proj"].shape == (4, 48, 32)
    assert names["model.layers.3.feed_forward.experts.down_proj"].shape == (4, 32, 24)
    assert "model.layers.2.feed_forward.gate_proj.weight" in names


def test_one_expert_is_the_dense_mlp_everywhere() -> None:
    # As in Hugging Face Jamba: num_experts 1 means no router, whatever the period and top-k.
    config = ModelConfig(
        num_experts=1, experts_per_token=2, expert_layer_period=1, expert_layer_offset=0
    )
    model = NexusLM(config)
    assert config.moe_layers == () and not model.has_moe
    assert all(isinstance(layer.feed_forward, MLP) for layer in model.model.layers)
    assert model.num_parameters() == NexusLM(ModelConfig()).num_parameters()


def hand_moe(moe: SparseMoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token by token: softmax of the router logits, the k largest, and the weighted experts."""
    probabilities = torch.exp(x @ moe.router.weight.T)
    probabilities = probabilities / probabilities.sum(-1, keepdim=True)
    chosen = torch.stack([p.argsort(descending=True)[: moe.top_k] for p in probabilities])
    weights = probabilities.gather(-1, chosen)
    out = torch.zeros_like(x)
    hidden = moe.experts.down_proj.shape[-1]
    for t in range(x.shape[0]):
        for weight, e in zip(weights[t], chosen[t].tolist(), strict=True):
            gate = moe.experts.gate_up_proj[e, :hidden] @ x[t]
            up = moe.experts.gate_up_proj[e, hidden:] @ x[t]
            out[t] += weight * (moe.experts.down_proj[e] @ (F.silu(gate) * up))
    return weights, chosen, out


def test_router_picks_the_top_k_of_the_softmax_and_weights_them_unnormalised(
    moe_model: NexusLM,
) -> None:
    moe = moe_model.model.layers[3].feed_forward
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        _, weights, chosen = moe.route(x.flatten(0, 1))
        out = moe(x)
        expected_weights, expected_chosen, expected_out = hand_moe(moe, x.flatten(0, 1))
    assert torch.equal(chosen, expected_chosen)
    torch.testing.assert_close(weights, expected_weights)
    assert (weights.sum(-1) < 1 - 1e-3).all()  # the top-2 of 4 are not renormalised to 1
    assert len(set(chosen[:, 0].tolist())) > 1  # the tokens really route differently
    torch.testing.assert_close(out, expected_out.view(2, 10, 32), atol=1e-6, rtol=1e-5)


def test_load_balancing_loss_matches_the_switch_transformer_formula(moe_model: NexusLM) -> None:
    # Hugging Face Jamba's load_balancing_loss_func: the router logits of every MoE layer
    # concatenated, f_e = top-k assignments to e / tokens, P_e = mean probability of e,
    # loss = num_experts · Σ_e f_e · P_e.
    inputs = []
    hooks = [
        moe_model.model.layers[i].feed_forward.register_forward_hook(
            lambda module, args, output: inputs.append(args[0].flatten(0, 1))
        )
        for i in MOE.moe_layers
    ]
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        moe_model(ids)
    for hook in hooks:
        hook.remove()
    logits = torch.cat(
        [
            x @ moe_model.model.layers[i].feed_forward.router.weight.T
            for i, x in zip(MOE.moe_layers, inputs, strict=True)
        ]
    )
    probabilities = logits.softmax(-1)
    chosen = probabilities.topk(2, dim=-1).indices
    fraction = torch.stack([(chosen == e).sum() for e in range(4)]).float() / logits.shape[0]
    expected = 4 * (fraction * probabilities.mean(0)).sum()
    torch.testing.assert_close(moe_model.aux_loss(), expected)


def test_load_balancing_loss_is_top_k_for_a_uniform_router_and_trains_the_router() -> None:
    torch.manual_seed(8)
    model = NexusLM(MOE)
    with torch.no_grad():
        for i in MOE.moe_layers:
            model.model.layers[i].feed_forward.router.weight.zero_()
    model(torch.randint(0, 256, (2, 8)))
    aux = model.aux_loss()
    torch.testing.assert_close(aux, torch.tensor(2.0))  # uniform P_e = 1/4, Σ f_e = k = 2
    aux.backward()
    assert model.model.layers[1].feed_forward.router.weight.grad is not None


def test_moe_cached_steps_match_the_full_forward(moe_model: NexusLM) -> None:
    ids = torch.randint(0, 256, (2, 14), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = moe_model(ids)
        logits, cache = moe_model.prefill(ids[:, :4])
        stepped = [logits[:, -1]]
        for position in range(4, 14):
            step_logits, cache = moe_model.step(ids[:, position], cache)
            stepped.append(step_logits)
    torch.testing.assert_close(logits, full[:, :4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(stepped[:-1], 1), full[:, 3:13], atol=1e-4, rtol=1e-4)


def test_info_counts_total_and_active_parameters_and_top_k_flops(moe_model: NexusLM) -> None:
    info = model_info(MOE)
    total = sum(p.numel() for p in moe_model.parameters())
    assert info["parameters"] == total
    assert sum(info["parameters_by_component"].values()) == total
    assert info["parameters_by_component"]["router"] == 2 * 4 * 32
    # Each token runs 2 of the 4 experts (3 matrices of 32 x 24 each) in 2 layers.
    assert info["active_parameters"] == total - 2 * 2 * 3 * 32 * 24
    assert info["moe_layers"] == [1, 3]
    # Top-1 of 4 experts costs what the dense model costs, plus the routers.
    top1 = ModelConfig(**{**MOE.to_dict(), "experts_per_token": 1})
    dense = ModelConfig(**{**MOE.to_dict(), "num_experts": 1})
    assert flops_per_token(top1)["forward"] == flops_per_token(dense)["forward"] + 2 * 2 * 32 * 4
    assert (
        "active_parameters" not in model_info(dense)
        and "router" not in model_info(dense)["parameters_by_component"]
    )


def test_dropout_drops_and_rescales_in_training_and_is_off_for_inference() -> None:
    config = preset("nexus-tiny")
    p = 0.3
    torch.manual_seed(0)
    plain = NexusLM(config).eval()
    dropped = NexusLM(config, dropout=p)
    dropped.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 256, (4, 32))
    assert torch.equal(dropped.eval()(ids), plain(ids))  # inference ignores it

    # Record, in training, what enters and leaves each part of the first layer.
    seen: dict[str, Tensor] = {}
    layer = dropped.model.layers[0]
    hooks = [
        dropped.model.embed_tokens.register_forward_hook(
            lambda m, i, o: seen.__setitem__("embedded", o)
        ),
        layer.register_forward_pre_hook(lambda m, i: seen.__setitem__("layer_in", i[0])),
        layer.mixer.register_forward_hook(lambda m, i, o: seen.__setitem__("mixed", o)),
        layer.pre_ff_layernorm.register_forward_pre_hook(
            lambda m, i: seen.__setitem__("middle", i[0])
        ),
    ]
    dropped.train()(ids)
    for hook in hooks:
        hook.remove()
    for reached, full in (
        (seen["layer_in"], seen["embedded"]),
        (seen["middle"] - seen["layer_in"], seen["mixed"]),
    ):
        kept = reached != 0
        # Every value is either dropped or kept scaled by 1 / (1 - p) ...
        assert torch.allclose(reached[kept], full[kept] / (1 - p), rtol=1e-5, atol=1e-6)
        # ... and about p of them are dropped (4,096 values: the share's sd is 0.007).
        assert abs((~kept).float().mean().item() - p) < 0.03
    assert not torch.equal(dropped(ids), dropped(ids))  # new masks each forward
