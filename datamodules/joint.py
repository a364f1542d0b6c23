"""Joint training data: several datasets, one of them per optimizer step, then the target alone.

Design:
  * Which dataset an optimizer step draws from is a pure function of (seed, epoch, step), the same on
    every process: under DDP all ranks train the same head at each step (a head no rank used keeps
    ``grad=None``, so the optimizer leaves it alone), and with gradient accumulation every micro-batch
    of a step comes from the same dataset.
  * Every epoch has ``steps_per_epoch`` optimizer steps, joint or target-only, so the LR schedule's
    total (``trainer.estimated_stepping_batches``) is exact and a target-only run with
    ``joint_epochs=0`` spends the same budget.
  * Each dataset is one endless stream of micro-batches per epoch: pass after pass, each a
    permutation seeded by (epoch, pass), never cut per process. A step takes the next
    processes x accumulation micro-batches of its dataset's stream and deals them as
    ``datamodules.sampling.TrainShards`` does, so the same step trains the same micro-batches on any
    number of processes; the train loader saves how far into the epoch it got, and a run resumed on
    the same or another number of processes sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from torch.utils.data import DataLoader

from datamodules.base import DataModuleBase, DataSpec, check_folds
from datamodules.sampling import batches_trained, position_for
from modules.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SAMPLINGS = ("ratio", "temperature")


def sampling_probabilities(
    sizes: Mapping[str, int], sampling: str, ratios: Mapping[str, float] | None = None, temperature: float = 1.0
) -> dict[str, float]:
    """Per-dataset probability of being drawn at a joint step.

    ``ratio``: proportional to ``ratios`` (any positive scale). ``temperature``: ``p_i ∝ n_i**(1/T)``
    for training-set sizes ``n_i`` (T=1: proportional to size, T→∞: uniform).
    """
    if sampling not in SAMPLINGS:
        raise ConfigError(f"data.sampling={sampling!r}; choose one of {', '.join(SAMPLINGS)}")
    if sampling == "temperature":
        if ratios:
            raise ConfigError("data.ratios is set but data.sampling=temperature ignores it; "
                              "set data.sampling=ratio, or data.ratios=null")
        if not temperature > 0:
            raise ConfigError(f"data.temperature={temperature} must be > 0 (1: proportional to size, large: uniform)")
        weights = {name: float(n) ** (1.0 / temperature) for name, n in sizes.items()}
    else:
        if not ratios:
            raise ConfigError(f"data.sampling=ratio needs data.ratios, one weight per dataset: {', '.join(sizes)}")
        unknown = sorted(set(ratios) - set(sizes))
        if unknown:
            raise ConfigError(f"data.ratios has {', '.join(unknown)}, which data.datasets lacks; its datasets are: {', '.join(sizes)}")
        missing = [name for name in sizes if name not in ratios]
        if missing:
            raise ConfigError(f"data.ratios gives no weight for {', '.join(missing)}; give every dataset one (0 leaves it out)")
        negative = {k: v for k, v in ratios.items() if not float(v) >= 0}
        if negative:
            raise ConfigError(f"data.ratios {negative} must be >= 0")
        weights = {name: float(ratios[name]) for name in sizes}
    total = sum(weights.values())
    if not total > 0:
        raise ConfigError(f"data.ratios {dict(ratios or {})} sum to 0; give at least one dataset a positive weight")
    return {name: w / total for name, w in weights.items()}


class JointSampler:
    """The dataset each step of an epoch draws from: seeded draws by probability, then only the target.

    Lightning calls ``set_epoch`` at every epoch start; ``choices(epoch)`` is a pure function of
    (seed, epoch), so every process and every resumed run makes the same choices.
    """

    def __init__(self, probabilities: Mapping[str, float], target: str, joint_epochs: int, steps_per_epoch: int,
                 seed: int = 0) -> None:
        self.names = list(probabilities)
        self.probabilities = torch.tensor([probabilities[n] for n in self.names], dtype=torch.float64)
        self.target, self.joint_epochs, self.steps, self.seed = target, joint_epochs, steps_per_epoch, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def choices(self, epoch: int) -> list[str]:
        if epoch >= self.joint_epochs:
            return [self.target] * self.steps
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        drawn = torch.multinomial(self.probabilities, self.steps, replacement=True, generator=generator)
        return [self.names[i] for i in drawn.tolist()]

    def __iter__(self) -> Iterator[str]:
        return iter(self.choices(self.epoch))

    def __len__(self) -> int:
        return self.steps


class BatchStream:
    """One dataset's micro-batches of ``(tag, index)`` pairs in an epoch, endless and addressable: pass after pass,
    each a permutation of the whole dataset seeded by (seed, epoch, pass), cut into micro-batches. The tag (epoch and
    pass) lets the child dataset seed each item's random augmentation, so resumed runs augment exactly like
    uninterrupted ones. The same on every process: ``JointLoader`` deals its micro-batches."""

    def __init__(self, size: int, batch_size: int, drop_last: bool, seed: int) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.drop_last = drop_last and size > batch_size
        self._pass: tuple[int, int, list[int]] | None = None  # (epoch, pass, its permutation): the last one drawn

    def batches_per_pass(self) -> int:
        return self.size // self.batch_size if self.drop_last else math.ceil(self.size / self.batch_size)

    def batch(self, epoch: int, n: int) -> list[tuple[int, int]]:
        """Micro-batch ``n`` (counted from the epoch's start) of ``epoch``."""
        pass_index, start = divmod(n, self.batches_per_pass())
        if self._pass is None or self._pass[:2] != (epoch, pass_index):
            generator = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 10_007 + pass_index)
            self._pass = (epoch, pass_index, torch.randperm(self.size, generator=generator).tolist())
        tag = epoch * 10_007 + pass_index
        return [(tag, i) for i in self._pass[2][start * self.batch_size : (start + 1) * self.batch_size]]


class JointLoader:
    """The training loader: ``steps_per_epoch`` optimizer steps of ``accumulate`` micro-batches on each process, every
    micro-batch of a step from the dataset ``sampler`` chose for it, with a ``dataset`` key.

    Step ``s`` takes micro-batches ``k * per_step ... (k + 1) * per_step - 1`` of its dataset's stream (``k``: how
    many earlier steps drew that dataset; ``per_step`` = processes x accumulation), and process ``r`` trains slot
    ``a * world_size + r`` of them at its ``a``-th micro-batch of the step: the same micro-batches per step on any
    number of processes. Stateful (Lightning saves ``state_dict`` in checkpoints): resuming mid-epoch skips the
    micro-batches done, on the same or another number of processes.
    """

    def __init__(self, sampler: JointSampler, streams: Mapping[str, BatchStream], loader_for: Any, world_size: int = 1,
                 rank: int = 0, accumulate: int = 1, progress: Any = None,
                 resume_at: tuple[int, int] | Any = None) -> None:
        self.sampler, self.streams, self.loader_for = sampler, dict(streams), loader_for
        self.world_size, self.rank, self.accumulate = world_size, rank, accumulate
        self.progress = progress  # batches of the epoch trained, Lightning's count
        self._yielded, self._resume_at = 0, resume_at

    def __len__(self) -> int:
        return len(self.sampler) * self.accumulate

    def plan(self, epoch: int) -> list[tuple[str, list[tuple[int, int]]]]:
        """This process's micro-batches of ``epoch``, in order: (dataset, its keys)."""
        per_step, drawn = self.world_size * self.accumulate, dict.fromkeys(self.streams, 0)
        mine = []
        for name in self.sampler.choices(epoch):
            for a in range(self.accumulate):
                mine.append((name, self.streams[name].batch(epoch, drawn[name] * per_step + a * self.world_size + self.rank)))
            drawn[name] += 1
        return mine

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # a generator: the body runs at the first next(), after Lightning's set_epoch
        epoch = self.sampler.epoch
        skip = 0
        position = self._resume_at() if callable(self._resume_at) else self._resume_at
        if position is not None and position[0] == epoch:
            skip = position[1]
        if not callable(self._resume_at):
            self._resume_at = None
        plan = self.plan(epoch)
        iterators: dict[str, Iterator] = {}
        for step in range(skip, len(plan)):
            name = plan[step][0]
            if name not in iterators:  # lazily: a dataset not drawn this epoch costs nothing
                iterators[name] = iter(self.loader_for(name, [keys for n, keys in plan[skip:] if n == name]))
            batch = dict(next(iterators[name]))
            batch["dataset"] = name
            self._yielded = step + 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        done = self.progress() if self.progress is not None else None
        return {"epoch": self.sampler.epoch, "yielded": self._yielded if done is None else done,
                "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self._resume_at = position_for(int(state["epoch"]), int(state["yielded"]),
                                       int(state.get("world_size", self.world_size)), self.world_size)


class TaggedLoaders:
    """Evaluation batches of several loaders, one after the other, each with its loader's name as ``dataset``."""

    def __init__(self, loaders: Sequence[tuple[str, Any]]) -> None:
        self.loaders = list(loaders)

    def __len__(self) -> int:
        return sum(len(loader) for _, loader in self.loaders)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for name, loader in self.loaders:
            for batch in loader:
                yield {**batch, "dataset": name}


@dataclass(frozen=True)
class TrainSpec:
    """What joint training takes from a child datamodule's training split."""

    dataset: Any
    batch_size: int
    drop_last: bool
    collate_fn: Any
    num_workers: int

    @classmethod
    def of(cls, child: Any) -> TrainSpec:
        child.setup("fit")
        return cls(child.datasets["train"], child.batch_size, child.drop_last_for("train"), child.collate_for("train"),
                   child.num_workers)


class JointDataModule(DataModuleBase):
    """Two or more labelled datasets trained at once (one head each, ``task=joint_classification``), then the target alone.

    Each training step draws one batch from one dataset; after ``joint_epochs`` epochs every step
    draws from ``target``. Validation and test use the target's loaders, so its metrics keep their
    usual names (``val/acc``); with ``validate_sources`` the sources' validation sets follow,
    logged as ``val/<name>/acc``.

    Args:
        datasets: name -> a datamodule, or its config (``_target_`` + arguments; built here with
            ``processor``). Any of this repo's classification datamodules, all of one modality.
        target: the dataset training continues on, validated and tested.
        sampling: ``ratio`` (``ratios``) or ``temperature`` (``p_i ∝ n_i**(1/T)`` by training-set size).
        ratios: name -> weight, for ``sampling=ratio`` (0 leaves a dataset out of the joint phase).
        temperature: T for ``sampling=temperature``: 1 proportional to size, large values uniform.
        joint_epochs: epochs of joint training before the target-only epochs (0: target only).
        steps_per_epoch: optimizer steps per epoch in both phases (default: the sum of the
            datasets' batches per pass, one pass over everything in expectation at T=1).
        validate_sources: also validate the sources (``val/<name>/...``) after the target.
        num_folds / fold: k-fold cross-validation of the target dataset (see ``DataModuleBase``).
        train_on_val: train on the target's carved validation share too (``auto.py``'s final run; see
            ``DataModuleBase``).
        processor: the backbone's processor (``train.py`` passes it), handed to every child config.
        seed: the dataset draws and each dataset's order.
    """

    def __init__(
        self,
        datasets: Mapping[str, Any],
        target: str,
        sampling: str = "temperature",
        ratios: Mapping[str, float] | None = None,
        temperature: float = 1.0,
        joint_epochs: int = 1,
        steps_per_epoch: int | None = None,
        validate_sources: bool = True,
        processor: Any = None,
        seed: int = 42,
        num_folds: int | None = None,
        fold: int | None = None,
        train_on_val: bool = False,
    ) -> None:
        super().__init__(seed=seed)  # the training position, the data report; folds are the target dataset's
        check_folds(num_folds, fold)
        if not datasets or len(datasets) < 2:
            raise ConfigError(f"data.datasets has {len(datasets or {})} dataset(s) ({', '.join(datasets or {})}); joint "
                              "training needs two or more, e.g. data.datasets: {source: {...}, target: {...}}")
        for name in datasets:
            if not str(name).isidentifier():
                raise ConfigError(f"data.datasets name {name!r} is used in metric names and module keys; "
                                  "use letters, digits and underscores")
        if target not in datasets:
            raise ConfigError(f"data.target={target!r} is not among data.datasets ({', '.join(datasets)}); name one of them")
        if sampling not in SAMPLINGS:
            raise ConfigError(f"data.sampling={sampling!r}; choose one of {', '.join(SAMPLINGS)}")
        if joint_epochs < 0:
            raise ConfigError(f"data.joint_epochs={joint_epochs} must be >= 0 (0: train on the target alone)")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ConfigError(f"data.steps_per_epoch={steps_per_epoch} must be >= 1 (or null: one pass over every dataset)")
        # the rule is checked now, so a bad ratio fails before any data loads
        sampling_probabilities({name: 1 for name in datasets}, sampling, ratios, temperature)
        self.target, self.sampling, self.temperature = target, sampling, temperature
        self.ratios = dict(ratios) if ratios else None
        self.joint_epochs, self.steps_per_epoch, self.validate_sources = joint_epochs, steps_per_epoch, validate_sources
        # cross-validation folds the target, train_on_val joins the target's validation share: the sources always
        # train in full
        target_only = {**({"num_folds": num_folds, "fold": fold} if num_folds else {}),
                       **({"train_on_val": True} if train_on_val else {})}
        if target_only:
            spec = datasets[target]
            if not isinstance(spec, Mapping):
                raise ConfigError(f"data.{'/'.join(target_only)} with a ready-built target datamodule: give its config "
                                  "instead, or set it on the target datamodule itself")
            datasets = {**datasets, target: {**spec, **target_only}}
        self.children = {name: self._build(name, spec, processor) for name, spec in datasets.items()}
        self.probabilities: dict[str, float] = {}
        self.train_specs: dict[str, TrainSpec] = {}

    @staticmethod
    def _build(name: str, spec: Any, processor: Any) -> Any:
        if isinstance(spec, Mapping):
            if "_target_" not in spec:
                raise ConfigError(f"data.datasets.{name} needs a _target_ (a datamodule class), e.g. a config from configs/data/")
            return hydra.utils.instantiate(spec, processor=processor, _convert_="all")
        if not all(hasattr(spec, a) for a in ("train_dataloader", "val_dataloader", "task_kwargs")):
            raise ConfigError(f"data.datasets.{name} is a {type(spec).__name__}; give a datamodule or its config")
        return spec

    @property
    def sources(self) -> list[str]:
        return [name for name in self.children if name != self.target]

    # -- what the rest of the run needs to know -------------------------------------------------
    kind = "joint_classification"

    @property
    def modality(self) -> str:
        return self.children[self.target].modality

    @property
    def random_train_inputs(self) -> bool:
        return any(child.random_train_inputs for child in self.children.values())

    def data_spec(self) -> DataSpec:
        """The task's heads (dataset -> label names) and which one is the target."""
        self.setup("fit")
        specs = {name: child.data_spec() for name, child in self.children.items()}
        for name, spec in specs.items():
            if spec.kind != "classification":
                raise ConfigError(f"data.datasets.{name} is {spec.kind} data; joint training takes classification datasets")
        target = specs[self.target]
        return DataSpec("joint_classification", target.modality, target.label_names,
                        heads={name: spec.label_names for name, spec in specs.items()}, target=self.target,
                        has_test=target.has_test)

    def task_kwargs(self) -> dict[str, Any]:
        return self.data_spec().task_kwargs()

    def has_split(self, role: str) -> bool:
        return self.children[self.target].has_split(role)

    def describe(self, role: str) -> list[dict[str, Any]]:
        """The target's examples: evaluation and prediction are the target's."""
        return self.children[self.target].describe(role)

    def prediction_loader(self, role: str) -> Any:
        return self.children[self.target].loader(role)

    def save_to(self, run_dir: str | Path) -> None:
        """``labels.json`` (the target's labels first, every dataset's labels and the sampling), and each dataset's own files under ``datasets/<name>/``."""
        heads = self.task_kwargs()["heads"]
        for name, child in self.children.items():
            folder = Path(run_dir) / "datasets" / name
            folder.mkdir(parents=True, exist_ok=True)
            child.save_to(folder)
        info = {
            "label_names": heads[self.target],
            "target": self.target,
            "datasets": {name: {"label_names": labels, "train_size": len(self.train_specs[name].dataset)}
                         for name, labels in heads.items()},
            "sampling": self.sampling,
            "probabilities": self.probabilities,
            "joint_epochs": self.joint_epochs,
            "steps_per_epoch": self._steps_per_epoch(),
        }
        (Path(run_dir) / "labels.json").write_text(json.dumps(info, indent=2))

    # -- loading --------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_specs:
            return
        for child in self.children.values():
            child.setup(stage)
        self.train_specs = {name: TrainSpec.of(child) for name, child in self.children.items()}
        self._check_batch_formats()
        sizes = {name: len(spec.dataset) for name, spec in self.train_specs.items()}
        self.probabilities = sampling_probabilities(sizes, self.sampling, self.ratios, self.temperature)
        shares = ", ".join(f"{name} {p:.3f} (n={sizes[name]})" for name, p in self.probabilities.items())
        log.info(f"joint data: {self.joint_epochs} joint epoch(s) drawing {shares}, then {self.target} alone; "
                 f"{self._steps_per_epoch()} optimizer steps per epoch")

    def _check_batch_formats(self) -> None:
        """One backbone reads every batch: all datasets must give the same input fields."""
        fields = {name: sorted(set(spec.dataset[0]) - {"labels"}) for name, spec in self.train_specs.items()}
        first = fields[self.target]
        for name, keys in fields.items():
            if keys != first:
                raise DataError(f"data.datasets.{name} gives inputs {', '.join(keys)} but {self.target} gives "
                                f"{', '.join(first)}; one backbone needs datasets of one modality")

    def _steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: ``data.steps_per_epoch``, or one pass over every dataset (all processes' and
        accumulated micro-batches together)."""
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        _, world_size, accumulate = self._placement()
        return math.ceil(sum(self._stream(name).batches_per_pass() for name in self.train_specs) / (world_size * accumulate))

    def _stream(self, name: str) -> BatchStream:
        spec = self.train_specs[name]
        # a different stream per dataset, so two same-sized datasets are not shuffled alike
        return BatchStream(len(spec.dataset), spec.batch_size, spec.drop_last,
                           self.seed + 7919 * list(self.train_specs).index(name))

    def _placement(self) -> tuple[int, int, int]:
        """(rank, processes, accumulation) of this run's trainer."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1, 1
        return trainer.global_rank, trainer.world_size, int(getattr(trainer, "accumulate_grad_batches", 1) or 1)

    def train_dataloader(self) -> JointLoader:
        self.setup()
        rank, world_size, accumulate = self._placement()

        def loader_for(name: str, batches: list[list[tuple[int, int]]]) -> DataLoader:
            # the child's dataset and collate (mixup, padding...), our order: the micro-batches this process trains
            spec = self.train_specs[name]
            return DataLoader(spec.dataset, batch_sampler=batches, collate_fn=spec.collate_fn, num_workers=spec.num_workers)

        sampler = JointSampler(self.probabilities, self.target, self.joint_epochs, self._steps_per_epoch(), self.seed)
        return JointLoader(sampler, {name: self._stream(name) for name in self.train_specs}, loader_for, world_size, rank,
                           accumulate, progress=lambda: batches_trained(getattr(self, "trainer", None)),
                           resume_at=self.take_resume_position)

    def share_trainer(self) -> None:
        """The children build their evaluation loaders for this run's processes (``DataModuleBase.loader``)."""
        for child in self.children.values():
            child.trainer = getattr(self, "trainer", None)

    def val_dataloader(self) -> TaggedLoaders:
        self.share_trainer()
        loaders = [(self.target, self.children[self.target].val_dataloader())]
        if self.validate_sources:
            loaders += [(name, self.children[name].val_dataloader()) for name in self.sources]
        return TaggedLoaders(loaders)

    def test_dataloader(self) -> TaggedLoaders:
        self.share_trainer()
        return TaggedLoaders([(self.target, self.children[self.target].test_dataloader())])
