"""Per-epoch reseeding, so a run resumed at an epoch boundary replays the same randomness."""

from __future__ import annotations

import lightning.pytorch as pl


class EpochSeed(pl.Callback):
    """Reseeds every RNG at each training epoch's start from (seed, epoch).

    Lightning does not checkpoint RNG states, so without this a resumed run shuffles and drops out
    differently from an uninterrupted one. Runs before the epoch's data order is drawn.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl.seed_everything(self.seed * 1009 + trainer.current_epoch + trainer.global_rank * 7919, workers=True, verbose=False)
