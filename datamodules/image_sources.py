"""Where labelled images come from: class-folder trees, HF datasets, scikit-learn digits, IDX files."""

from __future__ import annotations

import gzip
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from datamodules.sources import VAL_SPLIT_NAMES, load_hub_dataset
from modules.backbones.base import resolve_local_source
from modules.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLIT_FOLDERS = {"train": ("train",), "val": VAL_SPLIT_NAMES, "test": ("test",)}
IDX_PREFIXES = {"train": "train", "test": "t10k"}  # the MNIST / Fashion-MNIST file layout
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class")


class HubImages:
    """An HF dataset's image column, read lazily as ``{"bytes", "path"}`` so we decode (and name) files ourselves."""

    def __init__(self, dataset: Any, column: str) -> None:
        import datasets

        self.dataset = dataset.cast_column(column, datasets.Image(decode=False)).select_columns([column])
        self.column = column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(i)][self.column]

    def select(self, indices: Sequence[int]) -> HubImages:
        out = object.__new__(HubImages)
        out.dataset, out.column = self.dataset.select(list(indices)), self.column
        return out


@dataclass
class ImageSplit:
    """One split: images (paths, arrays, or lazy hub items), string labels, and a name per image (for errors).

    ``label_names``: the source's own label order (digits 0-9, a hub ClassLabel), if it has one.
    """

    images: Any
    labels: list[str]
    names: list[str]
    origin: str
    label_names: list[str] | None = None
    # images are files or encoded bytes that could be corrupt (arrays are already decoded)
    encoded: bool = field(default=True)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: Sequence[int]) -> ImageSplit:
        images = self.images.select(indices) if hasattr(self.images, "select") else [self.images[i] for i in indices]
        return ImageSplit(images, [self.labels[i] for i in indices], [self.names[i] for i in indices], self.origin,
                          self.label_names, self.encoded)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as RGB; transparent pixels (RGBA, LA, palette with transparency) become white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float greys: scale to 8 bits
        array = np.asarray(image, dtype=np.float32)
        span = float(array.max() - array.min()) or 1.0
        image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
    return image.convert("RGB")


def open_image(item: Any, name: str) -> Image.Image:
    """Decode one image fully (so truncated files fail here) as RGB; DataError naming ``name`` if it is bad."""
    try:
        if isinstance(item, np.ndarray):
            image = Image.fromarray(item)
        elif isinstance(item, Image.Image):
            image = item
        elif isinstance(item, Mapping):  # an HF Image feature with decode=False
            image = Image.open(io.BytesIO(item["bytes"])) if item.get("bytes") else Image.open(item["path"])
        else:
            image = Image.open(item)
        image.load()
        return to_rgb(image)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise DataError(
            f"cannot read image {name} ({str(err).splitlines()[0][:120]}); replace or delete it, "
            f"or set data.on_bad_input=skip to leave bad images out"
        ) from None


# -- readers --------------------------------------------------------------------------------------
def read_digits() -> dict[str, ImageSplit]:
    """scikit-learn's 1,797 real 8x8 handwritten digits (values 0-16), as 8-bit grey arrays."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = list((digits.images * (255.0 / 16.0)).round().astype(np.uint8))
    labels = [str(int(t)) for t in digits.target]
    names = [f"digits[{i}]" for i in range(len(labels))]
    return {"train": ImageSplit(images, labels, names, "sklearn digits", [str(i) for i in range(10)], encoded=False)}


def read_idx(path: Path, magic: bytes, what: str) -> tuple[bytes, int]:
    """An IDX file's bytes and item count, after checking its magic number and that its size matches the header."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:4] != magic:
        raise DataError(f"{path} is not an IDX {what} file (magic {data[:4].hex()})")
    return data, int.from_bytes(data[4:8], "big")


def read_idx_images(path: Path) -> np.ndarray:
    data, count = read_idx(path, b"\x00\x00\x08\x03", "image")
    rows, cols = (int.from_bytes(data[i : i + 4], "big") for i in (8, 12))
    if len(data) - 16 != count * rows * cols:
        raise DataError(f"{path} is truncated or padded: its header announces {count} images of {rows}x{cols} "
                        f"({count * rows * cols} bytes) but it holds {len(data) - 16}; download or copy it again")
    return np.frombuffer(data, np.uint8, offset=16).reshape(count, rows, cols)


def read_idx_labels(path: Path) -> np.ndarray:
    data, count = read_idx(path, b"\x00\x00\x08\x01", "label")
    if len(data) - 8 != count:
        raise DataError(f"{path} is truncated or padded: its header announces {count} labels but it holds {len(data) - 8}")
    return np.frombuffer(data, np.uint8, offset=8)


def read_idx_folder(root: Path, label_names: Sequence[str] | None = None) -> dict[str, ImageSplit]:
    """MNIST-layout IDX files (``train-images-idx3-ubyte.gz``, ``t10k-...``): Fashion-MNIST, MNIST, KMNIST."""
    if not root.is_dir():
        hint = " (`apt-get install dataset-fashion-mnist`)" if "fashion" in str(root) else ""
        raise ConfigError(f"IDX folder {root} does not exist{hint}")
    out = {}
    for role, prefix in IDX_PREFIXES.items():
        images = sorted(root.glob(f"{prefix}-images-idx3-ubyte*"))
        labels = sorted(root.glob(f"{prefix}-labels-idx1-ubyte*"))
        if not images or not labels:
            continue
        array, targets = read_idx_images(images[0]), read_idx_labels(labels[0])
        if len(array) != len(targets):
            raise DataError(f"{images[0]} has {len(array)} images but {labels[0]} has {len(targets)} labels")
        names = label_names or [str(i) for i in range(int(targets.max()) + 1)]
        out[role] = ImageSplit(list(array), [names[int(t)] for t in targets], [f"{images[0].name}[{i}]" for i in range(len(targets))],
                               str(images[0]), list(names), encoded=False)
    if "train" not in out:
        raise DataError(f"{root} has no train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz] pair")
    return out


def read_class_tree(root: Path) -> ImageSplit:
    """``root/<label>/<image>``: label = folder name. Empty class folders and single classes are errors."""
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders; expected {root}/<label>/<image>.jpg")
    images, labels = [], []
    for class_dir in classes:
        files = sorted(str(f) for f in class_dir.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not files:
            raise DataError(f"class folder {class_dir} has no images ({', '.join(IMAGE_SUFFIXES[:5])}, ...); remove it or add images")
        images += files
        labels += [class_dir.name] * len(files)
    if len(classes) < 2:
        raise DataError(f"{root} has a single class folder ({classes[0].name}); classification needs at least 2")
    return ImageSplit(images, labels, list(images), str(root))


def read_image_tree(root: Path) -> dict[str, ImageSplit]:
    """A class-folder tree, or ``train/``, ``val/`` (or ``validation/``), ``test/`` folders of class folders."""
    out = {}
    for role, names in SPLIT_FOLDERS.items():
        folder = next((root / n for n in names if (root / n).is_dir()), None)
        if folder is not None:
            out[role] = read_class_tree(folder)
    if not out:
        return {"train": read_class_tree(root)}
    if "train" not in out:
        raise DataError(f"{root} has split folders ({', '.join(out)}) but no train/")
    return out


def pick_column(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], key: str, origin: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"data.{key}={wanted!r} not found in {origin}; columns are: {', '.join(columns)}")
        return wanted
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise DataError(f"{origin} has none of the columns {', '.join(candidates)}; set data.{key} (columns: {', '.join(columns)})")
    return found


def read_hub_images(
    name: str,
    config: str | None,
    split_names: Mapping[str, str | None],
    image_column: str | None,
    label_column: str | None,
    data_dir: str | None = None,
) -> dict[str, ImageSplit]:
    """An HF dataset (hub name, or the ``imagefolder`` builder on a local ``data_dir``)."""
    import datasets

    loaded = load_hub_dataset(name, config, "point data.source at a local folder of class folders (or imagefolder://DIR)",
                              data_dir=data_dir)
    out = {}
    for role, split in split_names.items():
        if role == "val" and split is None:
            split = next((n for n in VAL_SPLIT_NAMES if n in loaded), None)
        if not split or split not in loaded:
            continue
        ds = loaded[split]
        origin = f"{name}[{split}]" if data_dir is None else f"{data_dir}[{split}]"
        image_col = pick_column(ds.column_names, image_column, IMAGE_COLUMNS, "image_column", origin)
        label_col = pick_column(ds.column_names, label_column, LABEL_COLUMNS, "label_column", origin)
        feature = ds.features[label_col]
        raw = ds[label_col]
        if isinstance(feature, datasets.ClassLabel):
            label_names, labels = list(feature.names), [feature.int2str(v) if v is not None and v >= 0 else None for v in raw]
        else:  # a missing label stays None (never the class "None"); the datamodule applies on_bad_input
            label_names, labels = None, [str(v) if v is not None else None for v in raw]
        images = HubImages(ds, image_col)
        paths = [item.get("path") for item in images.dataset[image_col]] if data_dir else None
        names = [p or f"{origin} row {i}" for i, p in enumerate(paths)] if paths else [f"{origin} row {i}" for i in range(len(ds))]
        out[role] = ImageSplit(images, labels, names, origin, label_names)
    if "train" not in out:
        raise ConfigError(f"dataset {name!r} has no split {split_names['train']!r}; its splits are: {', '.join(loaded)}")
    return out


def load_image_splits(
    source: str | None,
    hub_config: str | None = None,
    train_split: str = "train",
    val_split: str | None = None,
    test_split: str | None = "test",
    image_column: str | None = None,
    label_column: str | None = None,
) -> dict[str, ImageSplit]:
    """The splits a source has, as ``{"train": ImageSplit, "val"?: ..., "test"?: ...}``.

    ``source`` is one of: ``sklearn://digits``; ``idx://DIR`` (MNIST-layout files, Fashion-MNIST's
    class names when DIR mentions fashion); ``imagefolder://DIR`` (HF's imagefolder builder); a local
    folder of class folders (optionally under train/ val/ test/); ``pkg://package/sub``; a hub name.
    """
    if not source:
        raise ConfigError("data.source is empty; give a folder of class folders, sklearn://digits, idx://DIR or a hub name")
    splits = {"train": train_split, "val": val_split, "test": test_split}
    if source.startswith("sklearn://"):
        if source != "sklearn://digits":
            raise ConfigError(f"data.source={source!r}: the scikit-learn image set available is sklearn://digits")
        return read_digits()
    if source.startswith("idx://"):
        root = Path(source[len("idx://") :]).expanduser()
        return read_idx_folder(root, FASHION_MNIST_LABELS if "fashion" in str(root).lower() else None)
    if source.startswith("imagefolder://"):
        folder = resolve_local_source(source[len("imagefolder://") :])
        return read_hub_images("imagefolder", None, splits, image_column, label_column, data_dir=folder)
    resolved = resolve_local_source(source)
    path = Path(resolved)
    if path.is_dir():
        return read_image_tree(path)
    if path.exists():
        raise ConfigError(f"data.source={source!r} is a file; give a folder of class folders (root/<label>/<image>)")
    return read_hub_images(resolved, hub_config, splits, image_column, label_column)
