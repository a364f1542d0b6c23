"""Evaluation under several processes with every sample counted exactly once.

Lightning's ``DistributedSampler`` pads a split to a multiple of the world size by repeating its first samples, and
the repeats enter the validation and test metrics twice (an odd-sized split under 2 processes: one sample counted
twice). Here each process takes its own samples, none repeated, and cuts them into the same number of batches as
every other process: under FSDP every forward gathers the weights, so a process with one batch more would wait for
the others forever.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from modules.errors import ConfigError


class EvalShards(DistributedSampler):
    """The batches of one process: samples ``rank, rank + W, ...`` (no padding, no repeats), cut into the same number
    of batches on every process, as even as possible and none larger than ``batch_size``.

    A ``DistributedSampler`` (so Lightning leaves it in place) that yields whole batches (lists of indices), for a
    loader with ``batch_size=None`` over ``Batches``.

    Args:
        size: samples in the split.
        batch_size: the largest batch.
        num_replicas, rank: the world size and this process's rank.
        lengths: per sample, its length (speech: seconds): each process then sorts its samples longest first, as
            the single-process evaluation does, so batches group similar lengths.
    """

    def __init__(self, size: int, batch_size: int, num_replicas: int, rank: int,
                 lengths: Sequence[float] | None = None) -> None:
        if size < num_replicas:
            raise ConfigError(f"the evaluation split has {size} sample(s) for {num_replicas} processes; every process "
                              "needs one: give a larger split or fewer devices")
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        own = list(range(rank, size, num_replicas))
        if lengths is not None:
            own.sort(key=lambda i: -lengths[i])
        self.num_batches = math.ceil(math.ceil(size / num_replicas) / batch_size)
        if size // num_replicas < self.num_batches:  # only with a batch size of 1 and an uneven split
            raise ConfigError(f"an evaluation batch size of {batch_size} cannot give {num_replicas} processes the same "
                              f"number of batches over {size} samples; use data.eval_batch_size of 2 or more")
        base, extra = divmod(len(own), self.num_batches)
        self.batches: list[list[int]] = []
        start = 0
        for b in range(self.num_batches):
            end = start + base + (b < extra)
            self.batches.append(own[start:end])
            start = end

    def __iter__(self) -> Iterator[list[int]]:  # type: ignore[override]
        return iter(self.batches)

    def __len__(self) -> int:
        return self.num_batches


class Batches(Dataset):
    """``dataset`` read a batch at a time: item ``[i, j, ...]`` is the collated batch of those samples.

    Item ``n`` (a number, with ``batch_size``) is the ``n``-th batch of the data in its order: what a loader whose
    sampler Lightning replaced by a sequential one asks for (``trainer.overfit_batches``: the first batches, fixed)."""

    def __init__(self, dataset: Any, collate_fn: Callable | None, batch_size: int | None = None) -> None:
        self.dataset, self.collate_fn, self.batch_size = dataset, collate_fn or default_collate, batch_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[Any] | int) -> Any:
        if isinstance(indices, int) and self.batch_size:
            indices = range(indices * self.batch_size, min((indices + 1) * self.batch_size, len(self.dataset)))
        return self.collate_fn([self.dataset[i] for i in indices])


def as_is(batch: Any) -> Any:
    """The loader's collate function: the batch is collated already (by ``Batches``)."""
    return batch


def sharded_eval_loader(dataset: Any, collate_fn: Callable | None, batch_size: int, world_size: int, rank: int,
                        lengths: Sequence[float] | None = None, **loader_kwargs: Any) -> DataLoader:
    """The evaluation loader of one process under ``world_size`` processes (see ``EvalShards``)."""
    shards = EvalShards(len(dataset), batch_size, world_size, rank, lengths)
    return DataLoader(Batches(dataset, collate_fn), sampler=shards, batch_size=None, collate_fn=as_is, **loader_kwargs)
