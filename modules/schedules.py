"""Learning-rate schedules with warm-up, stepped once per optimizer step.

Each is a ``_partial_`` factory in ``configs/scheduler/``: the task completes it with the optimizer
and the run's total number of optimizer steps (from the trainer, so epochs, accumulation and
device count are respected). ``warmup`` is a step count when >= 1, else a fraction of training.
Every schedule below is ``LambdaLR`` over a factor of the peak LR, so each parameter group keeps
its own peak (layer-wise decay) and follows the same shape; ``plateau`` is the exception.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from modules.errors import ConfigError

Shape = Callable[[float], float]  # progress in [0, 1] after warm-up -> factor of the peak LR


def warmup_steps_of(warmup: float, total_steps: int) -> int:
    """``warmup`` is a step count when >= 1, else a fraction of ``total_steps``."""
    if warmup < 0:
        raise ConfigError(f"scheduler.warmup={warmup} must be >= 0 (steps, or a fraction of training when < 1)")
    return int(warmup) if warmup >= 1 else int(round(warmup * total_steps))


def _check_scale(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"scheduler.{name}={value} must be in [0, 1] (a fraction of the peak LR)")


def warmup_then(shape: Shape, warmup: float, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up from ~0 to the peak over the warm-up steps, then ``shape(progress)``."""
    w = warmup_steps_of(warmup, total_steps)

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return shape(min(1.0, (step - w) / max(1, total_steps - w)))

    return factor


def _lambda(optimizer: Optimizer, shape: Shape, warmup: float, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, warmup_then(shape, warmup, total_steps))


def constant(optimizer: Optimizer, total_steps: int, warmup: float = 0.0) -> LambdaLR:
    """Warm up, then hold the peak LR."""
    return _lambda(optimizer, lambda p: 1.0, warmup, total_steps)


def linear(optimizer: Optimizer, total_steps: int, warmup: float = 0.0, final_scale: float = 0.0) -> LambdaLR:
    """Warm up, then decay linearly to ``final_scale`` x the peak."""
    _check_scale("final_scale", final_scale)
    return _lambda(optimizer, lambda p: 1.0 - (1.0 - final_scale) * p, warmup, total_steps)


def cosine(optimizer: Optimizer, total_steps: int, warmup: float = 0.0, final_scale: float = 0.0) -> LambdaLR:
    """Warm up, then a half cosine down to a floor of ``final_scale`` x the peak."""
    _check_scale("final_scale", final_scale)
    return _lambda(optimizer, lambda p: final_scale + (1 - final_scale) * 0.5 * (1 + math.cos(math.pi * p)), warmup, total_steps)


def polynomial(
    optimizer: Optimizer, total_steps: int, warmup: float = 0.0, power: float = 1.0, final_scale: float = 0.0
) -> LambdaLR:
    """Warm up, then ``final + (1 - final) * (1 - progress) ** power`` (power 1 is linear)."""
    _check_scale("final_scale", final_scale)
    if power <= 0:
        raise ConfigError(f"scheduler.power={power} must be > 0")
    return _lambda(optimizer, lambda p: final_scale + (1 - final_scale) * (1 - p) ** power, warmup, total_steps)


def inverse_sqrt(optimizer: Optimizer, total_steps: int, warmup: float = 0.0, timescale: int | None = None) -> LambdaLR:
    """Warm up, then ``sqrt(timescale / (timescale + steps since warm-up))`` (timescale: the warm-up length)."""
    w = warmup_steps_of(warmup, total_steps)
    tau = timescale or max(1, w)

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return math.sqrt(tau / (tau + step - w))

    return LambdaLR(optimizer, factor)


def warmup_stable_decay(
    optimizer: Optimizer, total_steps: int, warmup: float = 0.0, decay: float = 0.2, final_scale: float = 0.0,
    decay_shape: str = "linear",
) -> LambdaLR:
    """Warm up, hold the peak, then decay over the last ``decay`` (steps if >= 1, else a fraction of training)."""
    _check_scale("final_scale", final_scale)
    if decay_shape not in ("linear", "cosine", "sqrt"):
        raise ConfigError(f"scheduler.decay_shape={decay_shape!r} is unknown; choose linear, cosine or sqrt")
    w = warmup_steps_of(warmup, total_steps)
    d = warmup_steps_of(decay, total_steps)
    if w + d > total_steps:
        raise ConfigError(f"scheduler warm-up ({w}) + decay ({d}) steps exceed the {total_steps} training steps")
    shapes = {"linear": lambda q: 1 - q, "cosine": lambda q: 0.5 * (1 + math.cos(math.pi * q)), "sqrt": lambda q: 1 - math.sqrt(q)}
    shape = shapes[decay_shape]
    decay_start = total_steps - d

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        if step < decay_start:
            return 1.0
        q = min(1.0, (step - decay_start) / max(1, d))
        return final_scale + (1 - final_scale) * shape(q)

    return LambdaLR(optimizer, factor)


def step_decay(optimizer: Optimizer, total_steps: int, warmup: float = 0.0, step_size: float = 0.3, gamma: float = 0.1) -> LambdaLR:
    """Warm up, then multiply by ``gamma`` every ``step_size`` steps (a fraction of training when < 1)."""
    w = warmup_steps_of(warmup, total_steps)
    size = max(1, warmup_steps_of(step_size, total_steps))

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return gamma ** ((step - w) // size)

    return LambdaLR(optimizer, factor)


def exponential(optimizer: Optimizer, total_steps: int, warmup: float = 0.0, gamma: float = 0.999) -> LambdaLR:
    """Warm up, then multiply by ``gamma`` every step."""
    w = warmup_steps_of(warmup, total_steps)
    return LambdaLR(optimizer, lambda step: (step + 1) / w if step < w else gamma ** (step - w))


def plateau(
    optimizer: Optimizer, total_steps: int, monitor: str = "val/loss", mode: str = "min", factor: float = 0.5,
    patience: int = 1, threshold: float = 1e-4, min_lr: float = 0.0,
) -> ReduceLROnPlateau:
    """Multiply the LR by ``factor`` when ``monitor`` stops improving (checked after each validation)."""
    if mode not in ("min", "max"):
        raise ConfigError(f"scheduler.mode={mode!r} must be min or max")
    scheduler = ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience, threshold=threshold, min_lr=min_lr)
    scheduler.monitor = monitor  # read by TaskModule.configure_optimizers
    return scheduler


SCHEDULES = {f.__name__: f for f in (constant, linear, cosine, polynomial, inverse_sqrt, warmup_stable_decay,
                                     step_decay, exponential, plateau)}
