"""Hugging Face Jamba export and import: the loaded HF model computes what Nexus computes.

Tests that need `transformers` skip without it (`pip install -e ".[hf]"`); the rest check the
file format, the refusals and the round trip on their own. HF Jamba runs its slow torch scan
on CPU, so sequences stay short.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import tiny_config
from nexus.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    model_state_for_saving,
    save_checkpoint,
)
from nexus.cli import main
from nexus.config import ModelConfig, TrainConfig, preset
from nexus.errors import NexusError
from nexus.generation import generate
from nexus.hf import export_to_hf, import_from_hf
from nexus.model import NexusLM
from nexus.training import Trainer

TOLERANCE = 1e-4
GREEDY_BYTES = 64
PROMPT = b"ROMEO:\n"

CONFIGS = {
    "nexus-tiny": preset("nexus-tiny"),
    # Untied, one attention layer in the middle, one KV head, a short conv.
    "untied": ModelConfig(
        d_model=64,
        n_layers=4,
        attention_layers=(2,),
        n_heads=4,
        n_kv_heads=1,
        d_state=8,
        d_conv=3,
        dt_rank=6,
        mlp_hidden=80,
        seq_len=32,
    ),
    # Tied, a small vocabulary, two attention layers (period 2, offset 1), another eps.
    "tied": ModelConfig(
        vocab_size=128,
        d_model=48,
        n_layers=5,
        attention_layers=(1, 3),
        n_heads=6,
        n_kv_heads=3,
        d_state=4,
        dt_rank=3,
        mlp_hidden=72,
        norm_eps=1e-5,
        tie_embeddings=True,
        seq_len=32,
    ),
    # Jamba's sparse MoE on every other layer (1: attention, 3: Mamba), 4 experts, top-2.
    "moe": ModelConfig(
        d_model=64,
        n_layers=4,
        attention_layers=(1,),
        n_heads=4,
        n_kv_heads=2,
        d_state=8,
        dt_rank=4,
        mlp_hidden=48,
        num_experts=4,
        experts_per_token=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        seq_len=32,
    ),
}


def jamba() -> object:
    return pytest.importorskip("transformers")


@torch.no_grad()
def perturb(model: nn.Module, seed: int) -> None:
    """Move the parameters an init leaves at 1 or 0 (norms, D, biases), spread Δ from tiny
    to large and make MoE routers decisive, so a misplaced tensor or a wrong routing changes
    the logits. Works on Nexus and HF alike: the parameter names are the same."""
    generator = torch.Generator().manual_seed(seed)

    def rand(shape: torch.Size) -> torch.Tensor:
        return torch.rand(shape, generator=generator)

    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight"):
            param.copy_(0.5 + rand(param.shape))
        elif name.endswith("dt_proj.bias"):
            param.copy_(-4.0 + 5.0 * rand(param.shape))  # softplus: Δ from 0.02 to 1.3
        elif name.endswith(("mamba.D", "conv1d.bias")):
            param.copy_(rand(param.shape) - 0.5)
        elif name.endswith("A_log"):
            param.add_(0.3 * (rand(param.shape) - 0.5))
        elif name.endswith("router.weight"):  # logits of std ~1 for normalised inputs
            param.copy_(6.0 * (rand(param.shape) - 0.5) / math.sqrt(param.shape[-1]))


def nexus_checkpoint(config: ModelConfig, path: Path, seed: int = 0) -> NexusLM:
    torch.manual_seed(seed)
    model = NexusLM(config).eval()
    perturb(model, seed)
    meta = {"step": 0, "model_config": config.to_dict(), "train_config": TrainConfig().to_dict()}
    save_checkpoint(path, model_state_for_saving(model), {}, meta)
    return model


def load_hf(out: Path) -> nn.Module:
    transformers = jamba()
    model, info = transformers.JambaForCausalLM.from_pretrained(out, output_loading_info=True)
    # from_pretrained re-initialises wrongly named weights silently: the loading info must be clean.
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


@torch.no_grad()
def max_logit_diff(nexus: NexusLM, hf: nn.Module, ids: torch.Tensor) -> float:
    return (nexus(ids) - hf(ids, use_cache=False).logits).abs().max().item()


def random_bytes(config: ModelConfig, batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=generator)


# --- export -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_loads_in_transformers_with_equal_logits_and_greedy_bytes(
    name: str, tmp_path: Path
) -> None:
    jamba()
    config = CONFIGS[name]
    model = nexus_checkpoint(config, tmp_path / "model.bin", seed=len(name))
    out = export_to_hf(tmp_path / "model.bin", tmp_path / "hf")
    saved = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in saved) == (not config.tie_embeddings)
    hf = load_hf(out)
    assert hf.config.layers_block_type == [
        "attention" if config.is_attention(i) else "mamba" for i in range(config.n_layers)
    ]
    assert hf.config.pad_token_id is None and hf.config.eos_token_id is None

    diff = max_logit_diff(model, hf, random_bytes(config, 2, 48, seed=1))
    print(f"{name}: max |Δlogit| {diff:.2e}")
    assert diff < TOLERANCE

    # Greedy decoding with the caches of both sides (HF's generate(), recurrent steps in Nexus).
    ours = generate(model, PROMPT, GREEDY_BYTES, temperature=0)
    prompt_ids = torch.tensor([list(PROMPT)])
    theirs = hf.generate(
        prompt_ids,
        max_new_tokens=GREEDY_BYTES,
        min_new_tokens=GREEDY_BYTES,
        do_sample=False,
        pad_token_id=0,
        use_cache=True,
    )
    assert bytes(theirs[0, len(PROMPT) :].tolist()) == ours


def test_reference_preset_exports_with_equal_logits(tmp_path: Path) -> None:
    jamba()
    config = preset("nexus-6m")
    model = nexus_checkpoint(config, tmp_path / "model.bin")
    hf = load_hf(export_to_hf(tmp_path / "model.bin", tmp_path / "hf"))
    assert hf.config.attn_layer_period == 6 and hf.config.attn_layer_offset == 3
    assert hf.num_parameters() == model.num_parameters()
    diff = max_logit_diff(model, hf, random_bytes(config, 1, 16, seed=2))
    print(f"nexus-6m: max |Δlogit| {diff:.2e}")
    assert diff < TOLERANCE


def test_export_config_is_what_jamba_expects(tmp_path: Path) -> None:
    config = CONFIGS["tied"]
    nexus_checkpoint(config, tmp_path / "model.bin")
    out = export_to_hf(tmp_path / "model.bin", tmp_path / "hf")
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["JambaForCausalLM"] and written["model_type"] == "jamba"
    assert (written["attn_layer_period"], written["attn_layer_offset"]) == (2, 1)
    assert (written["num_experts"], written["expert_layer_period"]) == (1, 1)
    assert written["expert_layer_offset"] == 0
    assert written["use_mamba_kernels"] is False and written["tie_word_embeddings"] is True
    assert written["pad_token_id"] is None and written["bos_token_id"] is None
    assert written["eos_token_id"] is None
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_export_works_without_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # any import of it now fails
    nexus_checkpoint(CONFIGS["nexus-tiny"], tmp_path / "model.bin")
    out = export_to_hf(tmp_path / "model.bin", tmp_path / "hf")
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("attention_layers", "message"),
    [((0, 1, 3), "evenly spaced"), ((), "without attention layers")],
)
def test_export_refuses_what_jamba_cannot_express_and_leaves_nothing(
    attention_layers: tuple[int, ...], message: str, tmp_path: Path
) -> None:
    config = ModelConfig(
        d_model=32, n_layers=4, attention_layers=attention_layers, n_heads=4, n_kv_heads=2,
        d_state=4, dt_rank=2, mlp_hidden=32,
    )  # fmt: skip
    nexus_checkpoint(config, tmp_path / "model.bin")
    exports = tmp_path / "exports"
    exports.mkdir()
    with pytest.raises(NexusError, match=message):
        export_to_hf(tmp_path / "model.bin", exports / "hf")
    assert list(exports.iterdir()) == []


def test_export_does_not_overwrite_unless_forced(tmp_path: Path) -> None:
    nexus_checkpoint(CONFIGS["nexus-tiny"], tmp_path / "model.bin")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(NexusError, match="not empty"):
        export_to_hf(tmp_path / "model.bin", out)
    assert (out / "notes.txt").read_text() == "mine"
    export_to_hf(tmp_path / "model.bin", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model.bin"]  # no leftovers


# --- import -----------------------------------------------------------------------------------


@torch.no_grad()
def imported_model(path: Path) -> NexusLM:
    return model_from_checkpoint(load_checkpoint(path)).eval()


@pytest.mark.parametrize("name", ["nexus-tiny", "tied", "moe"])
def test_export_then_import_gives_the_same_model(name: str, tmp_path: Path) -> None:
    config = CONFIGS[name]
    model = nexus_checkpoint(config, tmp_path / "model.bin")
    export_to_hf(tmp_path / "model.bin", tmp_path / "hf")
    path = import_from_hf(tmp_path / "hf", tmp_path / "imported.bin")
    checkpoint = load_checkpoint(path)
    back = model_from_checkpoint(checkpoint).eval()
    assert back.config == config  # seq_len travels in config.json's nexus_seq_len
    for (name, tensor), (other_name, other) in zip(
        model.state_dict().items(), back.state_dict().items(), strict=True
    ):
        assert name == other_name and torch.equal(tensor, other), name
    ids = random_bytes(config, 2, 40, seed=3)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    train_config = TrainConfig.from_dict(checkpoint.meta["train_config"])
    assert train_config.model_config() == config
    if name == "nexus-tiny":
        assert train_config.preset == "nexus-tiny" and train_config.model == {}


@pytest.mark.parametrize("tied", [False, True])
def test_import_of_a_transformers_jamba_matches_its_logits(tied: bool, tmp_path: Path) -> None:
    transformers = jamba()
    hf_config = transformers.JambaConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        num_experts=1,
        expert_layer_period=1,
        expert_layer_offset=0,
        mamba_d_state=8,
        mamba_dt_rank="auto",  # ceil(64 / 16) = 4
        intermediate_size=96,
        tie_word_embeddings=tied,
        use_mamba_kernels=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(4)
    hf = transformers.JambaForCausalLM(hf_config).eval()
    perturb(hf, seed=4)
    hf.save_pretrained(tmp_path / "hf")
    model = imported_model(import_from_hf(tmp_path / "hf", tmp_path / "imported.bin"))
    assert model.config.attention_layers == (1, 3) and model.config.dt_rank == 4
    assert model.config.tie_embeddings == tied and model.config.seq_len == 128
    diff = max_logit_diff(model, hf, random_bytes(model.config, 2, 40, seed=5))
    print(f"HF-native {'tied' if tied else 'untied'} import: max |Δlogit| {diff:.2e}")
    assert diff < TOLERANCE


def test_import_maps_legacy_b_c_layernorm_names(tmp_path: Path) -> None:
    config = CONFIGS["nexus-tiny"]
    model = nexus_checkpoint(config, tmp_path / "model.bin")
    out = export_to_hf(tmp_path / "model.bin", tmp_path / "hf")
    tensors = load_file(out / "model.safetensors")
    renamed = {
        k.replace("b_layernorm", "B_layernorm").replace("c_layernorm", "C_layernorm"): v
        for k, v in tensors.items()
    }
    assert renamed.keys() != tensors.keys()
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    back = imported_model(import_from_hf(out, tmp_path / "imported.bin"))
    ids = random_bytes(config, 1, 24, seed=6)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def test_import_reads_a_sharded_checkpoint(tmp_path: Path) -> None:
    config = CONFIGS["untied"]
    model = nexus_checkpoint(config, tmp_path / "model.bin")
    out = export_to_hf(tmp_path / "model.bin", tmp_path / "hf")
    tensors = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for index, shard in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-0000{index + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in shard}, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    back = imported_model(import_from_hf(out, tmp_path / "imported.bin"))
    ids = random_bytes(config, 1, 24, seed=7)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def edit_export(tmp_path: Path, **changes: object) -> Path:
    nexus_checkpoint(CONFIGS["nexus-tiny"], tmp_path / "model.bin")
    out = export_to_hf(tmp_path / "model.bin", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"num_experts": 16, "expert_layer_period": 2, "expert_layer_offset": 1},
            "missing: model.layers.1.feed_forward.experts.0",
        ),
        (
            {"num_experts": 4, "num_experts_per_tok": 5, "expert_layer_period": 2,
             "expert_layer_offset": 1},
            "experts_per_token 5 exceeds num_experts 4",
        ),
        ({"vocab_size": 65536}, "vocab_size 65536 is more than the 256 byte values"),
        ({"mamba_proj_bias": True}, "mamba_proj_bias"),
        ({"model_type": "llama"}, "only Jamba"),
        ({"intermediate_size": 100}, "wrong shape: model.layers.0.feed_forward"),
        ({"attn_layer_offset": 0}, "missing: model.layers.0.self_attn"),
    ],
)  # fmt: skip
def test_import_refuses_what_nexus_cannot_hold(
    changes: dict[str, object], message: str, tmp_path: Path
) -> None:
    out = edit_export(tmp_path, **changes)
    with pytest.raises(NexusError, match=message):
        import_from_hf(out, tmp_path / "imported.bin")
    assert not (tmp_path / "imported.bin").exists()


def test_import_of_a_transformers_jamba_moe_matches_its_logits(tmp_path: Path) -> None:
    transformers = jamba()
    hf_config = transformers.JambaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, attn_layer_period=3, attn_layer_offset=1,
        num_experts=3, num_experts_per_tok=2, expert_layer_period=1, expert_layer_offset=0,
        router_aux_loss_coef=0.01, mamba_d_state=4, use_mamba_kernels=False,
        pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(10)
    hf = transformers.JambaForCausalLM(hf_config).eval()
    perturb(hf, seed=10)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "imported.bin")]) == 0
    model = imported_model(tmp_path / "imported.bin")
    config = model.config
    assert (config.num_experts, config.experts_per_token) == (3, 2)
    assert config.moe_layers == (0, 1, 2) and config.router_aux_loss_coef == 0.01
    diff = max_logit_diff(model, hf, random_bytes(config, 2, 40, seed=11))
    print(f"HF-native MoE import: max |Δlogit| {diff:.2e}")
    assert diff < TOLERANCE


def test_moe_export_matches_save_pretrained_routing_and_aux_loss(tmp_path: Path) -> None:
    jamba()
    config = CONFIGS["moe"]
    model = nexus_checkpoint(config, tmp_path / "model.bin", seed=12)
    out = export_to_hf(tmp_path / "model.bin", tmp_path / "hf")
    written = json.loads((out / "config.json").read_text())
    assert (written["num_experts"], written["num_experts_per_tok"]) == (4, 2)
    assert (written["expert_layer_period"], written["expert_layer_offset"]) == (2, 1)
    assert written["router_aux_loss_coef"] == 0.001
    hf = load_hf(out)
    assert hf.config.layers_num_experts == [1, 4, 1, 4]
    # The file holds what transformers' own save_pretrained writes for this model.
    hf.save_pretrained(tmp_path / "resaved")
    ours, theirs = (
        load_file(out / "model.safetensors"),
        load_file(tmp_path / "resaved" / "model.safetensors"),
    )
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    ids = random_bytes(config, 2, 48, seed=13)
    with torch.no_grad():
        hf_out = hf(ids, use_cache=False, output_router_logits=True)
        nexus_logits = model(ids)
    # Routing is not degenerate: tokens differ in their first choice, and every expert serves.
    for logits in hf_out.router_logits:
        first_choices = set(logits.argmax(-1).tolist())
        assert first_choices == {0, 1, 2, 3}, first_choices
    assert (nexus_logits - hf_out.logits).abs().max() < TOLERANCE
    torch.testing.assert_close(model.aux_loss(), hf_out.aux_loss, atol=1e-5, rtol=1e-5)


def test_a_trained_moe_run_exports_with_equal_logits(text_corpus: Path, tmp_path: Path) -> None:
    jamba()
    run = tiny_config(text_corpus, tmp_path / "run", preset="nexus-tiny-moe", max_steps=4)
    Trainer(run, progress=False).run()
    assert main(["export", str(tmp_path / "run" / "step_4.bin"), str(tmp_path / "hf")]) == 0
    model = imported_model(tmp_path / "run" / "step_4.bin")
    hf = load_hf(tmp_path / "hf")
    diff = max_logit_diff(model, hf, random_bytes(model.config, 2, 32, seed=14))
    print(f"trained nexus-tiny-moe: max |Δlogit| {diff:.2e}")
    assert diff < TOLERANCE


# --- the command line and what can use an imported checkpoint ---------------------------------


def test_cli_export_import_then_sample_eval_and_fine_tune(
    tmp_path: Path, text_corpus: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    config = CONFIGS["nexus-tiny"]
    model = nexus_checkpoint(config, tmp_path / "model.bin")
    hf_dir, imported = tmp_path / "hf", tmp_path / "imported.bin"
    assert main(["export", str(tmp_path / "model.bin"), str(hf_dir)]) == 0
    assert main(["import", str(hf_dir), str(imported)]) == 0
    assert main(["import", str(hf_dir), str(imported)]) == 2  # exists: refused without --force
    assert b"exists" in capsysbinary.readouterr().err

    args = ["sample", str(imported), "--prompt", "ROMEO", "--temperature", "0"]
    assert main([*args, "--max_new_tokens", "16"]) == 0
    expected = b"ROMEO" + generate(model, b"ROMEO", 16, temperature=0)
    # Printed as text: bytes that are not UTF-8 show as U+FFFD.
    assert capsysbinary.readouterr().out == expected.decode(errors="replace").encode() + b"\n"
    assert main(["eval", str(imported), "--data", str(text_corpus), "--json"]) == 0
    assert json.loads(capsysbinary.readouterr().out)["step"] == 0

    # The imported checkpoint resumes as step 0 of a fine-tuning run.
    run = tiny_config(text_corpus, tmp_path / "run", max_steps=2, eval_interval=2)
    Trainer(run, resume=str(imported)).run()
    assert load_checkpoint(tmp_path / "run" / "step_2.bin").step == 2
