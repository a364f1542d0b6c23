"""Image classification: ``Classifier`` with vision defaults (no dropout before the head)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from modules.backbones.base import Backbone
from modules.classifier import Classifier


class ImageClassifier(Classifier):
    """Pooled timm features -> linear head. Logs ``<stage>/acc``, ``acc_top5``, ``f1_macro``, ``loss``.

    Batches come from ``datamodules.VisionDataModule``: ``pixel_values`` and ``labels``; labels are
    soft targets (batch, num_classes) when mixup/cutmix is on, and the loss is then soft-target
    cross-entropy.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        label_names: Sequence[str] | None = None,
        dropout: float = 0.0,
        label_smoothing: float = 0.0,
        **task_kwargs: Any,
    ) -> None:
        super().__init__(backbone, num_classes, label_names, dropout, label_smoothing, **task_kwargs)
