"""Where labelled examples come from: HF hub datasets, local table files, folders of class folders."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modules.backbones.base import resolve_local_source
from modules.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TABLE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
VAL_SPLIT_NAMES = ("validation", "val", "valid", "dev")


ENCODING_ERRORS = ("strict", "replace", "ignore")


@dataclass
class TextEncoding:
    """How text files are decoded: ``data.encoding`` (a Python codec name) and ``data.encoding_errors``
    (strict: an undecodable byte is a one-line error naming the file and its offset; replace / ignore: the bytes
    become U+FFFD / are dropped, and the files where that happened are counted in the data report)."""

    encoding: str = "utf-8"
    errors: str = "strict"
    changed: list[str] = field(default_factory=list)  # files whose undecodable bytes were replaced or dropped

    def __post_init__(self) -> None:
        import codecs

        try:
            codecs.lookup(self.encoding)
        except (LookupError, TypeError):
            raise ConfigError(f"data.encoding={self.encoding!r} is not a known text encoding; use e.g. utf-8, "
                              "latin-1, cp1252, utf-16") from None
        if self.errors not in ENCODING_ERRORS:
            raise ConfigError(f"data.encoding_errors={self.errors!r} is unknown; choose one of {', '.join(ENCODING_ERRORS)}")

    def decode(self, data: bytes, origin: Any) -> str:
        try:
            return data.decode(self.encoding)
        except UnicodeDecodeError as err:
            if self.errors == "strict":
                line = data.count(b"\n", 0, err.start) + 1
                raise DataError(f"{origin} is not {self.encoding} text: byte 0x{data[err.start]:02x} at offset {err.start} "
                                f"(line {line}) cannot be decoded; read it with data.encoding=<its encoding> (e.g. latin-1, "
                                "cp1252), or data.encoding_errors=replace to replace undecodable bytes") from None
            self.changed.append(str(origin))
            return data.decode(self.encoding, errors=self.errors)

    def read(self, path: Path) -> str:
        return self.decode(Path(path).read_bytes(), path)


@dataclass
class Split:
    """The examples of one split: columns by name, and where each row came from (for errors)."""

    columns: dict[str, list[Any]]
    origin: str
    row_ids: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.row_ids)

    def take(self, indices: Sequence[int]) -> Split:
        return Split({k: [v[i] for i in indices] for k, v in self.columns.items()}, self.origin, [self.row_ids[i] for i in indices])

    def require(self, **keys: str | None) -> None:
        """Check columns exist: ``require(text_column="text")`` names the config key on failure."""
        for key, name in keys.items():
            if name is not None and name not in self.columns:
                raise DataError(f"data.{key}={name!r} not found in {self.origin}; columns are: {', '.join(map(str, self.columns))}")


def read_class_folders(root: Path, suffixes: tuple[str, ...] = (".txt",), encoding: TextEncoding | None = None) -> Split:
    """A folder of class sub-folders of ``.txt`` files (the BBC News layout): label = folder name."""
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders; expected {root}/<label>/<file>{suffixes[0]}")
    texts, labels, rows = [], [], []
    for class_dir in classes:
        files = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in suffixes)
        if not files:
            raise DataError(f"class folder {class_dir} has no {'/'.join(suffixes)} files; remove it or add examples")
        for f in files:
            texts.append((encoding or TextEncoding()).read(f))
            labels.append(class_dir.name)
            rows.append(str(f))
    return Split({"text": texts, "label": labels}, str(root), rows)


def read_table(path: Path, encoding: TextEncoding | None = None) -> Split:
    """A CSV / TSV / JSON / JSONL / parquet file, read with pandas (text formats decoded by ``encoding``)."""
    import io

    import pandas as pd

    fmt = TABLE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(TABLE_FORMATS)}")
    text = (encoding or TextEncoding()).read(path) if fmt != "parquet" else None
    try:
        if fmt == "csv":
            frame = pd.read_csv(io.StringIO(text), sep="\t" if path.suffix.lower() == ".tsv" else ",", keep_default_na=False)
        elif fmt == "json":
            frame = pd.read_json(io.StringIO(text), lines=path.suffix.lower() == ".jsonl")
        else:
            frame = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - pandas raises many types; name the file either way
        raise DataError(f"could not read {path}: {str(err).splitlines()[0]}") from None
    # rows are numbered as a spreadsheet shows them: header is row 1 in CSV files
    first = 2 if fmt == "csv" else 1
    return Split({c: frame[c].tolist() for c in frame.columns}, str(path), list(range(first, first + len(frame))))


def load_hub_dataset(name: str, config: str | None, offline_hint: str, what: str = "dataset", from_disk: bool = False,
                     **kwargs: Any) -> Any:
    """``datasets.load_dataset`` (``load_from_disk`` for a ``save_to_disk`` folder), failing with one line
    that says what to do offline instead (``offline_hint``)."""
    import datasets

    try:
        return datasets.load_from_disk(name) if from_disk else datasets.load_dataset(name, config, **kwargs)
    except Exception as err:  # noqa: BLE001 - connection, auth and missing-config errors differ by version
        raise ConfigError(f"could not load {what} {name!r} ({str(err).splitlines()[0][:160]}); offline, {offline_hint}") from None


def read_data_files(data_files: Mapping[str, str | None], base: Path | None = None, what: str = "file",
                    encoding: TextEncoding | None = None) -> dict[str, Split]:
    """``data.data_files``: split name (train / validation / test) -> a local table file (relative to ``base``)."""
    out = {}
    for split, file in data_files.items():
        role = "val" if split in VAL_SPLIT_NAMES else split
        if role not in ("train", "val", "test"):
            raise ConfigError(f"data.data_files has split {split!r}; use train, validation and test")
        if file is None:
            continue
        path = Path(str(file)).expanduser()
        path = path if path.is_absolute() or base is None else base / path
        path = Path(resolve_local_source(str(path))) if base is None else path
        if not path.is_file():
            raise ConfigError(f"data.data_files.{split}={file!r}: {what} {path} does not exist")
        out[role] = read_table(path, encoding)
    if "train" not in out:
        raise ConfigError(f"data.data_files needs a 'train' {what}")
    return out


def read_hub(name: str, config: str | None, split_names: Mapping[str, str | None]) -> dict[str, Split]:
    """A dataset from the Hugging Face hub (or a local dataset script/folder), via ``datasets``."""
    import datasets

    loaded = load_hub_dataset(name, config, "point data.source at local files instead (a CSV/JSONL/parquet file, "
                                            "or data.data_files={train: ..., test: ...})")
    out = {}
    for role, split in split_names.items():
        if role == "val" and split is None:  # try the usual names
            split = next((n for n in VAL_SPLIT_NAMES if n in loaded), None)
        if split and split in loaded:
            ds = loaded[split]
            columns = {c: ds[c] for c in ds.column_names}
            for c, feature in ds.features.items():
                if isinstance(feature, datasets.ClassLabel):  # readable label names; a missing one (None, -1) stays None
                    columns[c] = [feature.int2str(v) if v is not None and v >= 0 else None for v in columns[c]]
                elif isinstance(getattr(feature, "feature", None), datasets.ClassLabel):  # a list of them (NER tags)
                    names = feature.feature
                    columns[c] = [[names.int2str(v) for v in row] for row in columns[c]]
            out[role] = Split(columns, f"{name}[{split}]", list(range(len(ds))))
    if "train" not in out:
        raise ConfigError(f"dataset {name!r} has no split {split_names['train']!r}; its splits are: {', '.join(loaded)}")
    return out


def load_splits(
    source: str | None,
    data_files: Mapping[str, str] | None = None,
    hub_config: str | None = None,
    train_split: str = "train",
    val_split: str | None = None,
    test_split: str | None = "test",
    encoding: TextEncoding | None = None,
) -> dict[str, Split]:
    """Load the splits that exist as ``{"train": Split, "val"?: Split, "test"?: Split}``.

    ``source`` is a folder of class folders, a single table file (train only), a hub dataset name,
    or ``pkg://package/sub`` for data shipped in a Python package; ``data_files`` maps split names
    (train / validation / test) to local table files.
    """
    if data_files:
        return read_data_files(data_files, encoding=encoding)
    if not source:
        raise ConfigError("data.source is empty; give a hub dataset name, a table file or a folder of class folders")
    resolved = resolve_local_source(source)
    path = Path(resolved)
    if path.is_dir() and any(d.is_dir() for d in path.iterdir()) and not (path / "dataset_info.json").exists():
        return {"train": read_class_folders(path, encoding=encoding)}
    if path.is_file():
        return {"train": read_table(path, encoding)}
    if path.is_dir():
        raise DataError(f"{path} has no class sub-folders; expected {path}/<label>/<file>.txt")
    return read_hub(resolved, hub_config, {"train": train_split, "val": val_split, "test": test_split})


def stratified_split(labels: Sequence[Any], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Seeded split of indices into ``len(fractions) + 1`` parts, keeping each class's share.

    Part ``i`` gets ``fractions[i]`` of every class (at least one example when the class has more
    than one left); the last part gets the rest.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    by_class: dict[Any, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    for label in sorted(by_class, key=str):
        idx = rng.permutation(by_class[label]).tolist()
        start = 0
        for part, fraction in zip(parts, fractions, strict=False):
            n = math.floor(fraction * len(idx) + 0.5)
            if fraction > 0 and n == 0 and len(idx) - start > 1:
                n = 1
            part.extend(idx[start : start + n])
            start += n
        parts[-1].extend(idx[start:])
    return [sorted(p) for p in parts]
