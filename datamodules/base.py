"""What every datamodule shares: the data -> task contract, split carving and caps, loaders, the
bad-input policy and the data report written with the run."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader, Dataset

from datamodules.eval_shards import Batches, as_is, sharded_eval_loader
from datamodules.sampling import (
    EpochAwareLoader,
    EpochShuffleSampler,
    EpochTaggedSampler,
    TrainShards,
    batches_trained,
    position_for,
    training_position,
)
from datamodules.sources import TextEncoding, stratified_split
from modules.errors import ConfigError, DataError

log = logging.getLogger(__name__)

BAD_INPUT_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class DataSpec:
    """What the data tells the task (``train.py`` hands it over): the one data -> task contract.

    kind: which tasks can train on it (``classification``, ``token_classification``, ``ctc``, ``mlm``,
        ``joint_classification``).
    modality: what the backbone reads (``text``, ``image``, ``audio``).
    label_names: classification label ids -> names (the target's, for joint data; tags for token classification).
    vocab: CTC output tokens.
    heads: joint data: dataset name -> its label names; target: the dataset validated and tested.
    has_test: whether a real test split exists (never the validation set under another name).
    """

    kind: str
    modality: str
    label_names: tuple[str, ...] = ()
    vocab: tuple[str, ...] = ()
    heads: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    target: str | None = None
    has_test: bool = True

    def task_kwargs(self) -> dict[str, Any]:
        """The task's constructor arguments that come from the data."""
        if self.kind in ("classification", "token_classification"):
            return {"num_classes": len(self.label_names), "label_names": list(self.label_names)}
        if self.kind == "ctc":
            return {"vocab": list(self.vocab)}
        if self.kind == "joint_classification":
            return {"heads": {name: list(labels) for name, labels in self.heads.items()}, "target": self.target}
        return {}


class Sliceable(Protocol):
    def __len__(self) -> int: ...

    def take(self, indices: Sequence[int]) -> Any: ...


S = TypeVar("S", bound=Sliceable)


def check_folds(num_folds: Any, fold: Any) -> None:
    """``data.num_folds`` (null, or a whole number >= 2) and ``data.fold`` (0 .. num_folds - 1)."""
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if num_folds is not None and not (whole(num_folds) and num_folds >= 2):
        raise ConfigError(f"data.num_folds={num_folds!r} must be a whole number >= 2 (or null: no cross-validation)")
    if fold is None:
        return
    if num_folds is None:
        raise ConfigError(f"data.fold={fold!r} needs data.num_folds (the number of folds), e.g. data.num_folds=5")
    if not (whole(fold) and 0 <= fold < num_folds):
        raise ConfigError(f"data.fold={fold!r} must be a whole number from 0 to {num_folds - 1} (data.num_folds={num_folds})")


def fold_indices(size: int, num_folds: int, seed: int, labels: Sequence[str] | None = None) -> list[list[int]]:
    """Seeded k-fold partition of ``range(size)``: disjoint folds covering every index, sizes within one of each
    other; with ``labels``, each class is dealt round the folds in turn (stratified)."""
    rng = np.random.default_rng(seed)
    if labels is None:
        order = rng.permutation(size).tolist()
    else:
        by_class: dict[str, list[int]] = {}
        for i, label in enumerate(labels):
            by_class.setdefault(label, []).append(i)
        order = [i for label in sorted(by_class) for i in rng.permutation(by_class[label]).tolist()]
    folds: list[list[int]] = [[] for _ in range(num_folds)]
    for position, index in enumerate(order):  # dealt in turn, continuing across classes: sizes stay within one
        folds[position % num_folds].append(index)
    return [sorted(f) for f in folds]


def check_policy(name: str, value: str) -> None:
    if value not in BAD_INPUT_POLICIES:
        raise ConfigError(f"data.{name}={value!r} is unknown; choose one of {', '.join(BAD_INPUT_POLICIES)}")


class DataModuleBase(pl.LightningDataModule):
    """The shared half of every datamodule. Subclasses fill ``self.datasets`` in ``setup`` and say
    what they give the task in ``data_spec``; loaders, carving, caps and the report come from here.

    Args:
        val_fraction / test_fraction: shares of train carved out (stratified by label when there are
            labels, seeded) for the splits the source lacks.
        max_train_samples / max_eval_samples: cap split sizes (stratified, seeded), for quick runs.
        num_folds / fold: k-fold cross-validation. The test split is carved as usual and kept aside; what a plain
            run trains and validates on (train + the carved validation share, each capped as without folds) is cut
            into ``num_folds`` seeded folds, stratified by label when there are labels; fold ``fold`` validates, the
            others train. The same seed gives the same folds.
        label_names: a fixed label set (ids in this order), e.g. a trained model's: labels outside it are an
            error instead of new classes (``eval.py`` passes the model's). None: the training split's labels.
        on_bad_input: ``error`` (stop with one line naming the file and row) or ``skip`` (leave bad
            examples out and count them in the log and ``data_report.json``).
        batch_size / eval_batch_size / num_workers / seed: loaders and every seeded choice.
        train_on_val: train on the carved validation share too (the same capped train and val a run without it has,
            joined; validation still runs on that share, so its figures are no longer held out). ``auto.py``'s final
            run: the winner of a search on the validation split, retrained on everything but the test split.
    """

    modality: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    @property
    def random_train_inputs(self) -> bool:
        """Whether a training example's inputs change from epoch to epoch (random augmentation, mixup, speed
        perturbation): then nothing keyed by the inputs (a teacher-logit cache) is ever read back."""
        return False

    def __init__(
        self,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        on_bad_input: str = "error",
        label_names: Sequence[str] | None = None,
        encoding: str = "utf-8",
        encoding_errors: str = "strict",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        num_folds: int | None = None,
        fold: int | None = None,
        train_on_val: bool = False,
    ) -> None:
        super().__init__()
        check_folds(num_folds, fold)
        if train_on_val and (num_folds or not val_fraction > 0):
            raise ConfigError("data.train_on_val trains on the validation share too, which needs one carved from the "
                              "training data (data.val_fraction > 0) and no data.num_folds")
        self.train_on_val = bool(train_on_val)
        self.num_folds, self.fold = num_folds, (fold or 0) if num_folds else None
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not isinstance(frac, (int, float)) or not 0.0 <= frac < 1.0:
                raise ConfigError(f"data.{name}={frac!r} must be a number in [0, 1)")
        if val_fraction + test_fraction >= 1.0:
            raise ConfigError(f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves no training data")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                            ("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"data.{name}={value!r} must be a whole number >= 1" + (" (or null)" if name != "batch_size" else ""))
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers!r} must be a whole number >= 0")
        check_policy("on_bad_input", on_bad_input)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.on_bad_input = on_bad_input
        self.text_encoding = TextEncoding(encoding, encoding_errors)  # text and table files (manifests too)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.datasets: dict[str, Dataset] = {}
        self.label_names: list[str] = []  # classification data: label id -> name, set in setup
        self.fixed_labels = [str(n) for n in label_names] if label_names else None
        self.counts: dict[str, Counter] = {}  # role -> what was dropped, resampled, ... (the data report)
        self.parsed_rows: dict[str, int] = {}  # role -> rows the source gave, before anything was dropped
        self._resume_at: tuple[int, int, int] | None = None  # (epoch, batches trained, processes): a mid-epoch checkpoint

    # -- the contract -----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def data_spec(self) -> DataSpec:
        """What this data gives the task (``kind``, ``modality``, labels; subclasses add e.g. a vocabulary)."""
        self.setup("fit")
        return DataSpec(self.kind, self.modality, tuple(self.label_names), has_test="test" in self.datasets)

    def task_kwargs(self) -> dict[str, Any]:
        """The task's arguments that come from the data (``data_spec().task_kwargs()``)."""
        self.setup("fit")
        return self.data_spec().task_kwargs()

    def has_split(self, role: str) -> bool:
        self.setup("fit")
        return role in self.datasets

    def resolve_labels(self, found: Sequence[str], origin: str) -> list[str]:
        """Label ids: those ``found`` in the training split, or the fixed ``label_names`` (which must cover them)."""
        if self.fixed_labels is None:
            return list(found)
        unseen = sorted(set(found) - set(self.fixed_labels))
        if unseen:
            raise DataError(f"labels {unseen[:5]} of {origin} are not among the model's {len(self.fixed_labels)} labels "
                            f"({', '.join(self.fixed_labels[:10])}); evaluate on data labelled with the run's label set")
        return list(self.fixed_labels)

    @property
    def label_origin(self) -> str:
        return "model's" if self.fixed_labels is not None else "training"

    def describe(self, role: str) -> list[dict[str, Any]]:
        """Per example of a split, in loader order of the dataset: what identifies it and its reference
        (``eval.py`` writes these beside the predictions)."""
        self.setup()
        return [{"index": i} for i in range(len(self.datasets[role]))]

    def prediction_loader(self, role: str) -> DataLoader:
        """The evaluation loader of a split, its batches in the order ``trainer.test`` sees them."""
        return self.loader(role)

    # -- the bad-input policy ---------------------------------------------------------------------
    def count(self, role: str, reason: str, n: int = 1) -> None:
        self.counts.setdefault(role, Counter())[reason] += n

    def reject(self, role: str, reason: str, rows: Sequence[Any], origin: str, what: str, fix: str) -> None:
        """Bad rows found at setup: stop with one line (``error``) or count them (``skip``).

        ``what`` says what is wrong with them ("have an empty label"), ``fix`` how to repair them.
        """
        if not rows:
            return
        if self.on_bad_input == "error":
            first = ", ".join(str(r) for r in rows[:5])
            raise DataError(f"{len(rows)} rows of {origin} ({role}) {what} (first rows: {first}); {fix}, "
                            f"or set data.on_bad_input=skip to leave them out and count them")
        self.count(role, reason, len(rows))
        log.warning(f"{role}: skipped {len(rows)} rows of {origin} that {what} (first: {rows[0]}); counted in data_report.json")

    # -- splits -----------------------------------------------------------------------------------
    def carve(self, splits: dict[str, S], labels_of: Callable[[S], Sequence[Any] | None] | None) -> dict[str, S]:
        """Seeded val/test splits out of train for those the source lacks (stratified when ``labels_of``
        gives a split's labels, at random when it gives None), then the caps. ``splits`` maps role ->
        anything with ``len`` and ``take``."""
        train = splits["train"]
        wanted = [r for r, f in (("val", self.val_fraction), ("test", self.test_fraction)) if r not in splits and f > 0]
        if self.train_on_val and "val" not in wanted:  # never silently trained on the train split alone
            raise DataError("data.train_on_val: this data has a validation split of its own, not one carved from "
                            "the training data; drop data.train_on_val, or carve one (data.val_fraction)")
        if self.num_folds:
            splits = self._take_fold(splits, labels_of, wanted)
        elif wanted:
            fractions = [self.val_fraction if r == "val" else self.test_fraction for r in wanted]
            parts = self._split_indices(train, labels_of, fractions)
            if not parts[-1]:
                raise DataError(f"carving {', '.join(wanted)} out of {len(train)} training examples leaves none to train on; "
                                "add data or lower data.val_fraction / data.test_fraction")
            for role, idx in zip(wanted, parts, strict=False):
                splits[role] = train.take(idx)
            splits["train"] = train.take(parts[-1])
            if self.train_on_val:
                # the same capped train and val a run without it trains and validates on, trained on together
                kept = {role: self._capped(train, idx, cap, labels_of) for role, idx, cap in
                        (("train", parts[-1], self.max_train_samples), ("val", parts[wanted.index("val")], self.max_eval_samples))}
                splits["val"] = train.take(kept["val"])
                splits["train"] = train.take(sorted(kept["train"] + kept["val"]))
        caps = {"train": self.max_train_samples, "val": self.max_eval_samples, "test": self.max_eval_samples}
        for role, cap in caps.items():
            if (self.train_on_val or self.num_folds) and role in ("train", "val"):
                continue  # capped above, before they were joined or cut into folds
            if cap and role in splits and len(splits[role]) > cap:
                keep, rest = self._split_indices(splits[role], labels_of, [cap / len(splits[role])])
                splits[role] = splits[role].take(exactly(keep, rest, cap, self.seed))
        return splits

    def _capped(self, pool: S, indices: list[int], cap: int | None, labels_of: Callable[[S], Sequence[Any] | None] | None
                ) -> list[int]:
        """``indices`` of ``pool`` cut to ``cap`` as the caps cut a split (the same seeded, stratified pick)."""
        part = pool.take(indices)
        if not cap or len(part) <= cap:
            return list(indices)
        keep, rest = self._split_indices(part, labels_of, [cap / len(part)])
        return [indices[i] for i in exactly(keep, rest, cap, self.seed)]

    def _take_fold(self, splits: dict[str, S], labels_of: Callable[[S], Sequence[Any] | None] | None,
                   wanted: list[str]) -> dict[str, S]:
        """k-fold: the test split carved exactly as without folds (so CV and plain runs test on the same examples),
        then what a plain run trains and validates on (its train + carved validation, caps included) cut into folds;
        ``fold`` validates."""
        train = splits["train"]
        if "val" in splits:
            log.warning(f"data.num_folds={self.num_folds}: the source's own validation split ({len(splits['val'])} examples)"
                        f" is not used; fold {self.fold} of the training split validates")
            del splits["val"]
        pool = list(range(len(train)))
        if wanted:
            fractions = [self.val_fraction if r == "val" else self.test_fraction for r in wanted]
            parts = self._split_indices(train, labels_of, fractions)
            if "test" in wanted:
                splits["test"] = train.take(parts[wanted.index("test")])
                pool = sorted(i for k, part in enumerate(parts) if k != wanted.index("test") for i in part)
            if "val" in wanted:  # the plain run's capped train and val: the folds partition what it trains and validates on
                pool = sorted(self._capped(train, parts[-1], self.max_train_samples, labels_of)
                              + self._capped(train, parts[wanted.index("val")], self.max_eval_samples, labels_of))
        if "val" not in wanted:  # the source's own validation split is not used: the capped train split is folded
            pool = self._capped(train, pool, self.max_train_samples, labels_of)
        pooled = train.take(pool)
        labels = labels_of(pooled) if labels_of is not None else None
        folds = fold_indices(len(pooled), self.num_folds, self.seed, [str(v) for v in labels] if labels is not None else None)
        if any(not f for f in folds):
            raise DataError(f"data.num_folds={self.num_folds} is more than the {len(pooled)} training examples; "
                            "lower data.num_folds")
        splits["val"] = pooled.take(folds[self.fold])
        splits["train"] = pooled.take(sorted(i for k, f in enumerate(folds) if k != self.fold for i in f))
        return splits

    def _split_indices(self, split: Sliceable, labels_of: Callable[[Any], Sequence[Any] | None] | None,
                       fractions: Sequence[float]) -> list[list[int]]:
        labels = labels_of(split) if labels_of is not None else None
        if labels is not None:
            return stratified_split([str(v) for v in labels], fractions, self.seed)
        # unlabelled (speech, corpus): a seeded permutation, each part at least one example
        order = np.random.default_rng(self.seed).permutation(len(split)).tolist()
        parts, start = [], 0
        for fraction in fractions:
            n = max(1, round(fraction * len(split))) if fraction > 0 and len(split) > 1 else 0
            parts.append(sorted(order[start : start + n]))
            start += n
        return [*parts, sorted(order[start:])]

    # -- loaders ----------------------------------------------------------------------------------
    def collate_for(self, role: str) -> Callable | None:
        """The collate function of a split's loader (default: torch's)."""
        return None

    def batch_sampler_for(self, role: str, training: bool) -> Any:
        """A batch sampler for the split (e.g. length-grouped), or None for plain batches."""
        return None

    def drop_last_for(self, role: str) -> bool:
        return False

    def eval_lengths(self, role: str) -> list[float] | None:
        """Per example of an evaluation split, its length when evaluation batches group by length (else None)."""
        return None

    def loader(self, role: str) -> DataLoader:
        """The loader of one split: training shuffles (seeded per epoch), tags items with the epoch when they are
        augmented, and deals the epoch's micro-batches to the processes (``TrainShards``); evaluation keeps the order."""
        self.setup()
        if role not in self.datasets:
            raise ConfigError(f"the data has no {role} split; name one (data.{role}_split or data.data_files.{role}) "
                              f"or carve it (data.{role}_fraction > 0)")
        dataset, training = self.datasets[role], role == "train"
        kwargs: dict[str, Any] = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0,
                                  "pin_memory": self.feeds_cuda()}
        trainer = getattr(self, "trainer", None)
        world_size, rank = int(getattr(trainer, "world_size", 1) or 1), int(getattr(trainer, "global_rank", 0) or 0)
        if training:  # resumable at any step, on any number of processes: see state_dict below
            tagged = getattr(dataset, "tagged", True)
            grouped = self.batch_sampler_for(role, True)
            order = grouped.sampler if grouped is not None else (EpochTaggedSampler if tagged else EpochShuffleSampler)(
                len(dataset), self.seed)
            shards = TrainShards(order, self.batch_size, self.drop_last_for(role), world_size, rank,
                                 int(getattr(trainer, "accumulate_grad_batches", 1) or 1), grouped)
            return EpochAwareLoader(Batches(dataset, self.collate_for(role), self.batch_size), sampler=shards, batch_size=None,
                                    collate_fn=as_is, progress=lambda: batches_trained(getattr(self, "trainer", None)),
                                    resume_at=self.take_resume_position, **kwargs)
        if world_size > 1:  # every example scored once, none repeated to even out the processes
            return sharded_eval_loader(dataset, self.collate_for(role), self.eval_batch_size, world_size, rank,
                                       self.eval_lengths(role), **kwargs)
        batch_sampler = self.batch_sampler_for(role, False)
        if batch_sampler is not None:
            return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=self.collate_for(role), **kwargs)
        return DataLoader(dataset, batch_size=self.eval_batch_size, collate_fn=self.collate_for(role), **kwargs)

    def feeds_cuda(self) -> bool:
        """Whether the batches go to a CUDA device: then they are built in pinned memory, so the copy to the device
        runs asynchronously (Lightning moves batches with ``non_blocking``) instead of stalling the host."""
        trainer = getattr(self, "trainer", None)
        device = getattr(getattr(trainer, "strategy", None), "root_device", None)
        return getattr(device, "type", "cpu") == "cuda"

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        if not self.has_split("test"):
            # never the validation set under the name "test": it picked the checkpoint
            raise ConfigError("the data has no test split, and the validation set is not a test set (it picked the "
                              "checkpoint); give a test file/split or carve one with data.test_fraction > 0")
        return self.loader("test")

    # -- exact resume at any step, on any number of processes ----------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the epoch, how many of its training batches each process trained, and how many
        processes there were, and the micro-batch size the count is in."""
        return {**training_position(getattr(self, "trainer", None)), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The training loader skips the micro-batches already trained when it starts its next epoch."""
        if state.get("batches_done"):
            self._resume_at = (int(state["epoch"]), int(state["batches_done"]), int(state.get("world_size", 0)))

    def take_resume_position(self) -> tuple[int, int] | None:
        """The restored (epoch, batches this process skips), once: asked by the training loader when its epoch starts,
        so it holds whether the checkpoint was restored before the loader was built (DDP) or after (FSDP2's strategy
        restores after setup). Saved on another number of processes, the position is the same global cursor dealt to
        this run's processes."""
        position, self._resume_at = self._resume_at, None
        if position is None:
            return None
        epoch, done, saved_world = position
        world = int(getattr(getattr(self, "trainer", None), "world_size", 1) or 1)
        return position_for(epoch, done, saved_world or world, world)

    # -- the report written with the run ----------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Sizes, rows parsed and what was dropped or changed, per split (``data_report.json``)."""
        info: dict[str, Any] = {"sizes": {k: len(v) for k, v in self.datasets.items()},
                                "counts": {k: dict(v) for k, v in self.counts.items() if v}}
        if self.parsed_rows:
            info["parsed_rows"] = dict(self.parsed_rows)
        if self.num_folds:
            info["cross_validation"] = {"num_folds": self.num_folds, "fold": self.fold, "seed": self.seed}
        if self.text_encoding.changed:  # encoding_errors=replace / ignore did change something
            info["undecodable_text"] = {"encoding": self.text_encoding.encoding, "errors": self.text_encoding.errors,
                                        "files": list(self.text_encoding.changed)}
        return info

    def warn_undecodable(self) -> None:
        changed = self.text_encoding.changed
        if changed:
            log.warning(f"{len(changed)} file(s) had bytes that are not {self.text_encoding.encoding} "
                        f"(data.encoding_errors={self.text_encoding.errors}), e.g. {changed[0]}; listed in data_report.json")

    def save_to(self, run_dir: str | Path) -> None:
        """``data_report.json`` (and, for subclasses, what predictions need: labels, vocabulary)."""
        self.setup("fit")
        (Path(run_dir) / "data_report.json").write_text(json.dumps(self.report(), indent=2, default=str))


def exactly(keep: list[int], rest: list[int], size: int, seed: int) -> list[int]:
    """``keep`` (a stratified pick, whose per-class rounding can miss ``size`` by a few) made exactly ``size`` long:
    seeded extras dropped from it, or seeded ones added from ``rest``."""
    rng = np.random.default_rng(seed)
    if len(keep) > size:
        return sorted(rng.choice(keep, size, replace=False).tolist())
    if len(keep) < size:
        return sorted(keep + rng.choice(rest, size - len(keep), replace=False).tolist())
    return keep
