"""A NaN or Inf loss is never a quiet success: stop with one line, skip the step and count it, or end the run.

The check costs one fused reduction per step and, with a fused optimizer (AdamW on CUDA), no host sync: the verdict
stays on the device, the optimizer skips the update there (``found_inf``, as ``GradScaler`` drives it), and the host
reads the verdict a step later, when the device has long computed it. Other optimizers get one sync per step.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch

from callbacks.run_end import RunEnd
from modules.errors import ConfigError, TrainingError
from modules.scaling import local

log = logging.getLogger(__name__)

POLICIES = ("error", "skip", "stop")
# a loss scaler whose scale fell below this has skipped step after step: the run no longer trains
COLLAPSED_SCALE = 2.0**-14


class NonFiniteGuard(RunEnd):
    """Checks every optimizer step's loss and gradients before the weights change.

    ``error`` (default) stops the run with one line naming the step, the value and the usual fixes;
    ``skip`` drops that step's update (the optimizer leaves every weight and its state alone; the LR
    schedule moves on), counts it in ``train/nonfinite_skipped`` and the final metrics; ``stop`` drops
    the step and every later one and ends training, and the run's metrics say at which step (``nonfinite/stopped_at_step``),
    so no checkpoint is reported as if nothing happened. Under DDP the gradients are already averaged
    across processes; under FSDP each process checks its shard and the verdicts are combined: every rank decides alike.

    With a loss scaler (``trainer.precision=16-mixed``) infinite gradients are the scaler's business (it skips the
    step and lowers the scale): the guard checks the loss and that the scale has not collapsed below
    ``COLLAPSED_SCALE``, and never counts the scaler's routine skips.

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
        self._loss: torch.Tensor | None = None
        self._pending: list[tuple[int, int, torch.Tensor, torch.Tensor, Any]] = []  # (step, epoch, verdict, loss, event)
        self._skip_now = False  # the verdict just settled says: drop this step's update

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # once an epoch: logging a host number copies it to the device, which waits for the device (a sync)
        self.settle(trainer, wait=True)
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=False, on_epoch=True, batch_size=1)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        self.settle(trainer)  # the verdicts of earlier steps, computed by now
        raw = getattr(optimizer, "optimizer", optimizer)  # Lightning may hand a LightningOptimizer
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        bad = self.verdict(pl_module, scaler)
        if trainer.world_size > 1:  # FSDP: each rank saw its shard; decide alike everywhere (a collective, no sync)
            bad = trainer.strategy.reduce(bad.float(), reduce_op="max") > 0
        self.remember(trainer, bad)
        if scaler is None and supports_found_inf(raw):
            # the fused optimizer skips the update on the device when told; after a stop, every later step is skipped
            raw.found_inf = torch.ones((), device=bad.device) if self.stopped_at is not None else bad.float()
            return
        if scaler is not None and self.policy != "stop":
            return  # the scaler skips a step whose gradients are not finite by itself: the verdict can wait
        self.settle(trainer, wait=True)  # one sync: the optimizer needs the answer now
        if self._skip_now or self.stopped_at is not None:
            for p in pl_module.parameters():  # no gradient: the optimizer leaves the weight and its state alone
                p.grad = None
        self._skip_now = False

    def verdict(self, pl_module: pl.LightningModule, scaler: Any) -> torch.Tensor:
        """True (on the device) if this step's loss, or gradients, are not finite: one fused max-abs over every
        gradient, which is NaN or Inf exactly when one element is."""
        loss = self._loss if self._loss is not None else torch.zeros(())
        bad = ~torch.isfinite(loss)
        if scaler is not None:
            scale = getattr(scaler, "_scale", None)
            if isinstance(scale, torch.Tensor):
                bad = bad.to(scale.device) | (scale < COLLAPSED_SCALE)
            return bad
        # under FSDP2 a small parameter can leave a process an empty shard: no element, nothing to check (and the
        # infinity norm of an empty tensor is an error)
        grads = [g for g in (local(p.grad) for p in pl_module.parameters() if p.grad is not None) if g.numel()]
        if grads:
            top = torch.nn.utils.get_total_norm(grads, norm_type=float("inf"), foreach=True)
            bad = bad.to(top.device) | ~torch.isfinite(top)
        return bad

    def remember(self, trainer: pl.Trainer, bad: torch.Tensor) -> None:
        """Keep the verdict (and the loss, for the message) for reading once the device has computed it."""
        loss = self._loss if self._loss is not None else torch.zeros(())
        event = None
        if bad.device.type == "cuda":
            host = torch.empty(2, dtype=torch.float32, pin_memory=True)
            host.copy_(torch.stack([bad.float(), loss.float().to(bad.device)]), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            bad, loss = host[0], host[1]
        self._pending.append((trainer.global_step, trainer.current_epoch, bad, loss, event))

    def settle(self, trainer: pl.Trainer, wait: bool = False) -> None:
        """Act on the verdicts the device has finished (all of them with ``wait``)."""
        while self._pending:
            step, epoch, bad, loss, event = self._pending[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            self._pending.pop(0)
            with torch.profiler.record_function("host:nonfinite verdict"):  # a host copy by now (StepProfile)
                found = bool(bad)
            if found:
                self.act(trainer, step, epoch, float(loss))

    def act(self, trainer: pl.Trainer, step: int, epoch: int, loss: float) -> None:
        what = f"loss {loss}" if not torch.isfinite(torch.tensor(loss)) else f"gradients (loss {loss:.4g})"
        if self.policy == "error":
            raise TrainingError(f"non-finite {what} at optimizer step {step} (epoch {epoch}); lower "
                                "optimizer.lr, set trainer.gradient_clip_val=1.0, check that batch's data, or set "
                                "on_nonfinite=skip to skip such steps (counted) or on_nonfinite=stop")
        if self.stopped_at is not None:  # a step after the stop: skipped like it, nothing more to say
            self._skip_now = True
            return
        if self.policy == "skip":
            self.skipped += 1
            self._skip_now = True
            log.warning(f"skipped optimizer step {step}: non-finite {what} ({self.skipped} skipped so far)")
            if self.skipped > self.max_skips:
                raise TrainingError(f"{self.skipped} optimizer steps had a non-finite loss or gradients (on_nonfinite=skip "
                                    f"allows {self.max_skips}); lower optimizer.lr or set trainer.gradient_clip_val")
        else:
            self.stopped_at = step
            self._skip_now = True
            trainer.should_stop = True
            log.warning(f"stopping: non-finite {what} at optimizer step {step} (on_nonfinite=stop)")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.settle(trainer, wait=True)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.settle(trainer, wait=True)  # the count a checkpoint holds is every step's before it

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


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer skips an update itself when its ``found_inf`` says so (torch's fused Adam / AdamW / SGD,
    the same protocol ``GradScaler`` uses): then no host sync is needed to skip a step."""
    return bool(getattr(optimizer, "defaults", {}).get("fused")) and getattr(optimizer, "_step_supports_amp_scaling", False)
