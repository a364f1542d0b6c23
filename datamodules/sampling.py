"""Samplers whose order is a pure function of (seed, epoch), and a training loader that resumes at any step:
resumed runs replay exactly the batches (and augmentation) of an uninterrupted run, on the same number of processes
or on another (``TrainShards``: the epoch's micro-batches are one list whatever the world size, dealt to the
processes from a global cursor)."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler

from modules.errors import ConfigError


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation per epoch, seeded by ``seed`` and the epoch number.

    Lightning calls ``set_epoch`` at every epoch start (as for ``DistributedSampler``), so the order
    does not depend on how much randomness anything else consumed before: a run resumed from a
    checkpoint sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class EpochTaggedSampler(EpochShuffleSampler):
    """``EpochShuffleSampler`` that yields ``(epoch, index)``: the dataset seeds each item's augmentation.

    Random augmentation then depends only on (seed, epoch, index), not on which worker loaded the
    item or what ran before, so a resumed run augments exactly like an uninterrupted one.
    """

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return iter([(self.epoch, i) for i in super().__iter__()])


def seed_item(seed: int, epoch: int, index: int) -> None:
    """Seed torch, numpy and ``random`` for one item's augmentation (and a collate after it)."""
    value = (seed * 1_000_003 + epoch * 100_019 + index) % (2**32)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def item_index(key: int | tuple[int, int], seed: int) -> int:
    """A dataset key's index; an ``(epoch, index)`` key (``EpochTaggedSampler``) also seeds the item's
    random augmentation from (seed, epoch, index), so it is the same in a resumed run."""
    if isinstance(key, tuple):
        epoch, index = key
        seed_item(seed, epoch, index)
        return index
    return key


def batches_trained(trainer: Any) -> int | None:
    """Training batches of the current epoch that Lightning has run ``training_step`` on (None: no trainer).

    Not the loader's own count: Lightning fetches one batch ahead, so at a checkpoint the loader has
    yielded one batch more than training used; resuming past that batch would lose it.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(loop.batch_progress.current.ready) if loop is not None else None


def training_position(trainer: Any) -> dict[str, int]:
    """Where training is (for checkpoints): the current epoch, how many of its batches this process trained, and how
    many processes there were (so a run resumed on another number of processes finds the same global position)."""
    done = batches_trained(trainer)
    return {"epoch": int(getattr(trainer, "current_epoch", 0) or 0), "batches_done": done or 0,
            "world_size": int(getattr(trainer, "world_size", 1) or 1)}


def position_for(epoch: int, batches_done: int, saved_world: int, world: int) -> tuple[int, int]:
    """A saved position (each of ``saved_world`` processes trained ``batches_done`` batches of ``epoch``) as this
    process's count under ``world`` processes: the same micro-batches of the epoch's one list were consumed
    (``TrainShards`` deals micro-batch ``j`` to process ``j % world``)."""
    consumed = batches_done * saved_world
    if consumed % world:
        raise ConfigError(f"the checkpoint was saved after {consumed} micro-batches of epoch {epoch} on {saved_world} "
                          f"process(es), which {world} processes cannot share evenly (not at an optimizer-step boundary); "
                          f"resume on {saved_world} process(es), or from a checkpoint saved at a step boundary")
    return epoch, consumed // world


class TrainShards(DistributedSampler):
    """One process's training micro-batches, the same optimizer steps on any number of processes.

    The epoch's micro-batches are one list, a pure function of (seed, epoch): cut from the epoch's permutation
    (``order``) or grouped by length over all of it (``grouped``), never per process. It is padded to whole optimizer
    steps (``per_step`` = processes x accumulation micro-batches) by repeating its first micro-batches, and micro-batch
    ``j`` goes to process ``j % world_size``. So optimizer step ``s`` consumes micro-batches ``s * per_step`` to
    ``(s + 1) * per_step - 1`` whether 2 processes train one micro-batch each or 1 process accumulates two: a run
    killed on N processes continues on M from the same global cursor, each micro-batch with the same samples (and,
    seeded by its global index, the same dropout: ``callbacks.BatchSeed``).

    A ``DistributedSampler`` (Lightning leaves it in place) that yields whole micro-batches (lists of keys), for a loader
    with ``batch_size=None`` over ``Batches``.

    Args:
        order: the epoch's sample order (``EpochShuffleSampler`` / ``EpochTaggedSampler``), ``set_epoch`` forwarded.
        batch_size: samples per micro-batch (``data.batch_size``).
        drop_last: drop the epoch's last micro-batch when it is short.
        num_replicas, rank: the world size and this process's rank.
        accumulate: micro-batches each process accumulates per optimizer step.
        grouped: a batch sampler over ``order`` that makes the epoch's micro-batches itself (length grouping).
    """

    def __init__(self, order: Any, batch_size: int, drop_last: bool = False, num_replicas: int = 1, rank: int = 0,
                 accumulate: int = 1, grouped: BatchSampler | None = None) -> None:
        size = len(order)
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.order, self.grouped, self.batch_size = order, grouped, batch_size
        self.drop_last = drop_last and size > batch_size
        self.per_step = num_replicas * accumulate
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for sampler in (self.order, getattr(self.grouped, "sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)

    @property
    def global_size(self) -> int:
        """Micro-batches in the epoch's list before padding."""
        if self.grouped is not None:
            return len(self.grouped)
        size = len(self.order)
        return size // self.batch_size if self.drop_last else math.ceil(size / self.batch_size)

    def padded_size(self) -> int:
        return math.ceil(self.global_size / self.per_step) * self.per_step

    def global_batches(self) -> list[list[Any]]:
        """The epoch's micro-batches, every process's, padded to whole optimizer steps."""
        if self.grouped is not None:
            batches = [list(b) for b in self.grouped]
        else:
            keys = list(self.order)
            batches = [keys[i : i + self.batch_size] for i in range(0, len(keys), self.batch_size)]
            if self.drop_last and len(batches[-1]) < self.batch_size:
                batches.pop()
        return batches + [batches[i % len(batches)] for i in range(self.padded_size() - len(batches))]

    def __iter__(self) -> Iterator[list[Any]]:  # type: ignore[override]
        return iter(self.global_batches()[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return self.padded_size() // self.num_replicas


class _SkipFirst:
    """An index or batch sampler without its first ``n`` items in epoch ``epoch`` (``current()`` tells the epoch now);
    its length stays the epoch's full length (Lightning counts the skipped batches as done). In any other epoch it is
    the base sampler: with persistent workers, the DataLoader iterator keeps this object and iterates it again at
    every epoch start."""

    def __init__(self, base: Any, n: int, epoch: int, current: Callable[[], int]) -> None:
        self.base, self.n, self.epoch, self.current = base, n, epoch, current

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.base), self.n if self.current() == self.epoch else 0, None)

    def __len__(self) -> int:
        return len(self.base)


class _DeferredIterator:
    """Creates the real DataLoader iterator at the first ``next``; counts what it yields."""

    def __init__(self, make: Any) -> None:
        self._make, self._it, self.yielded = make, None, 0

    def __iter__(self) -> _DeferredIterator:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._it = self._make()
        item = next(self._it)
        self.yielded += 1
        return item


class EpochAwareLoader(DataLoader):
    """The training DataLoader: started at the first batch, and resumable at any step.

    Lightning creates the training iterator before it calls ``sampler.set_epoch`` on a resumed run,
    and worker processes prefetch indices as soon as the iterator exists, so a resumed run would
    replay epoch 0's order (and augmentation seeds) in its first epoch. Deferring the iterator until
    the first ``next`` makes the epoch-seeded samplers above hold with ``num_workers > 0`` too.

    Resumed from the middle of an epoch (``resume_at``: the epoch and how many of its batches were
    trained, from the checkpoint), the first iterator of that epoch leaves those batches out without
    loading them, so the run continues with exactly the batch an uninterrupted run would train next,
    under DDP too (the skip applies to this process's shard). The datamodule hands ``resume_at`` over
    when it builds the loader: Lightning's own loader-state path does not reach a loader that was built
    early (``trainer.estimated_stepping_batches`` in ``configure_optimizers`` builds it before the
    checkpoint's loop state is restored). ``state_dict``/``load_state_dict`` give the same position.

    Args:
        progress: returns the number of batches of the current epoch already trained (the datamodule
            passes Lightning's count, ``batches_trained``).
        resume_at: (epoch, batches trained in it) to resume from, or a callable asked for it (once per epoch start;
            it answers None once the position is taken), or None.
    """

    def __init__(self, *args: Any, progress: Callable[[], int | None] | None = None,
                 resume_at: tuple[int, int] | Callable[[], tuple[int, int] | None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress
        self._resume_at = resume_at if callable(resume_at) else tuple(resume_at) if resume_at else None
        self._skip, self._skip_epoch = 0, -1
        self._current: _DeferredIterator | None = None

    def __iter__(self) -> Any:
        self._current = _DeferredIterator(self._start)
        return self._current

    def _start(self) -> Any:
        self._skip, self._skip_epoch = 0, -1
        position = self._resume_at() if callable(self._resume_at) else self._resume_at
        if not callable(self._resume_at):
            self._resume_at = None
        if position is not None:
            epoch, done = position
            if epoch == self.epoch:
                self._skip, self._skip_epoch = done, epoch
                if self._current is not None:
                    self._current.yielded = done  # batch positions continue where the epoch stopped
        return super().__iter__()

    @property
    def _index_sampler(self) -> Any:
        base = super()._index_sampler
        return _SkipFirst(base, self._skip, self._skip_epoch, lambda: self.epoch) if self._skip else base

    @property
    def epoch(self) -> int:
        """The epoch the sampler was last set to (Lightning's ``set_epoch``)."""
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if hasattr(sampler, "epoch") and hasattr(sampler, "set_epoch"):
                return int(sampler.epoch)
        return 0

    @property
    def world_size(self) -> int:
        return int(getattr(self.sampler, "num_replicas", 1) or 1)

    def state_dict(self) -> dict[str, int]:
        done = self.progress() if self.progress is not None else None
        if done is None:  # outside a Trainer: what this loader yielded
            done = self._current.yielded if self._current is not None else 0
        return {"epoch": self.epoch, "batches_done": done, "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self._resume_at = position_for(int(state["epoch"]), int(state["batches_done"]),
                                       int(state.get("world_size", self.world_size)), self.world_size)


class LengthGroupedBatchSampler(BatchSampler):
    """Batches of similar length (less padding) over the keys ``sampler`` yields (speech clips, texts).

    Training: the sampler's order (seeded per epoch, ``(epoch, index)`` keys, so each clip's speed
    perturbation is seeded too) is cut into pools of ``pool`` batches, sorted by length within a pool,
    batched, and the batches shuffled by (seed, epoch). Evaluation: sorted by length, longest first.
    It follows the ``BatchSampler`` API, so under DDP Lightning swaps ``sampler`` for a distributed
    one (each process then groups its own shard) and calls ``set_epoch`` on it.
    """

    def __init__(self, sampler: Sampler | Sequence[Any], lengths: Sequence[float], batch_size: int, shuffle: bool,
                 seed: int = 0, pool: int = 50, drop_last: bool = False) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.lengths, self.shuffle, self.seed, self.pool = list(lengths), shuffle, seed, pool

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size if self.drop_last else math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[list[Any]]:
        # no side effect here: DataLoader iterators may call iter() more than once per epoch
        keys = list(self.sampler)

        def length(key: Any) -> float:
            return -self.lengths[key[1] if isinstance(key, tuple) else key]

        size = self.batch_size * self.pool if self.shuffle else max(1, len(keys))
        batches = []
        for start in range(0, len(keys), size):
            chunk = sorted(keys[start : start + size], key=length)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches = [b for b in batches if len(b) == self.batch_size]
        if self.shuffle:
            epoch = keys[0][0] if keys and isinstance(keys[0], tuple) else 0
            order = np.random.default_rng(self.seed * 100_003 + epoch).permutation(len(batches))
            batches = [batches[i] for i in order]
        return iter(batches)
