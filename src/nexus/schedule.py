"""The learning-rate schedule: linear warmup to the peak, then either cosine decay to a floor
or warmup-stable-decay (the peak held, then a linear cool-down to the floor at the end)."""

import math

from nexus.config import TrainConfig


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
