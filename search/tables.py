"""A Hydra callback that gathers every job of a multirun into one table (CSV, markdown, console, plot)."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table


def lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


class SweepTable(Callback):
    """After a multirun, one row per job from its ``config.yaml`` and ``metrics.json``.

    Args:
        filename: base name of the files written into the sweep folder (``.csv``, ``.md``, ``.png``).
        columns: header -> ``config:<dotted key>`` or ``metric:<name>``.
        plot: a column to plot as bars, one bar per job, labelled by the first column.
    """

    def __init__(self, filename: str, columns: Mapping[str, str], plot: str | None = None) -> None:
        self.filename, self.columns, self.plot = filename, dict(columns), plot

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = [row for job in sorted(sweep_dir.iterdir(), key=job_order) if (row := self.row(job)) is not None]
        if not rows:
            return
        self.write(rows, sweep_dir)

    def row(self, job: Path) -> dict[str, Any] | None:
        if not (job / "metrics.json").exists() or not (job / "config.yaml").exists():
            return None
        metrics = json.loads((job / "metrics.json").read_text())
        cfg = yaml.safe_load((job / "config.yaml").read_text())
        out: dict[str, Any] = {}
        for header, source in self.columns.items():
            kind, _, key = source.partition(":")
            out[header] = lookup(cfg, key) if kind == "config" else metrics.get(key)
        return out

    def write(self, rows: list[dict[str, Any]], sweep_dir: Path) -> None:
        headers = list(self.columns)
        write_table(rows, headers, sweep_dir, self.filename, f"{self.filename} ({sweep_dir})")
        if self.plot and self.plot in headers:
            plot_bars([str(r[headers[0]]) for r in rows], [r[self.plot] for r in rows], self.plot, sweep_dir / f"{self.filename}.png")


def write_table(rows: list[dict[str, Any]], headers: list[str], folder: Path, filename: str, title: str,
                show: bool = True) -> None:
    """``rows`` as ``<filename>.csv`` and ``.md`` in ``folder``, and (``show``) as a table on the console."""
    with open(folder / f"{filename}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=headers, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fmt = [[format_cell(r.get(h)) for h in headers] for r in rows]
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + ["| " + " | ".join(r) + " |" for r in fmt]
    (folder / f"{filename}.md").write_text("\n".join(md) + "\n")
    if not show:
        return
    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="left" if h == headers[0] else "right", no_wrap=h == headers[0])
    for r in fmt:
        table.add_row(*r)
    Console(width=max(Console().width, 120)).print(table)


def job_order(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


def format_cell(value: Any) -> str:
    """A table cell: large floats without decimals, metrics to 4 places, small values (learning rates, weight decays)
    to 3 significant figures (at 4 places every LR of 1e-4 +- 50 % read 0.0001)."""
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if 0 < abs(value) < 0.01 else f"{value:.4f}"
    return "" if value is None else str(value)


def plot_bars(labels: list[str], values: list[Any], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = [float(v) if v is not None else 0.0 for v in values]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels)), 4))
    bars = ax.bar(labels, numbers, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in numbers], fontsize=8)
    ax.set_ylabel(title)
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
