"""Building a run from its config, once for every entry point: backbone -> data -> what the data tells the task ->
task, then callbacks, loggers and the trainer. ``train.py``, ``eval.py`` / ``predict.py`` / ``export.py`` (through
``run.trained``), the benchmarks and the tests all build through here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from modules.errors import UserInputError


def build(node: DictConfig | Mapping[str, Any], **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets our one-line input errors through unwrapped."""
    kwargs.setdefault("_convert_", "all")  # plain lists/dicts, so checkpoints hold no OmegaConf types
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, UserInputError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def build_each(nodes: DictConfig | Mapping[str, Any] | None) -> list[Any]:
    """Instantiate every entry of a name -> config mapping, skipping entries set to null."""
    return [build(node) for node in (nodes or {}).values() if node is not None and "_target_" in node]


def build_task(cfg: DictConfig, backbone: Any, data_arguments: Mapping[str, Any], schedule: bool = True,
               **extra: Any) -> Any:
    """The task of ``cfg.task`` on ``backbone``, completed with what the data said (labels, vocabulary, heads), and
    what it does to its blocks when the trainer sets it up (``compile=``, ``compile_options``, ``activation_checkpointing=``)."""
    from modules.scaling import plan_fields

    scheduler = build(cfg.scheduler) if schedule and cfg.get("scheduler") else None
    return build(cfg.task, backbone=backbone, optimizer=build(cfg.optimizer), scheduler=scheduler,
                 scale_plan=plan_fields(cfg), **dict(data_arguments), **extra)


@dataclass
class Parts:
    """What a run trains: the backbone, the data and the task built on both."""

    backbone: Any
    datamodule: Any
    task: Any

    @property
    def has_test(self) -> bool:
        return self.datamodule.data_spec().has_test


def build_parts(cfg: DictConfig) -> Parts:
    """Backbone, then the data (prepared by the backbone's processor), then the task with the data's arguments."""
    from run.checks import check_backbone

    backbone = build(cfg.backbone)
    check_backbone(cfg, backbone)
    datamodule = build(data_config(cfg), processor=backbone.processor)
    task = build_task(cfg, backbone, datamodule.data_spec().task_kwargs())
    return Parts(backbone, datamodule, task)


def data_config(cfg: DictConfig) -> dict[str, Any]:
    """The data node as the datamodule is built from it: resolved, without ``global_batch_size`` (a run-level setting
    ``run.elastic`` turns into the trainer's accumulation)."""
    node = OmegaConf.to_container(cfg.data, resolve=True)
    node.pop("global_batch_size", None)
    return node


def build_callbacks(cfg: DictConfig) -> list[Any]:
    """The run's callbacks: the freezing schedule first, so reports see its changes at the same step."""
    return ([build(cfg.finetune)] if cfg.get("finetune") else []) + build_each(cfg.get("callbacks"))
