"""Learning-rate schedules with warm-up, stepped once per optimizer step.

Each is a ``_partial_`` factory in ``configs/scheduler/``: the task completes it with the optimizer
and the run's total number of optimizer steps (from the trainer, so epochs, accumulation and
device count are respected).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from modules.errors import ConfigError


def warmup_steps_of(warmup: float, total_steps: int) -> int:
    """``warmup`` is a step count when >= 1, else a fraction of ``total_steps``."""
    if warmup < 0:
        raise ConfigError(f"scheduler.warmup={warmup} must be >= 0 (steps, or a fraction of training when < 1)")
    return int(warmup) if warmup >= 1 else int(round(warmup * total_steps))


def _with_warmup(decay: Callable[[float], float], warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return decay(progress)

    return factor


def constant(optimizer: Optimizer, total_steps: int, warmup: float = 0.0) -> LambdaLR:
    """Warm up linearly, then hold the LR."""
    w = warmup_steps_of(warmup, total_steps)
    return LambdaLR(optimizer, _with_warmup(lambda p: 1.0, w, total_steps))


def linear(optimizer: Optimizer, total_steps: int, warmup: float = 0.0, final_scale: float = 0.0) -> LambdaLR:
    """Warm up linearly, then decay linearly to ``final_scale`` x the peak LR."""
    w = warmup_steps_of(warmup, total_steps)
    return LambdaLR(optimizer, _with_warmup(lambda p: 1.0 - (1.0 - final_scale) * p, w, total_steps))


def cosine(optimizer: Optimizer, total_steps: int, warmup: float = 0.0, final_scale: float = 0.0) -> LambdaLR:
    """Warm up linearly, then follow a half cosine down to a floor of ``final_scale`` x the peak LR."""
    w = warmup_steps_of(warmup, total_steps)
    return LambdaLR(
        optimizer, _with_warmup(lambda p: final_scale + (1 - final_scale) * 0.5 * (1 + math.cos(math.pi * p)), w, total_steps)
    )
