"""Sequence-level classification on any backbone: text, images or audio."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from modules.backbones.base import Backbone
from modules.errors import ConfigError
from modules.heads import ClassificationHead
from modules.task import TaskModule


class Classifier(TaskModule):
    """Pooled backbone features -> linear head; cross-entropy; accuracy and macro-F1 per stage.

    Args:
        num_classes: number of labels (filled in from the data by ``train.py``).
        label_names: label id -> name, kept in the checkpoint for prediction.
        dropout: dropout before the head.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        label_names: Sequence[str] | None = None,
        dropout: float = 0.1,
        label_smoothing: float = 0.0,
        **task_kwargs: Any,
    ) -> None:
        super().__init__(backbone, **task_kwargs)
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes}: classification needs at least 2 classes")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler"])
        self.num_classes = num_classes
        self.label_names = list(label_names) if label_names else [str(i) for i in range(num_classes)]
        self.label_smoothing = label_smoothing
        self.head = ClassificationHead(backbone.feature_dim, num_classes, dropout)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1_macro": MulticlassF1Score(num_classes, average="macro"),
            }
        )
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits, (batch, num_classes)."""
        return self.head(self.backbone(batch).pooled)

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        labels = batch["labels"]
        logits = self(batch)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), labels)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=len(labels))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=len(labels))
        return loss

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[str]:
        return [self.label_names[i] for i in self(batch).argmax(-1).tolist()]


class TextClassifier(Classifier):
    """Text classification: a Hugging Face text backbone under ``Classifier``.

    Batches come from ``datamodules.TextDataModule``: ``input_ids``, ``attention_mask``, ``labels``.
    """
