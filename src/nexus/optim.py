"""The optimizer of a training run, and its state as flat tensors for checkpoints.

`adamw` (the default): AdamW over every parameter. `muon`: Muon (torch.optim.Muon, the
Newton–Schulz orthogonalised momentum of Jordan et al. 2024) for the hidden weight matrices,
with its update scaled to AdamW's RMS (Liu et al. 2025) so it takes the same lr and weight
decay, and AdamW for the rest: embeddings and head, whose rows are looked up one at a time
rather than mixed, and every 1-D or 3-D parameter, which Muon's orthogonalisation does not
apply to.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from nexus.config import TrainConfig
from nexus.model import NexusLM

ADAM_BETAS = (0.9, 0.95)


def _is_decayed(name: str, param: Tensor) -> bool:
    """Weight matrices (an MoE layer's stacks of expert matrices included): not norms,
    biases, conv filters, A_log, D or the Δ bias, whose scale is part of what they mean."""
    return (param.ndim == 2 and not name.endswith("A_log")) or ".experts." in name


def _is_hidden_matrix(name: str, param: Tensor) -> bool:
    """What Muon updates: the 2-D weights inside the layers."""
    return param.ndim == 2 and name.startswith("model.layers.") and not name.endswith("A_log")


def _adamw(named: list[tuple[str, Tensor]], config: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in named if _is_decayed(n, p)]
    no_decay = [p for n, p in named if not _is_decayed(n, p)]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel: one pass over each tensor, ~4 ms per update of nexus-6m on 2 cores
    # against ~20 ms for the default per-tensor loop.
    return torch.optim.AdamW(groups, lr=config.lr, betas=ADAM_BETAS, eps=1e-8, fused=True)


class MuonAdamW:
    """Muon for the hidden matrices and AdamW for the rest, stepped as one optimizer: the
    Trainer sets the lr on `param_groups`, steps, and saves `state_dict()`, whose parameter
    indices run through Muon's parameters first, then AdamW's."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.AdamW) -> None:
        self.parts = (muon, adamw)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts for group in part.param_groups]

    @property
    def state(self) -> dict[Tensor, dict[str, Any]]:
        return {p: s for part in self.parts for p, s in part.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def _offsets(self) -> Iterator[tuple[torch.optim.Optimizer, int, int]]:
        """Each part, the index of its first parameter, and its number of groups."""
        offset = 0
        for part in self.parts:
            yield part, offset, len(part.param_groups)
            offset += sum(len(group["params"]) for group in part.param_groups)

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        for part, offset, _ in self._offsets():
            own = part.state_dict()
            state.update({index + offset: slots for index, slots in own["state"].items()})
            for group in own["param_groups"]:
                groups.append({**group, "params": [i + offset for i in group["params"]]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = list(state_dict["param_groups"])
        for part, offset, n_groups in self._offsets():
            own_groups, groups = groups[:n_groups], groups[n_groups:]
            indices = {i for group in own_groups for i in group["params"]}
            part.load_state_dict(
                {
                    "state": {
                        i - offset: s for i, s in state_dict["state"].items() if i in indices
                    },
                    "param_groups": [
                        {**group, "params": [i - offset for i in group["params"]]}
                        for group in own_groups
                    ],
                }
            )


Optimizer = torch.optim.AdamW | MuonAdamW


def build_optimizer(model: NexusLM, config: TrainConfig) -> Optimizer:
    """The run's optimizer (`config.optimizer`), weight decay on the weight matrices only."""
    named = list(model.named_parameters())
    if config.optimizer == "adamw":
        return _adamw(named, config)
    hidden = [p for n, p in named if _is_hidden_matrix(n, p)]
    muon = torch.optim.Muon(
        hidden, lr=config.lr, weight_decay=config.weight_decay, adjust_lr_fn="match_rms_adamw"
    )
    rest = [(n, p) for n, p in named if not _is_hidden_matrix(n, p)]
    return MuonAdamW(muon, _adamw(rest, config))


def optimizer_tensors(optimizer: Optimizer) -> dict[str, Tensor]:
    state = optimizer.state_dict()["state"]
    return {
        f"{index}.{key}": value for index, slots in state.items() for key, value in slots.items()
    }


def restore_optimizer(
    optimizer: Optimizer, tensors: dict[str, Tensor], param_groups: list[dict]
) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        index, slot = key.split(".", 1)
        state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
