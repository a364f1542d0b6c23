"""Sequence-level classification on any backbone: text, images or audio (``task=text_classification``,
``task=image_classification``: the same task with other defaults)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from modules.backbones.base import Backbone
from modules.errors import ConfigError
from modules.heads import LinearHead
from modules.task import TaskModule


def classification_metrics(num_classes: int, validate_args: bool = True) -> MetricCollection:
    """Accuracy, macro-F1, and top-5 accuracy when there are more than 5 classes (else it is always 1).

    ``validate_args=False`` for the training metrics: torchmetrics' range checks read the labels back to the host
    at every update, a device sync per training step."""
    kwargs = {"validate_args": validate_args}
    metrics = {"acc": MulticlassAccuracy(num_classes, average="micro", **kwargs),
               "f1_macro": MulticlassF1Score(num_classes, average="macro", **kwargs)}
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro", **kwargs)
    return MetricCollection(metrics)


class Classifier(TaskModule):
    """Pooled backbone features -> linear head; cross-entropy; ``acc``, ``f1_macro`` (and ``acc_top5``
    above 5 classes) per stage, and the test confusion matrix (``confusion``), which the
    ``ConfusionMatrixReport`` callback writes to the run folder.

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
        self.save_hyperparameters(ignore=list(self.NOT_HYPERPARAMETERS))
        self.label_smoothing = label_smoothing
        label_head(self, num_classes, label_names, dropout, "classes")
        metrics = classification_metrics(num_classes)
        self.train_metrics = classification_metrics(num_classes, validate_args=False).clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.confusion = MulticlassConfusionMatrix(num_classes)

    data_kind = "classification"
    default_monitor = ("val/acc", "max")

    def metric_names(self) -> list[str]:
        return ["loss", *self.val_metrics.keys(keep_base=True)]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits, (batch, num_classes)."""
        return self.head(self.backbone(batch).pooled)

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy, hard labels for the metrics). Labels of shape (batch, num_classes) are soft
        targets (mixup/cutmix, already smoothed by them): soft-target cross-entropy, argmax for the metrics."""
        hard = labels.argmax(-1) if labels.ndim == 2 else labels
        return label_loss(logits, labels, self.label_smoothing if stage == "train" else 0.0), hard

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch)
        loss, labels = self.classification_loss(logits, batch["labels"], stage)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), labels)
        if stage == "test":
            self.confusion.update(logits.detach().argmax(-1), labels)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=self.shows_progress, on_step=on_step, on_epoch=True, batch_size=len(labels))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=len(labels))
        return loss

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.confusion.reset()

    predict_top_k: int = 5  # predict.py / eval.py: how many (label, probability) pairs per example
    predict_outputs: bool = False  # eval.py --save-outputs: the logits too

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[dict[str, Any]]:
        """Per example: the predicted label, its probability and the top-k (label, probability) pairs."""
        logits = self(batch).float()
        top = logits.softmax(-1).topk(min(self.predict_top_k, logits.shape[-1]), dim=-1)
        rows = [{"predicted": self.label_names[ids[0]], "score": ps[0],
                 "top_k": [[self.label_names[i], p] for i, p in zip(ids, ps, strict=True)]}
                for ids, ps in zip(top.indices.tolist(), top.values.tolist(), strict=True)]
        if self.predict_outputs:
            for row, values in zip(rows, logits.cpu(), strict=True):
                row["outputs"] = values
        return rows


def label_head(task: TaskModule, num_classes: int, label_names: Sequence[str] | None, dropout: float, what: str) -> None:
    """A task's labels (``num_classes``, ``label_names``: id -> name, numbers when none are given) and its linear head
    on the backbone's features (pooled or per token, as the task applies it)."""
    if num_classes < 2:
        raise ConfigError(f"num_classes={num_classes}: {type(task).__name__} needs at least 2 {what}")
    task.num_classes = num_classes
    task.label_names = list(label_names) if label_names else [str(i) for i in range(num_classes)]
    task.head = LinearHead(task.backbone.feature_dim, num_classes, dropout)


def label_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy on hard labels (smoothed by ``label_smoothing``), or on soft targets of shape (batch, num_classes)
    (mixup/cutmix, smoothed by them already)."""
    if labels.ndim == 2:
        return torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
