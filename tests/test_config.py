"""ModelConfig / TrainConfig validation, presets and the defaults < file < flags layering."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from nexus.config import PRESETS, ModelConfig, TrainConfig, preset, resolve_train_config
from nexus.errors import NexusError
from nexus.model import NexusLM


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_heads": 8, "n_kv_heads": 3}, "not divisible by n_kv_heads"),
        ({"attention_layers": (6,)}, "outside the stack of 6 layers"),
        ({"attention_layers": (-1,)}, "outside the stack"),
        ({"d_model": 0}, "d_model must be a positive integer"),
        ({"d_state": -4}, "d_state must be a positive integer"),
        ({"n_heads": 7}, "not divisible by n_heads"),
        ({"vocab_size": 300}, "more than the 256 byte values"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"num_experts": 0}, "num_experts must be a positive integer"),
        ({"num_experts": 4, "experts_per_token": 5}, "experts_per_token 5 exceeds num_experts 4"),
        ({"expert_layer_period": 1}, "expert_layer_offset 1 must be below expert_layer_period 1"),
        ({"expert_layer_offset": -1}, "expert_layer_offset must be an integer >= 0"),
        (
            {"num_experts": 4, "n_layers": 3, "attention_layers": (1,), "expert_layer_period": 4,
             "expert_layer_offset": 3},
            "no layer of 3 has index % 4 == 3",
        ),
        ({"router_aux_loss_coef": -0.1}, "router_aux_loss_coef must be a number >= 0"),
        ({"router_aux_loss_coef": float("nan")}, "router_aux_loss_coef must be a number >= 0"),
    ],
)  # fmt: skip
def test_model_config_rejects_impossible_combinations(overrides: dict, message: str) -> None:
    with pytest.raises(NexusError, match=message):
        ModelConfig(**overrides)


def test_moe_settings_default_to_dense_and_old_configs_still_load() -> None:
    reference = ModelConfig()
    assert reference.num_experts == 1 and reference.moe_layers == ()
    # A config saved before the MoE fields existed loads with their (dense) defaults.
    old = {k: v for k, v in reference.to_dict().items() if "expert" not in k and "router" not in k}
    assert ModelConfig.from_dict(old) == reference == preset("nexus-6m")
    moe = preset("nexus-tiny-moe")
    assert moe.moe_layers == (1,) and moe.experts_per_token == 2
    assert ModelConfig.from_dict(moe.to_dict()) == moe
    with pytest.raises(NexusError, match="num_experts has the wrong type"):
        ModelConfig.from_dict({"num_experts": 2.5})


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(NexusError, match=r"unknown preset 'nexus-7b'.*nexus-6m"):
        preset("nexus-7b")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": 0.0}, "lr must be a number > 0"),
        ({"lr": -1e-3}, "lr must be a number > 0"),
        ({"max_steps": 0}, "max_steps must be a positive integer"),
        ({"warmup_steps": 300, "max_steps": 200}, "warmup_steps 300 exceeds max_steps 200"),
        ({"micro_batch": 0}, "micro_batch must be a positive integer"),
        ({"min_lr": 1.0}, "min_lr 1.0 is above the peak lr"),
        ({"optimizer": "sgd"}, "optimizer must be one of adamw, muon, got 'sgd'"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\), got -0.1"),
        ({"device": "tpu"}, "device must be auto, cpu or cuda"),
        ({"tensorboard": "no"}, "tensorboard must be true or false"),
        ({"compile": "yes"}, "compile must be auto, on or off, got 'yes'"),
        ({"model": {"n_kv_heads": 3}}, "not divisible by n_kv_heads"),
    ],
)
def test_train_config_rejects_bad_values(overrides: dict, message: str) -> None:
    with pytest.raises(NexusError, match=message):
        TrainConfig(**overrides)


def test_from_dict_rejects_unknown_keys_and_wrong_types() -> None:
    with pytest.raises(NexusError, match="unknown key 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(NexusError, match="max_steps has the wrong type"):
        TrainConfig.from_dict({"max_steps": "many"})
    with pytest.raises(NexusError, match="must be a number, not a boolean"):
        TrainConfig.from_dict({"max_steps": True})
    with pytest.raises(NexusError, match="tensorboard has the wrong type"):
        TrainConfig.from_dict({"tensorboard": 0})
    assert TrainConfig.from_dict({"tensorboard": False}).tensorboard is False


def test_layering_defaults_then_file_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "run.toml"
    file.write_text("max_steps = 500\nlr = 1e-3\nseed = 7\n[model]\nd_state = 8\n")
    config = resolve_train_config(file, {"lr": 5e-4})
    assert config.max_steps == 500  # from the file
    assert config.lr == 5e-4  # the flag beats the file
    assert config.seed == 7
    assert config.weight_decay == 0.1  # the default stays
    assert config.model_config().d_state == 8
    assert config.model_config().d_model == 256


def test_a_preset_brings_its_training_settings_below_file_and_flags(tmp_path: Path) -> None:
    fast = resolve_train_config(None, {"preset": "nexus-6m-fast"})
    assert (fast.lr, fast.max_steps, fast.warmup_steps) == (1e-3, 1000, 50)
    assert (fast.micro_batch, fast.grad_accum) == (8, 2)  # the same 16 windows per step
    assert fast.out_dir == "checkpoints/nexus-6m-fast"  # not the reference run's directory
    assert fast.weight_decay == 0.1 and fast.model_config().ssm == "mamba2"
    file = tmp_path / "run.toml"
    file.write_text('preset = "nexus-6m-fast"\nmax_steps = 300\n')
    layered = resolve_train_config(file, {"lr": 5e-4})
    assert (layered.max_steps, layered.lr, layered.warmup_steps) == (300, 5e-4, 50)
    reference = resolve_train_config(None, {})
    assert (reference.lr, reference.max_steps, reference.micro_batch) == (3e-4, 2000, 4)


def test_yaml_file_and_malformed_files(tmp_path: Path) -> None:
    good = tmp_path / "run.yaml"
    good.write_text("max_steps: 300\nwarmup_steps: 10\n")
    assert resolve_train_config(good).max_steps == 300
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("max_steps = = 3\n")
    with pytest.raises(NexusError, match=r"bad\.toml' is malformed"):
        resolve_train_config(bad_toml)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("max_steps: [1, 2\n")
    with pytest.raises(NexusError, match=r"bad\.yaml' is malformed"):
        resolve_train_config(bad_yaml)
    with pytest.raises(NexusError, match="does not exist"):
        resolve_train_config(tmp_path / "missing.toml")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("epochs = 3\n")
    with pytest.raises(NexusError, match="unknown key 'epochs'"):
        resolve_train_config(unknown)


def test_a_short_run_fits_the_default_warmup_and_says_so() -> None:
    notes: list[str] = []
    quick = resolve_train_config(None, {"max_steps": 50}, notes=notes)
    assert quick.warmup_steps == 5
    assert notes == [
        "warmup_steps 5: the default 100 would take more than a fifth of max_steps 50, so it is "
        "a tenth of the run (pass --warmup_steps to choose)"
    ]
    kept: list[str] = []
    assert resolve_train_config(None, {"max_steps": 500}, notes=kept).warmup_steps == 100
    assert kept == []  # a fifth of the run: the default stays
    with pytest.raises(NexusError, match="warmup_steps 100 exceeds max_steps 50"):
        resolve_train_config(None, {"max_steps": 50, "warmup_steps": 100})
    # a resumed run keeps the warmup it ran with
    resumed = resolve_train_config(None, {}, base={"max_steps": 50, "warmup_steps": 40})
    assert resumed.warmup_steps == 40


def test_the_readme_gives_every_preset_its_exact_parameter_count() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| `(nexus-[\w-]+)`[^|]*\| ([\d,]+)", readme, flags=re.MULTILINE)
    listed = {name: int(count.replace(",", "")) for name, count in rows}
    assert set(listed) == set(PRESETS)
    for name, config in PRESETS.items():
        with torch.device("meta"):  # sizes only: no memory for nexus-100m's weights
            parameters = sum(p.numel() for p in NexusLM(config).parameters())
        assert listed[name] == parameters, name
