"""Elastic runs: the same optimizer steps on any number of processes, and a run that continues on another.

``data.global_batch_size`` fixes the samples per optimizer step; the micro-batch stays ``data.batch_size`` and the
accumulation is derived: ``global = batch_size x processes x accumulate_grad_batches``. A run resumed on another
number of processes (``resume=<run> trainer.devices=M``, or another ``trainer=``) keeps the global batch it was trained
with and derives its accumulation the same way, so every optimizer step sees the same micro-batches
(``datamodules.sampling.TrainShards``), the LR schedule and the freezing milestones stay where they were, and the
data continues from the checkpoint's global position. Each segment of a run (processes, strategy, device, precision,
batches, the step it started from) is recorded in ``config.yaml`` under ``segments``.
"""

from __future__ import annotations

import datetime
import logging
import numbers
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from modules.errors import ConfigError
from run.budget import processes
from run.checks import on_gpus, strategy_kind

log = logging.getLogger("tunelab")


def saved_batches(ckpt: Mapping[str, Any] | None) -> tuple[int, int, int] | None:
    """(processes, micro-batch, accumulation) a checkpoint was trained with; None for one saved before they were
    recorded."""
    if not ckpt or "world_size" not in ckpt or "accumulate" not in ckpt:
        return None
    position = next((v for v in ckpt.values() if isinstance(v, Mapping) and "batches_done" in v), {})
    return int(ckpt["world_size"]), int(position.get("batch_size", 0)), int(ckpt["accumulate"])


def plan(cfg: DictConfig, ckpt: Mapping[str, Any] | None) -> dict[str, Any]:
    """Derive ``trainer.accumulate_grad_batches`` from the global batch (given, or the checkpoint's when the number of
    processes changed) and append this segment to ``cfg.segments``; the segment.

    The invariant is the number of micro-batches per optimizer step (processes x accumulation): ``data.global_batch_size
    / data.batch_size`` when a global batch is given; the checkpoint's when a run continues on another number of
    processes (joint data, whose datasets have batch sizes of their own, keeps it the same way)."""
    world, micro = processes(cfg), OmegaConf.select(cfg, "data.batch_size")
    micro = micro if isinstance(micro, int) and not isinstance(micro, bool) else None
    wanted = OmegaConf.select(cfg, "data.global_batch_size")
    accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches") or 1
    if wanted is not None and (not isinstance(wanted, numbers.Integral) or isinstance(wanted, bool) or wanted < 1):
        raise ConfigError(f"data.global_batch_size={wanted!r} must be a whole number >= 1 (or null: "
                          "data.batch_size x processes x trainer.accumulate_grad_batches)")
    if wanted is not None and micro is None:
        raise ConfigError(f"data.global_batch_size={wanted} needs one data.batch_size, and this data has none (joint "
                          "data: each dataset has its own); set trainer.accumulate_grad_batches instead")
    saved = saved_batches(ckpt)
    per_step = None  # micro-batches per optimizer step, all processes together
    if wanted is not None:
        if wanted % (micro * world):
            fix = (f"a data.batch_size that divides {wanted // world}" if wanted % world == 0 else
                   f"a global batch that {world} process(es) can share")
            raise ConfigError(f"data.global_batch_size={wanted} is not a multiple of data.batch_size={micro} x {world} "
                              f"process(es) = {micro * world}; give {fix}, or another number of processes")
        per_step = wanted // micro
    if saved is not None:
        saved_world, saved_micro, saved_accumulate = saved
        if saved_micro and micro is not None and saved_micro != micro:
            raise ConfigError(f"the checkpoint was trained with data.batch_size={saved_micro} (samples per micro-batch, "
                              f"which its data position counts); data.batch_size={micro} cannot continue it: give "
                              f"data.batch_size={saved_micro} (data.global_batch_size sets the samples per step)")
        if per_step is None and saved_world != world:
            per_step = saved_world * saved_accumulate
            if per_step % world:
                raise ConfigError(f"the run trained {per_step} micro-batches per optimizer step on {saved_world} "
                                  f"process(es), which {world} processes cannot share evenly; resume on a number of "
                                  f"processes that divides {per_step}")
            log.info(f"resuming on {world} process(es) instead of {saved_world}: still {per_step} micro-batches per "
                     f"optimizer step" + (f" ({per_step * micro} samples)" if micro else ""))
    if per_step is not None:
        derived = per_step // world
        # a resumed run's config holds the accumulation derived for its last segment: not a choice of the user's
        earlier = {int(s.get("accumulate_grad_batches", 1)) for s in (cfg.get("segments") or [])}
        earlier |= {saved[2]} if saved is not None else set()
        if accumulate not in {1, derived} | earlier:
            why = (f"data.global_batch_size={wanted}" if wanted is not None else
                   f"continuing with {per_step} micro-batches per step on {world} process(es)")
            raise ConfigError(f"{why} derives trainer.accumulate_grad_batches={derived}, but it is set to {accumulate}; "
                              "drop one of them")
        accumulate = derived
    segment = {"world_size": world, "strategy": strategy_kind(cfg), "accelerator": "gpu" if on_gpus(cfg) else "cpu",
               "precision": str(OmegaConf.select(cfg, "trainer.precision", default="32-true")),
               "batch_size": micro, "accumulate_grad_batches": int(accumulate),
               "global_batch_size": micro * world * int(accumulate) if micro is not None else None,
               "from_step": int((ckpt or {}).get("global_step", 0)), "checkpoint": cfg.get("ckpt_path"),
               "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    earlier_segments = OmegaConf.to_container(cfg.segments) if cfg.get("segments") else []
    if earlier_segments and all(earlier_segments[-1].get(k) == segment[k]
                                for k in ("world_size", "strategy", "from_step", "checkpoint")):
        # the same segment again: a DDP process re-reading the config.yaml that rank 0 wrote, or a retry of an attempt
        # that saved no checkpoint
        earlier_segments.pop()
    with open_dict(cfg):
        cfg.trainer.accumulate_grad_batches = int(accumulate)
        cfg.segments = [*earlier_segments, segment]
    return segment
