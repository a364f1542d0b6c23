"""Sequence-level classification on any backbone: text, images or audio."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from modules.backbones.base import Backbone
from modules.errors import ConfigError
from modules.heads import ClassificationHead
from modules.task import TaskModule


def classification_metrics(num_classes: int) -> MetricCollection:
    """Accuracy, macro-F1, and top-5 accuracy when there are more than 5 classes (else it is always 1)."""
    metrics = {"acc": MulticlassAccuracy(num_classes, average="micro"), "f1_macro": MulticlassF1Score(num_classes, average="macro")}
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


class Classifier(TaskModule):
    """Pooled backbone features -> linear head; cross-entropy; ``acc``, ``f1_macro`` (and ``acc_top5``
    above 5 classes) per stage. At test end the confusion matrix goes to ``<run>/<report_dir>/``
    (``confusion_matrix.csv`` + ``.png``).

    Args:
        num_classes: number of labels (filled in from the data by ``train.py``).
        label_names: label id -> name, kept in the checkpoint for prediction.
        dropout: dropout before the head.
        label_smoothing: cross-entropy label smoothing.
        report_dir: folder under the trainer's ``default_root_dir`` for the confusion matrix.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        label_names: Sequence[str] | None = None,
        dropout: float = 0.1,
        label_smoothing: float = 0.0,
        report_dir: str = "reports",
        **task_kwargs: Any,
    ) -> None:
        super().__init__(backbone, **task_kwargs)
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes}: classification needs at least 2 classes")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler"])
        self.num_classes = num_classes
        self.label_names = list(label_names) if label_names else [str(i) for i in range(num_classes)]
        self.label_smoothing = label_smoothing
        self.report_dir = report_dir
        self.head = ClassificationHead(backbone.feature_dim, num_classes, dropout)
        metrics = classification_metrics(num_classes)
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.confusion = MulticlassConfusionMatrix(num_classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits, (batch, num_classes)."""
        return self.head(self.backbone(batch).pooled)

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy, hard labels for the metrics). Labels of shape (batch, num_classes) are soft
        targets (mixup/cutmix, already smoothed by them): soft-target cross-entropy, argmax for the metrics."""
        if labels.ndim == 2:
            return torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1).mean(), labels.argmax(-1)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing if stage == "train" else 0.0), labels

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch)
        loss, labels = self.classification_loss(logits, batch["labels"], stage)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), labels)
        if stage == "test":
            self.confusion.update(logits.detach().argmax(-1), labels)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=len(labels))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=len(labels))
        return loss

    def on_test_epoch_start(self) -> None:
        self.confusion.reset()

    def on_test_epoch_end(self) -> None:
        matrix = self.confusion.compute().cpu()  # every rank takes part in the sync
        self.write_confusion(matrix)

    @rank_zero_only
    def write_confusion(self, matrix: torch.Tensor) -> None:
        out = Path(self.trainer.default_root_dir) / self.report_dir
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "confusion_matrix.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["true \\ predicted", *self.label_names])
            for name, row in zip(self.label_names, matrix.tolist(), strict=True):
                writer.writerow([name, *row])
        plot_confusion(matrix, self.label_names, out / "confusion_matrix.png")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[str]:
        return [self.label_names[i] for i in self(batch).argmax(-1).tolist()]


class TextClassifier(Classifier):
    """Text classification: a Hugging Face text backbone under ``Classifier``.

    Batches come from ``datamodules.TextDataModule``: ``input_ids``, ``attention_mask``, ``labels``.
    """


def plot_confusion(matrix: torch.Tensor, label_names: Sequence[str], path: Path) -> None:
    """Row-normalised confusion matrix (recall per true class) with counts, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = matrix.numpy()
    rates = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    n = len(label_names)
    size = min(4 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ticks = range(n)
        ax.set_xticks(ticks, [str(x)[:14] for x in label_names], rotation=60, ha="right")
        ax.set_yticks(ticks, [str(x)[:14] for x in label_names])
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Test confusion matrix ({int(counts.sum())} examples, accuracy {counts.trace() / max(1, counts.sum()):.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
