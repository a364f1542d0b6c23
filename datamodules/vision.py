"""Image classification data: any image source, timm transforms that match the backbone, mixup/cutmix."""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from timm.data import Mixup, create_transform
from torch.utils.data import DataLoader, Dataset, default_collate

from datamodules.image_sources import ImageSplit, load_image_splits, open_image
from datamodules.sampling import EpochAwareLoader, EpochTaggedSampler, item_index
from datamodules.sources import stratified_split
from datamodules.text import sort_labels
from modules.errors import ConfigError, DataError

log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")
# what the backbone's data config may set (timm.data.resolve_data_config)
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# augmentation options: keyword arguments of timm.data.create_transform other than the data config
AUGMENT_KEYS = tuple(k for k in inspect.signature(create_transform).parameters if k not in (*DATA_CONFIG_KEYS, "is_training"))


def build_transform(data_config: Mapping[str, Any], augment: Mapping[str, Any] | None, training: bool) -> Callable:
    """timm's train or eval transform for a backbone's data config; ``augment=None`` trains without augmentation."""
    if augment:
        unknown = sorted(set(augment) - set(AUGMENT_KEYS))
        if unknown:
            raise ConfigError(f"data.augment has unknown keys {unknown}; they are timm.data.create_transform options, e.g. "
                              "auto_augment, re_prob, hflip, scale, color_jitter")
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items() if k in DATA_CONFIG_KEYS}
    if not training:
        return create_transform(**config, is_training=False)
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in (augment or {}).items()}
    return create_transform(**config, is_training=True, no_aug=augment is None, **options)


class ImageDataset(Dataset):
    """Decoded, RGB-converted, transformed images with integer labels."""

    def __init__(self, split: ImageSplit, label_ids: list[int], transform: Callable, seed: int = 0) -> None:
        self.split, self.label_ids, self.transform, self.seed = split, label_ids, transform, seed

    def __len__(self) -> int:
        return len(self.label_ids)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i = item_index(key, self.seed)
        image = open_image(self.split.images[i], self.split.names[i])
        return {"pixel_values": self.transform(image), "labels": self.label_ids[i]}


class MixupCollate:
    """Batches, then timm's mixup/cutmix: ``labels`` become soft targets (batch, num_classes)."""

    def __init__(self, mixup: Mixup) -> None:
        self.mixup = mixup

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = default_collate(items)
        batch["pixel_values"], batch["labels"] = self.mixup(batch["pixel_values"], batch["labels"])
        return batch


class VisionDataModule(pl.LightningDataModule):
    """Labelled images from folders, the hub or built-in real sets, transformed as the backbone expects.

    Args:
        source: a folder of class folders (or of train/ val/ test/ class-folder trees),
            ``imagefolder://DIR`` (HF imagefolder), ``sklearn://digits``, ``idx://DIR`` (MNIST-layout
            files such as Fashion-MNIST), ``pkg://package/sub``, or a hub dataset name.
        hub_config / train_split / val_split / test_split: the hub dataset's config and split names.
        image_column / label_column: hub columns (found automatically when left empty).
        val_fraction / test_fraction: shares of train carved out (stratified, seeded) for missing splits.
        max_train_samples / max_eval_samples: cap split sizes (stratified, seeded), for quick runs.
        processor: the backbone's timm data config (``train.py`` passes it): input size, mean/std,
            interpolation, crop.
        augment: training augmentation, as ``timm.data.create_transform`` options (``auto_augment:
            rand-m9-mstd0.5``, ``re_prob: 0.25``, ``hflip``, ``scale``, ``color_jitter``...); null: none.
        mixup: ``timm.data.Mixup`` options (``mixup_alpha``, ``cutmix_alpha``, ``prob``,
            ``switch_prob``, ``mode``, ``label_smoothing``); null: off.
        on_bad_image: ``error`` (stop, naming the file) or ``skip`` (leave it out and count it).
        verify_images: decode every encoded image once at setup, so bad files are found before training.
    """

    def __init__(
        self,
        source: str | None = None,
        hub_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = "test",
        image_column: str | None = None,
        label_column: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        processor: Mapping[str, Any] | None = None,
        augment: Mapping[str, Any] | None = None,
        mixup: Mapping[str, Any] | None = None,
        on_bad_image: str = "error",
        verify_images: bool = True,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
    ) -> None:
        super().__init__()
        if not processor or "input_size" not in processor:
            raise ConfigError("VisionDataModule needs the backbone's timm data config (processor=backbone.processor); "
                              "use a timm backbone (backbone.kind=timm)")
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= frac < 1.0:
                raise ConfigError(f"data.{name}={frac} must be in [0, 1)")
        if val_fraction + test_fraction >= 1.0:
            raise ConfigError(f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves no training data")
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ConfigError(f"data.on_bad_image={on_bad_image!r}; choose one of {', '.join(BAD_IMAGE_POLICIES)}")
        if mixup and batch_size % 2:
            raise ConfigError(f"data.batch_size={batch_size} is odd; mixup/cutmix pairs examples, use an even batch size")
        self.source, self.hub_config = source, hub_config
        self.split_names = {"train_split": train_split, "val_split": val_split, "test_split": test_split}
        self.columns = {"image_column": image_column, "label_column": label_column}
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.data_config = dict(processor)
        self.augment = dict(augment) if augment is not None else None
        self.mixup_options = dict(mixup) if mixup else None
        self.on_bad_image, self.verify_images = on_bad_image, verify_images
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.train_transform = build_transform(self.data_config, self.augment, training=True)
        self.eval_transform = build_transform(self.data_config, None, training=False)
        self.label_names: list[str] = []
        self.datasets: dict[str, ImageDataset] = {}
        self.skipped: dict[str, list[str]] = {}

    # -- what the rest of the run needs to know -------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def task_kwargs(self) -> dict[str, Any]:
        """Arguments the task takes from the data (``train.py`` passes them on)."""
        self.setup("fit")
        return {"num_classes": self.num_classes, "label_names": self.label_names}

    def save_to(self, run_dir: str | Path) -> None:
        """Write label ids, split sizes, skipped images and the transforms with the run."""
        info = {
            "label_names": self.label_names,
            "sizes": {k: len(v) for k, v in self.datasets.items()},
            "skipped_bad_images": {k: {"count": len(v), "first": v[:20]} for k, v in self.skipped.items()},
            "data_config": self.data_config,
            "train_transform": str(self.train_transform),
            "eval_transform": str(self.eval_transform),
        }
        (Path(run_dir) / "labels.json").write_text(json.dumps(info, indent=2, default=str))

    # -- loading --------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        splits = load_image_splits(self.source, self.hub_config, **self.split_names, **self.columns)
        splits = self._carve_missing(splits)
        if self.verify_images:
            splits = {role: self._check_images(role, split) for role, split in splits.items()}
        train = splits["train"]
        present = set(train.labels)
        self.label_names = list(train.label_names) if train.label_names else [str(v) for v in sort_labels(present)]
        if len(present) < 2:
            raise DataError(f"{train.origin} has a single class {sorted(present)}; classification needs at least 2")
        label_ids = {name: i for i, name in enumerate(self.label_names)}
        for role, split in splits.items():
            unknown = sorted(set(split.labels) - set(label_ids))
            if unknown:
                raise DataError(f"labels {unknown[:5]} in {role} ({split.origin}) are not among the training labels; "
                                "add training images of them or remove them")
            transform = self.train_transform if role == "train" else self.eval_transform
            self.datasets[role] = ImageDataset(split, [label_ids[v] for v in split.labels], transform, self.seed)
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.datasets.items())
        log.info(f"image data: {sizes}; {self.num_classes} classes: {', '.join(self.label_names[:10])}")

    def _carve_missing(self, splits: dict[str, ImageSplit]) -> dict[str, ImageSplit]:
        """Seeded, stratified val/test splits out of train for the splits the source lacks; then caps."""
        train = splits["train"]
        wanted = [r for r, f in (("val", self.val_fraction), ("test", self.test_fraction)) if r not in splits and f > 0]
        if wanted:
            fractions = [self.val_fraction if r == "val" else self.test_fraction for r in wanted]
            parts = stratified_split(train.labels, fractions, self.seed)
            for role, idx in zip(wanted, parts, strict=False):
                splits[role] = train.take(idx)
            splits["train"] = train.take(parts[-1])
        caps = {"train": self.max_train_samples, "val": self.max_eval_samples, "test": self.max_eval_samples}
        for role, cap in caps.items():
            if cap and role in splits and len(splits[role]) > cap:
                keep, _ = stratified_split(splits[role].labels, [cap / len(splits[role])], self.seed)
                splits[role] = splits[role].take(keep)
        return splits

    def _check_images(self, role: str, split: ImageSplit) -> ImageSplit:
        """Decode each file once: raise on the first bad one, or (``skip``) leave bad ones out and count them."""
        if not split.encoded:
            return split
        keep, bad = [], []
        for i in range(len(split)):
            try:
                open_image(split.images[i], split.names[i])
                keep.append(i)
            except DataError:
                if self.on_bad_image == "error":
                    raise
                bad.append(split.names[i])
        if bad:
            self.skipped[role] = bad
            log.warning(f"skipped {len(bad)} unreadable images in {role} ({split.origin}), first: {bad[0]}")
            if not keep:
                raise DataError(f"every image in {split.origin} ({role}) is unreadable, first: {bad[0]}")
            split = split.take(keep)
        return split

    # -- loaders --------------------------------------------------------------------------------
    def _loader(self, role: str, training: bool) -> DataLoader:
        self.setup()
        if role not in self.datasets:
            raise ConfigError(f"the data has no {role} split; name one (data.{role}_split) or carve it (data.{role}_fraction > 0)")
        collate = default_collate
        if training and self.mixup_options:
            collate = MixupCollate(Mixup(num_classes=self.num_classes, **self.mixup_options))
        return (EpochAwareLoader if training else DataLoader)(
            self.datasets[role],
            batch_size=self.batch_size if training else self.eval_batch_size,
            sampler=EpochTaggedSampler(len(self.datasets[role]), self.seed) if training else None,
            # as timm does: a ragged last batch (size 1 breaks BatchNorm; odd sizes break mixup) is dropped
            drop_last=training and len(self.datasets[role]) > self.batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", training=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", training=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.datasets else "val", training=False)
