"""A trial of an Optuna study that reports each validation to the study and stops when the study prunes it (``auto.py``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

log = logging.getLogger("tunelab")

PRUNED_FILE = "pruned.json"


def median_pruner() -> Any:
    """The pruner of ``auto`` studies: a trial whose figure after an epoch is behind the median of the earlier trials'
    at that epoch stops, once two trials have finished, and not before its third validation: measured on digits from
    scratch, pruning from the first validation stopped 12 of 24 trials at chance level, among them learning rates
    next to the winner's, whose first epoch simply had not taken off yet. (Optuna keeps no pruner in its storage: the
    driver and each trial's process build this same one.)"""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)


class OptunaPruning(pl.Callback):
    """After every validation, report the monitored value to the Optuna trial this run is (by id, through the study's
    journal file, so the run may be a process of its own), and stop training when the study's pruner says the trial
    is behind the others at this epoch (successive halving / median). The run then ends as a normal short run (its
    best checkpoint and ``metrics.json`` are written) and ``pruned.json`` in its folder says where it was stopped.

    Args:
        storage: the study's journal file.
        study_name: the study.
        trial_id: the trial's id in the study (``Trial._trial_id`` of the trial the driver asked for).
        monitor: the metric the study optimises (the run's ``monitor``).
    """

    def __init__(self, storage: str, study_name: str, trial_id: int, monitor: str) -> None:
        self.storage, self.study_name, self.trial_id, self.monitor = storage, study_name, int(trial_id), monitor
        self._trial: Any = None

    def trial(self) -> Any:
        if self._trial is None:
            import optuna
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            study = optuna.load_study(study_name=self.study_name, storage=JournalStorage(JournalFileBackend(self.storage)),
                                      pruner=median_pruner())
            self._trial = optuna.trial.Trial(study, self.trial_id)
        return self._trial

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        epoch = int(trainer.current_epoch)
        trial = self.trial()
        trial.report(float(value), step=epoch)
        if trial.should_prune():
            trainer.should_stop = True
            log.info(f"auto: trial {trial.number} pruned after epoch {epoch} ({self.monitor}={float(value):.4f})")
            record = {"epoch": epoch, "value": float(value), "step": int(trainer.global_step)}
            (Path(trainer.default_root_dir) / PRUNED_FILE).write_text(json.dumps(record))
