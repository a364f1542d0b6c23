"""Samplers whose order is a pure function of (seed, epoch): resumed runs replay the same batches."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


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


class _DeferredIterator:
    """Creates the real DataLoader iterator at the first ``next``."""

    def __init__(self, make: Any) -> None:
        self._make, self._it = make, None

    def __iter__(self) -> _DeferredIterator:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._it = self._make()
        return next(self._it)


class EpochAwareLoader(DataLoader):
    """A DataLoader whose worker processes are started (and indices prefetched) at the first batch.

    Lightning creates the training iterator before it calls ``sampler.set_epoch`` on a resumed run,
    and worker processes prefetch indices as soon as the iterator exists, so a resumed run would
    replay epoch 0's order (and augmentation seeds) in its first epoch. Deferring the iterator until
    the first ``next`` makes the epoch-seeded samplers above hold with ``num_workers > 0`` too.
    """

    def __iter__(self) -> Any:
        return _DeferredIterator(super().__iter__)
