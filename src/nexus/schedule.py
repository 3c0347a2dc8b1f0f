"""The learning-rate schedule: linear warmup to the peak, then cosine decay to a floor."""

import math

from nexus.config import TrainConfig


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate used by optimizer update number `step` (1-based)."""
    if config.warmup_steps and step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    decay_steps = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))
