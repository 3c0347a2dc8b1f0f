"""Checkpoints: safetensors files holding the model, the optimizer state and the run's
metadata (config, step, metrics, RNG), written atomically and verified by checksum on load.

Opening a checkpoint never runs code: safetensors holds only tensors and a JSON header.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from nexus.errors import NexusError

FORMAT = "nexus-checkpoint"
FORMAT_VERSION = "1"
OPTIMIZER_PREFIX = "optimizer."  # model weights keep their own names
RNG_KEY = "rng.torch"


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


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`: a crash
    at any instant leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a run's files should be readable like any
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


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


def save_checkpoint(
    path: str | Path,
    model_state: dict[str, torch.Tensor],
    optimizer_tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    rng_state: torch.Tensor | None = None,
) -> bytes:
    """Write a checkpoint atomically; returns its bytes (so best.bin can be the same file)."""
    payload = encode_checkpoint(model_state, optimizer_tensors, meta, rng_state)
    atomic_write_bytes(Path(path), payload)
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
