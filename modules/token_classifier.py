"""Token classification (``task=token_classification``): a tag for every word, e.g. named-entity recognition in IOB2.

Every token's features from the backbone -> a linear head -> per-token tag logits. The data gives each word's tag to
its first sub-token and ``IGNORE`` (-100) to the others and to padding (``data.label_all_tokens=true`` trains the
other sub-tokens too, while the scores still read one tag per word: the batch then carries ``word_labels``). Scores:
entity-level micro precision / recall / F1 and macro F1 over entity types (strict IOB2, ``modules.entities``), each
type's F1, and token accuracy over words; the test also fills an entity-type confusion matrix (``confusion``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from modules.backbones.base import Backbone
from modules.classifier import label_head
from modules.entities import IGNORE, EntityConfusion, EntityScores, entity_spans, entity_types, parse_tag
from modules.errors import ConfigError
from modules.task import TaskModule


class TokenClassifier(TaskModule):
    """Per-token features -> linear head; cross-entropy over the labelled sub-tokens.

    Args:
        num_classes: number of tags (filled in from the data).
        label_names: tag id -> tag (``O``, ``B-<type>``, ``I-<type>``), kept in the checkpoint.
        dropout: dropout before the head.
        label_smoothing: cross-entropy label smoothing.
    """

    data_kind = "token_classification"
    default_monitor = ("val/f1", "max")

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
        label_head(self, num_classes, label_names, dropout, "tags")
        for name in self.label_names:
            try:
                parse_tag(name)
            except ValueError as err:
                raise ConfigError(f"task=token_classification reads IOB2 tags; {err}") from None
        self.label_smoothing = label_smoothing
        self.types = entity_types(self.label_names)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE, validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE)
        self.val_entities = EntityScores(self.label_names)
        self.test_entities = EntityScores(self.label_names)
        self.confusion = EntityConfusion(self.label_names)
        self.confusion_names = self.confusion.names

    def metric_names(self) -> list[str]:
        return ["loss", "token_acc", "precision", "recall", "f1", "f1_macro", *(f"f1/{t}" for t in self.types)]

    def monitorable(self) -> list[str]:
        """Entity scores exist for validation only (training logs its loss and token accuracy)."""
        return ["train/loss_epoch", "train/token_acc", *(f"val/{m}" for m in self.metric_names())]

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the host: how many tokens carry a tag (``labelled_tokens``), the weight of the batch's mean loss in the
        epoch's (a per-token mean, whatever the batching or the number of processes), without a device sync."""
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if isinstance(labels, torch.Tensor) and labels.device.type == "cpu":
            batch["labelled_tokens"] = int((labels != IGNORE).sum())
        return batch

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tag logits, (batch, length, num_classes)."""
        return self.head(self.backbone(batch).features)

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch)
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                               label_smoothing=self.label_smoothing if stage == "train" else 0.0)
        words = batch.get("word_labels", labels)  # one gold tag per word: what the scores read
        predicted = logits.detach().argmax(-1)
        size = batch.get("labelled_tokens")  # the loss is a mean over labelled tokens: so is its epoch figure
        if size is None:  # a batch that did not pass through the loader hooks
            size = int((labels != IGNORE).sum())
        accuracy = getattr(self, f"{stage}_acc")
        accuracy.update(predicted.flatten(), words.flatten())
        self.log(f"{stage}/loss", loss, prog_bar=self.shows_progress, on_step=stage == "train", on_epoch=True, batch_size=size)
        self.log(f"{stage}/token_acc", accuracy, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=size)
        if stage != "train":
            getattr(self, f"{stage}_entities").update(predicted, words)
            if stage == "test":
                self.confusion.update(predicted, words)
        return loss

    def log_entity_scores(self, stage: str) -> None:
        scores = getattr(self, f"{stage}_entities")
        values = scores.compute()  # every process takes part (summed counts)
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=False)
        self.last_entity_report = scores.report()
        scores.reset()

    def on_validation_epoch_end(self) -> None:
        self.log_entity_scores("val")

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.confusion.reset()

    def on_test_epoch_end(self) -> None:
        self.log_entity_scores("test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[dict[str, Any]]:
        """Per example: each word's predicted tag and its probability (words: the first sub-token of each, marked by
        ``word_labels`` or ``labels`` not being ``IGNORE``), and the entities read from those tags: type, first word,
        one past the last word, and the mean of their words' probabilities (the Hugging Face pipeline's score with
        ``aggregation_strategy="first"``)."""
        probs = self(batch).float().softmax(-1)
        score, ids = probs.max(-1)
        words = batch.get("word_labels", batch.get("labels"))
        rows = []
        for i in range(len(ids)):
            keep = words[i] != IGNORE
            tags = [self.label_names[t] for t in ids[i][keep].tolist()]
            scores = score[i][keep].tolist()
            entities = [{"type": kind, "start": a, "end": b, "score": sum(scores[a:b]) / (b - a)}
                        for kind, a, b in entity_spans(tags)]
            rows.append({"predicted_tags": tags, "tag_scores": scores, "entities": entities})
        return rows
