"""Budgets that follow the data: ``trainer.max_epochs=auto`` and ``budget.minutes``.

One epoch of lr 1e-4 is a fine budget for 2,000 documents and a poor one for 200: the optimizer takes 125 steps on one
and 13 on the other. ``trainer.max_epochs=auto`` trains as many epochs as give at least ``budget.min_steps`` optimizer
steps (counted as the trainer will count them: processes, accumulation and ``limit_train_batches`` included), and at
least ``budget.min_epochs`` (``auto.py``'s trials: the preset's own epochs), at most ``budget.max_epochs``; early stopping on the task's monitor (the default callbacks) ends it sooner when validation
stops improving, and the best checkpoint is the one tested. ``budget.minutes`` caps fitting's wall time (Lightning's
``max_time``), with any epoch count. The numbers chosen are logged and written into ``config.yaml``
(``trainer.max_epochs``, ``budget.chosen``), so the run, and a rerun of its config, say what they trained.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from modules.errors import ConfigError

log = logging.getLogger("tunelab")


def check(cfg: DictConfig) -> None:
    """The budget's values, before anything is built."""
    node = cfg.get("budget") or {}
    for key in ("min_steps", "min_epochs", "max_epochs"):
        value = node.get(key)
        if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"budget.{key}={value!r} must be a whole number >= 1")
    minutes = node.get("minutes")
    if minutes is not None and (not isinstance(minutes, numbers.Real) or isinstance(minutes, bool) or minutes <= 0):
        raise ConfigError(f"budget.minutes={minutes!r} must be a number of minutes > 0 (or null: no time cap)")
    if OmegaConf.select(cfg, "trainer.max_epochs") == "auto" and OmegaConf.select(cfg, "trainer.max_steps") not in (None, -1):
        raise ConfigError(f"trainer.max_epochs=auto derives the epochs from the data, but trainer.max_steps="
                          f"{cfg.trainer.max_steps} fixes the length too; drop one of them")


def processes(cfg: DictConfig) -> int:
    """How many processes share each epoch's batches (data parallel), as the trainer will start them."""
    import torch

    from run.checks import on_gpus

    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    if OmegaConf.is_list(devices):
        count = len(devices)
    elif devices in ("auto", -1, "-1"):
        count = max(torch.cuda.device_count(), 1) if on_gpus(cfg) else 1
    else:
        count = int(devices)
    return count * int(OmegaConf.select(cfg, "trainer.num_nodes", default=1) or 1)


def steps_per_epoch(cfg: DictConfig, batches: int) -> int:
    """Optimizer steps per epoch from the number of training batches (one process's share, limit, accumulation)."""
    per_process = math.ceil(batches / processes(cfg))
    limit = OmegaConf.select(cfg, "trainer.limit_train_batches")
    if isinstance(limit, float) and limit <= 1.0:
        per_process = max(int(per_process * limit), 1)
    elif limit is not None:
        per_process = min(per_process, int(limit))
    return max(math.ceil(per_process / int(OmegaConf.select(cfg, "trainer.accumulate_grad_batches") or 1)), 1)


def resolve(cfg: DictConfig, datamodule: Any) -> dict[str, Any] | None:
    """Fill in ``trainer.max_epochs=auto`` and ``budget.minutes`` (``trainer.max_time``) in ``cfg``; what was chosen."""
    node = cfg.get("budget") or {}
    auto = OmegaConf.select(cfg, "trainer.max_epochs") == "auto"
    minutes = node.get("minutes")
    if not auto and minutes is None:
        return None
    chosen: dict[str, Any] = {}
    if auto:
        per_epoch = steps_per_epoch(cfg, len(datamodule.train_dataloader()))
        min_steps, cap = int(node.get("min_steps") or 1), int(node.get("max_epochs") or 1000)
        floor = int(node.get("min_epochs") or 1)
        epochs = min(max(math.ceil(min_steps / per_epoch), floor), cap)
        rule = f"at least budget.min_steps={min_steps} optimizer steps" + (
            f" and budget.min_epochs={floor} epochs" if node.get("min_epochs") else "")
        chosen = {"steps_per_epoch": per_epoch, "max_epochs": epochs, "optimizer_steps": epochs * per_epoch,
                  "rule": f"{rule}, at most budget.max_epochs={cap} epochs"}
        log.info(f"budget: {per_epoch} optimizer steps per epoch -> trainer.max_epochs={epochs} ({epochs * per_epoch} "
                 f"steps; {chosen['rule']}; early stopping on {cfg.get('monitor')} may end it sooner)")
    if minutes is not None:
        chosen["minutes"] = float(minutes)
        log.info(f"budget: fitting stops after {float(minutes):g} min (trainer.max_time); the best checkpoint so far is "
                 "tested. The LR schedule spans the whole epoch count: a run the clock ends has not finished decaying")
    with open_dict(cfg):
        if auto:
            cfg.trainer.max_epochs = chosen["max_epochs"]
        if minutes is not None:
            cfg.trainer.max_time = {"seconds": round(float(minutes) * 60, 3)}
        cfg.budget.chosen = chosen
    return chosen
