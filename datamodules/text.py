"""Text classification data: any source, stable label ids, seeded splits, cached tokenization."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader, Dataset
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from datamodules.sampling import EpochAwareLoader, EpochShuffleSampler
from datamodules.sources import Split, load_splits, stratified_split
from datamodules.token_cache import cached
from modules.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class TokenizedDataset(Dataset):
    """Token ids (unpadded) and integer labels; padding happens per batch in the collator."""

    def __init__(self, input_ids: list[list[int]], labels: list[int]) -> None:
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i = key[1] if isinstance(key, tuple) else key  # (epoch, index) keys carry nothing random for text
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def is_empty_text(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def sort_labels(values: set[Any]) -> list[Any]:
    """Numbers in numeric order, anything else as sorted strings: stable across runs and machines."""
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return sorted(values)
    return sorted(values, key=str)


class TextDataModule(pl.LightningDataModule):
    """Labelled texts from the hub, local files or class folders, tokenized by the backbone's tokenizer.

    Args:
        source: hub dataset name, a table file, a folder of class folders, or ``pkg://package/sub``.
        data_files: ``{train: a.csv, validation: b.csv, test: c.csv}`` for local files.
        hub_config: the hub dataset's configuration name.
        train_split / val_split / test_split: split names in a hub dataset (val: tries the usual names).
        text_column / label_column: which columns hold the text and the label.
        val_fraction / test_fraction: shares of train carved out (stratified, seeded) for missing splits.
        max_train_samples / max_eval_samples: cap split sizes (seeded, stratified), for quick runs.
        processor: the backbone's tokenizer (``train.py`` passes it).
        max_length: tokens per text after truncation.
        cache_dir: where tokenized splits are cached between runs (None: no cache).
    """

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
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        processor: PreTrainedTokenizerBase | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if processor is None:
            raise ConfigError("TextDataModule needs the backbone's tokenizer (processor=backbone.processor)")
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= frac < 1.0:
                raise ConfigError(f"data.{name}={frac} must be in [0, 1)")
        if val_fraction + test_fraction >= 1.0:
            raise ConfigError(f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves no training data")
        self.source, self.data_files, self.hub_config = source, dict(data_files or {}) or None, hub_config
        self.split_names = {"train_split": train_split, "val_split": val_split, "test_split": test_split}
        self.text_column, self.label_column = text_column, label_column
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.tokenizer = processor
        self.max_length = max_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.collate = DataCollatorWithPadding(self.tokenizer)
        self.label_names: list[str] = []
        self.datasets: dict[str, TokenizedDataset] = {}
        self.dropped: dict[str, int] = {}

    # -- what the rest of the run needs to know -------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def task_kwargs(self) -> dict[str, Any]:
        """Arguments the task takes from the data (``train.py`` passes them on)."""
        self.setup("fit")
        return {"num_classes": self.num_classes, "label_names": self.label_names}

    def save_to(self, run_dir: str | Path) -> None:
        """Write the label ids with the run, so predictions map back to names."""
        path = Path(run_dir) / "labels.json"
        path.write_text(json.dumps({"label_names": self.label_names, "sizes": {k: len(v) for k, v in self.datasets.items()},
                                    "dropped_empty_texts": self.dropped}, indent=2))

    # -- loading --------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        splits = load_splits(self.source, self.data_files, self.hub_config, **self.split_names)
        for split in splits.values():
            split.require(text_column=self.text_column, label_column=self.label_column)
        splits = {role: self._drop_empty(role, split) for role, split in splits.items()}
        splits = self._carve_missing(splits)
        self.label_names = [str(v) for v in sort_labels(set(splits["train"].columns[self.label_column]))]
        if len(self.label_names) < 2:
            raise DataError(f"{splits['train'].origin} has a single label {self.label_names}; classification needs at least 2")
        label_ids = {name: i for i, name in enumerate(self.label_names)}
        for role, split in splits.items():
            self.datasets[role] = TokenizedDataset(self._tokenize(split), self._encode_labels(role, split, label_ids))
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.datasets.items())
        log.info(f"text data: {sizes}; {self.num_classes} labels: {', '.join(self.label_names[:10])}")

    def _drop_empty(self, role: str, split: Split) -> Split:
        texts = split.columns[self.text_column]
        keep = [i for i, t in enumerate(texts) if not is_empty_text(t)]
        if len(keep) < len(texts):
            self.dropped[role] = len(texts) - len(keep)
            log.warning(f"dropped {len(texts) - len(keep)} empty texts from {role} ({split.origin})")
            if not keep:
                raise DataError(f"every text in {split.origin} column {self.text_column!r} is empty")
            split = split.take(keep)
        return split

    def _carve_missing(self, splits: dict[str, Split]) -> dict[str, Split]:
        """Seeded, stratified val/test splits out of train for the splits the source lacks."""
        train = splits["train"]
        wanted = [r for r, f in (("val", self.val_fraction), ("test", self.test_fraction)) if r not in splits and f > 0]
        if wanted:
            fractions = [self.val_fraction if r == "val" else self.test_fraction for r in wanted]
            parts = stratified_split([str(v) for v in train.columns[self.label_column]], fractions, self.seed)
            for role, idx in zip(wanted, parts, strict=False):
                splits[role] = train.take(idx)
            splits["train"] = train.take(parts[-1])
        caps = {"train": self.max_train_samples, "val": self.max_eval_samples, "test": self.max_eval_samples}
        for role, cap in caps.items():
            if cap and role in splits and len(splits[role]) > cap:
                labels = [str(v) for v in splits[role].columns[self.label_column]]
                keep, _ = stratified_split(labels, [cap / len(labels)], self.seed)
                splits[role] = splits[role].take(keep)
        return splits

    def _encode_labels(self, role: str, split: Split, label_ids: dict[str, int]) -> list[int]:
        out = []
        for row, value in zip(split.row_ids, split.columns[self.label_column], strict=True):
            if str(value) not in label_ids:
                raise DataError(
                    f"label {value!r} in {role} ({split.origin}, row {row}) is not among the training labels "
                    f"({', '.join(self.label_names[:10])}); fix that row or add training examples of it"
                )
            out.append(label_ids[str(value)])
        return out

    def _tokenize(self, split: Split) -> list[list[int]]:
        texts = [str(t) for t in split.columns[self.text_column]]

        def tokenize() -> list[list[int]]:
            return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

        return cached(self.cache_dir, "tokenized", self.tokenizer, f"max_length={self.max_length}", texts, tokenize)

    # -- loaders --------------------------------------------------------------------------------
    def _loader(self, role: str, shuffle: bool) -> DataLoader:
        self.setup()
        if role not in self.datasets:
            raise ConfigError(f"the data has no {role} split; name one (data.{role}_split) or carve it (data.{role}_fraction > 0)")
        dataset = self.datasets[role]
        return (EpochAwareLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if shuffle else None,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.datasets else "val", shuffle=False)
