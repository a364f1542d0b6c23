"""The end of a run, declared once: what a callback adds to the run's final metrics (``metrics.json``), and the work
it does after fitting with the fitted model and the run's own trainer (WiSE-FT's α sweep, inference speed).

``train.py`` calls ``run_end_metrics`` after ``trainer.fit``; every callback that takes part subclasses ``RunEnd``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


class RunEnd(pl.Callback):
    """A Lightning callback with a part in the run's end."""

    def final_metrics(self) -> dict[str, float]:
        """What this callback saw during training, for the run's final metrics (e.g. non-finite steps skipped)."""
        return {}

    def after_fit(self, trainer: pl.Trainer, task: pl.LightningModule, datamodule: Any) -> dict[str, float]:
        """Work that needs the fitted model and the run's trainer, on every process; returns final metrics."""
        return {}


def run_end_metrics(trainer: pl.Trainer, task: pl.LightningModule, datamodule: Any) -> dict[str, float]:
    """Every ``RunEnd`` callback's final metrics, then its after-fit work's, in callback order."""
    ends = [callback for callback in trainer.callbacks if isinstance(callback, RunEnd)]
    metrics: dict[str, float] = {}
    for callback in ends:
        metrics.update(callback.final_metrics())
    for callback in ends:
        metrics.update(callback.after_fit(trainer, task, datamodule))
    return metrics
