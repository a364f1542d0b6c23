"""Speech recognition with CTC on any audio backbone: characters out, WER and CER tracked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.text import CharErrorRate, WordErrorRate

from modules.backbones.base import Backbone
from modules.errors import ConfigError
from modules.heads import LinearHead
from modules.task import TaskModule
from modules.vocab import CharVocab


class CTCRecognizer(TaskModule):
    """Frame features -> character log-probabilities; CTC loss; greedy decoding; WER and CER.

    Args:
        vocab: the character tokens (``<pad>`` = blank, ``<unk>``, ``|``, ...), filled in from the
            data by ``train.py`` and kept in the checkpoint's hyperparameters.
        dropout: dropout before the head.
        num_samples: sample (reference, prediction) pairs kept per validation (``val_samples``; the
            ``PredictionSamples`` callback writes them to ``<run>/predictions/val.txt`` and the loggers).
    """

    def __init__(
        self,
        backbone: Backbone,
        vocab: Sequence[str],
        dropout: float = 0.1,
        num_samples: int = 8,
        **task_kwargs: Any,
    ) -> None:
        super().__init__(backbone, **task_kwargs)
        if len(vocab) < 4:
            raise ConfigError(f"vocab has {len(vocab)} tokens; CTC needs <pad>, <unk>, | and at least one character")
        self.save_hyperparameters(ignore=list(self.NOT_HYPERPARAMETERS))
        self.vocab = CharVocab(list(vocab))
        self.head = LinearHead(backbone.feature_dim, len(self.vocab), dropout)
        self.num_samples = num_samples
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_metrics", nn.ModuleDict({"wer": WordErrorRate(), "cer": CharErrorRate()}))
        self.val_samples: list[tuple[str, str]] = []

    data_kind = "ctc"
    default_monitor = ("val/wer", "min")

    def metric_names(self) -> list[str]:
        return ["loss", "wer", "cer"]

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities (batch, frames, vocab) and the number of real frames per example."""
        out = self.backbone(batch)
        log_probs = F.log_softmax(self.head(out.features).float(), dim=-1)
        lengths = out.mask.sum(-1) if out.mask is not None else torch.full(log_probs.shape[:1], log_probs.shape[1])
        return log_probs, lengths.long()

    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """Greedy CTC decoding: best token per frame, repeats merged, blanks dropped."""
        best = log_probs.argmax(-1).tolist()
        return [self.vocab.decode_ctc(ids[:n]) for ids, n in zip(best, lengths.tolist(), strict=True)]

    def step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        labels = batch["labels"]
        log_probs, frames = self(batch)
        label_mask = labels != -100
        targets = labels[label_mask]  # concatenated targets: no padding value can leak into the loss
        # zero_infinity: a clip too short for its transcript gives no gradient instead of inf/nan
        loss = F.ctc_loss(log_probs.transpose(0, 1), targets, frames, label_mask.sum(-1), blank=self.vocab.blank_id,
                          reduction="mean", zero_infinity=True)
        size = len(labels)
        self.log(f"{stage}/loss", loss, prog_bar=self.shows_progress, on_step=stage == "train", on_epoch=True, batch_size=size)
        # clips that failed to decode in a loader worker (data.on_bad_input=skip), summed over the epoch
        self.log(f"{stage}/skipped_audio", float(batch.get("skipped_audio", 0)), on_step=False, on_epoch=True,
                 reduce_fx="sum", batch_size=1)
        if stage != "train" or self.global_step % 10 == 0:  # decoding every train step costs time for little
            predictions = self.decode(log_probs.detach(), frames)
            references = list(batch["texts"])
            for name, metric in getattr(self, f"{stage}_metrics").items():
                metric.update(predictions, references)
                self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=size)
            if stage == "val" and len(self.val_samples) < self.num_samples:
                self.val_samples += list(zip(references, predictions, strict=True))[: self.num_samples - len(self.val_samples)]
        return loss

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.val_samples = []

    predict_outputs: bool = False  # eval.py --save-outputs: the log-probabilities of the real frames too

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Per example: the greedy transcript and its number of frames."""
        log_probs, frames = self(batch)
        rows = [{"transcript": text, "frames": n} for text, n in zip(self.decode(log_probs, frames), frames.tolist(), strict=True)]
        if self.predict_outputs:
            for row, values, n in zip(rows, log_probs.cpu(), frames.tolist(), strict=True):
                row["outputs"] = values[:n]
        return rows
