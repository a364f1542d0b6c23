"""Preemption: SIGTERM, SIGINT (Ctrl+C) and SIGUSR1 (SLURM's warning signal) end training at the next optimizer-step
boundary (under gradient accumulation too) with ``last.ckpt`` saved there, so ``resume=<run folder>`` continues
exactly."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from modules.errors import Preempted

log = logging.getLogger("tunelab")


class Preemption(pl.Callback):
    """Turn the signals a scheduler or a user sends into Lightning's graceful SIGTERM stop, at an optimizer-step
    boundary, and save a checkpoint there.

    Lightning stops the loops after the current micro-batch when it sees SIGTERM (``SIGTERMException``). Under
    gradient accumulation that may be in the middle of an optimizer step: the gradients accumulated so far are not
    in the checkpoint, and the resumed run would take that step on fewer micro-batches. So the signal is handed to
    Lightning only at the end of the micro-batch that steps (at once when none is open: in validation, between
    steps); SIGINT and SIGUSR1 take the same path, and ``path`` is saved when the exception passes through. A
    second Ctrl+C interrupts at once, as usual. Under SLURM with Lightning's auto-requeue on, SIGUSR1 stays
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
        self._in_batch = False  # inside a training micro-batch
        self._open = False  # micro-batches have accumulated gradients that no optimizer step has applied yet
        self._step_at_batch_start = 0
        self._deferred: tuple[int, Any] | None = None  # a SIGTERM held back until the optimizer step completes

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

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._in_batch = True
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._in_batch = False
        self._open = trainer.global_step == self._step_at_batch_start  # this micro-batch stepped nothing
        if self._deferred is not None and not self._open:  # the step is whole: Lightning stops after this batch
            signum, frame = self._deferred
            self._deferred = None
            self._stop(signum, frame)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.received is not None:  # a second Ctrl+C: stop now, no checkpoint
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            return
        if self.received is None:
            self.received = name
            log.warning(f"received {name}: stopping at the end of this optimizer step and saving {self.path}")
        if signum != signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)  # one path for every signal: this handler again, as SIGTERM
        elif self._in_batch or self._open:
            self._deferred = (signum, frame)  # in the middle of an optimizer step: at its last micro-batch's end
        else:
            self._stop(signum, frame)

    def _stop(self, signum: int, frame: Any) -> None:
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)  # Lightning's: stop the loops after this batch (and tell DDP children)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        self.received = self.received or "SIGTERM"
        trainer.save_checkpoint(self.path)  # atomic: written to a temporary file, then renamed
        self.saved_at_step = trainer.global_step
        log.warning(f"saved {self.path} at optimizer step {trainer.global_step} ({self.received})")


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose saves from training batches (``every_n_train_steps``, a time interval)
    fall only where a resume is exact: at the end of an optimizer step, never between the micro-batches of one (the
    accumulated gradients are in no checkpoint), and never after an epoch's last batch, before its validation
    (Lightning resumes such a checkpoint as if that validation had run, and skips it); the save after that validation
    follows. A step- or time-triggered one saves after every validation as well (Lightning's triggers exclude each
    other), so ``last.ckpt`` is always the latest state a resume can continue exactly."""

    _step_at_batch_start = -1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._saves_at_epoch_end(trainer):  # validation in the middle of the epoch
            self._save_after_validation(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._saves_at_epoch_end(trainer):  # where Lightning's checkpoints (the best one...) save after validation
            self._save_after_validation(trainer)

    def _saves_at_epoch_end(self, trainer: pl.Trainer) -> bool:
        # Lightning saves at the train epoch's end when validation runs once an epoch, at its end; else after validation
        decide = getattr(super(), "_should_save_on_train_epoch_end", None)
        return bool(decide(trainer)) if callable(decide) else True

    def _save_after_validation(self, trainer: pl.Trainer) -> None:
        step_or_time = self.every_n_epochs == 0 and self.monitor is None
        if step_or_time and not trainer.sanity_checking and trainer.state.fn == "fit" and self.dirpath:
            trainer.save_checkpoint(os.path.join(self.dirpath, f"{self.filename or 'last'}{self.FILE_EXTENSION}"))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        stepped = trainer.global_step != self._step_at_batch_start
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        if stepped and not last_of_epoch:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that keeps its record when a run continues from a checkpoint into a new folder
    (``ckpt_path=`` from another run): Lightning then forgets the best score and would take the next validation's
    checkpoint as the best, whatever its score, so the test would score another model than an uninterrupted run's.
    The best checkpoints of the run continued from are copied into this run's folder (once, by rank 0) and the record
    (score, top-k) carried over; if they are gone, the record starts afresh, with a warning."""

    _carried: dict[str, str] | None = None

    @property
    def state_key(self) -> str:
        # Lightning's own key: checkpoints written before this class (and readers of best_model_path) still match
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__) :]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        before = state_dict.get("dirpath", self.dirpath)
        if before == self.dirpath or not self.dirpath:
            super().load_state_dict(state_dict)
            return
        kept = {str(path): score for path, score in (state_dict.get("best_k_models") or {}).items()}
        if not kept or not all(os.path.exists(path) for path in kept):
            log.warning(f"the best checkpoints of {before} are gone: this run's best-checkpoint record starts afresh")
            self.best_model_path = ""
            return
        self._carried = {path: os.path.join(self.dirpath, os.path.basename(path)) for path in kept}
        self.best_k_models = {self._carried[path]: score for path, score in kept.items()}
        self.best_model_score = state_dict["best_model_score"]
        self.best_model_path = self._carried.get(str(state_dict["best_model_path"]), "")
        self.kth_best_model_path = self._carried.get(str(state_dict.get("kth_best_model_path")), "")
        self.kth_value = state_dict.get("kth_value", self.kth_value)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # not on_fit_start: sharded strategies (FSDP2) restore the callbacks after it
        if self._carried and trainer.is_global_zero:
            import shutil

            for old, new in self._carried.items():
                if os.path.exists(new):
                    continue
                os.makedirs(os.path.dirname(new), exist_ok=True)
                partial = new + ".partial"
                if os.path.isdir(old):  # a sharded checkpoint folder
                    shutil.copytree(old, partial)
                else:
                    shutil.copyfile(old, partial)
                os.replace(partial, new)
                log.info(f"carried the best checkpoint {old} over as {new}")
        if self._carried:
            trainer.strategy.barrier()
            self._carried = None


class TimedCheckpoint(StepCheckpoint):
    """``last.ckpt`` every ``minutes`` of training as well, in the middle of an epoch, so a ``kill -9`` (an OOM kill, a
    node lost) costs at most that much (at optimizer-step boundaries: ``StepCheckpoint``). Lightning's time trigger
    excludes the per-epoch one, hence a checkpoint callback of its own beside ``last_checkpoint``, writing the same
    file.

    Args:
        dirpath: the run's checkpoint folder.
        minutes: training time between two saves (0: at every optimizer step).
        filename: the file's name, without ``.ckpt``.
    """

    def __init__(self, dirpath: str, minutes: float = 10.0, filename: str = "last") -> None:
        if minutes < 0:
            from modules.errors import ConfigError

            raise ConfigError(f"callbacks.timed_checkpoint.minutes={minutes}: give the minutes between saves (0 or more)")
        super().__init__(dirpath=dirpath, filename=filename, monitor=None, save_top_k=1, enable_version_counter=False,
                         train_time_interval=timedelta(minutes=minutes))
        self.minutes = minutes


def preempted(trainer: pl.Trainer, run_dir: Any) -> Preempted:
    """The clean stop to raise when a signal ended ``trainer.fit`` (``SIGTERMException``): which signal, the step,
    the checkpoint this callback saved, and how to continue."""
    stop = next((cb for cb in trainer.callbacks if isinstance(cb, Preemption)), None)
    return Preempted(getattr(stop, "received", None) or "SIGTERM", trainer.global_step, getattr(stop, "path", None), run_dir)
