"""Every size and choice of a Nexus model and of a training run, the named presets, and the
layering of defaults < config file (TOML or YAML) < command-line flags."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from nexus.errors import NexusError
from nexus.sources import DEFAULT_EXCLUDE

SSM_CHOICES = ("mamba1", "mamba2")
COMPILE_CHOICES = ("auto", "on", "off")
SCHEDULE_CHOICES = ("cosine", "wsd")
OPTIMIZER_CHOICES = ("adamw", "muon")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the hybrid stack. Parameter names follow Hugging Face's Jamba layout."""

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 6
    attention_layers: tuple[int, ...] = (3,)  # after Mamba layers: attention has no positions
    n_heads: int = 8
    n_kv_heads: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 16  # Mamba-1 only
    ssm: str = "mamba1"  # the SSM mixer: "mamba1" (Jamba's) or "mamba2" (SSD, as in Bamba)
    ssm_head_dim: int = 64  # Mamba-2 only: channels per SSM head (P)
    n_groups: int = 1  # Mamba-2 only: groups of heads sharing B and C (G)
    mlp_hidden: int = 928
    # Jamba's sparse mixture-of-experts MLP: layer i is MoE when num_experts > 1 and
    # i % expert_layer_period == expert_layer_offset; each token runs its experts_per_token
    # experts. num_experts = 1 is the dense SwiGLU in every layer (the other fields unused).
    num_experts: int = 1
    experts_per_token: int = 2
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss in training
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    seq_len: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_layers", tuple(self.attention_layers))
        self.validate()

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ssm_heads(self) -> int:
        """Mamba-2's number of SSM heads (H), each with its own scalar decay."""
        return self.d_inner // self.ssm_head_dim

    def is_attention(self, layer: int) -> bool:
        return layer in self.attention_layers

    def is_moe(self, layer: int) -> bool:
        """Whether layer's MLP is a sparse mixture of experts (Hugging Face Jamba's rule)."""
        return self.num_experts > 1 and layer % self.expert_layer_period == self.expert_layer_offset

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if self.is_moe(i))

    def validate(self) -> None:
        positive = (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "d_state",
            "d_conv",
            "expand",
            "dt_rank",
            "ssm_head_dim",
            "n_groups",
            "mlp_hidden",
            "num_experts",
            "experts_per_token",
            "expert_layer_period",
            "seq_len",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise NexusError(f"model config: {name} must be a positive integer, got {value!r}")
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
            raise NexusError(f"model config: norm_eps must be in (0, 1), got {self.norm_eps!r}")
        offset = self.expert_layer_offset
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise NexusError(
                f"model config: expert_layer_offset must be an integer >= 0, got {offset!r}"
            )
        coef = self.router_aux_loss_coef
        if not (_is_number(coef) and coef >= 0 and math.isfinite(coef)):
            raise NexusError(
                f"model config: router_aux_loss_coef must be a number >= 0, got {coef!r}"
            )
        if self.vocab_size > 256:
            raise NexusError(
                f"model config: vocab_size {self.vocab_size} is more than the 256 byte values; "
                "use vocab_size <= 256"
            )
        if self.d_model % self.n_heads:
            raise NexusError(
                f"model config: d_model {self.d_model} is not divisible by n_heads "
                f"{self.n_heads}; pick n_heads that divides d_model"
            )
        if self.n_heads % self.n_kv_heads:
            raise NexusError(
                f"model config: n_heads {self.n_heads} is not divisible by n_kv_heads "
                f"{self.n_kv_heads}; pick n_kv_heads that divides n_heads (e.g. 1, 2, 4)"
            )
        for layer in self.attention_layers:
            if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
                raise NexusError(
                    f"model config: attention layer index {layer!r} is outside the stack of "
                    f"{self.n_layers} layers; use indices 0..{self.n_layers - 1}"
                )
        if len(set(self.attention_layers)) != len(self.attention_layers):
            raise NexusError("model config: attention_layers lists a layer twice")
        self._validate_experts()
        if self.ssm not in SSM_CHOICES:
            raise NexusError(
                f"model config: ssm must be one of {', '.join(SSM_CHOICES)}, got {self.ssm!r}"
            )
        if self.ssm == "mamba2":
            if self.d_inner % self.ssm_head_dim:
                raise NexusError(
                    f"model config: d_inner {self.d_inner} (expand · d_model) is not divisible "
                    f"by ssm_head_dim {self.ssm_head_dim}; pick a head dim that divides it"
                )
            if self.ssm_heads % self.n_groups:
                raise NexusError(
                    f"model config: the {self.ssm_heads} SSM heads are not divisible by "
                    f"n_groups {self.n_groups}; pick n_groups that divides them (e.g. 1)"
                )

    def _validate_experts(self) -> None:
        period, offset = self.expert_layer_period, self.expert_layer_offset
        if offset >= period:
            # Hugging Face's JambaConfig refuses it too; and such an offset is never reached.
            raise NexusError(
                f"model config: expert_layer_offset {offset} must be below expert_layer_period "
                f"{period} (layer i is MoE when i % period == offset); e.g. period 2, offset 1"
            )
        if self.num_experts == 1:
            return
        if self.experts_per_token > self.num_experts:
            raise NexusError(
                f"model config: experts_per_token {self.experts_per_token} exceeds num_experts "
                f"{self.num_experts}; route each token to at most num_experts experts"
            )
        if not self.moe_layers:
            raise NexusError(
                f"model config: num_experts is {self.num_experts} but no layer of {self.n_layers} "
                f"has index % {period} == {offset}; lower expert_layer_period or "
                "expert_layer_offset, or set num_experts 1 for a dense model"
            )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["attention_layers"] = list(self.attention_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**_checked_kwargs(cls, data, "model config"))


PRESETS: dict[str, ModelConfig] = {
    # The reference: Jamba's layout at 6.74M parameters (2,421,744 + 4,608·mlp_hidden, untied).
    "nexus-6m": ModelConfig(),
    # The same stack with Mamba-2 (SSD) mixers: 8 SSM heads of 64 channels, one B/C group,
    # N = 64 (Mamba-2's usual state size: 4x Mamba-1's state per layer for ~15 % more mixer
    # FLOPs). 6,733,304 parameters at the reference's mlp_hidden.
    "nexus-6m-ssd": ModelConfig(ssm="mamba2", d_state=64, ssm_head_dim=64, n_groups=1),
    # The recommended preset for a quick run on CPU: the SSD stack, with the training settings
    # of PRESET_TRAINING (a higher peak lr over a 1000-step schedule).
    "nexus-6m-fast": ModelConfig(ssm="mamba2", d_state=64, ssm_head_dim=64, n_groups=1),
    # GPU sizes in Jamba's proportions: one attention layer in eight (at offset 4, as Jamba),
    # GQA with 4-5 query heads per KV head, Mamba-1 with state 16, dt_rank d_model / 16.
    "nexus-25m": ModelConfig(
        d_model=512,
        n_layers=8,
        attention_layers=(4,),
        n_heads=8,
        n_kv_heads=2,
        dt_rank=32,
        mlp_hidden=1024,
        seq_len=512,
    ),
    "nexus-100m": ModelConfig(
        d_model=640,
        n_layers=16,
        attention_layers=(4, 12),
        n_heads=10,
        n_kv_heads=2,
        dt_rank=40,
        mlp_hidden=2048,
        seq_len=1024,
    ),
    # Seconds to train: for tests and quick experiments.
    "nexus-tiny": ModelConfig(
        d_model=64,
        n_layers=2,
        attention_layers=(1,),
        n_heads=4,
        n_kv_heads=2,
        d_state=8,
        dt_rank=4,
        mlp_hidden=128,
        seq_len=32,
    ),
    # nexus-tiny with Jamba's MoE on the attention layer: 4 experts, top-2.
    "nexus-tiny-moe": ModelConfig(
        d_model=64,
        n_layers=2,
        attention_layers=(1,),
        n_heads=4,
        n_kv_heads=2,
        d_state=8,
        dt_rank=4,
        mlp_hidden=128,
        num_experts=4,
        experts_per_token=2,
        seq_len=32,
    ),
}


# Training settings that come with a preset, between the TrainConfig defaults (the reference
# run) and the user's config file and flags. Measured in docs/performance.md: nexus-6m-fast's
# lr 1e-3 beat 6e-4 and 2e-3 at step 200, and its 1000 steps reach val 1.512 in 20 minutes,
# where the reference needs about 31.
PRESET_TRAINING: dict[str, dict[str, Any]] = {
    "nexus-6m-fast": {
        "out_dir": "checkpoints/nexus-6m-fast",
        "max_steps": 1000,
        "lr": 1e-3,
        "warmup_steps": 50,
        "micro_batch": 8,  # the same 16-window step as 4 x 4, 4 % faster on this CPU
        "grad_accum": 2,
    },
    # Starting points for one GPU under bf16 (not yet tuned by measurement): 16K and 32K
    # tokens a step, the peak lr of GPT-3's table for these sizes (6e-4 at 125M and below).
    "nexus-25m": {
        "out_dir": "checkpoints/nexus-25m",
        "max_steps": 5000,
        "lr": 6e-4,
        "warmup_steps": 250,
        "micro_batch": 32,
        "grad_accum": 1,
        "eval_interval": 250,
    },
    "nexus-100m": {
        "out_dir": "checkpoints/nexus-100m",
        "max_steps": 10000,
        "lr": 6e-4,
        "warmup_steps": 500,
        "micro_batch": 16,
        "grad_accum": 2,
        "eval_interval": 500,
    },
}


def preset_for(model: ModelConfig) -> tuple[str, dict[str, Any]]:
    """A preset name and the [model] overrides that give `model`: the equal preset, else
    nexus-6m with the fields that differ."""
    for name, candidate in PRESETS.items():
        if candidate == model:
            return name, {}
    base = PRESETS["nexus-6m"].to_dict()
    return "nexus-6m", {k: v for k, v in model.to_dict().items() if base[k] != v}


def preset(name: str) -> ModelConfig:
    """The named preset, or a NexusError listing the known names."""
    if name not in PRESETS:
        raise NexusError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Defaults are the reference run of the `nexus-6m` preset."""

    preset: str = "nexus-6m"
    data: str | None = None  # None: Tiny Shakespeare, resolved by nexus.data
    # A directory, .jsonl or .gz source: the JSON Lines field, the files a directory gives
    # (comma-separated name patterns), and what joins the documents in the prepared store.
    # Validate on this source instead of the last 10 % of --data (which then trains whole).
    val_data: str | None = None
    text_field: str = "text"
    include: str = "*"
    exclude: str = DEFAULT_EXCLUDE
    doc_separator: str = "\n\n"
    # Start from these weights (a Nexus checkpoint or a Hugging Face Jamba directory): the model
    # config comes from them; optimizer, schedule, step, data and out_dir are this run's own.
    init_from: str | None = None
    out_dir: str = "checkpoints/nexus_production"
    max_steps: int = 2000
    micro_batch: int = 4
    grad_accum: int = 4
    lr: float = 3e-4
    min_lr: float = 0.0  # cosine floor: the reference run ended at val 1.4971, 1.5098 at 10 %
    warmup_steps: int = 100
    # After the warmup: "cosine" decays to min_lr at max_steps; "wsd" (warmup-stable-decay)
    # holds the peak, then decays linearly to min_lr over the last cooldown_fraction of steps.
    schedule: str = "cosine"
    cooldown_fraction: float = 0.2
    weight_decay: float = 0.1
    # "muon": Muon for the layers' weight matrices, AdamW for the rest (nexus.optim)
    optimizer: str = "adamw"
    dropout: float = 0.0  # training only: on the embeddings and each residual branch
    grad_clip: float = 1.0
    eval_interval: int = 200
    save_interval: int = 0  # 0: same as eval_interval
    keep_last: int = 0  # keep the N newest step_<N>.bin files; 0 keeps them all
    eval_batches: int = 32  # fixed batches of eval_batch_size windows: ±0.01 nats
    eval_batch_size: int = 16
    log_interval: int = 10
    tensorboard: bool = True  # event files in out_dir/tensorboard, when tensorboard is installed
    max_bad_steps: int = 5  # non-finite steps in a row before training stops
    # Off by default, so the reference run always trains to max_steps. On, an eval stops the
    # run when val loss has stayed above its best for early_stop_patience evals, or when even
    # the optimistic end of the forecast's interval gains less than early_stop_min_gain nats
    # over the remaining steps (the upper end, so an uncertain forecast never stops a run).
    early_stop: bool = False
    early_stop_patience: int = 3
    early_stop_min_gain: float = 0.01
    seed: int = 1337
    sample_prompt: str = "To be"
    sample_bytes: int = 200
    device: str = "auto"
    compile: str = "auto"  # torch.compile the training step: auto (long dense runs), on, off
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's fields

    def __post_init__(self) -> None:
        self.validate()

    @property
    def checkpoint_interval(self) -> int:
        return self.save_interval or self.eval_interval

    @property
    def cooldown_steps(self) -> int:
        """The wsd schedule's linear cool-down, at least one step, never into the warmup."""
        steps = round(self.cooldown_fraction * self.max_steps)
        return max(1, min(steps, self.max_steps - self.warmup_steps))

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.model_config().seq_len

    def model_config(self) -> ModelConfig:
        base = preset(self.preset)
        return ModelConfig.from_dict({**base.to_dict(), **self.model}) if self.model else base

    def validate(self) -> None:
        positive_ints = (
            "max_steps",
            "micro_batch",
            "grad_accum",
            "eval_interval",
            "eval_batches",
            "eval_batch_size",
            "log_interval",
            "max_bad_steps",
            "early_stop_patience",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise NexusError(f"train config: {name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "save_interval", "keep_last", "sample_bytes", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise NexusError(f"train config: {name} must be an integer >= 0, got {value!r}")
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0 or not math.isfinite(value):
                raise NexusError(f"train config: {name} must be a number > 0, got {value!r}")
        for name in ("min_lr", "weight_decay", "early_stop_min_gain"):
            value = getattr(self, name)
            if not _is_number(value) or not value >= 0 or not math.isfinite(value):
                raise NexusError(f"train config: {name} must be a number >= 0, got {value!r}")
        if not (_is_number(self.dropout) and 0 <= self.dropout < 1):
            raise NexusError(f"train config: dropout must be in [0, 1), got {self.dropout!r}")
        if self.min_lr > self.lr:
            raise NexusError(
                f"train config: min_lr {self.min_lr} is above the peak lr {self.lr}; lower it"
            )
        if self.warmup_steps > self.max_steps:
            raise NexusError(
                f"train config: warmup_steps {self.warmup_steps} exceeds max_steps "
                f"{self.max_steps}; shorten the warmup or train longer"
            )
        for name in ("tensorboard", "early_stop"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise NexusError(f"train config: {name} must be true or false, got {value!r}")
        if self.schedule not in SCHEDULE_CHOICES:
            raise NexusError(
                f"train config: schedule must be one of {', '.join(SCHEDULE_CHOICES)}, "
                f"got {self.schedule!r}"
            )
        if self.optimizer not in OPTIMIZER_CHOICES:
            raise NexusError(
                f"train config: optimizer must be one of {', '.join(OPTIMIZER_CHOICES)}, "
                f"got {self.optimizer!r}"
            )
        fraction = self.cooldown_fraction
        if not (_is_number(fraction) and 0 < fraction <= 1):
            raise NexusError(f"train config: cooldown_fraction must be in (0, 1], got {fraction!r}")
        if self.compile not in COMPILE_CHOICES:
            raise NexusError(f"train config: compile must be auto, on or off, got {self.compile!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise NexusError(f"train config: device must be auto, cpu or cuda, got {self.device!r}")
        if not isinstance(self.model, dict):
            raise NexusError("train config: model must be a table of model-config overrides")
        self.model_config()  # validates the preset name and the overrides

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**_checked_kwargs(cls, data, "train config"))


def _checked_kwargs(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    """Reject unknown keys and values of the wrong type before they reach the dataclass."""
    known = {f.name: f for f in fields(cls)}
    for key, value in data.items():
        if key not in known:
            raise NexusError(f"{what}: unknown key {key!r}; known keys: {', '.join(known)}")
        expected = _expected_types(known[key].type)
        if expected and not isinstance(value, expected):
            raise NexusError(
                f"{what}: {key} has the wrong type ({type(value).__name__}: {value!r}); "
                f"expected {' or '.join(t.__name__ for t in expected)}"
            )
        if isinstance(value, bool) and bool not in expected:
            raise NexusError(f"{what}: {key} must be a number, not a boolean")
    return dict(data)


def _expected_types(annotation: str) -> tuple[type, ...]:
    names = {"int": int, "float": (int, float), "str": str, "bool": bool, "None": type(None)}
    out: list[type] = []
    for part in str(annotation).split("|"):
        part = part.strip()
        if part.startswith("tuple"):
            out += [tuple, list]
        elif part.startswith("dict"):
            out.append(dict)
        elif part in names:
            found = names[part]
            out += list(found) if isinstance(found, tuple) else [found]
    return tuple(out)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML file of TrainConfig keys (and a `model` table) into a dict."""
    path = Path(path)
    if path.is_dir():
        raise NexusError(f"config file {str(path)!r} is a directory; pass a .toml or .yaml file")
    if not path.is_file():
        raise NexusError(f"config file {str(path)!r} does not exist; check the --config path")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise NexusError(
            f"config file {str(path)!r} could not be read ({error.strerror or error}); "
            "fix its permissions or pass another --config"
        ) from None
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise NexusError(f"config file {str(path)!r}: use a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise NexusError(f"config file {str(path)!r} is malformed: {first_line}") from error
    if not isinstance(data, dict):
        raise NexusError(f"config file {str(path)!r} must hold a table of settings at the top")
    return data


def resolve_train_config(
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> TrainConfig:
    """Defaults < the preset's training settings < base (a resumed run's own settings) < config
    file < flags (given as a dict of the keys the user set). A setting chosen for the user (a
    warmup fitted to a short run) is explained by a line appended to `notes`."""
    merged: dict[str, Any] = dict(base or {})
    if file is not None:
        merged.update(load_config_file(file))
    for key, value in (overrides or {}).items():
        if key == "model":
            merged["model"] = {**merged.get("model", {}), **value}
        else:
            merged[key] = value
    if merged.get("init_from"):
        from nexus.finetune import fit_to_parent  # reads the parent, which needs torch

        merged = fit_to_parent(merged)
    chosen = merged.get("preset", TrainConfig.preset)
    settings = {**PRESET_TRAINING.get(chosen, {}), **merged}
    if "warmup_steps" not in merged:  # neither the user nor the resumed run chose it
        default = settings.get("warmup_steps", TrainConfig.warmup_steps)
        settings["warmup_steps"] = fitted_warmup(settings)
        if settings["warmup_steps"] != default and notes is not None:
            notes.append(
                f"warmup_steps {settings['warmup_steps']}: the default {default} would take more "
                f"than a fifth of max_steps {settings['max_steps']}, so it is a tenth of the run "
                "(pass --warmup_steps to choose)"
            )
    return TrainConfig.from_dict(settings)


def fitted_warmup(settings: dict[str, Any]) -> int:
    """The default (or the preset's) warmup, or a tenth of the run when the default would take
    more than a fifth of it: `--max_steps 50` gets a 5-step warmup instead of an error."""
    default = settings.get("warmup_steps", TrainConfig.warmup_steps)
    max_steps = settings.get("max_steps", TrainConfig.max_steps)
    if not (_is_number(default) and _is_number(max_steps)) or default <= max_steps // 5:
        return default
    return max(1, int(max_steps) // 10)
