"""How often torch.compile compiled, recompiled and broke its graphs, step by step: a recompile storm shows at once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from callbacks.run_end import RunEnd
from modules.scaling import compile_stats


class CompileReport(RunEnd):
    """With ``compile=regional|full``: logs ``compile/frames``, ``compile/recompiles`` and ``compile/graph_breaks``
    (totals so far) each epoch, puts them in the run's final metrics, and writes the per-step history to
    ``<run>/<dirname>/compile.json``. Recompiles should stop growing after the first steps (a new padded length, a
    group unfrozen); if they grow every step, pad to a multiple (``data.pad_to_multiple_of``). Silent without compile.
    A count the installed torch does not expose is "unavailable" in the report and absent from the metrics.

    Args:
        dirname: the report folder inside the run folder.
    """

    def __init__(self, dirname: str = "reports") -> None:
        self.dirname = dirname
        self.history: list[dict[str, float | str]] = []
        self._active = False
        self._start: dict[str, float | None] = {}

    def counts(self) -> dict[str, float | None]:
        """This run's counts: the process's since fitting started (a multirun trains several runs in one process);
        None where this torch does not expose the count."""
        return {name: None if value is None else value - (self._start.get(name) or 0.0)
                for name, value in compile_stats().items()}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = getattr(getattr(pl_module, "scale_plan", None), "compile", None) is not None
        self._start = compile_stats() if self._active else {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._active:
            counts = {k: "unavailable" if v is None else v for k, v in self.counts().items()}
            self.history.append({"step": float(trainer.global_step), **counts})

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            for name, value in self.counts().items():
                if value is not None:
                    pl_module.log(name, value, on_step=False, on_epoch=True, reduce_fx="max", batch_size=1)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active and trainer.is_global_zero:
            folder = Path(trainer.default_root_dir) / self.dirname
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "compile.json").write_text(json.dumps(self.history, indent=1))

    def final_metrics(self) -> dict[str, float]:
        """For the run's metrics.json: the compile counts at the end of training."""
        return {k: v for k, v in self.counts().items() if v is not None} if self._active else {}
