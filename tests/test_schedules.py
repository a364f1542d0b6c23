"""Every LR schedule matches its formula at sampled steps; warm-up as steps or as a ratio."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from modules import schedules
from modules.errors import ConfigError

TOTAL = 100


def lrs(factory, steps: int = TOTAL, peak: float = 1.0) -> list[float]:
    """The LR each optimizer step runs at, for two param groups with different peaks (layer-wise)."""
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": peak}, {"params": [params[1]], "lr": peak / 4}], lr=peak)
    sched = factory(opt, total_steps=TOTAL)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == pytest.approx(out[-1] / 4)  # each group keeps its own peak
        opt.step()
        sched.step()
    return out


SAMPLES = [0, 4, 9, 10, 11, 50, 77, 99]


@pytest.mark.parametrize(
    ("factory", "formula"),
    [
        (partial(schedules.constant, warmup=10), lambda t: 1.0),
        (partial(schedules.linear, warmup=0.1, final_scale=0.2), lambda t: 1 - 0.8 * (t - 10) / 90),
        (partial(schedules.cosine, warmup=10, final_scale=0.1), lambda t: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 90))),
        (partial(schedules.polynomial, warmup=10, power=2.0), lambda t: (1 - (t - 10) / 90) ** 2),
        (partial(schedules.inverse_sqrt, warmup=10), lambda t: math.sqrt(10 / (10 + t - 10))),
        (partial(schedules.warmup_stable_decay, warmup=10, decay=0.3), lambda t: 1.0 if t < 70 else 1 - (t - 70) / 30),
        (partial(schedules.step_decay, warmup=10, step_size=20, gamma=0.5), lambda t: 0.5 ** ((t - 10) // 20)),
        (partial(schedules.exponential, warmup=10, gamma=0.98), lambda t: 0.98 ** (t - 10)),
    ],
    ids=["constant", "linear", "cosine", "polynomial", "inverse_sqrt", "wsd", "step", "exponential"],
)
def test_schedule_matches_formula(factory, formula) -> None:
    got = lrs(factory)
    for t in SAMPLES:
        expected = (t + 1) / 10 if t < 10 else formula(t)
        assert got[t] == pytest.approx(expected, rel=1e-9, abs=1e-12), t


def test_warmup_as_ratio_equals_warmup_as_steps() -> None:
    assert lrs(partial(schedules.cosine, warmup=0.25)) == lrs(partial(schedules.cosine, warmup=25))


def test_plateau_carries_its_monitor() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = schedules.plateau(opt, total_steps=10, monitor="val/f1_macro", mode="max", factor=0.5, patience=0)
    assert sched.monitor == "val/f1_macro"
    sched.step(0.5)
    sched.step(0.4)  # worse: halve
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (partial(schedules.linear, warmup=-1), "warmup=-1 must be >= 0"),
        (partial(schedules.cosine, final_scale=1.5), "final_scale=1.5 must be in"),
        (partial(schedules.warmup_stable_decay, warmup=60, decay=60), "exceed the 100 training steps"),
        (partial(schedules.polynomial, power=0), "power=0 must be > 0"),
    ],
)
def test_bad_schedule_values(factory, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        lrs(factory, steps=1)
