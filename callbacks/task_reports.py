"""What tasks compute, written out: the test confusion matrix of classifiers and sample transcripts of
recognisers, to the run folder and to whichever loggers can show them (W&B tables, TensorBoard text)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger


class ConfusionMatrixReport(pl.Callback):
    """At test end, the classifier's confusion matrix (``pl_module.confusion``) as
    ``<run>/<dirname>/confusion_matrix.csv`` (counts, label names on both axes) and ``.png`` (row-normalised)."""

    def __init__(self, dirname: str = "reports") -> None:
        self.dirname = dirname

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        confusion = getattr(pl_module, "confusion", None)
        if confusion is None:
            return
        matrix = confusion.compute().cpu()  # every rank takes part in the sync
        if not trainer.is_global_zero:
            return
        out = Path(trainer.default_root_dir) / self.dirname
        out.mkdir(parents=True, exist_ok=True)
        names = list(getattr(pl_module, "confusion_names", None) or pl_module.label_names)
        with open(out / "confusion_matrix.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["true \\ predicted", *names])
            for name, row in zip(names, matrix.tolist(), strict=True):
                writer.writerow([name, *row])
        plot_confusion(matrix, names, out / "confusion_matrix.png")


class EntityReport(pl.Callback):
    """At test end, a tagger's per-entity-type scores (``pl_module.last_entity_report``: precision, recall, F1, gold
    and predicted counts) as ``<run>/<dirname>/entities.{csv,md}`` and a bar plot ``entities.png``."""

    def __init__(self, dirname: str = "reports") -> None:
        self.dirname = dirname

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = getattr(pl_module, "last_entity_report", None)
        if not rows or not trainer.is_global_zero:
            return
        write_entity_report(rows, Path(trainer.default_root_dir) / self.dirname)


def write_entity_report(rows: Sequence[dict], out: Path, title: str = "Test entity F1 per type") -> None:
    """``entities.csv`` / ``entities.md`` (one row per type, by support) and ``entities.png`` (F1 per type)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: -r["support"])
    headers = ["type", "precision", "recall", "f1", "support", "predicted"]
    with open(out / "entities.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=headers)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(f"{r[h]:.3f}" if isinstance(r[h], float) else str(r[h]) for h in headers) + " |" for r in rows]
    (out / "entities.md").write_text(f"{title}\n\n" + "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(rows) + 1.5), 3.6))
    ax.bar(range(len(rows)), [r["f1"] for r in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), [f"{r['type']}\n({r['support']})" for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("entity F1")
    ax.set_title(f"{title} (gold count in brackets)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "entities.png", dpi=100)
    plt.close(fig)


class PredictionSamples(pl.Callback):
    """After each validation, the recogniser's sample (reference, prediction) pairs (``pl_module.val_samples``):
    appended to ``<run>/<dirname>/val.txt``, and shown as a W&B table or TensorBoard text."""

    def __init__(self, dirname: str = "predictions") -> None:
        self.dirname = dirname

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        samples = getattr(pl_module, "val_samples", None)
        if not samples or trainer.sanity_checking or not trainer.is_global_zero:
            return
        rows = [[ref, hyp, "ok" if ref == hyp else "x"] for ref, hyp in samples]
        header = f"epoch {trainer.current_epoch} step {trainer.global_step}"
        text = "\n".join([header] + [f"  ref: {r}\n  hyp: {h}  [{m}]" for r, h, m in rows])
        out = Path(trainer.default_root_dir) / self.dirname
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "val.txt", "a") as f:
            f.write(text + "\n\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("val/samples", columns=["reference", "prediction", "match"], data=rows)
            elif isinstance(logger, TensorBoardLogger):
                table = "| reference | prediction |\n|---|---|\n" + "\n".join(f"| {r} | {h} |" for r, h, _ in rows)
                logger.experiment.add_text("val/samples", table, trainer.global_step)


def plot_confusion(matrix: torch.Tensor, label_names: Sequence[str], path: Path) -> None:
    """Row-normalised confusion matrix (recall per true class) with counts, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = matrix.numpy()
    rates = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    n = len(label_names)
    size = min(4 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ticks = range(n)
        ax.set_xticks(ticks, [str(x)[:14] for x in label_names], rotation=60, ha="right")
        ax.set_yticks(ticks, [str(x)[:14] for x in label_names])
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Test confusion matrix ({int(counts.sum())} examples, accuracy {counts.trace() / max(1, counts.sum()):.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
