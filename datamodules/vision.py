"""Image classification data: any image source, timm transforms that match the backbone, mixup/cutmix."""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup, create_transform
from torch.utils.data import Dataset, default_collate

from datamodules.base import DataModuleBase
from datamodules.image_sources import ImageSplit, load_image_splits, open_image
from datamodules.sampling import item_index
from datamodules.text import is_empty_text, sort_labels
from modules.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# what the backbone's data config may set (timm.data.resolve_data_config)
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# augmentation options: keyword arguments of timm.data.create_transform other than the data config
AUGMENT_KEYS = tuple(k for k in inspect.signature(create_transform).parameters if k not in (*DATA_CONFIG_KEYS, "is_training"))


def randaugment_options(policy: Any) -> dict[str, float] | None:
    """The numeric options of a timm RandAugment policy (``rand-m9-mstd0.5-inc1`` -> m 9, mstd 0.5, inc 1), None for
    no policy or another kind (AutoAugment, AugMix)."""
    if not isinstance(policy, str) or policy.split("-")[0] != "rand":
        return None
    options: dict[str, float] = {}
    for part in policy.split("-")[1:]:
        key = next((k for k in ("mstd", "mmax", "inc", "m") if part.startswith(k)), part.rstrip("0123456789."))
        value = part[len(key):]
        if value.replace(".", "", 1).isdigit():
            options[key] = float(value)
    return options


def safe_randaugment(policy: Any) -> Any:
    """A timm RandAugment policy that never posterizes an image to 0 bits, which Pillow (13 and later) refuses mid-epoch
    (measured: ``rand-m9-mstd0.5-inc1`` failed on 8 of 4,000 images, at magnitudes sampled up to the clip at 10).
    With increasing severity (``inc1``) the magnitude is clipped at 9 (``mmax9``: at least 1 bit kept, said in the
    log); the original Posterize keeps ``int(0.4 * magnitude)`` bits, so a policy whose magnitude can fall below 2.5
    is refused in one line. Anything else is returned as given."""
    options = randaugment_options(policy)
    if options is None:
        return policy
    magnitude, spread, ceiling = options.get("m", 10.0), options.get("mstd", 0.0), options.get("mmax", 10.0)
    if options.get("inc"):
        if ceiling > 9:
            log.info(f"data.augment.auto_augment={policy}: magnitudes clipped at 9 (-mmax9): at 10 RandAugment's "
                     "PosterizeIncreasing keeps 0 bits, which Pillow refuses")
            return f"{policy}-mmax9"
        return policy
    if min(magnitude, ceiling) - 6 * spread < 2.5:
        raise ConfigError(f"data.augment.auto_augment={policy}: below magnitude 2.5 timm's RandAugment posterizes images "
                          "to 0 bits, which Pillow refuses mid-epoch; add -inc1 (severity rising with the magnitude), e.g. "
                          f"rand-m{magnitude:g}-mstd{spread:g}-inc1")
    return policy


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
    if "auto_augment" in options:
        options["auto_augment"] = safe_randaugment(options["auto_augment"])
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


class VisionDataModule(DataModuleBase):
    """Labelled images from folders, the hub or built-in real sets, transformed as the backbone expects.

    Args:
        source: a folder of class folders (or of train/ val/ test/ class-folder trees),
            ``imagefolder://DIR`` (HF imagefolder), ``sklearn://digits``, ``idx://DIR`` (MNIST-layout
            files such as Fashion-MNIST), ``pkg://package/sub``, or a hub dataset name.
        hub_config / train_split / val_split / test_split: the hub dataset's config and split names.
        image_column / label_column: hub columns (found automatically when left empty).
        processor: the backbone's timm data config (``train.py`` passes it): input size, mean/std,
            interpolation, crop.
        augment: training augmentation, as ``timm.data.create_transform`` options (``auto_augment:
            rand-m9-mstd0.5``, ``re_prob: 0.25``, ``hflip``, ``scale``, ``color_jitter``...); null: none.
        mixup: ``timm.data.Mixup`` options (``mixup_alpha``, ``cutmix_alpha``, ``prob``,
            ``switch_prob``, ``mode``, ``label_smoothing``); null: off.
        verify_images: decode every encoded image once at setup, so bad files are found before training.
        **common: ``DataModuleBase`` arguments (fractions, caps, ``on_bad_input``: unreadable images and
            empty labels stop the run, or are left out and counted; batch sizes, seed).
    """

    modality = "image"
    kind = "classification"

    def __init__(
        self,
        source: str | None = None,
        hub_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = "test",
        image_column: str | None = None,
        label_column: str | None = None,
        processor: Mapping[str, Any] | None = None,
        augment: Mapping[str, Any] | None = None,
        mixup: Mapping[str, Any] | None = None,
        verify_images: bool = True,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if not isinstance(processor, Mapping) or "input_size" not in processor:
            raise ConfigError("image data needs an image backbone with a timm data config (backbone=small_resnet_scratch, "
                              f"efficientnet_lite0, timm, ...); this backbone gives {type(processor).__name__}")
        if mixup and self.batch_size % 2:
            raise ConfigError(f"data.batch_size={self.batch_size} is odd; mixup/cutmix pairs examples, use an even batch size")
        self.source, self.hub_config = source, hub_config
        self.split_names = {"train_split": train_split, "val_split": val_split, "test_split": test_split}
        self.columns = {"image_column": image_column, "label_column": label_column}
        self.data_config = dict(processor)
        self.augment = dict(augment) if augment is not None else None
        self.mixup_options = dict(mixup) if mixup else None
        self.verify_images = verify_images
        self.train_transform = build_transform(self.data_config, self.augment, training=True)
        self.eval_transform = build_transform(self.data_config, None, training=False)
        self.skipped: dict[str, list[str]] = {}

    # -- what the rest of the run needs to know -------------------------------------------------
    @property
    def random_train_inputs(self) -> bool:
        return self.augment is not None or self.mixup_options is not None

    def save_to(self, run_dir: str | Path) -> None:
        """Label ids, split sizes, skipped images and the transforms with the run (and the data report)."""
        super().save_to(run_dir)
        info = {
            "label_names": self.label_names,
            **self.report(),
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
        self.parsed_rows = {role: len(split) for role, split in splits.items()}
        splits = {role: self._drop_unlabelled(role, split) for role, split in splits.items()}
        splits = self.carve(splits, lambda s: s.labels)
        if self.verify_images:
            splits = {role: self._check_images(role, split) for role, split in splits.items()}
        train = splits["train"]
        present = set(train.labels)
        found = list(train.label_names) if train.label_names else [str(v) for v in sort_labels(present)]
        self.label_names = self.resolve_labels(found, train.origin)
        if len(present) < 2:
            raise DataError(f"{train.origin} has a single class {sorted(present)}; classification needs at least 2")
        label_ids = {name: i for i, name in enumerate(self.label_names)}
        for role, split in splits.items():
            unknown = sorted(set(split.labels) - set(label_ids))
            if unknown:
                raise DataError(f"labels {unknown[:5]} in {role} ({split.origin}) are not among the {self.label_origin} labels; "
                                + ("add training images of them or remove them" if self.fixed_labels is None else
                                   "evaluate on images of the run's classes"))
            transform = self.train_transform if role == "train" else self.eval_transform
            self.datasets[role] = ImageDataset(split, [label_ids[v] for v in split.labels], transform, self.seed)
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.datasets.items())
        log.info(f"image data: {sizes}; {self.num_classes} classes: {', '.join(self.label_names[:10])}")

    def _drop_unlabelled(self, role: str, split: ImageSplit) -> ImageSplit:
        """Images whose label is empty or missing (a null in a hub column) follow ``on_bad_input``."""
        missing = [i for i, v in enumerate(split.labels) if is_empty_text(v)]
        self.reject(role, "empty_label", [split.names[i] for i in missing], split.origin,
                    "have an empty or missing label", "fill in their labels")
        if not missing:
            return split
        return split.take(sorted(set(range(len(split))) - set(missing)))

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
                if self.on_bad_input == "error":
                    raise
                bad.append(split.names[i])
        if bad:
            self.skipped[role] = bad
            self.count(role, "bad_image", len(bad))
            log.warning(f"skipped {len(bad)} unreadable images in {role} ({split.origin}), first: {bad[0]}")
            if not keep:
                raise DataError(f"every image in {split.origin} ({role}) is unreadable, first: {bad[0]}")
            split = split.take(keep)
        return split

    def describe(self, role: str) -> list[dict[str, Any]]:
        self.setup()
        data = self.datasets[role]
        return [{"index": i, "image": data.split.names[i], "label": self.label_names[label]}
                for i, label in enumerate(data.label_ids)]

    # -- loaders --------------------------------------------------------------------------------
    def collate_for(self, role: str) -> Any:
        if role == "train" and self.mixup_options:
            return MixupCollate(Mixup(num_classes=self.num_classes, **self.mixup_options))
        return default_collate

    def drop_last_for(self, role: str) -> bool:
        # as timm does: a ragged last batch (size 1 breaks BatchNorm; odd sizes break mixup) is dropped
        return len(self.datasets[role]) > self.batch_size
