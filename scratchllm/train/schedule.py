"""The learning-rate schedule: linear warmup, then cosine, linear or no decay, by steps or by the clock."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .trainer_config import TrainerConfig

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(step: int, cfg: TrainerConfig, total_steps: int, elapsed_s: float = 0.0) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine/linear decay to `min_lr` at `total_steps`,
    or sooner with a time budget (`max_minutes`): at whichever end comes first, by steps or by the
    `elapsed_s` seconds of training so far, so that a run cut short by the clock still ends decayed."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant" or total_steps <= cfg.warmup_steps:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.max_minutes and elapsed_s > 0:
        # the decay's share of the time starts after warmup: its seconds, estimated by its share of the steps
        warm = elapsed_s * cfg.warmup_steps / step if step else 0.0
        budget = cfg.max_minutes * 60
        progress = max(progress, min(1.0, (elapsed_s - warm) / max(budget - warm, 1e-9)))
    if cfg.schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + factor * (cfg.lr - cfg.min_lr)
