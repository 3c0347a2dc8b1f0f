"""Hugging Face Jamba export and import.

Nexus's parameter names already are `JambaForCausalLM`'s, so the weights travel unchanged
except the experts of MoE layers: Nexus (like transformers 5's module) stacks them in 3-D
tensors, and the files hold one tensor per expert (`feed_forward.experts.3.gate_proj.weight`),
as `save_pretrained` writes them in transformers 4 and 5 alike. What this module adds is that
split, the config translation (Nexus's `attention_layers` as Jamba's `attn_layer_period` /
`attn_layer_offset`, a dense MLP as `num_experts=1`), a check of every tensor name and shape
against the Jamba layout, and refusals of what one side cannot express.

Export needs no `transformers`: `config.json` is written by hand, in the keys `JambaConfig`
reads (transformers 4.44 and 5.x alike), and `model.safetensors` holds float32 tensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nexus import __version__
from nexus.checkpoint import (
    checkpoint_meta,
    load_checkpoint,
    model_from_checkpoint,
    model_state_for_saving,
    save_checkpoint,
)
from nexus.config import ModelConfig, TrainConfig, preset_for
from nexus.errors import NexusError
from nexus.model import NexusLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# Jamba has no positions, so HF has no field for the training context; Nexus keeps its own
# in an extra key that JambaConfig stores and ignores.
SEQ_LEN_KEY = "nexus_seq_len"
DEFAULT_SEQ_LEN = ModelConfig().seq_len

# The ModelConfig fields this module translates. A field added to ModelConfig later (say, MoE
# settings) is exported only while it keeps its default; otherwise export refuses and names it.
EXPORTED_FIELDS = {
    "vocab_size",
    "d_model",
    "n_layers",
    "attention_layers",
    "n_heads",
    "n_kv_heads",
    "d_state",
    "d_conv",
    "expand",
    "dt_rank",
    "mlp_hidden",
    "num_experts",
    "experts_per_token",
    "expert_layer_period",
    "expert_layer_offset",
    "router_aux_loss_coef",
    "norm_eps",
    "tie_embeddings",
    "seq_len",
}

# JambaConfig's own defaults, for keys a hand-written config.json leaves out.
JAMBA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 65536,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "num_experts": 16,
    "num_experts_per_tok": 2,
    "router_aux_loss_coef": 0.001,
    "expert_layer_period": 2,
    "expert_layer_offset": 1,
    "attn_layer_period": 8,
    "attn_layer_offset": 4,
    "mamba_d_state": 16,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "mamba_dt_rank": "auto",
    "mamba_conv_bias": True,
    "mamba_proj_bias": False,
}

INTEGER_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "num_experts",
    "num_experts_per_tok",
    "expert_layer_period",
    "expert_layer_offset",
    "attn_layer_period",
    "attn_layer_offset",
    "mamba_d_state",
    "mamba_d_conv",
    "mamba_expand",
)

# Hugging Face Jamba before transformers 5 (and mamba.py's JambaLM) named the B and C norms
# `B_layernorm` / `C_layernorm`; 5.x calls them `b_layernorm` / `c_layernorm`, as Nexus does.
# 5.x does not rename them on load (it re-initialises them silently), so import maps them here.
LEGACY_NAMES = {
    ".mamba.B_layernorm.": ".mamba.b_layernorm.",
    ".mamba.C_layernorm.": ".mamba.c_layernorm.",
}


# --- the layer schedule -----------------------------------------------------------------------


def attention_schedule(attention_layers: tuple[int, ...], n_layers: int) -> tuple[int, int]:
    """Jamba's (attn_layer_period, attn_layer_offset) for Nexus's attention layer indices.

    Jamba puts attention at every layer i with i % period == offset (offset < period). The
    largest period that reproduces the indices is chosen, so one attention layer at index k of
    n layers becomes (n, k), as in AI21's "one attention layer per block".
    """
    wanted = sorted(attention_layers)
    if not wanted:
        return n_layers + 1, n_layers  # an offset never reached: all Mamba
    offset = wanted[0]
    for period in range(n_layers, offset, -1):
        if attention_layers_from_schedule(period, offset, n_layers) == tuple(wanted):
            return period, offset
    raise NexusError(
        f"attention layers {wanted} of {n_layers} cannot be exported: Hugging Face Jamba places "
        "attention at every layer i with i % attn_layer_period == attn_layer_offset, so the "
        "attention layers must be evenly spaced, starting below the spacing (e.g. [1, 3, 5] or "
        "[3]); retrain with such a schedule"
    )


def attention_layers_from_schedule(period: int, offset: int, n_layers: int) -> tuple[int, ...]:
    return tuple(i for i in range(n_layers) if i % period == offset)


# --- the tensor layout ------------------------------------------------------------------------


def jamba_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a JambaForCausalLM file with this config, by its Hugging Face name
    (without `lm_head.weight` when the embeddings are tied, and one set of MLP tensors per
    expert, as HF saves them)."""
    d, e, n, r, k = config.d_model, config.d_inner, config.d_state, config.dt_rank, config.d_conv
    kv = config.n_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, d)}
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "pre_ff_layernorm.weight"] = (d,)
        if config.is_attention(i):
            shapes[p + "self_attn.q_proj.weight"] = (d, d)
            shapes[p + "self_attn.k_proj.weight"] = (kv, d)
            shapes[p + "self_attn.v_proj.weight"] = (kv, d)
            shapes[p + "self_attn.o_proj.weight"] = (d, d)
        else:
            m = p + "mamba."
            shapes[m + "in_proj.weight"] = (2 * e, d)
            shapes[m + "conv1d.weight"] = (e, 1, k)
            shapes[m + "conv1d.bias"] = (e,)
            shapes[m + "x_proj.weight"] = (r + 2 * n, e)
            shapes[m + "dt_layernorm.weight"] = (r,)
            shapes[m + "b_layernorm.weight"] = (n,)
            shapes[m + "c_layernorm.weight"] = (n,)
            shapes[m + "dt_proj.weight"] = (e, r)
            shapes[m + "dt_proj.bias"] = (e,)
            shapes[m + "A_log"] = (e, n)
            shapes[m + "D"] = (e,)
            shapes[m + "out_proj.weight"] = (d, e)
        if config.is_moe(i):
            shapes[p + "feed_forward.router.weight"] = (config.num_experts, d)
            mlps = [f"{p}feed_forward.experts.{j}." for j in range(config.num_experts)]
        else:
            mlps = [p + "feed_forward."]
        for mlp in mlps:
            shapes[mlp + "gate_proj.weight"] = (config.mlp_hidden, d)
            shapes[mlp + "up_proj.weight"] = (config.mlp_hidden, d)
            shapes[mlp + "down_proj.weight"] = (d, config.mlp_hidden)
    shapes["model.final_layernorm.weight"] = (d,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def check_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """NexusError naming the missing, unexpected and wrongly shaped tensors, if any."""
    expected = jamba_tensor_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{name} {tuple(tensors[name].shape)} (expected {expected[name]})"
        for name in sorted(set(expected) & set(tensors))
        if tuple(tensors[name].shape) != expected[name]
    ]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise NexusError(
            f"{source}: the weights do not match the Jamba layout of its config ("
            + "; ".join(problems)
            + ")"
        )


def split_experts(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Nexus's stacked expert tensors as the per-expert tensors of a Jamba file."""
    tensors = dict(state)
    for i in config.moe_layers:
        experts = f"model.layers.{i}.feed_forward.experts."
        gate_up = tensors.pop(experts + "gate_up_proj")  # (experts, 2·hidden, d): gate, then up
        down = tensors.pop(experts + "down_proj")  # (experts, d, hidden)
        for j in range(config.num_experts):
            gate, up = gate_up[j].chunk(2, dim=0)
            tensors[f"{experts}{j}.gate_proj.weight"] = gate.contiguous()
            tensors[f"{experts}{j}.up_proj.weight"] = up.contiguous()
            tensors[f"{experts}{j}.down_proj.weight"] = down[j].contiguous()
    return tensors


def stack_experts(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The per-expert tensors of a Jamba file (checked by check_tensors) stacked as Nexus's."""
    state = dict(tensors)
    for i in config.moe_layers:
        experts = f"model.layers.{i}.feed_forward.experts."
        names = [
            [f"{experts}{j}.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
            for j in range(config.num_experts)
        ]
        state[experts + "gate_up_proj"] = torch.stack(
            [torch.cat([state.pop(gate), state.pop(up)]) for gate, up, _ in names]
        )
        state[experts + "down_proj"] = torch.stack([state.pop(down) for _, _, down in names])
    return state


# --- config translation -----------------------------------------------------------------------


def jamba_config_dict(config: ModelConfig) -> dict[str, Any]:
    """The config.json of a JambaForCausalLM equal to this Nexus model."""
    defaults = ModelConfig()
    for field in dataclasses.fields(ModelConfig):
        if field.name not in EXPORTED_FIELDS and getattr(config, field.name) != getattr(
            defaults, field.name
        ):
            raise NexusError(
                f"cannot export: the model sets {field.name}={getattr(config, field.name)!r}, "
                "which the Hugging Face Jamba export does not translate yet"
            )
    if not config.attention_layers:
        # Expressible (an offset never reached), but transformers 5.x's Jamba cache needs an
        # attention layer: forward with its default use_cache=True and generate() both fail.
        raise NexusError(
            "cannot export a model without attention layers: Hugging Face Jamba cannot run it "
            "(its generation cache needs at least one attention layer)"
        )
    period, offset = attention_schedule(config.attention_layers, config.n_layers)
    if config.moe_layers:
        experts = {
            "num_experts": config.num_experts,
            "num_experts_per_tok": config.experts_per_token,
            "expert_layer_period": config.expert_layer_period,
            "expert_layer_offset": config.expert_layer_offset,
        }
    else:
        # A dense MLP in every layer. The expert offset must be 0: JambaConfig refuses an
        # offset that is not below the period.
        experts = {
            "num_experts": 1,
            "num_experts_per_tok": 1,
            "expert_layer_period": 1,
            "expert_layer_offset": 0,
        }
    return {
        "architectures": ["JambaForCausalLM"],
        "model_type": "jamba",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "intermediate_size": config.mlp_hidden,
        "hidden_act": "silu",
        "attn_layer_period": period,
        "attn_layer_offset": offset,
        **experts,
        "mamba_d_state": config.d_state,
        "mamba_d_conv": config.d_conv,
        "mamba_expand": config.expand,
        "mamba_dt_rank": config.dt_rank,
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        # transformers 4.x on CPU refuses True (no CUDA kernels); 5.x ignores it.
        "use_mamba_kernels": False,
        "use_mambapy": False,
        # A byte model has no special tokens; JambaConfig's 0/1/2 would zero byte 0's embedding
        # (padding_idx) and stop generation at byte 2.
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "output_router_logits": False,
        "router_aux_loss_coef": config.router_aux_loss_coef,
        # Unused: Jamba has no positional encoding. JambaConfig's default.
        "max_position_embeddings": 262144,
        "torch_dtype": "float32",  # transformers 4.x
        "dtype": "float32",  # transformers 5.x
        SEQ_LEN_KEY: config.seq_len,
        "nexus_version": __version__,
    }


def model_config_from_jamba(hf: dict[str, Any], seq_len: int | None = None) -> ModelConfig:
    """The Nexus ModelConfig of a Jamba config.json, or a NexusError saying what Nexus lacks."""
    if hf.get("model_type", "jamba") != "jamba":
        raise NexusError(
            f"config.json has model_type {hf.get('model_type')!r}; only Jamba models import"
        )
    c = {**JAMBA_DEFAULTS, **hf}
    if c["num_key_value_heads"] is None:
        c["num_key_value_heads"] = c["num_attention_heads"]
    for key in INTEGER_KEYS:
        if not isinstance(c[key], int) or isinstance(c[key], bool):
            raise NexusError(f"config.json: {key} must be an integer, got {c[key]!r}")
    for key in ("expert_layer_period", "attn_layer_period", "num_experts"):
        if c[key] <= 0:
            raise NexusError(f"config.json: {key} must be positive, got {c[key]}")
    vocab = c["vocab_size"]
    if vocab > 256:
        raise NexusError(
            f"vocab_size {vocab} is more than the 256 byte values: Nexus models read bytes, so "
            "only Jamba models with vocab_size <= 256 import"
        )
    n_layers = c["num_hidden_layers"]
    is_moe = c["num_experts"] > 1 and any(
        i % c["expert_layer_period"] == c["expert_layer_offset"] for i in range(n_layers)
    )
    # Without MoE layers the expert settings mean nothing: Nexus's defaults keep the config
    # equal to a dense preset.
    experts = (
        {
            "num_experts": c["num_experts"],
            "experts_per_token": c["num_experts_per_tok"],
            "expert_layer_period": c["expert_layer_period"],
            "expert_layer_offset": c["expert_layer_offset"],
            "router_aux_loss_coef": c["router_aux_loss_coef"],
        }
        if is_moe
        else {}
    )
    if c["mamba_proj_bias"]:
        raise NexusError(
            "mamba_proj_bias is true: Nexus's Mamba in_proj/out_proj have no biases; only "
            "models with mamba_proj_bias false import"
        )
    if c["hidden_act"] != "silu":
        raise NexusError(f"hidden_act is {c['hidden_act']!r}; Nexus uses silu only")
    period, offset = c["attn_layer_period"], c["attn_layer_offset"]
    if not 0 <= offset < period:
        raise NexusError(f"attn_layer_offset {offset} must be below attn_layer_period {period}")
    dt_rank = c["mamba_dt_rank"]
    if dt_rank == "auto":
        dt_rank = math.ceil(c["hidden_size"] / 16)
    if seq_len is None:
        seq_len = hf.get(SEQ_LEN_KEY, DEFAULT_SEQ_LEN)
    try:
        return ModelConfig(
            vocab_size=vocab,
            d_model=c["hidden_size"],
            n_layers=n_layers,
            attention_layers=attention_layers_from_schedule(period, offset, n_layers),
            n_heads=c["num_attention_heads"],
            n_kv_heads=c["num_key_value_heads"],
            d_state=c["mamba_d_state"],
            d_conv=c["mamba_d_conv"],
            expand=c["mamba_expand"],
            dt_rank=dt_rank,
            mlp_hidden=c["intermediate_size"],
            **experts,
            norm_eps=float(c["rms_norm_eps"]),
            tie_embeddings=bool(c["tie_word_embeddings"]),
            seq_len=seq_len,
        )
    except NexusError as error:
        raise NexusError(f"the Jamba config does not fit Nexus: {error}") from None


# --- export -----------------------------------------------------------------------------------


def export_to_hf(
    checkpoint_path: str | Path, out_dir: str | Path, *, overwrite: bool = False
) -> Path:
    """Write a Nexus checkpoint as a Hugging Face Jamba directory (config.json and
    model.safetensors) that `JambaForCausalLM.from_pretrained` loads; returns the directory.

    The directory appears whole or not at all: it is written beside `out_dir` and renamed."""

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NexusError(f"{str(out)!r} is a file; pass a directory to export into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise NexusError(
            f"{str(out)!r} is not empty; choose a new directory or pass --force to replace it"
        )
    checkpoint = load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint, "cpu")
    config = model.config
    hf_config = jamba_config_dict(config)
    tensors = {
        name: tensor.detach().to(torch.float32).contiguous()
        for name, tensor in split_experts(model_state_for_saving(model), config).items()
    }
    check_tensors(tensors, config, f"checkpoint {str(checkpoint_path)!r}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as error:
        raise NexusError(f"cannot write into {str(out.parent)!r} ({error.strerror})") from None
    try:
        os.chmod(staging, 0o755)
        (staging / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            with open(staging / name, "rb") as handle:
                os.fsync(handle.fileno())
        _move_into_place(staging, out)
    except OSError as error:
        raise NexusError(f"could not write {str(out)!r} ({error.strerror or error})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _move_into_place(staging: Path, out: Path) -> None:
    if out.is_dir() and any(out.iterdir()):  # overwrite: swap, then delete the old one
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)  # rename(2) replaces a missing or empty directory


# --- import -----------------------------------------------------------------------------------


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors, or of the shards its index lists."""
    single, index = hf_dir / WEIGHTS_FILE, hf_dir / WEIGHTS_INDEX_FILE
    try:
        if single.is_file():
            return load_file(single)
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(load_file(hf_dir / shard))
            return tensors
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
        raise NexusError(
            f"{str(hf_dir)!r}: the safetensors weights are unreadable ({error})"
        ) from None
    raise NexusError(
        f"{str(hf_dir)!r} holds no {WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE}); only safetensors "
        "checkpoints import (re-save a pytorch_model.bin with save_pretrained)"
    )


def read_jamba_config(source: Path) -> dict[str, Any]:
    """A Hugging Face directory's config.json as a dict; a NexusError says what is wrong."""
    try:
        hf_config = json.loads((source / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise NexusError(f"{str(source)!r} holds no {CONFIG_FILE}") from None
    except (OSError, json.JSONDecodeError) as error:
        raise NexusError(f"{str(source / CONFIG_FILE)!r} is unreadable ({error})") from None
    if not isinstance(hf_config, dict):
        raise NexusError(f"{str(source / CONFIG_FILE)!r} does not hold a JSON object")
    return hf_config


def model_from_hf(hf_dir: str | Path, seq_len: int | None = None) -> NexusLM:
    """The Nexus model a Hugging Face Jamba directory holds, in float32.

    `seq_len` (Nexus's training and eval window) defaults to the one a Nexus export recorded,
    else 128: Jamba itself has no positional limit."""
    source = Path(hf_dir)
    if not source.is_dir():
        raise NexusError(f"{str(source)!r} is not a directory; pass a Hugging Face model directory")
    hf_config = read_jamba_config(source)
    config = model_config_from_jamba(hf_config, seq_len)

    tensors = {}
    for name, tensor in read_hf_weights(source).items():
        for old, new in LEGACY_NAMES.items():
            name = name.replace(old, new)
        tensors[name] = tensor.to(torch.float32)  # Nexus computes and trains in float32
    if config.tie_embeddings and "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")
        embed = tensors.get("model.embed_tokens.weight")
        if embed is not None and (head.shape != embed.shape or not torch.equal(head, embed)):
            raise NexusError(
                "tie_word_embeddings is true but lm_head.weight differs from the embedding; "
                "set tie_word_embeddings false in config.json to keep both"
            )
    if not hf_config.get("mamba_conv_bias", True):
        # No conv bias is the same function as a zero one, which Nexus's conv always has.
        for i in range(config.n_layers):
            if not config.is_attention(i):
                tensors[f"model.layers.{i}.mamba.conv1d.bias"] = torch.zeros(config.d_inner)
    check_tensors(tensors, config, f"{str(source)!r}")

    model = NexusLM(config)
    missing, unexpected = model.load_state_dict(stack_experts(tensors, config), strict=False)
    assert not unexpected and sorted(missing) == (
        ["lm_head.weight"] if config.tie_embeddings else []
    )
    return model


def import_from_hf(
    hf_dir: str | Path,
    checkpoint_path: str | Path,
    *,
    seq_len: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face Jamba directory as a Nexus checkpoint that `nexus sample`, `nexus
    eval` and `nexus train --resume --out_dir DIR` load; returns the checkpoint's path."""
    from nexus.optim import build_optimizer

    source = Path(hf_dir)
    target = Path(checkpoint_path)
    if target.is_dir():
        raise NexusError(f"{str(target)!r} is a directory; pass a checkpoint file path (.bin)")
    if target.exists() and not overwrite:
        raise NexusError(f"{str(target)!r} exists; choose another path or pass --force")
    model = model_from_hf(source, seq_len)
    config = model.config
    name, overrides = preset_for(config)
    train_config = TrainConfig(preset=name, out_dir=str(target.parent), model=overrides)
    optimizer = build_optimizer(model, train_config)
    meta = checkpoint_meta(
        step=0,
        train_config=train_config,
        model_config=config,
        optimizer_param_groups=optimizer.state_dict()["param_groups"],
        imported_from={"format": "huggingface-jamba", "path": str(source)},
    )
    try:
        save_checkpoint(target, model_state_for_saving(model), {}, meta)
    except OSError as error:
        raise NexusError(f"could not write {str(target)!r} ({error.strerror or error})") from None
    return target
