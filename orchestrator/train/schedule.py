"""Learning-rate schedules, as multipliers of each parameter group's peak learning rate."""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch

Schedule = Literal["noam", "linear", "constant"]
SCHEDULES = ("noam", "linear", "constant")


def noam_lambda(warmup_steps: int) -> Callable[[int], float]:
    """Noam schedule as a multiplier of the peak learning rate.

    Linear warm-up to 1.0 at ``warmup_steps``, then decay proportional to ``step ** -0.5``
    (Vaswani et al. 2017, eq. 3, normalised so the peak equals the configured learning rate).
    """
    warmup = max(1, int(warmup_steps))

    def factor(step: int) -> float:
        step = max(1, step + 1)
        return min(step / warmup, math.sqrt(warmup / step))

    return factor


def linear_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up to 1.0, then linear decay to 0 at ``total_steps`` (for fixed step budgets)."""
    warmup = max(1, int(warmup_steps))
    total = max(warmup + 1, int(total_steps))

    def factor(step: int) -> float:
        step = step + 1
        if step <= warmup:
            return step / warmup
        return max(0.0, (total - step) / (total - warmup))

    return factor


def constant_lambda(warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to 1.0, then constant."""
    warmup = max(1, int(warmup_steps))
    return lambda step: min(1.0, (step + 1) / warmup)


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: Schedule, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``schedule`` (``noam``, ``linear`` or ``constant``) over ``optimizer``'s groups.

    Raises:
        ValueError: an unknown schedule name.
    """
    if schedule == "noam":
        factor = noam_lambda(warmup_steps)
    elif schedule == "linear":
        factor = linear_lambda(warmup_steps, total_steps)
    elif schedule == "constant":
        factor = constant_lambda(warmup_steps)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def noam_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, noam_lambda(warmup_steps))
