"""A NaN or Inf loss is never a quiet success: stop with one line, skip the step and count it, or end the run."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch

from callbacks.run_end import RunEnd
from modules.errors import ConfigError, TrainingError
from modules.scaling import is_sharded, local

log = logging.getLogger(__name__)

POLICIES = ("error", "skip", "stop")


class NonFiniteGuard(RunEnd):
    """Checks every optimizer step's loss and gradients before the weights change.

    ``error`` (default) stops the run with one line naming the step, the value and the usual fixes;
    ``skip`` drops that step's gradients (the optimizer leaves every weight and its state alone; the LR
    schedule moves on), counts it in ``train/nonfinite_skipped`` and the final metrics; ``stop`` drops
    the step and ends training, and the run's metrics say at which step (``nonfinite/stopped_at_step``),
    so no checkpoint is reported as if nothing happened. Under DDP the gradients are already averaged
    across processes; under FSDP each process checks its shard and the verdicts are combined: every rank decides alike.

    Args:
        policy: ``error``, ``skip`` or ``stop``.
        max_skips: with ``skip``, stop with an error after this many skipped steps (a run that only skips
            is not training).
    """

    def __init__(self, policy: str = "error", max_skips: int = 100) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"on_nonfinite={policy!r} is unknown; choose one of {', '.join(POLICIES)}")
        self.policy, self.max_skips = policy, max_skips
        self.skipped = 0
        self.stopped_at: int | None = None
        self._loss: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=False, on_epoch=True, reduce_fx="max", batch_size=1)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._loss = float(loss.detach())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        grads = [local(p.grad) for p in pl_module.parameters() if p.grad is not None]
        loss_ok = self._loss is None or math.isfinite(self._loss)
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        if is_sharded(pl_module):  # FSDP2: each process holds a shard of the gradients
            finite = trainer.strategy.reduce(finite.float(), reduce_op="min") > 0
        grads_ok = bool(finite)  # one device sync
        if loss_ok and grads_ok:
            return
        step = trainer.global_step
        what = f"loss {self._loss}" if not loss_ok else f"gradients (loss {self._loss:.4g})"
        if self.policy == "error":
            raise TrainingError(f"non-finite {what} at optimizer step {step} (epoch {trainer.current_epoch}); lower "
                                "optimizer.lr, set trainer.gradient_clip_val=1.0, check that batch's data, or set "
                                "on_nonfinite=skip to skip such steps (counted) or on_nonfinite=stop")
        for p in pl_module.parameters():  # no gradient: the optimizer leaves the weight and its state alone
            p.grad = None
        if self.policy == "skip":
            self.skipped += 1
            log.warning(f"skipped optimizer step {step}: non-finite {what} ({self.skipped} skipped so far)")
            if self.skipped > self.max_skips:
                raise TrainingError(f"{self.skipped} optimizer steps had a non-finite loss or gradients (on_nonfinite=skip "
                                    f"allows {self.max_skips}); lower optimizer.lr or set trainer.gradient_clip_val")
        else:
            self.stopped_at = step
            trainer.should_stop = True
            log.warning(f"stopping: non-finite {what} at optimizer step {step} (on_nonfinite=stop)")

    def final_metrics(self) -> dict[str, float]:
        """For the run's metrics.json: what this guard did."""
        out = {"nonfinite/skipped": float(self.skipped)}
        if self.stopped_at is not None:
            out["nonfinite/stopped_at_step"] = float(self.stopped_at)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
