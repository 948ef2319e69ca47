"""``WarmupDecayLR``: linear warmup (a ratio of the run or a number of steps), then cosine, linear or
constant, as one mmengine scheduler stepped every iteration (what HF ``get_scheduler`` users expect).

    lr(s) = lr * s / W                                         for s < W (warmup from 0)
    lr(s) = lr * (m + (1 - m) * f((s - W) / (T - W)))          after: f = cosine 0.5(1 + cos(pi x)),
                                                               linear 1 - x, constant 1; m = min_lr_ratio
It has a closed form in the step, so a resumed run (which restores ``last_step``) continues exactly.
"""
from __future__ import annotations

import math

from mmengine.optim.scheduler.lr_scheduler import LRSchedulerMixin
from mmengine.optim.scheduler.param_scheduler import INF, _ParamScheduler
from mmengine.registry import PARAM_SCHEDULERS

from ..errors import UserError

DECAYS = {
    "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
    "linear": lambda x: 1.0 - x,
    "constant": lambda x: 1.0,
}


def lr_factor(step: int, total: int, warmup: int, decay: str, min_lr_ratio: float = 0.0) -> float:
    if step < warmup:
        return step / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * DECAYS[decay](progress)


@PARAM_SCHEDULERS.register_module()
class WarmupDecayLR(LRSchedulerMixin, _ParamScheduler):
    """Give ``warmup_ratio`` (of ``end - begin`` iterations) or ``warmup_steps``; ``by_epoch=False``."""

    def __init__(self, optimizer, decay: str = "cosine", warmup_ratio: float = 0.0, warmup_steps: int | None = None,
                 min_lr_ratio: float = 0.0, begin: int = 0, end: int = INF, last_step: int = -1,
                 by_epoch: bool = False, verbose: bool = False):
        if decay not in DECAYS:
            raise UserError(f"param_scheduler decay={decay!r}: use one of {', '.join(DECAYS)}")
        if by_epoch:
            raise UserError("WarmupDecayLR steps every iteration: set by_epoch=False in param_scheduler")
        if end == INF:
            raise UserError("WarmupDecayLR needs the run length: leave end unset (it defaults to max_iters)")
        if not 0.0 <= warmup_ratio < 1.0:
            raise UserError(f"warmup_ratio={warmup_ratio}: use a fraction in [0, 1)")
        self.total = end - begin
        self.warmup = warmup_steps if warmup_steps is not None else int(math.ceil(warmup_ratio * self.total))
        if not 0 <= self.warmup < self.total:
            raise UserError(f"warmup of {self.warmup} steps does not fit in a run of {self.total} iterations")
        self.decay, self.min_lr_ratio = decay, min_lr_ratio
        super().__init__(optimizer, begin=begin, end=end, last_step=last_step, by_epoch=False,
                         verbose=verbose)

    def _get_value(self) -> list:
        factor = lr_factor(self.last_step, self.total, self.warmup, self.decay, self.min_lr_ratio)
        return [base * factor for base in self.base_values]
