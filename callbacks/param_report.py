"""Per-layer-group parameter and depth report, refreshed whenever trainability changes."""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table
from torch import nn

from modules.layer_groups import LayerGroup


@dataclass
class GroupRow:
    depth: int
    group: str
    module_types: str
    params: int
    trainable: int
    share: float  # of the model's parameters
    trainable_share: float  # of this group's parameters


def leaf_owner_types(model: nn.Module, group: LayerGroup) -> str:
    """'BertLayer' style summary of the modules that own a group's parameters: 'Linear x6, LayerNorm x2'."""
    root = model
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    for name in group.params:
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if owner in seen:
            continue
        seen.add(owner)
        counts[type(root.get_submodule(owner)).__name__ if owner else type(root).__name__] += 1
    return ", ".join(f"{t} x{n}" if n > 1 else t for t, n in counts.most_common())


def parameter_report(model: nn.Module, groups: list[LayerGroup]) -> list[GroupRow]:
    """One row per layer group, in depth order (input side first)."""
    total = sum(g.num_params for g in groups) or 1
    return [
        GroupRow(
            depth=i,
            group=g.name,
            module_types=leaf_owner_types(model, g),
            params=g.num_params,
            trainable=g.num_trainable,
            share=g.num_params / total,
            trainable_share=g.num_trainable / max(1, g.num_params),
        )
        for i, g in enumerate(groups)
    ]


def summary(rows: list[GroupRow]) -> dict[str, Any]:
    """Totals and depth: depth = layer groups in the model; trainable depth = groups, from the top, that train."""
    trainable_depth = 0
    for row in reversed(rows):
        if row.trainable == 0:
            break
        trainable_depth += 1
    params = sum(r.params for r in rows)
    trainable = sum(r.trainable for r in rows)
    return {"params": params, "trainable": trainable, "trainable_share": trainable / max(1, params),
            "depth": len(rows), "trainable_depth": trainable_depth}


class ParameterReport(pl.Callback):
    """Table of each layer group's module types, parameters, trainable parameters and share.

    Shown (rich table) when fitting starts and whenever any ``requires_grad`` changes; saved as
    ``reports/parameter_report.csv`` (+ a ``_history.csv`` of every refresh) and a bar chart PNG in
    the run folder; sent to the loggers (a table under W&B, text under TensorBoard, totals to all).
    The module must provide ``layer_groups()`` (every ``modules.TaskModule`` does).
    """

    def __init__(self, dirname: str = "reports", plot: bool = True, print_table: bool = True) -> None:
        self.dirname, self.plot, self.print_table = dirname, plot, print_table
        self._signature: tuple[bool, ...] | None = None
        self.rows: list[GroupRow] = []
        self.refreshes = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._refresh_if_changed(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._refresh_if_changed(trainer, pl_module)

    def _refresh_if_changed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        signature = tuple(p.requires_grad for p in pl_module.parameters())
        if signature == self._signature:
            return
        self._signature = signature
        self.rows = parameter_report(pl_module, pl_module.layer_groups())
        self.refreshes += 1
        self._publish(trainer)

    @rank_zero_only
    def _publish(self, trainer: pl.Trainer) -> None:
        totals = summary(self.rows)
        out = Path(trainer.default_root_dir) / self.dirname
        out.mkdir(parents=True, exist_ok=True)
        self._write_csv(out, trainer.global_step)
        if self.print_table:
            Console().print(self._rich_table(totals, trainer.global_step))
        if self.plot:
            plot_report(self.rows, out / "parameter_report.png", f"step {trainer.global_step}")
        for logger in trainer.loggers:
            logger.log_metrics({f"params/{k}": float(v) for k, v in totals.items()}, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                columns = list(asdict(self.rows[0]))
                logger.log_table("parameter_report", columns=columns, data=[list(asdict(r).values()) for r in self.rows])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("parameter_report", self._markdown(), trainer.global_step)

    def _write_csv(self, out: Path, step: int) -> None:
        fields = list(asdict(self.rows[0]))
        with open(out / "parameter_report.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(asdict(r) for r in self.rows)
        history = out / "parameter_report_history.csv"
        new = not history.exists()
        with open(history, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", *fields])
            if new:
                writer.writeheader()
            writer.writerows({"step": step, **asdict(r)} for r in self.rows)

    def _rich_table(self, totals: dict[str, Any], step: int) -> Table:
        table = Table(title=f"Parameters by layer group (step {step}): depth {totals['depth']}, "
                            f"trainable depth {totals['trainable_depth']}")
        for col in ("#", "group", "module types", "params", "trainable", "share"):
            table.add_column(col, justify="right" if col in ("#", "params", "trainable", "share") else "left")
        for r in self.rows:
            style = None if r.trainable else "dim"
            table.add_row(str(r.depth), r.group, r.module_types[:60], f"{r.params:,}", f"{r.trainable:,}", f"{r.share:.1%}", style=style)
        table.add_row("", "total", "", f"{totals['params']:,}", f"{totals['trainable']:,}", f"{totals['trainable_share']:.1%} trainable", style="bold")
        return table

    def _markdown(self) -> str:
        lines = ["| # | group | module types | params | trainable | share |", "|---|---|---|---|---|---|"]
        lines += [f"| {r.depth} | {r.group} | {r.module_types} | {r.params} | {r.trainable} | {r.share:.3f} |" for r in self.rows]
        return "\n".join(lines)


def plot_report(rows: list[GroupRow], path: Path, subtitle: str) -> None:
    """Horizontal bars per layer group (input at the bottom): trainable vs frozen parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.group for r in rows]
    trainable = [r.trainable / 1e6 for r in rows]
    frozen = [(r.params - r.trainable) / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    ax.barh(names, trainable, color="tab:green", label="trainable")
    ax.barh(names, frozen, left=trainable, color="lightgray", label="frozen")
    for y, r in enumerate(rows):
        ax.text(r.params / 1e6, y, f" {r.params:,}", va="center", fontsize=8)
    ax.set_xlim(0, max(r.params for r in rows) / 1e6 * 1.25)
    ax.set_xlabel("parameters (millions)")
    ax.set_title(f"Parameters by layer group, input at the bottom ({subtitle})")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
