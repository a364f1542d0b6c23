"""k-fold cross-validation: after ``--multirun cv=kfold``, every metric as mean ± std over the folds (table + plot).

What estimates the recipe's performance, and what does not: each fold's ``best/*`` is the best epoch *chosen on that
same fold's validation data*, an optimistic figure (selection-biased); its last-epoch ``val/*`` (the recipe runs a
fixed number of epochs: ``cv=kfold`` turns early stopping off) and its ``test/*`` (the held-out test split, scored on
the checkpoint the fold chose) were chosen on nothing they measure. The summary says which is which (``kind``),
lists the estimates first and plots them."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from search.tables import lookup, write_table

log = logging.getLogger("tunelab")

# what each metric is, by its prefix: an estimate of the recipe, or a figure selected on the data it measures
ESTIMATES = ("val/", "test/")
SELECTED = ("best/",)


def kind_of(metric: str) -> str:
    """``estimate`` (last-epoch validation, held-out test), ``selection-biased`` (the best epoch, chosen on the fold's
    own validation data), or ``other`` (losses of training, timings, counts)."""
    if metric.startswith(ESTIMATES):
        return "estimate"
    if metric.startswith(SELECTED):
        return "selection-biased"
    return "other"


def read_folds(sweep_dir: Path) -> dict[int, dict[str, float]]:
    """fold -> its run's final metrics, for every finished job of a cross-validation sweep folder."""
    folds: dict[int, dict[str, float]] = {}
    for job in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir()):
        if not (job / "metrics.json").is_file() or not (job / "config.yaml").is_file():
            continue
        fold = lookup(yaml.safe_load((job / "config.yaml").read_text()) or {}, "data.fold")
        if fold is None:
            continue
        metrics = json.loads((job / "metrics.json").read_text())
        folds[int(fold)] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return folds


def aggregate(folds: Mapping[int, Mapping[str, float]]) -> list[dict[str, Any]]:
    """One row per metric that every fold has: mean, sample standard deviation (n - 1), n, and each fold's value."""
    names = sorted(set.intersection(*(set(m) for m in folds.values()))) if folds else []
    rows = []
    for name in names:
        values = [folds[f][name] for f in sorted(folds)]
        finite = [v for v in values if math.isfinite(v)]
        mean = sum(finite) / len(finite) if finite else float("nan")
        std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else 0.0
        row: dict[str, Any] = {"metric": name, "kind": kind_of(name), "mean": mean, "std": std, "n": len(finite)}
        row.update({f"fold {f}": folds[f][name] for f in sorted(folds)})
        rows.append(row)
    order = {"estimate": 0, "selection-biased": 1, "other": 2}
    return sorted(rows, key=lambda r: order[r["kind"]])


def plot_folds(rows: Sequence[Mapping[str, Any]], folds: Sequence[int], path: Path) -> None:
    """Each estimate (``kind_of``): its value per fold (points), the mean (line) and ± one std (band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["kind"] == "estimate" and "loss" not in str(r["metric"])] or list(rows[:4])
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), squeeze=False)
    for ax, row in zip(axes[0], shown, strict=False):
        values = [row[f"fold {f}"] for f in folds]
        ax.axhspan(row["mean"] - row["std"], row["mean"] + row["std"], color="tab:blue", alpha=0.15)
        ax.axhline(row["mean"], color="tab:blue", lw=1)
        ax.plot(list(folds), values, "o", color="tab:blue")
        ax.set_xticks(list(folds))
        ax.set_xlabel("fold")
        ax.set_title(f"{row['metric']}\n{row['mean']:.4f} ± {row['std']:.4f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarise(sweep_dir: Path, num_folds: int | None = None) -> list[dict[str, Any]]:
    """Write ``cv_summary.{csv,md,json,png}`` for the folds finished in ``sweep_dir``; return the rows."""
    sweep_dir = Path(sweep_dir)
    folds = read_folds(sweep_dir)
    if not folds:
        log.warning(f"cross-validation: no fold of {sweep_dir} finished; no summary")
        return []
    missing = sorted(set(range(num_folds)) - set(folds)) if num_folds else []
    if missing:
        log.warning(f"cross-validation: folds {missing} of {num_folds} did not finish; the summary covers {sorted(folds)}")
    rows = aggregate(folds)
    headers = ["metric", "kind", "mean", "std", "n", *[f"fold {f}" for f in sorted(folds)]]
    write_table(rows, headers, sweep_dir, "cv_summary", f"{len(folds)}-fold cross-validation ({sweep_dir}): mean ± std. "
                "kind: estimate = last-epoch validation / held-out test; selection-biased = the best epoch, chosen on the "
                "fold's own validation data (optimistic)")
    with open(sweep_dir / "cv_summary.md", "a") as md:
        md.write("\nkind: *estimate* = each fold's last-epoch validation (a fixed number of epochs) or the held-out test "
                 "split; *selection-biased* = the best epoch, chosen on the fold's own validation data (optimistic).\n")
    (sweep_dir / "cv_summary.json").write_text(json.dumps(
        {"folds": sorted(folds), "num_folds": num_folds,
         "metrics": {r["metric"]: {"kind": r["kind"], "mean": r["mean"], "std": r["std"], "n": r["n"]} for r in rows}},
        indent=2))
    plot_folds(rows, sorted(folds), sweep_dir / "cv_summary.png")
    return rows


class FoldSummary(Callback):
    """Hydra callback of ``cv=kfold``: the cross-validation summary once every fold's job has run."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summarise(Path(config.hydra.sweep.dir), config.data.get("num_folds"))
