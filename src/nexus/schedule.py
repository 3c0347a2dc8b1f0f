"""The learning-rate schedule: linear warmup to the peak, then either cosine decay to a floor
or warmup-stable-decay (the peak held, then a linear cool-down to the floor at the end); and
the schedule a run has actually followed when a resume changed it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from nexus.config import TrainConfig

# The settings that decide a step's LR: a resume that changes one starts a new stretch.
SCHEDULE_FIELDS = ("lr", "min_lr", "warmup_steps", "max_steps", "schedule", "cooldown_fraction")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate used by optimizer update number `step` (1-based)."""
    if config.warmup_steps and step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    if config.schedule == "wsd":
        cooldown = config.cooldown_steps
        left = config.max_steps - step  # updates still to come after this one
        if left >= cooldown:
            return config.lr
        return config.min_lr + (config.lr - config.min_lr) * left / cooldown
    decay_steps = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class ScheduleHistory:
    """The schedule a run followed: the settings of each stretch of steps, in order, the first
    from step 1. A resume with another max_steps, lr, … starts a stretch, so each past step's
    LR is the one it ran with and only the future follows the current settings."""

    stretches: tuple[tuple[int, TrainConfig], ...]  # (first step, settings from there on)

    @classmethod
    def of(cls, current: TrainConfig, recorded: Any = None) -> ScheduleHistory:
        """From config.json's `schedule_history` list; without one, `current` from step 1."""
        stretches = []
        for entry in recorded if isinstance(recorded, list) else []:
            try:
                stretches.append((int(entry["from_step"]), TrainConfig.from_dict(entry["train"])))
            except (KeyError, TypeError, ValueError):
                continue  # a damaged entry: the current settings stand in for it
        if not stretches or stretches[0][0] > 1:
            stretches.insert(0, (1, current))
        return cls(tuple(stretches))

    def settings_at(self, step: int) -> TrainConfig:
        return [config for first, config in self.stretches if first <= step][-1]

    def lr(self, step: int) -> float:
        return lr_at(step, self.settings_at(step))

    def continued(self, from_step: int, current: TrainConfig) -> ScheduleHistory:
        """This history up to `from_step` - 1, then `current`: a new stretch only where the
        schedule settings change."""
        kept = [(first, config) for first, config in self.stretches if first < from_step]
        last = kept[-1][1] if kept else None
        if last is None or any(getattr(last, f) != getattr(current, f) for f in SCHEDULE_FIELDS):
            kept.append((from_step, current))
        return ScheduleHistory(tuple(kept))

    def to_records(self) -> list[dict[str, Any]]:
        return [{"from_step": first, "train": config.to_dict()} for first, config in self.stretches]
