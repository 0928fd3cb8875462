"""Learning-rate schedules (the ``model.scheduler`` partials of the configs).

Noise schedules (``alphas_cumprod``) are ``diffusion/schedules.py``; this file holds optimiser schedules.
"""

from __future__ import annotations

import math

import torch

__all__ = ["warmup_cosine"]


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_factor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay of the learning rate to ``min_factor`` times its base value.

    Configs name it ``diffseg_lightning.methods.warmup_cosine`` (a re-export, so stored run configs keep
    working) with ``_partial_: true``; the method calls it with ``(optimizer, total_steps=...)``.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
