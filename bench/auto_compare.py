"""Default vs LR range test vs ``auto`` vs the best of a full grid, side by side on one preset: test figure and wall time.

    python -m bench.auto_compare --minutes 10 experiment=digits_scratch     # ~15 min on 2 idle CPU cores
    python -m bench.auto_compare --minutes 30                                # the default run (MiniLM on BBC News)

Arms, each a fresh process on the same data, split and seed:
  default   python train.py <overrides>
  tune_lr   python train.py <overrides> tune=lr           (the LR range test, then training at its suggestion)
  tune_lr_R python train.py <overrides> tune=lr tune.lr_find.rule=R   (R: steepest, valley or minimum; run/lr_find.py)
  auto      python auto.py --minutes M <overrides>        (the search, then the winner on train + val, tested once)
  grid      python auto.py --grid --knobs K <overrides>   (every combination of a few values of K, e.g. 5 LRs x 3
            freezing strategies, no pruning, no time cap; the best by validation on train + val, tested once)
Writes results.json, results.md and results.png (and every arm's run folder) to --out (default: a temp folder), and
results.json again as bench/results/auto_compare_<preset>_<date>.json. Run again into the same --out with --arms A, it
reruns only A and keeps the other arms' results (same overrides and minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run.lr_find import RULES

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
ARMS = ["default", "tune_lr", *(f"tune_lr_{rule}" for rule in RULES), "auto", "grid"]  # the order of the table and plot


def run(command: list[str]) -> float:
    """Run a command from the checkout; its wall time in seconds (a failure stops the benchmark with its last line)."""
    started = time.time()
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[1:3])} failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return time.time() - started


def test_figures(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.startswith("test/") and "top5" not in k}


def grid_knobs(overrides: list[str]) -> str:
    """The grid's default knobs: lr and the freezing strategy where the backbone is pretrained, else lr and label
    smoothing (5 x 3 or 5 x 2 runs)."""
    from run.config import compose_config
    from search.auto import knob_space

    space = knob_space(compose_config(list(overrides)))
    return "lr,finetune" if "finetune" in space else "lr,label_smoothing" if "label_smoothing" in space else "lr"


def headline(test: dict[str, float]) -> str | None:
    """The figure the table and plot show: accuracy, else WER, else entity F1, else the first test figure."""
    return next((m for m in ("test/acc", "test/wer", "test/f1") if m in test), next(iter(test), None))


def test_size(out: Path) -> int | None:
    """The test split's size, from any arm's run folder (every arm tests on the same split)."""
    for report in sorted(out.glob("*/data_report.json")) + sorted(out.glob("*/final/data_report.json")):
        size = json.loads(report.read_text()).get("sizes", {}).get("test")
        if size:
            return int(size)
    return None


def plot(record: dict, metric: str, path: Path) -> None:
    """Each arm's test figure with its wall time; for an accuracy, the 95 % binomial interval over the test examples
    (two arms whose intervals overlap are not told apart by this test set)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, arms, n = sorted(record["arms"], key=ARMS.index), record["arms"], record.get("test_size")
    values = [arms[a]["test"].get(metric, math.nan) for a in names]
    binomial = n and "acc" in metric
    errors = [1.96 * math.sqrt(max(v * (1 - v), 0.0) / n) if binomial else 0.0 for v in values]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names), 3.4))
    colours = {"default": "#888", "auto": "#d84", "grid": "#6a6"}
    for i, (name, value, error) in enumerate(zip(names, values, errors, strict=True)):
        ax.errorbar([i], [value], yerr=[error] if binomial else None, fmt="o", color=colours.get(name, "#59c"), capsize=6, ms=7)
        ax.annotate(f"{value:.4f}\n{arms[name]['seconds'] / 60:.1f} min", (i, value), xytext=(12, -4),
                    textcoords="offset points", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.5, len(names) - 0.2)
    ax.set_ylabel(metric)
    ax.grid(axis="y", alpha=0.3)
    preset = "_on_".join(o.split("=", 1)[1] for o in record["overrides"] if o.startswith(("experiment=", "data=")))
    interval = f"; bars: 95 % binomial interval, {n} test examples" if binomial else ""
    ax.set_title(f"{preset or 'default'} (auto: {record['minutes']:g} min{interval})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="auto's search budget")
    parser.add_argument("--arms", nargs="+", default=["default", "tune_lr", "auto", "grid"], choices=ARMS)
    parser.add_argument("--grid-knobs", default=None, help="the grid's knobs (default: lr and the freezing strategy for a "
                        "pretrained backbone, lr and label smoothing otherwise)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--replot", default=None, help="redraw DIR/results.png from DIR/results.json (no runs)")
    parser.add_argument("overrides", nargs="*", help="the preset and data, for every arm (e.g. experiment=digits_scratch)")
    args = parser.parse_intermixed_args(argv)
    if args.replot:
        folder = Path(args.replot)
        record = json.loads((folder / "results.json").read_text())
        record.setdefault("test_size", test_size(folder))
        plot(record, headline(next(iter(record["arms"].values()))["test"]), folder / "results.png")
        return
    named = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in args.overrides if o.startswith(("experiment=", "data="))}
    preset = "_on_".join(named[k] for k in ("experiment", "data") if k in named) or "default"
    out = Path(args.out or Path(tempfile.gettempdir()) / "tunelab_auto_compare" / preset).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    earlier = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else None
    if earlier and earlier["overrides"] == args.overrides and earlier["minutes"] == args.minutes:
        results = {arm: r for arm, r in earlier["arms"].items() if arm not in args.arms}  # kept: arms not run again
        if results:
            print(f"kept from {out / 'results.json'}: {', '.join(results)}", flush=True)
    for arm in args.arms:
        folder = out / arm
        if arm in ("auto", "grid"):
            search = (["--minutes", str(args.minutes)] if arm == "auto"
                      else ["--grid", "--minutes", "100000", "--knobs", args.grid_knobs or grid_knobs(args.overrides)])
            seconds = run([sys.executable, "auto.py", *search, "--dir", str(folder), *args.overrides, *QUIET])
            summary = json.loads((folder / "auto_result.json").read_text())
            results[arm] = {"seconds": round(seconds, 1), "test": test_figures(summary["test"]),
                            "trials": summary["trials"], "overrides": summary["overrides"], "final": summary["final"],
                            "pruned": sum("pruned" in r["state"] for r in json.loads((folder / "trials.json").read_text())),
                            "folds": summary.get("folds"), "grid": summary.get("grid")}
        else:
            rule = arm.removeprefix("tune_lr").removeprefix("_")
            extra = ["tune=lr", *([f"tune.lr_find.rule={rule}"] if rule else [])] if arm.startswith("tune_lr") else []
            seconds = run([sys.executable, "train.py", *args.overrides, *extra, *QUIET, f"hydra.run.dir={folder}"])
            config = (folder / "config.yaml").read_text()
            lr = next((line.split(":", 1)[1].strip() for line in config.splitlines() if line.strip().startswith("lr:")), "")
            results[arm] = {"seconds": round(seconds, 1), "test": test_figures(json.loads((folder / "metrics.json").read_text())),
                            "lr": lr}
            if extra:
                found = json.loads((folder / "lr_find.json").read_text())
                results[arm].update(rule=found["rule"].split(":")[0], suggestions=found.get("suggestions"))
        print(f"{arm}: {results[arm]}", flush=True)
        record = {"overrides": args.overrides, "minutes": args.minutes, "date": time.strftime("%Y-%m-%d"),
                  "arms": results, "test_size": test_size(out)}
        (out / "results.json").write_text(json.dumps(record, indent=2))  # after each arm: a failed arm keeps the others'
    record = json.loads((out / "results.json").read_text())
    (ROOT / "bench" / "results" / f"auto_compare_{preset}_{record['date']}.json").write_text(json.dumps(record, indent=2))
    metric = headline(next(iter(results.values()))["test"])
    lines = [f"| arm | {metric} | wall (s) | trials |", "|---|---|---|---|"]
    lines += [f"| {arm} | {r['test'].get(metric, float('nan')):.4f} | {r['seconds']:.0f} | {r.get('trials', 1)} |"
              for arm, r in sorted(results.items(), key=lambda item: ARMS.index(item[0]))]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    if metric:
        plot(record, metric, out / "results.png")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
