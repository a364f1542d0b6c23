"""After fine-tuning, evaluate the backbone interpolated between pretrained and fine-tuned weights."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from callbacks.run_end import RunEnd
from modules.errors import ConfigError
from modules.interpolation import DEFAULT_ALPHAS, backbone_state, best_row, snapshot, sweep, write_sweep

log = logging.getLogger(__name__)


class WiseFT(RunEnd):
    """WiSE-FT: validate θ_pre + α·(θ_ft − θ_pre) over a grid of α, with the fine-tuned head.

    θ_pre is the backbone as the run built it (the pretrained weights), captured before any step;
    θ_ft is the best checkpoint's backbone (the final weights when there is none). Results go to
    ``<run>/<dirname>/``: ``wise_ft.csv``/``.md`` (metric per α), ``wise_ft.png`` and ``best.json``.
    With ``save_best`` the interpolated model at the best α is saved there too (``best_backbone/``
    in Hugging Face format when the backbone has one, and ``best_alpha.pt``, the whole task's weights).
    The sweep runs after fitting and before testing (``after_fit``, ``callbacks.run_end``), with the run's own
    trainer: under DDP every process validates its shard, so nothing runs beside a live process group.

    Args:
        alphas: the grid (0 = pretrained backbone, 1 = fine-tuned).
        monitor / mode: the validation metric to plot and pick the best α by.
    """

    def __init__(
        self,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        monitor: str = "val/acc",
        mode: str = "max",
        save_best: bool = False,
        dirname: str = "wise_ft",
    ) -> None:
        if not alphas:
            raise ConfigError("callbacks.wise_ft.alphas is empty; give a grid like [0, 0.25, 0.5, 0.75, 1]")
        if mode not in ("max", "min"):
            raise ConfigError(f"callbacks.wise_ft.mode={mode!r}; use max or min")
        self.alphas = [float(a) for a in alphas]
        self.monitor, self.mode, self.save_best, self.dirname = monitor, mode, save_best, dirname
        self.pretrained: dict[str, torch.Tensor] | None = None
        self.rows: list[dict[str, float]] = []
        self.best: dict[str, float] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # setup runs before a checkpoint is restored: these are the weights the run was built with,
        # also when resuming (train.py seeds before building, so a from-scratch init repeats too)
        if stage == "fit" and self.pretrained is None:
            if not hasattr(pl_module, "backbone"):
                raise ConfigError("callbacks.wise_ft needs a task with a backbone (a modules.TaskModule)")
            self.pretrained = snapshot(pl_module.backbone)

    def after_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, datamodule: Any) -> dict[str, float]:
        """The α sweep, on every process; returns ``best/wise_ft_*`` for the run's final metrics."""
        if trainer.fast_dev_run or self.pretrained is None:
            return {}
        final = snapshot(pl_module)
        best_path = getattr(trainer.checkpoint_callback, "best_model_path", "")
        # the run's own best checkpoint, just written: read by the trainer's own checkpoint I/O (weights only)
        tuned = dict(trainer.strategy.load_checkpoint(best_path)["state_dict"]) if best_path else final
        pl_module.load_state_dict(tuned)  # the fine-tuned head (and backbone) of the best checkpoint
        loggers = trainer.loggers
        trainer.loggers = []  # the sweep's validations are not points of the training curves

        def validate() -> dict[str, float]:
            return trainer.validate(pl_module, datamodule=datamodule, verbose=False)[0]

        try:
            self.rows = sweep(pl_module, self.pretrained, backbone_state(tuned), self.alphas, validate, self.monitor)
            self.best = best_row(self.rows, self.monitor, self.mode)
            if trainer.is_global_zero:
                folder = Path(trainer.default_root_dir) / self.dirname
                write_sweep(self.rows, folder, self.monitor, self.mode)
                log.info(f"WiSE-FT: best α={self.best['alpha']:.2f} ({self.monitor}={self.best[self.monitor]:.4f}); "
                         f"α=1 (fine-tuned) gives {self.rows[-1][self.monitor]:.4f}; see {folder}")
                if self.save_best:
                    self._save(pl_module, tuned, folder)
        finally:
            trainer.loggers = loggers
            pl_module.load_state_dict(final)
        return {"best/wise_ft_alpha": self.best["alpha"],
                f"best/wise_ft_{self.monitor.replace('/', '_')}": self.best[self.monitor]}

    def _save(self, pl_module: pl.LightningModule, tuned: dict[str, torch.Tensor], folder: Path) -> None:
        from modules.backbones import save_backbone
        from modules.interpolation import interpolate_states

        assert self.best is not None and self.pretrained is not None
        pl_module.backbone.load_state_dict(interpolate_states(self.pretrained, backbone_state(tuned), self.best["alpha"]))
        torch.save({"alpha": self.best["alpha"], "state_dict": snapshot(pl_module)}, folder / "best_alpha.pt")
        if getattr(pl_module.backbone, "exportable", False):
            save_backbone(pl_module.backbone, folder / "best_backbone")
