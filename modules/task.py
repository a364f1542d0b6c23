"""The base every task shares: backbone + head, optimizer and schedule from partial configs."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import nn

from modules.backbones.base import Backbone
from modules.errors import ConfigError
from modules.layer_groups import LayerGroup
from modules.optim import optimizer_options, param_groups
from modules.scaling import ScalePlan, apply_plan

# Lightning says so whenever a task with a transfer hook (on_before_batch_transfer, below) trains on a datamodule;
# the task's hook is the one meant to run
warnings.filterwarnings("ignore", message=r".*overridden `on_before_batch_transfer` in `LightningModule`.*")

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


class TaskModule(pl.LightningModule):
    """Shared plumbing for every task.

    Subclasses set ``self.head`` and implement ``step(batch, stage) -> loss`` (logging their own
    metrics). The optimizer and scheduler are ``_partial_`` factories from ``configs/``: the task
    completes them with its layer-group parameter groups and the run's total step count.

    Each task declares the data it trains on (``data_kind``, matched against the datamodule's
    ``DataSpec``), the metric that picks its best checkpoint by default (``default_monitor``:
    name and mode) and the metrics it logs per stage (``metric_names``), so a wrong ``monitor``
    fails at start-up instead of after an epoch.

    Args:
        backbone: a backbone adapter (``modules.backbones``).
        optimizer: ``partial(torch.optim.X, lr=..., weight_decay=...)``.
        scheduler: ``partial(modules.schedules.X, warmup=...)`` or None for a constant LR.
        lr_decay: layer-wise LR decay; group k steps below the top gets ``lr * lr_decay**k``.
        head_lr_scale: the head's LR relative to the top backbone group.
        scale_plan: activation checkpointing and compilation of the blocks (``modules.scaling.ScalePlan``, or its
            fields); how the model runs, not what it is: checkpoints, eval and export see the same model either way.
    """

    data_kind: ClassVar[str] = ""
    default_monitor: ClassVar[tuple[str, str]] = ("val/loss", "min")
    # constructor arguments that are no hyperparameters (objects; how the model runs): never in a checkpoint
    NOT_HYPERPARAMETERS: ClassVar[tuple[str, ...]] = ("backbone", "optimizer", "scheduler", "scale_plan")

    def __init__(
        self,
        backbone: Backbone,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        lr_decay: float = 1.0,
        head_lr_scale: float = 1.0,
        scale_plan: ScalePlan | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.lr_decay = lr_decay
        self.head_lr_scale = head_lr_scale
        self.head: nn.Module = nn.Identity()
        self.scale_plan = ScalePlan(**scale_plan) if isinstance(scale_plan, Mapping) else scale_plan or ScalePlan()
        self._scaled = False

    def configure_model(self) -> None:
        """Activation checkpointing, compilation and (under ``trainer=fsdp2``) FSDP2 sharding of the backbone's
        repeated blocks, all derived from the layer groups (``modules.scaling``). Lightning calls this once per
        fit / test in the same process, before the strategy wraps the model: the first call does the work."""
        if self._scaled:
            return
        self._scaled = True
        precision = str(self.trainer.precision) if self._trainer is not None else None
        mesh = self.device_mesh  # ModelParallelStrategy's (data_parallel, tensor_parallel) mesh; None otherwise
        if mesh is not None and mesh.ndim > 1:
            mesh = mesh["data_parallel"]
        apply_plan(self, self.scale_plan, mesh=mesh, precision=precision)

    @property
    def shows_progress(self) -> bool:
        """Whether a progress bar shows per-step values: Lightning reads every ``prog_bar`` value back to the host
        at every step (a device sync), so without a bar nothing is put on it."""
        return self._trainer is not None and self._trainer.progress_bar_callback is not None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the host, before the batch moves to the device: an attention mask that masks nothing is dropped.
        Transformers would otherwise check it on the device at every step (``mask.all()``: a sync) to drop it itself;
        the model computes the same without it."""
        if not isinstance(batch, Mapping):
            return batch
        batch = dict(batch)  # a plain dict (collators give transformers' BatchEncoding)
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.device.type == "cpu":
            with torch.profiler.record_function("host:attention_mask"):
                if bool(mask.all()):
                    del batch["attention_mask"]
        return batch

    def layer_groups(self) -> list[LayerGroup]:
        """The backbone's ordered groups plus the head, last (names relative to this module)."""
        backbone = [
            LayerGroup(g.name, {f"backbone.{n}": p for n, p in g.params.items()}) for g in self.backbone.layer_groups()
        ]
        return [*backbone, LayerGroup("head", {f"head.{n}": p for n, p in self.head.named_parameters()})]

    def metric_names(self) -> list[str]:
        """What ``step`` logs per stage, without the stage prefix (``loss``, ``acc``, ...)."""
        return ["loss"]

    def monitorable(self) -> list[str]:
        """Epoch-level metric names a ``monitor`` can name: ``val/<metric>`` and ``train/<metric>``."""
        names = [f"{stage}/{m}" for stage in ("val", "train") for m in self.metric_names()]
        return [*names, "train/loss_epoch"]

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.step(batch, "test")

    def configure_optimizers(self) -> Any:
        defaults = getattr(self.optimizer_factory, "keywords", {})
        layer_groups = self.layer_groups()
        grouped = {id(p) for g in layer_groups for p in g.params.values()}
        outside = [n for n, p in self.named_parameters() if id(p) not in grouped]
        if outside:  # they would never be trained, without a word
            raise ConfigError(f"{len(outside)} parameters are in no layer group, so the optimizer would never train them "
                              f"(first: {', '.join(outside[:3])}); the backbone adapter's layer_groups() must cover every "
                              "parameter of the model")
        groups = param_groups(
            layer_groups,
            lr=defaults.get("lr", 1e-3),
            weight_decay=defaults.get("weight_decay", 0.0),
            lr_decay=self.lr_decay,
            head_lr_scale=self.head_lr_scale,
        )
        optimizer = self.optimizer_factory(groups, **optimizer_options(self.optimizer_factory, list(self.parameters())))
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        monitor = getattr(scheduler, "monitor", None)
        if monitor:  # reduce-on-plateau: checked after each validation, on the configured metric
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "monitor": monitor}}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
