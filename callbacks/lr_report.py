"""The LR of every parameter group as it actually ran: logged, saved as CSV and plotted."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only


class LRReport(pl.Callback):
    """Records each param group's LR at the moment the optimizer steps (after schedulers and freezing
    schedules have set it), logs ``lr/<group>`` every ``log_every_n_steps``, and writes
    ``reports/lr_history.csv`` and ``reports/lr.png`` (one line per layer group) when fitting ends.
    """

    def __init__(self, dirname: str = "reports", plot: bool = True) -> None:
        self.dirname, self.plot = dirname, plot
        self.history: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        lrs = {}
        for i, group in enumerate(optimizer.param_groups):
            name = group.get("layer_group", group.get("name", f"group_{i}"))
            lrs.setdefault(name, group["lr"])  # decay / no-decay halves of a layer group share an LR
        self.history.append({"step": step, **lrs})
        if step % max(1, trainer.log_every_n_steps) == 0:
            for logger in trainer.loggers:
                logger.log_metrics({f"lr/{k}": v for k, v in lrs.items()}, step=step)

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.history:
            return
        out = Path(trainer.default_root_dir) / self.dirname
        out.mkdir(parents=True, exist_ok=True)
        names = [k for k in self.history[-1] if k != "step"]
        with open(out / "lr_history.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", *names])
            writer.writeheader()
            writer.writerows(self.history)
        if self.plot:
            plot_lr(self.history, names, out / "lr.png")


def plot_lr(history: list[dict[str, Any]], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap("viridis", max(2, len(names)))
    for i, name in enumerate(names):
        ax.plot(steps, [h.get(name, float("nan")) for h in history], label=name, color=cmap(i))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("LR per layer group, as it ran (frozen groups included)")
    ax.legend(fontsize=7, ncol=2 if len(names) > 8 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
