"""Data-parallel training across processes started by torchrun: the process group, and the few
collective operations the trainer needs.

Gradients are averaged by hand (one all-reduce of all gradients, flattened, after the last
backward of a step) rather than by DDP: each rank runs its share of the step's micro-batches, so
the sum over ranks is exactly the single-process accumulation, with no bucketing or
`no_sync` bookkeeping."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nexus.errors import NexusError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank `rank` of `world_size` (local rank on its machine)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def micro_steps(self, grad_accum: int) -> range:
        """This rank's micro-steps of a step: r, r+W, r+2W, ... (all ranks together: all)."""
        return range(self.rank, grad_accum, self.world_size)

    def check_grad_accum(self, grad_accum: int) -> None:
        if grad_accum % self.world_size:
            raise NexusError(
                f"--grad_accum {grad_accum} does not divide across {self.world_size} processes: "
                "the effective batch is kept, so each process runs grad_accum / world_size "
                f"micro-batches; use a grad_accum that is a multiple of {self.world_size}, or "
                "another --nproc_per_node"
            )

    # --- collectives (no-ops in a single process) ----------------------------------------

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, value: float, device: torch.device) -> float:
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def any(self, flag: bool, device: torch.device) -> bool:
        return self.sum(1.0 if flag else 0.0, device) > 0

    def sum_gradients(self, model: nn.Module) -> None:
        """Replace each gradient by its sum over ranks (the micro-losses are already divided
        by the full grad_accum, so the sum is the step's mean gradient)."""
        if not self.enabled:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for param, grad in zip(params, grads, strict=True):
            count = grad.numel()
            param.grad = flat[offset : offset + count].view_as(grad).clone()
            offset += count


SINGLE_PROCESS = DistContext()


def context_from_env() -> DistContext:
    """The torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK), or a single process."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as error:
        raise NexusError(f"bad torchrun environment ({error})") from None
    if world_size <= 1:
        return SINGLE_PROCESS
    if not 0 <= rank < world_size:
        raise NexusError(f"RANK {rank} is outside WORLD_SIZE {world_size}")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


@contextmanager
def process_group(device_name: str) -> Iterator[DistContext]:
    """Join the torchrun process group when there is one (gloo on CPU, NCCL on CUDA); leave
    it on exit. `device_name` is the --device setting: cpu, cuda or auto."""
    context = context_from_env()
    if not context.enabled:
        yield context
        return
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise NexusError("--device cuda was asked for but no CUDA GPU is visible")
        torch.cuda.set_device(context.local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        yield context
        # Leave together: gloo aborts a process whose peer tears the group down under it.
        dist.barrier()
    finally:
        dist.destroy_process_group()
