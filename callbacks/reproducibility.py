"""Per-batch reseeding, so a resumed run replays exactly the randomness of an uninterrupted one."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


class BatchSeed(pl.Callback):
    """Reseeds every RNG (torch, numpy, random) before each training micro-batch from (seed, epoch, its index in the
    epoch's one list of micro-batches).

    Lightning does not checkpoint RNG states, and how much randomness is drawn between a restart and
    the first batch differs from an uninterrupted run; with this, dropout and augmentation depend
    only on which micro-batch is trained. The index is global (process ``r`` of ``W`` trains micro-batches
    ``r, r + W, ...``: ``datamodules.sampling.TrainShards``), so the same micro-batch draws the same dropout on any
    number of processes, and a run resumed on another number of processes continues with the same randomness.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        micro_batch = batch_idx * trainer.world_size + trainer.global_rank
        seed = (self.seed * 1_000_003 + trainer.current_epoch * 100_019 + micro_batch * 31) % (2**32)
        pl.seed_everything(seed, workers=True, verbose=False)
