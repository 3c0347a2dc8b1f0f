"""Starting a run from trained weights (`--init_from`): a Nexus checkpoint or a Hugging Face
Jamba directory gives the model config and the weights, never the optimizer state, schedule,
step, data or out_dir; the run records its parent (path, step, checksum)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nexus.checkpoint import load_checkpoint, model_from_checkpoint, read_header, read_meta
from nexus.config import ModelConfig, TrainConfig, preset_for
from nexus.errors import NexusError
from nexus.hf import model_config_from_jamba, model_from_hf, read_jamba_config
from nexus.model import NexusLM

NEXUS_CHECKPOINT = "nexus-checkpoint"
HUGGINGFACE_JAMBA = "huggingface-jamba"


@dataclass(frozen=True)
class Parent:
    """Where a fine-tune's weights come from."""

    path: str
    kind: str  # NEXUS_CHECKPOINT or HUGGINGFACE_JAMBA
    step: int | None  # the parent run's step; None for a Hugging Face directory
    checksum: str  # sha256 of the parent's tensors (Nexus) or weight files (Hugging Face)
    model_config: ModelConfig

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "step": self.step, "checksum": self.checksum}

    def load_model(self) -> NexusLM:
        if self.kind == HUGGINGFACE_JAMBA:
            return model_from_hf(self.path, seq_len=self.model_config.seq_len)
        return model_from_checkpoint(load_checkpoint(self.path))


def read_parent(source: str | Path) -> Parent:
    """The parent at `source`, read and checked; a NexusError names what is wrong with it."""
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise NexusError(
                f"--init_from {str(path)!r} is a directory without config.json; pass a Nexus "
                "checkpoint (.bin) or a Hugging Face Jamba directory"
            )
        hf_config = read_jamba_config(path)
        digest = hashlib.sha256()
        for weights in sorted(path.glob("*.safetensors")):
            digest.update(weights.read_bytes())
        config = model_config_from_jamba(hf_config, None)
        return Parent(str(path), HUGGINGFACE_JAMBA, None, digest.hexdigest(), config)
    if not path.is_file():
        raise NexusError(f"--init_from {str(path)!r}: no such checkpoint file or directory")
    meta = read_meta(path)
    config = ModelConfig.from_dict(meta["model_config"])
    checksum = read_header(path).get("checksum", "")
    return Parent(str(path), NEXUS_CHECKPOINT, meta["step"], checksum, config)


def fit_to_parent(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings with the parent's model: its preset and [model] overrides. A preset or
    [model] table the user chose that describes another model is refused, naming the fields."""
    parent = read_parent(settings["init_from"])
    if "preset" in settings or settings.get("model"):
        chosen = TrainConfig.from_dict(
            {k: v for k, v in settings.items() if k in {"preset", "model"}}
        ).model_config()
        if chosen != parent.model_config:
            differences = [
                f"{key} {value!r} (asked) vs {getattr(parent.model_config, key)!r} (parent)"
                for key, value in chosen.to_dict().items()
                if value != getattr(parent.model_config, key)
            ]
            raise NexusError(
                f"--init_from {parent.path!r} holds another model than the --preset/[model] "
                f"given: {'; '.join(differences)}. Leave them out: the model comes from the parent"
            )
    name, overrides = preset_for(parent.model_config)
    return {**settings, "preset": name, "model": overrides}
