"""What a configuration amounts to: layer schedule, parameters by component, FLOPs per token."""

from __future__ import annotations

from typing import Any

from nexus.config import ModelConfig
from nexus.model import NexusLM
from nexus.ssd import CHUNK_SIZE

# Per state element per position: exp(Δ·A), Δ·A, Δ·B·x (2), decay·h + input (2), C·h (2).
SCAN_FLOPS_PER_STATE = 8


def layer_schedule(config: ModelConfig) -> list[str]:
    return ["attention" if config.is_attention(i) else "mamba" for i in range(config.n_layers)]


def inactive_parameters(config: ModelConfig) -> int:
    """Parameters of the experts a token does not run: num_experts - top_k SwiGLU MLPs in
    every MoE layer."""
    per_expert = 3 * config.d_model * config.mlp_hidden
    unused = config.num_experts - config.experts_per_token
    return len(config.moe_layers) * unused * per_expert


def parameter_breakdown(model: NexusLM) -> dict[str, int]:
    """Parameter counts by component; tied weights counted once (under embedding). The MLPs
    of MoE layers count all their experts; their routers are a component of their own."""
    components = ["embedding", "attention", "mamba", "mlp", "norms", "lm_head"]
    if model.has_moe:
        components.insert(4, "router")
    counts = dict.fromkeys(components, 0)
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        if "embed_tokens" in name:
            key = "embedding"
        elif name.startswith("lm_head"):
            key = "lm_head"
        elif "self_attn" in name:
            key = "attention"
        elif ".mamba." in name and "layernorm" not in name:
            key = "mamba"
        elif ".feed_forward.router." in name:
            key = "router"
        elif "feed_forward" in name:
            key = "mlp"
        else:
            key = "norms"
        counts[key] += param.numel()
    counts["total"] = sum(counts.values())
    return counts


def mamba2_flops_per_token(config: ModelConfig, chunk_size: int = CHUNK_SIZE) -> int:
    """Forward FLOPs per token of one Mamba-2 layer: 2 per multiply-accumulate of in_proj and
    out_proj, the depthwise conv over the x, B and C channels, and the chunked SSD's matrix
    products as nexus.ssd computes them: per chunk of L steps C·Bᵀ (L·L·N per group) and the
    masked mixing (L·L·P per head) counted in full, masked upper triangles included (as
    attention's scores are over the full context), plus the chunk-end states (N·P per head
    and step) and their read-out by C (the same). Elementwise work (decays, gates, norm) is
    not counted."""
    d, E, N, G, H = (
        config.d_model,
        config.d_inner,
        config.d_state,
        config.n_groups,
        config.ssm_heads,
    )
    conv_dim = E + 2 * G * N
    projections = 2 * (d * (E + conv_dim + H) + E * d)
    ssd = 2 * chunk_size * (G * N + E) + 2 * 2 * E * N
    return projections + 2 * config.d_conv * conv_dim + ssd


def flops_per_token(config: ModelConfig) -> dict[str, int]:
    """Model FLOPs per token at context seq_len: 2 per multiply-accumulate of every weight
    matrix (embedding lookup excluded), attention scores and values over the full context
    (the PaLM convention), the depthwise conv and the selective scan (Mamba-1: 8 FLOPs per
    state element and step; Mamba-2: see mamba2_flops_per_token). An MoE layer costs its
    router and the experts_per_token experts each token runs. Training = 3 × forward (the
    backward costs twice the forward)."""
    d, E, N, R = config.d_model, config.d_inner, config.d_state, config.dt_rank
    kv_dim = config.n_kv_heads * config.head_dim
    mlp = 2 * 3 * d * config.mlp_hidden
    attention = 2 * (2 * d * d + 2 * d * kv_dim) + 2 * 2 * config.seq_len * d
    if config.ssm == "mamba2":
        mamba = mamba2_flops_per_token(config)
    else:
        mamba = (
            2 * (d * 2 * E + E * (R + 2 * N) + R * E + E * d)  # in, x, dt and out projections
            + 2 * config.d_conv * E
            + SCAN_FLOPS_PER_STATE * E * N
        )
    n_attention = len(config.attention_layers)
    n_moe = len(config.moe_layers)
    moe = 2 * d * config.num_experts + config.experts_per_token * mlp
    forward = (
        n_attention * attention
        + (config.n_layers - n_attention) * mamba
        + (config.n_layers - n_moe) * mlp
        + n_moe * moe
        + 2 * d * config.vocab_size
    )
    return {"forward": forward, "train": 3 * forward}


def model_info(config: ModelConfig, preset_name: str | None = None) -> dict[str, Any]:
    model = NexusLM(config)
    params = parameter_breakdown(model)
    flops = flops_per_token(config)
    info = {
        "preset": preset_name,
        "config": config.to_dict(),
        "layer_schedule": layer_schedule(config),
        "parameters": params["total"],
        "parameters_by_component": {k: v for k, v in params.items() if k != "total"},
        "flops_per_token_forward": flops["forward"],
        "flops_per_token_train": flops["train"],
    }
    if model.has_moe:
        info["moe_layers"] = list(config.moe_layers)
        info["active_parameters"] = params["total"] - inactive_parameters(config)
    return info


def _mamba_line(config: dict[str, Any]) -> str:
    sizes = f"d_state {config['d_state']}, d_conv {config['d_conv']}, expand {config['expand']}"
    if config.get("ssm") == "mamba2":
        heads = config["expand"] * config["d_model"] // config["ssm_head_dim"]
        return (
            f"  mamba           Mamba-2 (SSD), {sizes}, {heads} heads of "
            f"{config['ssm_head_dim']}, {config['n_groups']} B/C group(s)"
        )
    return f"  mamba           {sizes}, dt_rank {config['dt_rank']}"


def _mlp_line(config: dict[str, Any], moe_layers: list[int]) -> str:
    line = f"  mlp             SwiGLU, hidden {config['mlp_hidden']}"
    if moe_layers:
        line += (
            f"; sparse MoE in layers {', '.join(map(str, moe_layers))}: top-"
            f"{config['experts_per_token']} of {config['num_experts']} experts, "
            f"aux loss coef {config['router_aux_loss_coef']}"
        )
    return line


def format_info(info: dict[str, Any]) -> str:
    config = info["config"]
    schedule = info["layer_schedule"]
    n_attention = schedule.count("attention")
    lines = [
        f"Nexus model{' ' + info['preset'] if info['preset'] else ''}",
        f"  parameters      {info['parameters']:,} ({info['parameters'] / 1e6:.2f}M)",
    ]
    if "active_parameters" in info:
        active = info["active_parameters"]
        lines[-1] += f" in total, {active:,} ({active / 1e6:.2f}M) active per token"
    lines += [
        f"  d_model         {config['d_model']}",
        f"  layers          {config['n_layers']} ({n_attention} attention, "
        f"{len(schedule) - n_attention} Mamba): {' '.join(schedule)}",
        f"  attention       {config['n_heads']} heads, {config['n_kv_heads']} KV heads "
        f"(GQA), head_dim {config['d_model'] // config['n_heads']}, no positional encoding",
        _mamba_line(config),
        _mlp_line(config, info.get("moe_layers", [])),
        f"  vocab           {config['vocab_size']} (byte-level), seq_len {config['seq_len']}, "
        f"{'tied' if config['tie_embeddings'] else 'untied'} embeddings",
        "  parameters by component:",
    ]
    lines += [f"    {k:<12} {v:>10,}" for k, v in info["parameters_by_component"].items()]
    lines += [
        f"  FLOPs/token     forward {info['flops_per_token_forward'] / 1e6:.2f}M, "
        f"train {info['flops_per_token_train'] / 1e6:.2f}M",
    ]
    return "\n".join(lines)
