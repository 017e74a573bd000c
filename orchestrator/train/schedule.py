"""Learning-rate schedules."""

from __future__ import annotations

import math

import torch


def noam_lambda(warmup_steps: int):
    """Noam schedule as a multiplier of the peak learning rate.

    Linear warm-up to 1.0 at ``warmup_steps``, then decay proportional to ``step ** -0.5``
    (Vaswani et al. 2017, eq. 3, normalised so the peak equals the configured learning rate).
    """
    warmup = max(1, int(warmup_steps))

    def factor(step: int) -> float:
        step = max(1, step + 1)
        return min(step / warmup, math.sqrt(warmup / step))

    return factor


def noam_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, noam_lambda(warmup_steps))
