"""Learning-rate schedules, as multipliers of each parameter group's peak learning rate.

``noam``, ``linear`` and ``constant`` are functions of the step. ``newbob`` also listens to the
validation loss: :meth:`NewBobScheduler.observe` is called at each evaluation and multiplies a
group's rate by its annealing factor when the loss did not improve enough.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Mapping

import torch

Schedule = Literal["noam", "linear", "constant", "newbob"]
SCHEDULES = ("noam", "linear", "constant", "newbob")


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


@dataclass(frozen=True)
class NewBob:
    """NewBob annealing settings.

    Attributes:
        factors: annealing factor per parameter-group name (a group without an entry uses
            ``default_factor``); the paper: ``{"head": 0.5, "encoder": 0.7}``.
        threshold: the smallest relative improvement of the validation loss over the previous
            evaluation, ``(previous - current) / previous``, that counts as an improvement (0.0025).
        patience: evaluations without improvement tolerated before annealing (0: anneal at the
            first one).
        default_factor: factor of groups not named in ``factors``.
    """

    factors: Mapping[str, float]
    threshold: float = 0.0025
    patience: int = 0
    default_factor: float = 0.5


class NewBobScheduler(torch.optim.lr_scheduler.LambdaLR):
    """Warm-up to the peak rate, then NewBob annealing on the validation loss.

    Each group's rate is ``peak * warmup(step) * scale``; ``scale`` starts at 1 and is multiplied
    by the group's factor whenever :meth:`observe` sees the validation loss improve by less than
    ``threshold`` (relative to the previous evaluation) ``patience + 1`` evaluations in a row.
    The scales, the previous loss and the patience counter are in ``state_dict()``, so a resumed
    run anneals exactly as an uninterrupted one.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, settings: NewBob) -> None:
        self.settings_factors = [
            float(settings.factors.get(g.get("name", ""), settings.default_factor)) for g in optimizer.param_groups
        ]
        self.threshold = float(settings.threshold)
        self.patience = int(settings.patience)
        self.scales = [1.0] * len(optimizer.param_groups)
        self.previous: float | None = None
        self.waiting = 0
        self.annealings = 0
        warm = constant_lambda(warmup_steps)
        # The lambdas read self.scales at call time, so load_state_dict (which replaces the list) is seen.
        lambdas = [lambda step, i=i: warm(step) * self.scales[i] for i in range(len(optimizer.param_groups))]
        super().__init__(optimizer, lambdas)

    def observe(self, loss: float) -> bool:
        """Record one validation loss; returns whether the rates were annealed now."""
        loss = float(loss)
        previous, self.previous = self.previous, loss
        if previous is None or not math.isfinite(loss):
            return False
        improvement = (previous - loss) / previous if previous != 0 else 0.0
        if improvement >= self.threshold:
            self.waiting = 0
            return False
        if self.waiting < self.patience:
            self.waiting += 1
            return False
        self.waiting = 0
        self.annealings += 1
        self.scales = [s * f for s, f in zip(self.scales, self.settings_factors)]
        # Apply now: the next optimiser step uses the annealed rates.
        for group, base, fn in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas):
            group["lr"] = base * fn(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        return True


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    warmup_steps: int,
    total_steps: int,
    *,
    newbob: NewBob | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``schedule`` (``noam``, ``linear``, ``constant`` or ``newbob``) over ``optimizer``'s groups.

    Raises:
        ValueError: an unknown schedule name, or ``newbob`` without its settings.
    """
    if schedule == "noam":
        factor = noam_lambda(warmup_steps)
    elif schedule == "linear":
        factor = linear_lambda(warmup_steps, total_steps)
    elif schedule == "constant":
        factor = constant_lambda(warmup_steps)
    elif schedule == "newbob":
        if newbob is None:
            raise ValueError("schedule 'newbob' anneals on a validation loss: only fine-tuning has one")
        return NewBobScheduler(optimizer, warmup_steps, newbob)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
