"""Exponential moving average of the weights (timm's ModelEmaV3), validated and checkpointed in place of the raw ones."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from timm.utils import ModelEmaV3
from torch import nn


class WeightEMA(pl.Callback):
    """Keep an EMA of every parameter and buffer; validate on it; save it as the checkpoint's weights.

    Validation runs on the EMA weights (the raw ones are swapped back for training), so the monitored
    metric, early stopping and the best checkpoint all judge the EMA model; checkpoints hold the EMA
    weights in ``state_dict`` (what testing and prediction load) and the raw ones under ``ema_raw_state_dict``
    so a resumed run continues training from them.

    Args:
        decay: EMA decay per optimizer step (timm's default 0.9998 suits long runs; ~0.99 for a few hundred steps).
        warmup: ramp the decay up from 0 (``1 - (1 + step) ** -2/3``), so short runs are not dominated by init.
        update_after_step: start averaging after this many optimizer steps.
    """

    def __init__(self, decay: float = 0.9998, warmup: bool = True, update_after_step: int = 0) -> None:
        self.decay, self.warmup, self.update_after_step = decay, warmup, update_after_step
        self.ema: ModelEmaV3 | None = None
        self._raw: dict[str, torch.Tensor] | None = None
        self._restored: dict[str, torch.Tensor] | None = None
        self._updated_at = -1  # the optimizer step the average last took in

    @staticmethod
    def tracked(pl_module: pl.LightningModule) -> nn.ModuleDict:
        """The task's children that hold weights (backbone, head), under their own names."""
        return nn.ModuleDict({n: m for n, m in pl_module.named_children()
                              if any(True for _ in m.parameters()) or any(True for _ in m.buffers())})

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ema = ModelEmaV3(self.tracked(pl_module), decay=self.decay, use_warmup=self.warmup,
                              update_after_step=self.update_after_step)
        if self._restored is not None:  # resuming: the checkpoint's state_dict holds the EMA weights
            self.ema.module.load_state_dict(self._restored)
            self._restored = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # once per optimizer step: with gradient accumulation, micro-batches that stepped nothing are skipped
        if self.ema is not None and trainer.global_step != self._updated_at:
            self.ema.update(self.tracked(pl_module), step=trainer.global_step)
            self._updated_at = trainer.global_step

    # -- validate on the EMA weights ---------------------------------------------------------------
    def swap_in(self, pl_module: pl.LightningModule) -> None:
        if self.ema is None or self._raw is not None:
            return
        target = self.tracked(pl_module)
        self._raw = {k: v.detach().clone() for k, v in target.state_dict().items()}
        target.load_state_dict(self.ema.module.state_dict())

    def swap_out(self, pl_module: pl.LightningModule) -> None:
        if self._raw is not None:
            self.tracked(pl_module).load_state_dict(self._raw)
            self._raw = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self.swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.swap_out(pl_module)

    # -- checkpoints: EMA weights as the model, raw weights kept for resuming ------------------------
    def state_dict(self) -> dict[str, Any]:
        # the step the average last took in: a run resumed before the next step's last micro-batch must not
        # average the same weights in again
        return {"updated_at": self._updated_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._updated_at = int(state_dict.get("updated_at", -1))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.ema is None:
            return
        current = checkpoint["state_dict"]
        raw = {k: current[k] for k in current}
        if self._raw is not None:  # saved while the EMA weights are swapped in (during validation)
            raw.update(self._raw)
        checkpoint["ema_raw_state_dict"] = {k: v.detach().cpu().clone() for k, v in raw.items()}
        current.update({k: v.detach().clone() for k, v in self.ema.module.state_dict().items()})

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        raw = checkpoint.get("ema_raw_state_dict")
        if raw is None:
            return
        if trainer.state.fn != "fit":  # testing / validating a checkpoint: its state_dict (the EMA weights) is the model
            return
        # resuming (Lightning has just loaded the EMA weights into the model): training continues from
        # the raw weights; the EMA weights seed the average again in on_fit_start
        names = set(self.tracked(pl_module).state_dict())
        self._restored = {k: v for k, v in checkpoint["state_dict"].items() if k in names}
        pl_module.load_state_dict(raw)
