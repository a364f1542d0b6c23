"""Raw inputs for prediction, prepared exactly as the run's data was: texts (text files, table columns, stdin),
images (files, folders) and audio (files, manifests) -> batches the model reads. No training data is needed.

An input that cannot be read stops with one line naming it (``on_bad_input=error``) or comes out as a row
with an ``error`` field and is counted (``skip``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from datamodules.image_sources import IMAGE_SUFFIXES, open_image
from datamodules.sources import TABLE_FORMATS, TextEncoding, read_table
from modules.errors import ConfigError, DataError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".au", ".sph")


@dataclass
class RawItem:
    """One input: its name in the output (``file``, ``file:line``, ``table.csv row 3``) and its content (a text,
    or the path / bytes of an image or a clip)."""

    name: str
    content: Any


def read_texts(sources: Sequence[str], column: str, encoding: TextEncoding) -> list[RawItem]:
    """Texts: one per line of a text file or stdin (``-``), or a table column (CSV/TSV/JSON/JSONL/parquet).
    Empty lines are left out."""
    items: list[RawItem] = []
    for source in sources:
        if source == "-":
            lines = sys.stdin.read().splitlines()
            items += [RawItem(f"stdin:{i}", t) for i, t in enumerate(lines, 1) if t.strip()]
            continue
        path = existing(source)
        if path.suffix.lower() in TABLE_FORMATS:
            table = read_table(path, encoding)
            table.require(text_column=column)
            items += [RawItem(f"{path} row {row}", str(t)) for row, t in zip(table.row_ids, table.columns[column], strict=True)
                      if t is not None and str(t).strip()]
        else:
            lines = encoding.read(path).splitlines()
            items += [RawItem(f"{path}:{i}", t) for i, t in enumerate(lines, 1) if t.strip()]
    return items


def find_files(sources: Sequence[str], suffixes: Sequence[str], column: str | None, what: str) -> list[RawItem]:
    """Files, folders (searched recursively for ``suffixes``) and manifests (a table whose ``column`` holds paths,
    relative to the manifest's folder)."""
    items: list[RawItem] = []
    for source in sources:
        path = existing(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes and not p.name.startswith("."))
            if not found:
                raise DataError(f"{path} holds no {what} files ({', '.join(suffixes[:5])}, ...)")
            items += [RawItem(str(p), str(p)) for p in found]
        elif path.suffix.lower() in TABLE_FORMATS and column:
            table = read_table(path)
            table.require(**{f"{what}_column": column})
            for value in table.columns[column]:
                target = Path(str(value)).expanduser()
                target = target if target.is_absolute() else path.parent / target
                items.append(RawItem(str(target), str(target)))
        else:
            items.append(RawItem(str(path), str(path)))
    return items


def existing(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"input {source!r} does not exist; give files, folders, a table file, or - for stdin")
    return path


class RawDataset(Dataset):
    """Prepares each input with ``prepare`` (tokenize / decode + transform / decode + resample); a failure is
    an error, or (``skip``) an item that carries the error message."""

    def __init__(self, items: Sequence[RawItem], prepare: Any, on_bad_input: str = "error") -> None:
        self.items, self.prepare, self.on_bad_input = list(items), prepare, on_bad_input

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        try:
            return {"name": item.name, **self.prepare(item)}
        except DataError as err:
            message = str(err).replace("set data.on_bad_input=skip", "pass --on-bad-input skip")
            if self.on_bad_input == "error":
                raise DataError(message) from None
            return {"name": item.name, "error": message}


class RawCollator:
    """Batches the readable items with the run's own collator; the names (and errors) ride along."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        good = [it for it in items if "error" not in it]
        batch: dict[str, Any] = dict(self.collate([{k: v for k, v in it.items() if k != "name"} for it in good])) if good else {}
        batch["names"] = [it["name"] for it in good]
        batch["failed"] = [(it["name"], it["error"]) for it in items if "error" in it]
        return batch


def text_preparation(tokenizer: Any, max_length: int) -> tuple[Any, Any]:
    from transformers import DataCollatorWithPadding

    def prepare(item: RawItem) -> dict[str, Any]:
        return {"input_ids": tokenizer(item.content, truncation=True, max_length=max_length)["input_ids"]}

    return prepare, DataCollatorWithPadding(tokenizer)


def words_of(tokenizer: Any, text: str) -> list[tuple[str, tuple[int, int]]]:
    """The words of a raw text as the tokenizer's own pre-tokenizer splits it (BERT: at spaces and punctuation), with
    their character offsets: the words a token classifier tags (and a Hugging Face pipeline groups)."""
    return tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)


def word_preparation(tokenizer: Any, max_length: int) -> tuple[Any, Any]:
    """Token classification: a text -> its words -> sub-word tokens, ``word_labels`` marking each word's first
    sub-token (0) and ``IGNORE`` elsewhere (what the task reads one tag from); words beyond ``max_length`` are cut."""
    from datamodules.token_tags import TagCollator
    from modules.entities import IGNORE

    def prepare(item: RawItem) -> dict[str, Any]:
        words = [w for w, _ in words_of(tokenizer, item.content)]
        if not words:
            raise DataError(f"{item.name}: no word to tag")
        encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
        marks, seen = [], set()
        for w in encoded.word_ids():
            marks.append(0 if w is not None and w not in seen else IGNORE)
            if w is not None:
                seen.add(w)
        return {"input_ids": encoded["input_ids"], "word_labels": marks}

    return prepare, TagCollator(tokenizer)


def image_preparation(data_config: dict[str, Any]) -> tuple[Any, Any]:
    from torch.utils.data import default_collate

    from datamodules.vision import build_transform

    transform = build_transform(data_config, None, training=False)

    def prepare(item: RawItem) -> dict[str, Any]:
        return {"pixel_values": transform(open_image(item.content, item.name))}

    return prepare, default_collate


def audio_preparation(feature_extractor: Any) -> tuple[Any, Any]:
    import soundfile as sf

    from datamodules.speech import AudioCollator, read_audio

    rate = int(feature_extractor.sampling_rate)

    def prepare(item: RawItem) -> dict[str, Any]:
        try:
            wave = read_audio(item.content, rate)
        except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as err:
            raise DataError(f"cannot decode audio {item.name}: {str(err).splitlines()[0][:120]}; fix or remove it, "
                            "or pass --on-bad-input skip") from None
        if wave.size == 0:
            raise DataError(f"audio {item.name} holds no samples; remove it, or pass --on-bad-input skip")
        return {"wave": wave, "labels": [], "text": ""}

    collate = AudioCollator(feature_extractor)
    dropped = ("labels", "texts", "skipped_audio", "indices")
    return prepare, lambda items: {k: v for k, v in collate(items).items() if k not in dropped}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


SUFFIXES = {"image": IMAGE_SUFFIXES, "audio": AUDIO_SUFFIXES}
