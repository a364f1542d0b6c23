"""Token classification data (named-entity recognition and any other IOB2 tagging): CoNLL-style column files and the
Hugging Face ``tokens`` / ``ner_tags`` layout, tags aligned to the backbone's sub-word tokens.

Sources: a CoNLL file (``token<sep>tag`` per line, any column pair, tab- or space-separated; a blank or
separator-only line ends a sentence; ``-DOCSTART-`` lines are skipped), a table file (JSON / JSONL / parquet) or
hub dataset with a list-of-words column and a list-of-tags column (tag ids with the dataset's ``ClassLabel``
names, or tag strings), or ``data.data_files`` with one such file per split. A source with only a training file
gets seeded validation and test splits carved from it, stratified by each sentence's first entity type.

Bad input, each a one-line error naming the file and line (or row): a line with another number of columns than the
file's first, a tag that is not ``O`` / ``B-<type>`` / ``I-<type>``. An ``I-X`` that continues nothing is repaired
into ``B-X`` (``data.iob_repair=true``, the default, counted in ``data_report.json``) or refused (``false``). A
sentence without words follows ``data.on_bad_input`` (error, or skip and count).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from datamodules.base import DataModuleBase, DataSpec
from datamodules.sources import TABLE_FORMATS, VAL_SPLIT_NAMES, Split, TextEncoding, read_hub, read_table
from datamodules.text import check_text_settings, length_grouped
from datamodules.token_cache import cached
from modules.backbones.base import resolve_local_source
from modules.entities import IGNORE, OUTSIDE, entity_spans, label_set, parse_tag, repair_iob2
from modules.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CONLL_SUFFIXES = (".txt", ".conll", ".conllu", ".iob", ".iob2", ".bio", ".tsv")
DOCSTART = "-DOCSTART-"


def read_conll(path: Path, encoding: TextEncoding | None = None, token_column: int = 0, tag_column: int = -1,
               separator: str | None = None) -> Split:
    """One CoNLL-style file as a Split with ``tokens`` and ``tags`` columns; each sentence's row id is
    ``file:line`` of its first word."""
    text = (encoding or TextEncoding()).read(path)
    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    rows: list[str] = []
    words: list[str] = []
    labels: list[str] = []
    width, start = None, 0

    def end_sentence() -> None:
        nonlocal words, labels
        if words:
            tokens.append(words)
            tags.append(labels)
            rows.append(f"{path}:{start}")
        words, labels = [], []

    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():  # blank, or separators only (W-NUT: a lone tab)
            end_sentence()
            continue
        fields = line.split(separator) if separator else (line.split("\t") if "\t" in line else line.split())
        if fields[0] == DOCSTART:
            end_sentence()
            continue
        if width is None:
            width = len(fields)
            for name, column in (("token_column", token_column), ("tag_column", tag_column)):
                if not -width <= column < width:
                    raise DataError(f"{path}:{number} has {width} columns, so data.{name}={column} does not exist; "
                                    f"columns are numbered 0..{width - 1} (or -1 for the last)")
        if len(fields) != width:
            raise DataError(f"{path}:{number} has {len(fields)} columns where the file's first line has {width} "
                            f"({line[:80]!r}); fix that line (a token with a space in a space-separated file? set "
                            "data.separator)")
        if not words:
            start = number
        words.append(fields[token_column])
        labels.append(fields[tag_column].strip())
    end_sentence()
    if not tokens:
        raise DataError(f"{path} holds no sentence; expected lines of `token<TAB>tag`, a blank line after each sentence")
    return Split({"tokens": tokens, "tags": tags}, str(path), rows)


def is_conll(path: Path) -> bool:
    return path.suffix.lower() in CONLL_SUFFIXES or path.suffix.lower() not in TABLE_FORMATS


class TaggedDataset(Dataset):
    """Sub-word token ids with their aligned tag ids (``IGNORE`` where no tag is trained), and the words."""

    tagged = False

    def __init__(self, input_ids: list[list[int]], labels: list[list[int]], word_labels: list[list[int]] | None,
                 words: list[list[str]], tags: list[list[str]], rows: list[Any], scored: list[list[int]]) -> None:
        self.input_ids, self.labels, self.word_labels = input_ids, labels, word_labels
        self.words, self.tags, self.rows = words, tags, rows
        self.scored = scored  # per sentence, the words that have a sub-token within max_length (trained and scored)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i = key[1] if isinstance(key, tuple) else key
        item = {"input_ids": self.input_ids[i], "labels": self.labels[i]}
        if self.word_labels is not None:
            item["word_labels"] = self.word_labels[i]
        return item


class TagCollator:
    """Pads token ids with the tokenizer (attention mask included) and tag rows with ``IGNORE``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> None:
        self.tokenizer, self.pad_to_multiple_of = tokenizer, pad_to_multiple_of

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = dict(self.tokenizer.pad([{"input_ids": it["input_ids"]} for it in items], return_tensors="pt",
                                        pad_to_multiple_of=self.pad_to_multiple_of))
        length = batch["input_ids"].shape[1]
        right = self.tokenizer.padding_side == "right"
        for key in ("labels", "word_labels"):
            if key in items[0]:
                rows = [list(it[key]) for it in items]
                padded = [r + [IGNORE] * (length - len(r)) if right else [IGNORE] * (length - len(r)) + r for r in rows]
                batch[key] = torch.tensor(padded, dtype=torch.long)
        return batch


class TokenClassificationDataModule(DataModuleBase):
    """Tagged sentences (words + one IOB2 tag per word), tokenized by the backbone's tokenizer.

    Args:
        source: a CoNLL file, a JSON/JSONL/parquet file, a hub dataset name, or ``pkg://package/file``.
        data_files: ``{train: a.conll, validation: b.conll, test: c.conll}`` (CoNLL or table files).
        hub_config / train_split / val_split / test_split: for hub datasets.
        tokens_column / tags_column: the word-list and tag-list columns of table and hub data.
        tag_names: tag id -> tag, for a table whose tag column holds ids (hub datasets name them themselves).
        token_column / tag_column / separator: which columns of a CoNLL file (0-based, -1 the last) and what
            separates them (None: tabs when the line has one, else any whitespace).
        iob_repair: an ``I-X`` that continues nothing becomes ``B-X`` (counted); false: a one-line error.
        label_all_tokens: train every sub-token of a word (the word's ``B-X`` becomes ``I-X`` on the later ones);
            false: only the first sub-token (scores read one tag per word either way).
        processor: the backbone's tokenizer (a fast one: words are mapped to sub-tokens).
        max_length: sub-word tokens per sentence; words cut off are counted and not scored.
        pad_to_multiple_of / group_by_length / cache_dir / **common: as for text classification.
    """

    modality = "text"
    kind = "token_classification"

    def __init__(
        self,
        source: str | None = None,
        data_files: Mapping[str, str] | None = None,
        hub_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = "test",
        tokens_column: str = "tokens",
        tags_column: str = "ner_tags",
        tag_names: Sequence[str] | None = None,
        token_column: int = 0,
        tag_column: int = -1,
        separator: str | None = None,
        iob_repair: bool = True,
        label_all_tokens: bool = False,
        processor: PreTrainedTokenizerBase | None = None,
        max_length: int = 128,
        pad_to_multiple_of: int | None = None,
        group_by_length: bool = False,
        cache_dir: str | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        check_text_settings("token classification", processor, max_length, pad_to_multiple_of)
        if not processor.is_fast:
            raise ConfigError(f"token classification maps words to sub-word tokens, which needs a fast tokenizer; "
                              f"{type(processor).__name__} is not one (save the backbone with a tokenizer.json)")
        if not data_files and not source:
            raise ConfigError("token classification data needs data.source (a CoNLL or table file, a hub dataset) or "
                              "data.data_files={train: ..., test: ...}")
        self.source, self.data_files, self.hub_config = source, dict(data_files or {}) or None, hub_config
        self.split_names = {"train": train_split, "val": val_split, "test": test_split}
        self.tokens_column, self.tags_column = tokens_column, tags_column
        self.tag_names = [str(n) for n in tag_names] if tag_names else None
        self.conll = {"token_column": token_column, "tag_column": tag_column, "separator": separator}
        self.iob_repair, self.label_all_tokens = bool(iob_repair), bool(label_all_tokens)
        self.tokenizer = processor
        self.max_length = max_length
        self.collate = TagCollator(processor, pad_to_multiple_of)
        self.group_by_length = group_by_length
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None

    # -- the contract ------------------------------------------------------------------------------
    def data_spec(self) -> DataSpec:
        self.setup("fit")
        return DataSpec(self.kind, self.modality, tuple(self.label_names), has_test="test" in self.datasets)

    def save_to(self, run_dir: str | Path) -> None:
        super().save_to(run_dir)
        (Path(run_dir) / "labels.json").write_text(json.dumps({"label_names": self.label_names, **self.report()}, indent=2))

    def collate_for(self, role: str) -> Any:
        return self.collate

    def batch_sampler_for(self, role: str, training: bool) -> Any:
        return length_grouped(self, role, training)

    def describe(self, role: str) -> list[dict[str, Any]]:
        self.setup()
        data = self.datasets[role]
        out = []
        for i, (row, words, tags, scored) in enumerate(zip(data.rows, data.words, data.tags, data.scored, strict=True)):
            item = {"index": i, "row": row, "words": [words[w] for w in scored], "tags": [tags[w] for w in scored]}
            if len(scored) < len(words):  # cut by max_length (or no sub-token): neither trained nor scored
                item["unscored_words"] = len(words) - len(scored)
            out.append(item)
        return out

    # -- loading -----------------------------------------------------------------------------------
    def read(self) -> dict[str, Split]:
        """Every split the source has, as ``tokens`` / ``tags`` columns."""
        if self.data_files:
            out = {}
            for split, file in self.data_files.items():
                role = "val" if split in VAL_SPLIT_NAMES else split
                if role not in ("train", "val", "test"):
                    raise ConfigError(f"data.data_files has split {split!r}; use train, validation and test")
                if file is None:
                    continue
                path = Path(resolve_local_source(str(file))).expanduser()
                if not path.is_file():
                    raise ConfigError(f"data.data_files.{split}={file!r}: file {path} does not exist")
                out[role] = self.read_file(path)
            if "train" not in out:
                raise ConfigError("data.data_files needs a 'train' file")
            return out
        path = Path(resolve_local_source(str(self.source))).expanduser()
        if path.is_file():
            return {"train": self.read_file(path)}
        splits = read_hub(str(path) if path.exists() else str(self.source), self.hub_config, self.split_names)
        return {role: self.columns_of(split) for role, split in splits.items()}

    def read_file(self, path: Path) -> Split:
        if is_conll(path):
            return read_conll(path, self.text_encoding, **self.conll)
        return self.columns_of(read_table(path, self.text_encoding))

    def columns_of(self, split: Split) -> Split:
        """A table / hub split's word and tag lists as ``tokens`` / ``tags`` (tag ids read through the dataset's
        names when the hub gives them as a sequence of ``ClassLabel``)."""
        split.require(tokens_column=self.tokens_column, tags_column=self.tags_column)
        names = self.tag_names
        rows = split.columns[self.tags_column]
        if names is None and any(isinstance(t, int) for row in rows[:50] for t in row):
            raise DataError(f"{split.origin}: column {self.tags_column!r} holds tag ids without their names; give them "
                            "in order as data.tag_names=[O,B-PER,I-PER,...]")
        try:
            tags = [[names[int(t)] if names is not None else str(t) for t in row] for row in rows]
        except (IndexError, ValueError):
            raise DataError(f"{split.origin}: column {self.tags_column!r} has tag ids outside data.tag_names "
                            f"({len(names or [])} names)") from None
        return Split({"tokens": [[str(w) for w in row] for row in split.columns[self.tokens_column]], "tags": tags},
                     split.origin, split.row_ids)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        splits = self.read()
        self.warn_undecodable()
        for role, split in splits.items():
            self.parsed_rows[role] = len(split)
            splits[role] = self.checked(role, split)
        splits = self.carve(splits, lambda s: [first_type(tags) for tags in s.columns["tags"]])
        types = sorted({parse_tag(t)[1] for tags in splits["train"].columns["tags"] for t in tags} - {""})
        found = label_set(types)
        self.label_names = self.resolve_labels(found, splits["train"].origin)
        if len(self.label_names) < 2:
            raise DataError(f"{splits['train'].origin} has no entity tag (every word is O); nothing to learn")
        ids = {name: i for i, name in enumerate(self.label_names)}
        for role, split in splits.items():
            unknown = sorted({t for tags in split.columns["tags"] for t in tags} - set(ids))
            if unknown:
                raise DataError(f"tags {unknown[:5]} in {role} ({split.origin}) are not among the {self.label_origin} tags "
                                f"({', '.join(self.label_names[:12])}); fix them, or add training sentences of that type")
            self.datasets[role] = self.encode(role, split, ids)
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.datasets.items())
        log.info(f"tagged sentences: {sizes}; {len(types)} entity types: {', '.join(types[:12])}")

    def checked(self, role: str, split: Split) -> Split:
        """Tags that are IOB2 (one-line error naming the row otherwise), orphan ``I-`` repaired or refused, empty or
        mismatched sentences through ``on_bad_input``."""
        words, tags = split.columns["tokens"], split.columns["tags"]
        bad_length = [split.row_ids[i] for i, (w, t) in enumerate(zip(words, tags, strict=True)) if len(w) != len(t)]
        self.reject(role, "words_tags_mismatch", bad_length, split.origin, "have a different number of words and tags",
                    "give every word one tag")
        empty = [split.row_ids[i] for i, w in enumerate(words) if not w]
        self.reject(role, "empty_sentence", empty, split.origin, "are empty sentences (no word)", "remove them")
        keep, repaired = [], 0
        for i, (w, t) in enumerate(zip(words, tags, strict=True)):
            if not w or len(w) != len(t):
                continue
            for tag in t:
                try:
                    parse_tag(tag)
                except ValueError as err:
                    raise DataError(f"{split.row_ids[i]} ({role}): {err}; fix the tag, or convert the file to IOB2") from None
            fixed, changed = repair_iob2(t)
            if changed and not self.iob_repair:
                first = next(j for j, (a, b) in enumerate(zip(t, fixed, strict=True)) if a != b)
                raise DataError(f"{split.row_ids[i]} ({role}): word {first + 1} is tagged {t[first]!r} but no entity of that "
                                f"type precedes it (not IOB2); fix the file, or set data.iob_repair=true to read it as "
                                f"{fixed[first]!r}")
            repaired += changed
            tags[i] = fixed
            keep.append(i)
        if repaired:
            self.count(role, "iob_repaired_tags", repaired)
            log.warning(f"{role}: {repaired} I- tags that continued no entity read as B- ({split.origin}); counted in "
                        "data_report.json")
        return split.take(keep) if len(keep) < len(split) else split

    def encode(self, role: str, split: Split, ids: Mapping[str, int]) -> TaggedDataset:
        """Sub-word tokens and aligned tags: a word's tag on its first sub-token, ``IGNORE`` elsewhere (or, with
        ``label_all_tokens``, the inside tag on the later sub-tokens too, while ``word_labels`` keeps one per word)."""
        words, tags = split.columns["tokens"], split.columns["tags"]

        def tokenize() -> dict[str, list[list[int]]]:
            encoded = self.tokenizer(words, is_split_into_words=True, truncation=True, max_length=self.max_length)
            return {"input_ids": encoded["input_ids"],
                    "word_ids": [[-1 if w is None else w for w in encoded.word_ids(i)] for i in range(len(words))]}

        texts = ["\t".join(w) for w in words]
        encoded = cached(self.cache_dir, "tagged", self.tokenizer, f"max_length={self.max_length}", texts, tokenize)
        labels, word_labels, scored, cut, lost = [], [], [], 0, 0
        for sentence, word_ids in zip(tags, encoded["word_ids"], strict=True):
            row, first, seen = [], [], set()
            for w in word_ids:
                if w < 0:
                    row.append(IGNORE)
                    first.append(IGNORE)
                elif w not in seen:
                    seen.add(w)
                    row.append(ids[sentence[w]])
                    first.append(ids[sentence[w]])
                else:
                    tag = sentence[w]
                    inside = f"I-{tag[2:]}" if tag.startswith("B-") else tag
                    row.append(ids[inside] if self.label_all_tokens else IGNORE)
                    first.append(IGNORE)
            last = max(seen) + 1 if seen else 0
            cut += len(sentence) - last
            lost += last - len(seen)  # words inside the kept range that the tokenizer turned into nothing
            labels.append(row)
            word_labels.append(first)
            scored.append(sorted(seen))
        if cut:
            self.count(role, "words_cut_by_max_length", cut)
            log.warning(f"{role}: {cut} words beyond data.max_length={self.max_length} tokens are not trained or scored; "
                        "raise data.max_length")
        if lost:
            self.count(role, "words_without_tokens", lost)
        return TaggedDataset(encoded["input_ids"], labels, word_labels if self.label_all_tokens else None,
                             words, tags, list(split.row_ids), scored)


def first_type(tags: Sequence[str]) -> str:
    """What a sentence is stratified by when splits are carved: its first entity's type (``O`` for none)."""
    spans = entity_spans(tags)
    return spans[0][0] if spans else OUTSIDE
