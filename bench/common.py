"""What the benchmarks share: the default task (or a variant) built from the real config tree, and its batches."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig

from run.build import build, build_parts, data_config
from run.config import compose_config

config = compose_config  # the config ``python train.py <overrides>`` composes


def default_task(overrides: list[str] = ()) -> tuple[Any, DictConfig]:
    """The task train.py would build (seeded: every call gives the same weights) and its config."""
    cfg = config(list(overrides))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    return build_parts(cfg).task, cfg


def data_module(cfg: DictConfig, processor: Any) -> Any:
    datamodule = build(data_config(cfg), processor=processor)
    datamodule.setup()
    return datamodule


def take_batches(overrides: list[str], n: int) -> list[dict]:
    """The first ``n`` training batches of epoch 0, collated (the same batches for every side of a benchmark)."""
    cfg = config(list(overrides))
    datamodule = data_module(cfg, build(cfg.backbone).processor)
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append(dict(batch))
        if len(batches) == n:
            return batches
    raise ValueError(f"the training split has fewer than {n} batches")
