"""Entities in IOB2-tagged sequences and their entity-level scores (named-entity recognition).

A tag is ``O``, ``B-<type>`` (an entity of ``<type>`` begins) or ``I-<type>`` (it continues). Spans are read the
*strict* IOB2 way (``seqeval``'s ``mode="strict", scheme=IOB2``, checked against it in the tests): an entity is a
``B-X`` followed by any number of ``I-X``; an ``I-X`` that continues nothing (after ``O``, or after an entity of
another type) belongs to no entity. A predicted entity counts only when its type, first and last word all match a
gold one. Scores are micro-averaged over every entity (``precision``, ``recall``, ``f1``) and macro-averaged over
the entity types that occur in the gold or the predicted spans (``f1_macro``), as ``seqeval`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

IGNORE = -100  # label of a position that is no word's first sub-token (loss and scores skip it)
OUTSIDE = "O"

Span = tuple[str, int, int]  # (type, first word, one past the last word)


def parse_tag(tag: str) -> tuple[str, str]:
    """``("B", "person")`` for ``B-person``, ``("O", "")`` for ``O``; raises ValueError for anything else."""
    if tag == OUTSIDE:
        return OUTSIDE, ""
    prefix, dash, kind = tag.partition("-")
    if prefix not in ("B", "I") or not dash or not kind:
        raise ValueError(f"{tag!r} is not an IOB2 tag (O, B-<type> or I-<type>)")
    return prefix, kind


def entity_spans(tags: Sequence[str]) -> list[Span]:
    """The entities of one tagged sequence, strict IOB2: ``[("person", 0, 2), ...]``."""
    spans: list[Span] = []
    kind, start = "", -1
    for i, tag in enumerate(tags):
        prefix, this = parse_tag(tag)
        if prefix == "I" and start >= 0 and this == kind:
            continue
        if start >= 0:
            spans.append((kind, start, i))
            start = -1
        if prefix == "B":
            kind, start = this, i
    if start >= 0:
        spans.append((kind, start, len(tags)))
    return spans


def repair_iob2(tags: Sequence[str]) -> tuple[list[str], int]:
    """An ``I-X`` that continues nothing becomes ``B-X`` (how conlleval and ``seqeval``'s default mode read it);
    returns the tags and how many were changed."""
    out, changed, previous = [], 0, OUTSIDE
    for tag in tags:
        prefix, kind = parse_tag(tag)
        if prefix == "I" and parse_tag(previous)[1] != kind:
            tag, changed = f"B-{kind}", changed + 1
        out.append(tag)
        previous = tag
    return out, changed


def entity_types(label_names: Sequence[str]) -> list[str]:
    """The entity types of a label set, sorted (``B-person``, ``I-person``, ``O`` -> ``["person"]``)."""
    return sorted({parse_tag(name)[1] for name in label_names} - {""})


def label_set(types: Sequence[str]) -> list[str]:
    """The label ids of a tagging task: ``O`` first, then ``B-``/``I-`` of each type, types sorted."""
    return [OUTSIDE, *(f"{p}-{t}" for t in sorted(types) for p in ("B", "I"))]


class EntityScores(Metric):
    """Entity-level true positives, false positives and false negatives per type, summed over the epoch (and
    across processes); ``compute`` gives micro precision / recall / F1, macro F1 and each type's F1.

    ``update(predicted, gold)`` takes label ids of shape (batch, length); positions whose gold is ``IGNORE`` (padding,
    later sub-tokens of a word) are left out, so each row becomes the word-level sequence the spans are read from.
    Reading spans needs the ids on the host: one copy per evaluation batch (never used in training steps)."""

    full_state_update = False

    def __init__(self, label_names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label_names = list(label_names)
        self.types = entity_types(label_names)
        n = len(self.types)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predicted: torch.Tensor, gold: torch.Tensor) -> None:
        index = {t: i for i, t in enumerate(self.types)}
        counts = torch.zeros(3, len(self.types), dtype=torch.long)
        for pred_row, gold_row in zip(predicted.tolist(), gold.tolist(), strict=True):
            words = [(p, g) for p, g in zip(pred_row, gold_row, strict=True) if g != IGNORE]
            pred_spans = set(entity_spans([self.label_names[p] for p, _ in words]))
            gold_spans = set(entity_spans([self.label_names[g] for _, g in words]))
            for kind, *_ in pred_spans & gold_spans:
                counts[0, index[kind]] += 1
            for kind, *_ in pred_spans - gold_spans:
                counts[1, index[kind]] += 1
            for kind, *_ in gold_spans - pred_spans:
                counts[2, index[kind]] += 1
        counts = counts.to(self.tp.device)
        self.tp += counts[0]
        self.fp += counts[1]
        self.fn += counts[2]

    def compute(self) -> dict[str, torch.Tensor]:
        tp, fp, fn = self.tp.double(), self.fp.double(), self.fn.double()
        out = prf(tp.sum(), fp.sum(), fn.sum())
        per_type = prf(tp, fp, fn)
        seen = (tp + fp + fn) > 0  # seqeval averages over the types in the gold or the predicted spans
        out["f1_macro"] = per_type["f1"][seen].mean() if bool(seen.any()) else torch.zeros((), dtype=torch.double)
        for i, kind in enumerate(self.types):
            out[f"f1/{kind}"] = per_type["f1"][i]
        return {k: v.float() for k, v in out.items()}

    def report(self) -> list[dict[str, Any]]:
        """Per entity type: precision, recall, F1 and support (gold entities), as rows for a table."""
        tp, fp, fn = self.tp.double(), self.fp.double(), self.fn.double()
        scores = prf(tp, fp, fn)
        return [{"type": kind, "precision": float(scores["precision"][i]), "recall": float(scores["recall"][i]),
                 "f1": float(scores["f1"][i]), "support": int(self.tp[i] + self.fn[i]), "predicted": int(self.tp[i] + self.fp[i])}
                for i, kind in enumerate(self.types)]


class EntityConfusion(Metric):
    """Which type each gold entity was given: rows the gold type, columns the predicted type of the predicted entity
    with the same first and last word; ``none`` (the last row and column) for a gold entity nothing predicted at its
    place (missed) and a predicted entity at a place no gold one has (spurious). ``names`` labels both axes."""

    full_state_update = False

    def __init__(self, label_names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label_names = list(label_names)
        self.names = [*entity_types(label_names), "none"]
        n = len(self.names)
        self.add_state("matrix", default=torch.zeros(n, n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predicted: torch.Tensor, gold: torch.Tensor) -> None:
        index = {t: i for i, t in enumerate(self.names)}
        none = len(self.names) - 1
        counts = torch.zeros_like(self.matrix, device="cpu")
        for pred_row, gold_row in zip(predicted.tolist(), gold.tolist(), strict=True):
            words = [(p, g) for p, g in zip(pred_row, gold_row, strict=True) if g != IGNORE]
            pred = {(a, b): kind for kind, a, b in entity_spans([self.label_names[p] for p, _ in words])}
            for kind, a, b in entity_spans([self.label_names[g] for _, g in words]):
                counts[index[kind], index[pred.pop((a, b))] if (a, b) in pred else none] += 1
            for kind in pred.values():
                counts[none, index[kind]] += 1
        self.matrix += counts.to(self.matrix.device)

    def compute(self) -> torch.Tensor:
        return self.matrix


def prf(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision, recall and F1 (0 where undefined, as ``seqeval``'s ``zero_division=0``)."""
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    return {"precision": precision, "recall": recall, "f1": f1}


def tag_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]], label_names: Sequence[str]) -> EntityScores:
    """The entity scores of word-level tag sequences (a baseline's, ``eval.py``'s), counted as the task counts them."""
    ids = {name: i for i, name in enumerate(label_names)}
    scores = EntityScores(label_names)
    for g, p in zip(gold, predicted, strict=True):
        if g:
            scores.update(torch.tensor([[ids.get(t, 0) for t in p]]), torch.tensor([[ids[t] for t in g]]))
    return scores


def score_tags(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]], label_names: Sequence[str]) -> dict[str, float]:
    """Micro precision / recall / F1, macro F1 and each type's F1 of word-level tag sequences."""
    return {k: float(v) for k, v in tag_scores(gold, predicted, label_names).compute().items()}
