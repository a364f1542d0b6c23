"""Samplers whose order is a pure function of (seed, epoch): resumed runs replay the same batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


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
