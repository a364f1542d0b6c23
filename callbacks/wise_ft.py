"""After fine-tuning, evaluate the backbone interpolated between pretrained and fine-tuned weights."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only

from modules.errors import ConfigError
from modules.interpolation import DEFAULT_ALPHAS, backbone_state, snapshot, sweep, write_sweep

log = logging.getLogger(__name__)


class WiseFT(pl.Callback):
    """WiSE-FT: validate θ_pre + α·(θ_ft − θ_pre) over a grid of α, with the fine-tuned head.

    θ_pre is the backbone as the run built it (the pretrained weights), captured before any step;
    θ_ft is the best checkpoint's backbone (the final weights when there is none). Results go to
    ``<run>/<dirname>/``: ``wise_ft.csv``/``.md`` (metric per α), ``wise_ft.png`` and ``best.json``.
    With ``save_best`` the interpolated model at the best α is saved there too (``best_backbone/``
    in Hugging Face format when the backbone has one, and ``best_alpha.pt``, the whole task's weights).
    Evaluation runs in one process (rank 0), after fitting and before ``train.py`` tests.

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
        if stage == "fit" and trainer.world_size > 1:
            # the α sweep validates in one process with a Trainer of its own: beside a live process group it
            # would hang in the metrics' sync (or talk across ranks), so it is refused rather than risked
            raise ConfigError(f"callbacks=wise_ft runs its α sweep in a single process, not under {trainer.world_size}-process "
                              "training; train with one device (trainer=cpu or trainer=gpu), or drop callbacks.wise_ft")
        if stage == "fit" and self.pretrained is None:
            if not hasattr(pl_module, "backbone"):
                raise ConfigError("callbacks.wise_ft needs a task with a backbone (a modules.TaskModule)")
            self.pretrained = snapshot(pl_module.backbone)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run or self.pretrained is None:
            return
        self._evaluate(trainer, pl_module)

    @rank_zero_only
    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        final = snapshot(pl_module)
        best_path = getattr(trainer.checkpoint_callback, "best_model_path", "")
        tuned = torch.load(best_path, map_location="cpu", weights_only=False)["state_dict"] if best_path else final
        pl_module.load_state_dict(tuned)  # the fine-tuned head (and backbone) of the best checkpoint
        datamodule = trainer.datamodule
        loader = datamodule.val_dataloader() if datamodule is not None else trainer.val_dataloaders
        try:
            self.rows = sweep(pl_module, self.pretrained, backbone_state(tuned), self.alphas, loader, self.monitor,
                              accelerator=pl_module.device.type)
            folder = Path(trainer.default_root_dir) / self.dirname
            self.best = write_sweep(self.rows, folder, self.monitor, self.mode)
            log.info(f"WiSE-FT: best α={self.best['alpha']:.2f} ({self.monitor}={self.best[self.monitor]:.4f}); "
                     f"α=1 (fine-tuned) gives {self.rows[-1][self.monitor]:.4f}; see {folder}")
            # into the run's final metrics (metrics.json and the summary table)
            trainer.callback_metrics["best/wise_ft_alpha"] = torch.tensor(self.best["alpha"])
            trainer.callback_metrics[f"best/wise_ft_{self.monitor.replace('/', '_')}"] = torch.tensor(self.best[self.monitor])
            if self.save_best:
                self._save(pl_module, tuned, folder)
        finally:
            pl_module.load_state_dict(final)
            pl_module.trainer = trainer  # the evaluator took the module over; give it back

    def _save(self, pl_module: pl.LightningModule, tuned: dict[str, torch.Tensor], folder: Path) -> None:
        from modules.interpolation import interpolate_states

        assert self.best is not None and self.pretrained is not None
        pl_module.backbone.load_state_dict(interpolate_states(self.pretrained, backbone_state(tuned), self.best["alpha"]))
        torch.save({"alpha": self.best["alpha"], "state_dict": snapshot(pl_module)}, folder / "best_alpha.pt")
        if getattr(pl_module.backbone, "exportable", False):
            pl_module.backbone.save_pretrained(folder / "best_backbone")
