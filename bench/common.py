"""What the benchmarks share: the default task (or a variant) built from the real config tree, and its batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def config(overrides: list[str], hydra: bool = False) -> DictConfig:
    """The config ``python train.py <overrides>`` composes (with Hydra's own node if ``hydra``)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra)


def default_task(overrides: list[str] = ()) -> tuple[Any, DictConfig]:
    """The task train.py would build (seeded: every call gives the same weights) and its config."""
    import train

    cfg = config(list(overrides))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    backbone = train.build(cfg.backbone)
    spec = data_module(cfg, backbone.processor).data_spec()
    return train.build(cfg.task, backbone=backbone, optimizer=train.build(cfg.optimizer), **spec.task_kwargs()), cfg


def data_module(cfg: DictConfig, processor: Any) -> Any:
    import train

    datamodule = train.build(cfg.data, processor=processor)
    datamodule.setup()
    return datamodule


def take_batches(overrides: list[str], n: int) -> list[dict]:
    """The first ``n`` training batches of epoch 0, collated (the same batches for every side of a benchmark)."""
    import train

    cfg = config(list(overrides))
    datamodule = data_module(cfg, train.build(cfg.backbone).processor)
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append(dict(batch))
        if len(batches) == n:
            return batches
    raise ValueError(f"the training split has fewer than {n} batches")
