"""Per-batch reseeding, so a resumed run replays exactly the randomness of an uninterrupted one."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


class BatchSeed(pl.Callback):
    """Reseeds every RNG (torch, numpy, random) before each training batch from (seed, epoch, batch, rank).

    Lightning does not checkpoint RNG states, and how much randomness is drawn between a restart and
    the first batch differs from an uninterrupted run; with this, dropout and augmentation depend
    only on where in training a batch is. Data order comes from ``EpochShuffleSampler``.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        seed = (self.seed * 1_000_003 + trainer.current_epoch * 100_019 + batch_idx * 31 + trainer.global_rank) % (2**32)
        pl.seed_everything(seed, workers=True, verbose=False)
