"""Image classification: ``Classifier`` plus top-5 accuracy, soft (mixup/cutmix) targets and a confusion matrix."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from modules.backbones.base import Backbone
from modules.classifier import Classifier


class ImageClassifier(Classifier):
    """Pooled timm features -> linear head. Logs ``<stage>/acc``, ``acc_top5``, ``f1_macro``, ``loss``.

    Batches come from ``datamodules.VisionDataModule``: ``pixel_values`` and ``labels``; labels are
    soft targets (batch, num_classes) when mixup/cutmix is on, and the loss is then soft-target
    cross-entropy. At test end the confusion matrix is written to ``<run>/reports/`` (PNG + CSV).

    Args:
        report_dir: folder under the trainer's ``default_root_dir`` for the confusion matrix.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        label_names: Sequence[str] | None = None,
        dropout: float = 0.0,
        label_smoothing: float = 0.0,
        report_dir: str = "reports",
        **task_kwargs: Any,
    ) -> None:
        super().__init__(backbone, num_classes, label_names, dropout, label_smoothing, **task_kwargs)
        self.report_dir = report_dir
        if num_classes > 5:  # top-5 of 5 classes or fewer is always 1
            for metrics in (self.train_metrics, self.val_metrics, self.test_metrics):
                metrics.add_metrics({"acc_top5": MulticlassAccuracy(num_classes, top_k=5, average="micro")})
        self.confusion = MulticlassConfusionMatrix(num_classes)

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        labels = batch["labels"]
        logits = self(batch)
        if labels.ndim == 2:  # mixup/cutmix soft targets (already label-smoothed by timm's Mixup)
            loss = torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1).mean()
            labels = labels.argmax(-1)
        else:
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), labels)
        if stage == "test":
            self.confusion.update(logits.detach().argmax(-1), labels)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=True, batch_size=len(labels))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=len(labels))
        return loss

    def on_test_epoch_start(self) -> None:
        self.confusion.reset()

    def on_test_epoch_end(self) -> None:
        matrix = self.confusion.compute().cpu()
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
    ax.set_title(f"Test confusion matrix ({int(counts.sum())} images, accuracy {counts.trace() / max(1, counts.sum()):.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
