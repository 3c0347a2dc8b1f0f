"""Checkpoints: safetensors files holding the model, the optimizer state and the run's
metadata (config, step, metrics, RNG), written atomically and verified by checksum on load;
the metadata's schema; and the model a checkpoint holds, rebuilt for use.

Opening a checkpoint never runs code: safetensors holds only tensors and a JSON header.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from nexus.config import ModelConfig, TrainConfig
from nexus.errors import NexusError
from nexus.model import NexusLM
from nexus.rundir import atomic_write

FORMAT = "nexus-checkpoint"
FORMAT_VERSION = "1"
OPTIMIZER_PREFIX = "optimizer."  # model weights keep their own names
RNG_KEY = "rng.torch"
WEIGHTS_ONLY = "weights_only"  # the metadata key that marks a checkpoint no run resumes from


@dataclass
class Checkpoint:
    """What a checkpoint holds, split back into its parts."""

    model_state: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    rng_state: torch.Tensor | None
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def checkpoint_meta(
    *,
    step: int,
    train_config: TrainConfig,
    model_config: ModelConfig,
    optimizer_param_groups: list[dict[str, Any]],
    metrics: dict[str, Any] | None = None,
    best_val_loss: float | None = None,
    best_step: int | None = None,
    elapsed_s: float = 0.0,
    **extra: Any,
) -> dict[str, Any]:
    """The metadata every checkpoint carries: what the trainer needs to resume exactly and
    what `eval`, `sample` and the exports need to rebuild the model. `extra` adds keys such as
    where an imported checkpoint came from."""
    from nexus import __version__

    return {
        "step": step,
        "train_config": train_config.to_dict(),
        "model_config": model_config.to_dict(),
        "metrics": metrics or {},
        "best_val_loss": best_val_loss,
        "best_step": best_step,
        "elapsed_s": elapsed_s,
        "optimizer_param_groups": optimizer_param_groups,
        "nexus_version": __version__,
        **extra,
    }


def encode_checkpoint(
    model_state: dict[str, torch.Tensor],
    optimizer_tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    rng_state: torch.Tensor | None = None,
) -> bytes:
    tensors = {name: t.detach().contiguous().cpu() for name, t in model_state.items()}
    tensors.update(
        {OPTIMIZER_PREFIX + k: t.detach().contiguous().cpu() for k, t in optimizer_tensors.items()}
    )
    if rng_state is not None:
        tensors[RNG_KEY] = rng_state.cpu()
    meta_text = json.dumps(meta, allow_nan=True, sort_keys=True)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": str(int(meta["step"])),
        "checksum": tensors_checksum(tensors),
        "nexus": meta_text,
        # The metadata (config, step, best loss) is checked too: a flipped bit there would
        # otherwise change a resumed run silently. Older files lack it and are read as before.
        "meta_checksum": hashlib.sha256(meta_text.encode()).hexdigest(),
    }
    return save_safetensors(tensors, metadata=header)


def weights_only_payload(model_state: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """A checkpoint of the weights alone (best.bin): about a third of a resumable one, since
    AdamW keeps two moments per weight. It loads wherever a model is used, never to resume."""
    return encode_checkpoint(model_state, {}, {**meta, WEIGHTS_ONLY: True})


def save_checkpoint(
    path: str | Path,
    model_state: dict[str, torch.Tensor],
    optimizer_tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    rng_state: torch.Tensor | None = None,
) -> bytes:
    """Write a checkpoint atomically; returns its bytes (so best.bin can be the same file)."""
    payload = encode_checkpoint(model_state, optimizer_tensors, meta, rng_state)
    atomic_write(Path(path), payload)
    return payload


def read_header(path: str | Path) -> dict[str, str]:
    """The safetensors `__metadata__` of a checkpoint, without reading the tensors."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
            raise ValueError("the header is not a safetensors table")
        return dict(header.get("__metadata__") or {})
    except FileNotFoundError:
        raise NexusError(f"checkpoint {str(path)!r} does not exist; check the path") from None
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as error:
        raise NexusError(
            f"checkpoint {str(path)!r} is not a readable safetensors file ({error}); "
            "it may be truncated or not a Nexus checkpoint"
        ) from None


def read_meta(path: str | Path, header: dict[str, str] | None = None) -> dict[str, Any]:
    """A checkpoint's run metadata (step, configs, metrics), verified against its checksum,
    without reading the tensors. A foreign or damaged file raises NexusError."""
    path = Path(path)
    if path.is_dir():
        raise NexusError(f"checkpoint {str(path)!r} is a directory; pass a .bin checkpoint file")
    header = read_header(path) if header is None else header
    if header.get("format") != FORMAT or "nexus" not in header:
        raise NexusError(
            f"{str(path)!r} is not a Nexus checkpoint (no '{FORMAT}' format tag); "
            "pass a step_<N>.bin or best.bin written by `nexus train`"
        )
    text = header["nexus"]
    expected = header.get("meta_checksum")
    damaged = expected is not None and hashlib.sha256(text.encode()).hexdigest() != expected
    try:
        meta = None if damaged else json.loads(text)
    except ValueError:
        meta = None
    if not (
        isinstance(meta, dict)
        and isinstance(meta.get("step"), int)
        and isinstance(meta.get("model_config"), dict)
    ):
        raise NexusError(
            f"checkpoint {str(path)!r} is corrupted: its metadata does not match the checksum "
            "saved with it or is unreadable; use an earlier checkpoint"
        )
    return meta


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint; a damaged or foreign file raises NexusError."""
    path = Path(path)
    header = read_header(path) if not path.is_dir() else {}
    meta = read_meta(path, header)
    try:
        tensors = load_safetensors(path.read_bytes())
    except (SafetensorError, OSError, ValueError) as error:
        raise NexusError(
            f"checkpoint {str(path)!r} is corrupted or truncated ({error}); "
            "use an earlier checkpoint"
        ) from None
    if tensors_checksum(tensors) != header.get("checksum"):
        raise NexusError(
            f"checkpoint {str(path)!r} is corrupted: its tensors do not match the checksum "
            "saved with them; use an earlier checkpoint"
        )
    rng_state = tensors.pop(RNG_KEY, None)
    optimizer_tensors = {
        k[len(OPTIMIZER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(OPTIMIZER_PREFIX)
    }
    model_state = {k: v for k, v in tensors.items() if not k.startswith(OPTIMIZER_PREFIX)}
    return Checkpoint(model_state, optimizer_tensors, rng_state, meta)


def model_state_for_saving(model: NexusLM) -> dict[str, torch.Tensor]:
    """The weights a checkpoint stores (a tied lm_head once, as the embedding)."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # the same tensor as the embedding, as in Hugging Face
    return state


def model_from_checkpoint(
    checkpoint: Checkpoint,
    device: torch.device | str = "cpu",
    expected: ModelConfig | None = None,
    dropout: float = 0.0,
) -> NexusLM:
    """Rebuild the model a checkpoint holds (checking it against `expected` when given), with
    the dropout of the run that goes on training it."""
    config = ModelConfig.from_dict(checkpoint.meta["model_config"])
    if expected is not None and config != expected:
        differences = [
            f"{key} {value!r} (checkpoint) vs {getattr(expected, key)!r}"
            for key, value in config.to_dict().items()
            if value != expected.to_dict()[key]
        ]
        raise NexusError(
            "the checkpoint holds a different model config than the one asked for: "
            + "; ".join(differences)
            + ". Use the matching --preset, or start a new run in another --out_dir"
        )
    model = NexusLM(config, dropout)
    try:
        missing, unexpected = model.load_state_dict(checkpoint.model_state, strict=False)
    except RuntimeError as error:  # tensors of other shapes than the config gives
        reason = str(error).strip().splitlines()[-1].strip()
        raise NexusError(
            f"the checkpoint's weights do not fit its config ({reason}); it was not "
            "written by this version of Nexus"
        ) from None
    allowed_missing = ["lm_head.weight"] if config.tie_embeddings else []
    if unexpected or sorted(missing) != allowed_missing:
        raise NexusError(
            f"the checkpoint's weights do not fit its config (missing {missing}, unexpected "
            f"{unexpected}); it was not written by this version of Nexus"
        )
    return model.to(device)
