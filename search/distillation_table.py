"""A Hydra callback for distillation multiruns: the student with KD vs without, over seeds, and the teacher."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from search.tables import job_order

COLUMNS = ("model", "runs", "test acc (mean ± sd)", "test acc per seed", "params", "inference samples/s", "train wall time (s)")


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


class DistillationTable(Callback):
    """After a ``task=distillation`` multirun (``task.alpha=0,...`` x seeds): one row per arm - the student without KD
    (alpha 0), the student with KD (each alpha), the teacher - with test accuracy (mean ± sd over the seeds and each
    seed's), parameters and inference samples/s (forward only, eval mode, the run's test batches). Writes
    ``<filename>.{csv,md,png}`` into the sweep folder and prints the table."""

    def __init__(self, filename: str = "distillation_comparison") -> None:
        self.filename = filename

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = []
        for job in sorted(sweep_dir.iterdir(), key=job_order):
            if (job / "metrics.json").is_file() and (job / "config.yaml").is_file():
                jobs.append((yaml.safe_load((job / "config.yaml").read_text()), json.loads((job / "metrics.json").read_text())))
        if jobs:
            self.write(self.rows(jobs), sweep_dir)

    @staticmethod
    def rows(jobs: list[tuple[dict[str, Any], dict[str, float]]]) -> list[dict[str, Any]]:
        arms: dict[str, list[tuple[dict[str, Any], dict[str, float]]]] = {}
        for cfg, metrics in jobs:
            task = cfg.get("task", {})
            alpha = float(task.get("alpha", 0.0)) if "alpha" in task else 0.0
            name = (f"student + KD (α={alpha:g}, T={float(task.get('temperature', 1.0)):g}"
                    + (f", hidden β={float(task['hidden_weight']):g}" if task.get("hidden_weight") else "") + ")"
                    if alpha > 0 or task.get("hidden_weight") else "student, no KD")
            arms.setdefault(name, []).append((cfg, metrics))
        rows = []
        order = sorted(arms, key=lambda n: (n != "student, no KD", n))
        for name in order:
            members = arms[name]
            accs = [m["test/acc"] for _, m in members if "test/acc" in m]
            speeds = [m["speed/samples_per_s"] for _, m in members if "speed/samples_per_s" in m]
            rows.append(row(name, members, accs, speeds, [m.get("params/inference") for _, m in members],
                            [m.get("time/total_s") for _, m in members]))
        teacher = [(c, m) for members in arms.values() for c, m in members if "test/teacher_acc" in m]
        if teacher:
            # the same teacher in every job: its accuracy is one figure; its speed was measured in each job
            accs = [teacher[0][1]["test/teacher_acc"]]
            speeds = [m["speed/teacher_samples_per_s"] for _, m in teacher if "speed/teacher_samples_per_s" in m]
            rows.append(row(f"teacher ({Path(str(teacher[0][0]['task']['teacher'])).name})", teacher[:1], accs, speeds,
                            [teacher[0][1].get("params/teacher")], [None]))
            rows[-1]["runs"] = f"{len(teacher)} (speed)"
        return rows

    def write(self, rows: list[dict[str, Any]], sweep_dir: Path) -> None:
        with open(sweep_dir / f"{self.filename}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "acc_mean", "acc_sd"])
            writer.writeheader()
            writer.writerows(rows)
        md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        md += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
        (sweep_dir / f"{self.filename}.md").write_text("\n".join(md) + "\n")
        table = Table(title=f"{self.filename} ({sweep_dir})")
        for c in COLUMNS:
            table.add_column(c, justify="left" if c == "model" else "right")
        for r in rows:
            table.add_row(*(str(r[c]) for c in COLUMNS))
        Console(width=max(Console().width, 140)).print(table)
        plot(rows, sweep_dir / f"{self.filename}.png")


def row(name: str, members: list, accs: list[float], speeds: list[float], params: list[Any], times: list[Any]) -> dict[str, Any]:
    acc, sd = mean_sd(accs) if accs else (float("nan"), 0.0)
    speed = statistics.median(speeds) if speeds else float("nan")
    known = [t for t in times if t is not None]
    return {"model": name, "runs": len(members), "test acc (mean ± sd)": f"{acc:.4f} ± {sd:.4f}",
            "test acc per seed": " ".join(f"{a:.4f}" for a in accs), "params": f"{(params[0] or 0):,.0f}",
            "inference samples/s": f"{speed:.1f}", "train wall time (s)": f"{statistics.fmean(known):.0f}" if known else "",
            "acc_mean": acc, "acc_sd": sd}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(rows)), 4))
    labels = [r["model"].replace(" (", "\n(") for r in rows]
    bars = ax.bar(labels, [r["acc_mean"] for r in rows], yerr=[r["acc_sd"] for r in rows], capsize=4,
                  color=["tab:gray" if "no KD" in r["model"] else "tab:green" if "teacher" in r["model"] else "tab:blue"
                         for r in rows])
    ax.bar_label(bars, labels=[f"{r['acc_mean']:.3f}\n{r['inference samples/s']}/s" for r in rows], fontsize=8)
    ax.set_ylabel("test accuracy (mean ± sd over seeds)")
    ax.set_ylim(0, 1.1)
    ax.set_title("distillation: student with / without KD, and the teacher")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
