"""Joint training: one backbone, one classification head per dataset, batches routed by their ``dataset`` key."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from modules.backbones.base import Backbone
from modules.classifier import Classifier, classification_metrics
from modules.errors import ConfigError, DataError
from modules.heads import LinearHead

STAGES = ("train", "val", "test")


class MultiHeadClassifier(Classifier):
    """``Classifier`` with a head per dataset, for ``datamodules.JointDataModule``.

    The target's metrics keep the usual names (``val/acc``, ``test/f1_macro``...), so checkpointing, early stopping
    and sweeps work unchanged; a source's go under ``<stage>/<name>/``. ``train/loss_step`` and ``train/loss_epoch``
    are the joint objective (every batch, whatever its dataset); ``train/<name>/loss`` each dataset's epoch mean.
    ``train/batches/<name>`` counts the batches each dataset gave per epoch; the test confusion matrix
    (``<run>/reports/``) is the target's. A batch without a
    ``dataset`` key goes to the target head, so the checkpoint predicts the target as a plain
    classifier would. All heads form the last layer group, ``head`` (freezing schedules and
    ``head_lr_scale`` treat them alike). Labels may be soft targets (mixup/cutmix).

    Args:
        heads: dataset name -> its label names (``JointDataModule.task_kwargs`` gives them).
        target: the dataset whose head is the model's output.
    """

    def __init__(
        self,
        backbone: Backbone,
        heads: Mapping[str, Sequence[str]],
        target: str,
        dropout: float = 0.0,
        label_smoothing: float = 0.0,
        **task_kwargs: Any,
    ) -> None:
        if target not in heads:
            raise ConfigError(f"task target {target!r} has no head; the heads are: {', '.join(heads)}")
        clash = [name for name in heads if hasattr(nn.ModuleDict(), name)]
        if clash:
            raise ConfigError(f"dataset name {clash[0]!r} clashes with a torch.nn.Module attribute; rename it in data.datasets")
        super().__init__(backbone, len(heads[target]), heads[target], dropout, label_smoothing, **task_kwargs)
        self.target = target
        self.head_label_names = {name: list(labels) for name, labels in heads.items()}
        self.head = nn.ModuleDict({name: LinearHead(backbone.feature_dim, len(labels), dropout)
                                   for name, labels in heads.items()})
        self.source_metrics = nn.ModuleDict()  # "<stage>_<name>" -> metrics logged as <stage>/<name>/...
        for name, labels in heads.items():
            if name == target:
                continue
            if len(labels) < 2:
                raise ConfigError(f"dataset {name!r} has {len(labels)} label(s); classification needs at least 2")
            for stage in STAGES:
                self.source_metrics[f"{stage}_{name}"] = classification_metrics(len(labels)).clone(prefix=f"{stage}/{name}/")

    data_kind = "joint_classification"

    def metric_names(self) -> list[str]:
        sources = [f"{name}/{m}" for name in self.head_label_names if name != self.target
                   for m in ("loss", *classification_metrics(len(self.head_label_names[name])).keys())]
        return [*super().metric_names(), *sources]

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
        if isinstance(strategy, DDPStrategy) and not (ddp_kwargs or {}).get("find_unused_parameters"):
            raise ConfigError("each joint training step trains one head, which plain DDP refuses; "
                              "set trainer.strategy=ddp_find_unused_parameters_true")

    def dataset_of(self, batch: Mapping[str, Any]) -> str:
        name = batch.get("dataset", self.target)
        if name not in self.head_label_names:
            raise DataError(f"a batch from dataset {name!r}, but the task has heads for: {', '.join(self.head_label_names)}")
        return name

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the batch's dataset's head (the target's when the batch names none)."""
        return self.head[self.dataset_of(batch)](self.backbone(batch).pooled)

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        name = self.dataset_of(batch)
        logits = self(batch)
        loss, labels = self.classification_loss(logits, batch["labels"], stage)
        if name == self.target:
            prefix, metrics = stage, getattr(self, f"{stage}_metrics")
            if stage == "test":
                self.confusion.update(logits.detach().argmax(-1), labels)
        else:
            prefix, metrics = f"{stage}/{name}", self.source_metrics[f"{stage}_{name}"]
        metrics.update(logits.detach(), labels)
        if stage == "train":  # the loss of every step, whatever dataset gave it (a figure at each step, none stale),
            # and each dataset's epoch mean
            self.log("train/loss", loss, prog_bar=self.shows_progress, on_step=True, on_epoch=True, batch_size=len(labels))
            self.log(f"train/{name}/loss", loss, on_step=False, on_epoch=True, batch_size=len(labels))
        else:
            self.log(f"{prefix}/loss", loss, prog_bar=name == self.target, on_step=False, on_epoch=True, batch_size=len(labels))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train" and name == self.target,
                      batch_size=len(labels))
        if stage == "train":
            self.log(f"train/batches/{name}", 1.0, on_step=False, on_epoch=True, reduce_fx="sum", batch_size=1)
        return loss
