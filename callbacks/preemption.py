"""Preemption: SIGTERM, SIGINT (Ctrl+C) and SIGUSR1 (SLURM's warning signal) end training at the next step
boundary with ``last.ckpt`` saved there, so ``resume=<run folder>`` continues exactly."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from modules.errors import Preempted

log = logging.getLogger("tunelab")


class Preemption(pl.Callback):
    """Turn the signals a scheduler or a user sends into Lightning's graceful SIGTERM stop, and save a checkpoint.

    Lightning stops the loops at the end of the current optimizer step when it sees SIGTERM (``SIGTERMException``);
    this callback forwards SIGINT and SIGUSR1 to that path, and saves ``path`` when the exception passes through.
    A second Ctrl+C interrupts at once, as usual. Under SLURM with Lightning's auto-requeue on, SIGUSR1 stays
    Lightning's (it saves ``hpc_ckpt_*.ckpt`` in the run folder and requeues the job).

    Args:
        path: where the checkpoint goes (the run's ``checkpoints/last.ckpt``, so ``resume=`` finds it).
        signals: signal names to handle.
    """

    def __init__(self, path: str, signals: Sequence[str] = ("SIGTERM", "SIGINT", "SIGUSR1")) -> None:
        unknown = [name for name in signals if not isinstance(getattr(signal, str(name), None), signal.Signals)]
        if unknown:
            from modules.errors import ConfigError

            raise ConfigError(f"callbacks.preemption.signals: {unknown} are not signal names (e.g. SIGTERM, SIGUSR1)")
        self.path = str(path)
        self.signals = [getattr(signal, name) for name in signals]
        self.received: str | None = None
        self.saved_at_step: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registered its SIGTERM handler just before; ours wraps it (and its teardown restores the originals)
        if threading.current_thread() is not threading.main_thread():
            return
        env = getattr(trainer.strategy, "cluster_environment", None)  # single-device strategies have none
        for signum in self.signals:
            if signum == getattr(signal, "SIGUSR1", None) and isinstance(env, SLURMEnvironment) and env.auto_requeue:
                continue
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.received is not None:  # a second Ctrl+C: stop now, no checkpoint
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            return
        if self.received is None:
            self.received = name
            log.warning(f"received {name}: stopping after this step and saving {self.path}")
        if signum == signal.SIGTERM:
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)  # Lightning's: stop the loops at the step boundary (and tell DDP children)
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        self.received = self.received or "SIGTERM"
        trainer.save_checkpoint(self.path)  # atomic: written to a temporary file, then renamed
        self.saved_at_step = trainer.global_step
        log.warning(f"saved {self.path} at optimizer step {trainer.global_step} ({self.received})")


def preempted(trainer: pl.Trainer, run_dir: Any) -> Preempted:
    """The clean stop to raise when a signal ended ``trainer.fit`` (``SIGTERMException``): which signal, the step,
    the checkpoint this callback saved, and how to continue."""
    stop = next((cb for cb in trainer.callbacks if isinstance(cb, Preemption)), None)
    return Preempted(getattr(stop, "received", None) or "SIGTERM", trainer.global_step, getattr(stop, "path", None), run_dir)
