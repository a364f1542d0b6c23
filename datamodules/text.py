"""Text classification data: any source, stable label ids, seeded splits, cached tokenization."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from datamodules.base import DataModuleBase
from datamodules.sampling import EpochTaggedSampler, LengthGroupedBatchSampler
from datamodules.sources import Split, load_splits
from datamodules.token_cache import cached
from modules.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class TokenizedDataset(Dataset):
    """Token ids (unpadded) and integer labels; padding happens per batch in the collator."""

    tagged = False  # nothing random per item: plain indices

    def __init__(self, input_ids: list[list[int]], labels: list[int], texts: list[str] | None = None,
                 rows: list[Any] | None = None) -> None:
        self.input_ids, self.labels = input_ids, labels
        self.texts, self.rows = texts, rows  # the source rows, for per-example reports

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i = key[1] if isinstance(key, tuple) else key
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def check_text_settings(what: str, processor: Any, max_length: Any, pad_to_multiple_of: Any) -> None:
    """One-line errors for the settings every tokenized-text datamodule shares: a tokenizer, a length, the padding."""
    if not isinstance(processor, PreTrainedTokenizerBase):
        raise ConfigError(f"{what} needs a text backbone with a tokenizer (backbone=minilm, bert_scratch, hf_text, ...); "
                          f"this backbone gives {type(processor).__name__}")
    if not isinstance(max_length, int) or max_length < 3:
        raise ConfigError(f"data.max_length={max_length!r} must be a whole number >= 3 (tokens per text)")
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ConfigError(f"data.pad_to_multiple_of={pad_to_multiple_of!r} must be a whole number >= 1 (or null)")


def length_grouped(datamodule: Any, role: str, training: bool) -> Any:
    """Training batches of similar lengths (``data.group_by_length``; seeded per epoch, resumable) over a dataset with
    ``input_ids``; None (plain batches in the data's order) otherwise."""
    if not (training and datamodule.group_by_length):
        return None
    dataset = datamodule.datasets[role]
    return LengthGroupedBatchSampler(EpochTaggedSampler(len(dataset), datamodule.seed), [len(ids) for ids in dataset.input_ids],
                                     datamodule.batch_size, shuffle=True, seed=datamodule.seed)


def is_empty_text(value: Any) -> bool:
    """None, NaN (a missing cell in JSON/parquet), or only whitespace (an empty CSV cell)."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def sort_labels(values: set[Any]) -> list[Any]:
    """Numbers in numeric order, anything else as sorted strings: stable across runs and machines."""
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return sorted(values)
    return sorted(values, key=str)


class TextDataModule(DataModuleBase):
    """Labelled texts from the hub, local files or class folders, tokenized by the backbone's tokenizer.

    Args:
        source: hub dataset name, a table file, a folder of class folders, or ``pkg://package/sub``.
        data_files: ``{train: a.csv, validation: b.csv, test: c.csv}`` for local files.
        hub_config: the hub dataset's configuration name.
        train_split / val_split / test_split: split names in a hub dataset (val: tries the usual names).
        text_column / label_column: which columns hold the text and the label.
        processor: the backbone's tokenizer (``train.py`` passes it).
        max_length: tokens per text after truncation.
        pad_to_multiple_of: pad each batch to a multiple of this many tokens (None: to its longest text); with
            ``compile=`` it bounds the number of distinct shapes, and 8 suits GPU tensor cores.
        group_by_length: training batches of texts of similar length (less padding, faster epochs); the order
            stays seeded per epoch and resumable.
        cache_dir: where tokenized splits are cached between runs (None: no cache).
        **common: ``DataModuleBase`` arguments (fractions, caps, ``on_bad_input``, batch sizes, seed).

    Empty texts are dropped and counted; a row with an empty or missing label stops the run
    (``on_bad_input=error``) or is dropped and counted (``skip``): it never becomes a class.
    """

    modality = "text"
    kind = "classification"

    def __init__(
        self,
        source: str | None = None,
        data_files: Mapping[str, str] | None = None,
        hub_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = "test",
        text_column: str = "text",
        label_column: str = "label",
        processor: PreTrainedTokenizerBase | None = None,
        max_length: int = 128,
        pad_to_multiple_of: int | None = None,
        group_by_length: bool = False,
        cache_dir: str | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        check_text_settings("text data", processor, max_length, pad_to_multiple_of)
        self.source, self.data_files, self.hub_config = source, dict(data_files or {}) or None, hub_config
        self.split_names = {"train_split": train_split, "val_split": val_split, "test_split": test_split}
        self.text_column, self.label_column = text_column, label_column
        self.tokenizer = processor
        self.max_length = max_length
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.collate = DataCollatorWithPadding(self.tokenizer, pad_to_multiple_of=pad_to_multiple_of)
        self.group_by_length = group_by_length

    # -- what the rest of the run needs to know -------------------------------------------------
    def save_to(self, run_dir: str | Path) -> None:
        """The label ids (so predictions map back to names) and the data report."""
        super().save_to(run_dir)
        info = {"label_names": self.label_names, **self.report()}
        (Path(run_dir) / "labels.json").write_text(json.dumps(info, indent=2))

    def collate_for(self, role: str) -> Any:
        return self.collate

    def batch_sampler_for(self, role: str, training: bool) -> Any:
        """Training batches grouped by length (``group_by_length``); evaluation keeps the data's order."""
        return length_grouped(self, role, training)

    def describe(self, role: str) -> list[dict[str, Any]]:
        self.setup()
        data = self.datasets[role]
        return [{"index": i, "row": row, "text": text[:200], "label": self.label_names[label]}
                for i, (row, text, label) in enumerate(zip(data.rows, data.texts, data.labels, strict=True))]

    # -- loading --------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        splits = load_splits(self.source, self.data_files, self.hub_config, **self.split_names, encoding=self.text_encoding)
        self.warn_undecodable()
        for role, split in splits.items():
            split.require(text_column=self.text_column, label_column=self.label_column)
            self.parsed_rows[role] = len(split)
        splits = {role: self._drop_bad_rows(role, split) for role, split in splits.items()}
        splits = self.carve(splits, lambda s: s.columns[self.label_column])
        found = [str(v) for v in sort_labels(set(splits["train"].columns[self.label_column]))]
        self.label_names = self.resolve_labels(found, splits["train"].origin)
        if len(self.label_names) < 2:
            raise DataError(f"{splits['train'].origin} has a single label {self.label_names}; classification needs at least 2")
        label_ids = {name: i for i, name in enumerate(self.label_names)}
        for role, split in splits.items():
            self.datasets[role] = TokenizedDataset(self._tokenize(split), self._encode_labels(role, split, label_ids),
                                                   [str(t) for t in split.columns[self.text_column]], list(split.row_ids))
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.datasets.items())
        log.info(f"text data: {sizes}; {self.num_classes} labels: {', '.join(self.label_names[:10])}")
        for role, counts in self.counts.items():
            if counts:
                log.info(f"{role}: {self.parsed_rows.get(role, '?')} rows parsed, dropped {dict(counts)}")

    def _drop_bad_rows(self, role: str, split: Split) -> Split:
        """Empty texts are dropped and counted; empty or missing labels follow ``on_bad_input``."""
        texts, labels = split.columns[self.text_column], split.columns[self.label_column]
        no_label = [split.row_ids[i] for i, v in enumerate(labels) if is_empty_text(v)]
        self.reject(role, "empty_label", no_label, split.origin, f"have an empty or missing {self.label_column!r}",
                    "fill in the labels (a text field with line breaks that did not round-trip can split rows)")
        empty = [i for i, t in enumerate(texts) if is_empty_text(t)]
        if empty:
            self.count(role, "empty_text", len(empty))
            log.warning(f"dropped {len(empty)} empty texts from {role} ({split.origin})")
        keep = [i for i, (t, v) in enumerate(zip(texts, labels, strict=True)) if not is_empty_text(t) and not is_empty_text(v)]
        if not keep:
            raise DataError(f"no row of {split.origin} has both a text ({self.text_column!r}) and a label ({self.label_column!r})")
        return split.take(keep) if len(keep) < len(split) else split

    def _encode_labels(self, role: str, split: Split, label_ids: dict[str, int]) -> list[int]:
        out = []
        for row, value in zip(split.row_ids, split.columns[self.label_column], strict=True):
            if str(value) not in label_ids:
                raise DataError(
                    f"label {value!r} in {role} ({split.origin}, row {row}) is not among the {self.label_origin} labels "
                    f"({', '.join(self.label_names[:10])}); fix that row" + (" or add training examples of it"
                                                                            if self.fixed_labels is None else "")
                )
            out.append(label_ids[str(value)])
        return out

    def _tokenize(self, split: Split) -> list[list[int]]:
        texts = [str(t) for t in split.columns[self.text_column]]

        def tokenize() -> list[list[int]]:
            return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

        return cached(self.cache_dir, "tokenized", self.tokenizer, f"max_length={self.max_length}", texts, tokenize)
