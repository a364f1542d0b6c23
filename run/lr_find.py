"""The LR range test (``tune=lr``): before training, a short run raises the learning rate geometrically, step by step,
on the task's own optimizer groups, and the learning rate where the loss falls fastest becomes the run's
``optimizer.lr``.

Every group keeps its place relative to the others: layer-wise decay and the head's scale multiply the one swept
value, exactly as they multiply ``optimizer.lr`` in training, so the suggestion scales every group. The freezing
schedule runs as it will at the start of training (under ``finetune=gradual`` the test measures the head's phase).
Afterwards the weights, buffers and random streams are put back as they were: a run with ``tune=lr`` trains exactly
as a run given ``optimizer.lr=<the suggestion>`` would. The run folder gets ``lr_find.json`` (the curve, the rule,
the suggestion) and ``lr_find.png``; ``config.yaml`` records the applied LR (``optimizer.lr``, ``tune.lr_find.applied`` / ``.suggested``).

The curve: the loss smoothed (exponential moving average, bias-corrected), the test stopped once it exceeds
``stop_factor`` times its lowest value (or is not finite). Three rules read a suggestion off it (``tune.lr_find.rule``;
``lr_find.json`` records all three, the plot marks them):

- ``steepest``: the LR at the steepest fall of the smoothed loss against log LR, before its lowest point (Lightning's
  ``Tuner.lr_find``).
- ``valley``: the middle, in log LR, of the fall itself, from where the loss starts to fall to its lowest point.
- ``minimum``: a tenth of the LR at the lowest point.

The steepest fall is not always a trainable LR: a CTC model from scratch falls steepest where it collapses to blanks.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torchmetrics import Metric

from modules.errors import ConfigError

log = logging.getLogger("tunelab")


def read_settings(cls: type, node: Any, name: str, recorded: tuple[str, ...]) -> Any:
    """The ``tune.<name>`` node as the settings dataclass ``cls``: what ``apply()`` recorded in config.yaml dropped, an
    unknown key one line, each value cast to its default's type."""
    node = dict(node or {})
    for key in recorded:
        node.pop(key, None)
    unknown = set(node) - set(cls.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"tune.{name} has no {sorted(unknown)}; it takes {', '.join(cls.__dataclass_fields__)}")
    return cls(**{k: type(getattr(cls, k))(v) for k, v in node.items()})


@dataclass(frozen=True)
class RangeTest:
    """The settings of ``tune.lr_find`` (see configs/tune/lr.yaml)."""

    min_lr: float = 1e-7
    max_lr: float = 1.0
    steps: int = 100
    stop_factor: float = 4.0
    smoothing: float = 0.9
    rule: str = "steepest"

    @classmethod
    def from_config(cls, node: Any) -> RangeTest:
        test = read_settings(cls, node, "lr_find", recorded=("suggested", "applied"))
        if not 0 < test.min_lr < test.max_lr:
            raise ConfigError(f"tune.lr_find: min_lr={test.min_lr} and max_lr={test.max_lr} must satisfy 0 < min_lr < max_lr")
        if test.steps < 10:
            raise ConfigError(f"tune.lr_find.steps={test.steps}: the range test needs at least 10 optimizer steps")
        if test.stop_factor <= 1 or not 0 <= test.smoothing < 1:
            raise ConfigError(f"tune.lr_find: stop_factor={test.stop_factor} must be > 1 and smoothing={test.smoothing} "
                              "in [0, 1)")
        if test.rule not in RULES:
            raise ConfigError(f"tune.lr_find.rule={test.rule!r} is not a rule; choose one of {', '.join(RULES)}")
        return test

    def lr_at(self, step: int) -> float:
        """The swept LR at optimizer step ``step`` (geometric from min_lr at 0 to max_lr at steps - 1)."""
        return self.min_lr * (self.max_lr / self.min_lr) ** (step / (self.steps - 1))


@dataclass
class RangeResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stopped: str = "max_lr reached"
    suggestion: float | None = None
    suggestions: dict[str, float | None] = field(default_factory=dict)
    rule: str = "steepest"

    def read(self, test: RangeTest) -> None:
        """Every rule's suggestion; the configured rule's becomes ``suggestion``."""
        skip = warm_up(test.smoothing, len(self.smoothed))
        self.suggestions = {name: rule(self.lrs, self.smoothed, skip) for name, (rule, _) in RULES.items()}
        self.rule, self.suggestion = test.rule, self.suggestions[test.rule]

    def to_json(self, test: RangeTest, configured: float, applied: float) -> dict[str, Any]:
        return {"settings": asdict(test), "configured_lr": configured, "suggested_lr": self.suggestion,
                "applied_lr": applied, "stopped": self.stopped, "rule": f"{test.rule}: {RULES[test.rule][1]}",
                "suggestions": self.suggestions,
                "curve": [{"lr": lr, "loss": loss, "smoothed": s} for lr, loss, s in
                          zip(self.lrs, self.losses, self.smoothed, strict=True)]}


def lowest_point(smoothed: Sequence[float], start: int) -> int:
    """The index of the smoothed loss's lowest point at or after ``start``."""
    return min(range(start, len(smoothed)), key=smoothed.__getitem__, default=0)


def suggest(lrs: Sequence[float], smoothed: Sequence[float], skip: int = 0) -> float | None:
    """The LR where the smoothed loss falls fastest (per unit of log LR), up to its lowest point, past the first
    ``skip`` points (while the moving average holds a few batches it follows single batches: measured on spoken digits
    with CTC, whose per-batch loss swings 9-19 with the clips' lengths, the first points' noise out-fell the real fall
    and gave 1.9e-7); None when it never falls (the curve says nothing about a good LR)."""
    start = max(skip, 1)
    lowest = lowest_point(smoothed, start)
    if lowest < start + 1:
        return None
    logs = [math.log(lr) for lr in lrs[: lowest + 1]]
    slopes = {i: (smoothed[i + 1] - smoothed[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(start, lowest)}
    steepest = min(slopes, key=slopes.__getitem__)
    return float(lrs[steepest]) if slopes[steepest] < 0 else None


def valley(lrs: Sequence[float], smoothed: Sequence[float], skip: int = 0, begun: float = 0.05) -> float | None:
    """The middle (in log LR) of the smoothed loss's fall: from where it has fallen ``begun`` of the way from its
    highest point (past ``skip``, before the lowest) to its lowest point. A fall that is the whole curve's drop, not
    its steepest stretch: a short steep collapse followed by a long slow fall gives the long fall's middle. A plateau
    whose noise spans more than ``begun`` of the drop starts the fall early (measured on the spoken corpus: 5.6e-4,
    WER 0.15, docs/auto.md). None when the loss never falls."""
    lowest = lowest_point(smoothed, skip)
    if lowest <= skip:
        return None
    top = max(range(skip, lowest), key=smoothed.__getitem__)
    drop = smoothed[top] - smoothed[lowest]
    if not drop > 0:
        return None
    start = next(i for i in range(top, lowest + 1) if smoothed[i] <= smoothed[top] - begun * drop)
    return float(lrs[(start + lowest) // 2]) if lowest - start >= 2 else None


def tenth_of_lowest(lrs: Sequence[float], smoothed: Sequence[float], skip: int = 0) -> float | None:
    """A tenth of the LR at the smoothed loss's lowest point; None when the lowest point is where the curve starts."""
    lowest = lowest_point(smoothed, skip)
    return float(lrs[lowest]) / 10 if lowest > skip else None


RULES = {"steepest": (suggest, "steepest fall of the smoothed loss against log LR, before its lowest point"),
         "valley": (valley, "middle (log LR) of the smoothed loss's fall, from where it starts to its lowest point"),
         "minimum": (tenth_of_lowest, "a tenth of the LR at the smoothed loss's lowest point")}


def warm_up(smoothing: float, points: int) -> int:
    """Points of the curve before the moving average spans ~1/(1 - smoothing) batches (at most a third of the curve)."""
    return min(math.ceil(1 / (1 - smoothing) - 1e-9), points // 3)


class LRRangeTest(pl.Callback):
    """Sets every optimizer group's LR to ``swept * lr_scale`` before each optimizer step; records the loss."""

    def __init__(self, test: RangeTest, accumulate: int) -> None:
        self.test, self.accumulate = test, max(1, accumulate)
        self.result = RangeResult()
        self._batch_losses: list[float] = []
        self._best = math.inf
        self._average = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        lr = self.test.lr_at(trainer.global_step)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        self._batch_losses.append(float(loss))
        if len(self._batch_losses) < self.accumulate:
            return
        value = sum(self._batch_losses) / len(self._batch_losses)
        self._batch_losses = []
        step = len(self.result.losses)
        beta = self.test.smoothing
        self._average = beta * self._average + (1 - beta) * value
        smoothed = self._average / (1 - beta ** (step + 1))
        self.result.lrs.append(self.test.lr_at(step))
        self.result.losses.append(value)
        self.result.smoothed.append(smoothed)
        if not math.isfinite(smoothed):
            self.result.stopped = f"the loss was not finite at lr {self.result.lrs[-1]:.3g}"
            trainer.should_stop = True
            return
        self._best = min(self._best, smoothed)
        if smoothed > self.test.stop_factor * self._best:
            self.result.stopped = f"the loss rose above {self.test.stop_factor:g}x its lowest at lr {self.result.lrs[-1]:.3g}"
            trainer.should_stop = True


def check(cfg: Any) -> None:
    """``tune=lr``'s settings and where it can run, before anything is built."""
    node = (cfg.get("tune") or {}).get("lr_find")
    if node is None:
        return
    RangeTest.from_config(node)
    from run.budget import processes

    devices = cfg.trainer.get("devices", 1)
    if processes(cfg) != 1:
        raise ConfigError(f"tune=lr runs the range test on one process, not trainer.devices={devices}; find the LR with "
                          "trainer.devices=1 (same global batch), then pass optimizer.lr=<the suggestion>")


def smoke_run(cfg: Any) -> str | None:
    """The trainer key that makes this a smoke run (``fast_dev_run``, ``overfit_batches``), which no tuner sizes."""
    return next((key for key in ("fast_dev_run", "overfit_batches") if (cfg.get("trainer") or {}).get(key)), None)


def run(cfg: Any, parts: Any, checkpoint: Any) -> tuple[RangeResult, RangeTest, float, float] | None:
    """``tune=lr`` in ``train.py``: the range test, its suggestion applied; None when the run has no ``tune=lr``, or
    continues a run whose LR was found already, or starts from a checkpoint's training state (its optimizer and
    schedule carry on: the test is skipped, and said so)."""
    node = (cfg.get("tune") or {}).get("lr_find")
    if node is None:
        return None
    if node.get("applied") is not None:  # resume=: this run's LR was found before it was interrupted
        log.info(f"LR range test: done before this run was interrupted (optimizer.lr={cfg.optimizer.lr:g})")
        return None
    if checkpoint is not None:
        log.warning("LR range test skipped: the run starts from a checkpoint's training state (ckpt_path=); its optimizer "
                    f"continues at optimizer.lr={cfg.optimizer.lr:g}")
        return None
    smoke = smoke_run(cfg)
    if smoke:
        log.warning(f"LR range test skipped: trainer.{smoke} is a smoke run (a few batches say nothing about the LR)")
        return None
    from run.build import build

    result, test = find_lr(cfg, parts, build(cfg.finetune) if cfg.get("finetune") else None)
    configured = float(cfg.optimizer.lr)
    return result, test, configured, apply(cfg, parts.task, result)


@contextmanager
def put_back(task: Any) -> Iterator[None]:
    """Whatever a probing fit does to ``task`` is undone on the way out: weights, buffers, which parameters train, the
    LR schedule (the probe owns the LR; the task's schedule is set aside), the epoch metrics, every random stream."""
    saved = [(t, t.detach().clone()) for t in (*task.parameters(), *task.buffers())]
    requires_grad = [(p, p.requires_grad) for p in task.parameters()]
    states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    scheduler, task.scheduler_factory = task.scheduler_factory, None
    try:
        yield
    finally:
        task.scheduler_factory = scheduler
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)
        task.trainer = None  # the real trainer attaches itself
        for metric in task.modules():  # a probe's partial epoch leaves nothing in the run's epoch metrics
            if isinstance(metric, Metric):
                metric.reset()
        torch.random.set_rng_state(states[0])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(states[1])
        random.setstate(states[2])


def find_lr(cfg: Any, parts: Any, finetune: Any) -> tuple[RangeResult, RangeTest]:
    """Run the range test on ``parts.task`` (one process), restore every weight and random stream, return the curve."""
    from run.build import build

    test = RangeTest.from_config(cfg.tune.get("lr_find"))
    task = parts.task
    probe = LRRangeTest(test, int(cfg.trainer.get("accumulate_grad_batches", 1) or 1))
    with put_back(task):
        trainer = build(cfg.trainer, callbacks=[*([finetune] if finetune is not None else []), probe], logger=False,
                        max_steps=test.steps, max_epochs=-1, min_epochs=None, enable_checkpointing=False,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False, max_time=None)
        log.info(f"LR range test: {test.steps} optimizer steps, lr {test.min_lr:g} -> {test.max_lr:g} on every group "
                 "(scaled as in training)")
        trainer.fit(task, datamodule=parts.datamodule)
    result = probe.result
    if len(result.losses) < 5:
        raise ConfigError(f"the LR range test took {len(result.losses)} optimizer steps ({result.stopped}); it needs more "
                          "training batches (more data, or fewer tune.lr_find.steps)")
    result.read(test)
    return result, test


def apply(cfg: Any, task: Any, result: RangeResult) -> float:
    """Make the suggestion the run's ``optimizer.lr`` (config and task); keep the configured LR when there is none."""
    from omegaconf import open_dict

    configured = float(cfg.optimizer.lr)
    applied = configured if result.suggestion is None else result.suggestion
    with open_dict(cfg):
        cfg.optimizer.lr = applied
        cfg.tune.lr_find.suggested = result.suggestion
        cfg.tune.lr_find.applied = applied
    if result.suggestion is None:
        log.warning(f"LR range test: rule {result.rule} read no LR off the curve between {result.lrs[0]:.3g} and "
                    f"{result.lrs[-1]:.3g} (no fall, or one too short); keeping optimizer.lr={configured:g} (see "
                    "lr_find.png; lr_find.json has every rule's suggestion)")
        return configured
    factory = task.optimizer_factory
    task.optimizer_factory = partial(factory.func, *factory.args, **{**factory.keywords, "lr": applied})
    log.info(f"LR range test: optimizer.lr {configured:g} -> {applied:.3g} (rule {result.rule}; "
             f"{result.stopped}; the rules: " + ", ".join(f"{k} {v:.2g}" if v else f"{k} none" for k, v in
                                                          result.suggestions.items()) + ")")
    return applied


def save(result: RangeResult, test: RangeTest, configured: float, applied: float, run_dir: Path) -> None:
    """``lr_find.json`` and ``lr_find.png`` in the run folder."""
    (run_dir / "lr_find.json").write_text(json.dumps(result.to_json(test, configured, applied), indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(result.lrs, result.losses, color="lightgrey", lw=0.8, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", label="smoothed")
    for (name, lr), color in zip(result.suggestions.items(), ("C3", "C2", "C1"), strict=False):
        if lr is not None:
            chosen = name == result.rule
            ax.axvline(lr, color=color, ls="--", lw=1.6 if chosen else 0.8, alpha=1 if chosen else 0.6,
                       label=f"{name} {lr:.2g}" + (" (applied)" if chosen else ""))
    ax.axvline(configured, color="grey", ls=":", label=f"configured {configured:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (optimizer.lr; every group scaled from it)")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test: {len(result.losses)} steps ({result.stopped})", fontsize=9)
    ax.legend(fontsize=8)
    finite = [x for x in result.smoothed if math.isfinite(x)]
    if finite:
        ax.set_ylim(min(finite) * 0.9 if min(finite) > 0 else None, min(max(finite), test.stop_factor * min(finite)) * 1.1)
    fig.tight_layout()
    fig.savefig(run_dir / "lr_find.png", dpi=120)
    plt.close(fig)

