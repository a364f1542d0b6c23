"""Baselines for a token-classification preset, on exactly the split its run trains and tests on: a most-frequent-tag
tagger (each word's most frequent training tag, lower-cased; unseen words: O) and a linear-chain CRF on word features
(``sklearn-crfsuite``: the word, its shape, affixes, @/# /URL marks, and its neighbours), both scored by the same
strict-IOB2 entity scorer as the run (``modules.entities``).

    python -m bench.ner_baselines                                  # experiment=wnut16_ner's split
    python -m bench.ner_baselines data.seed=1 --json out.json      # other overrides: as for train.py
    python -m bench.ner_baselines --run RUN1 --run RUN2 --plot f1.png  # runs' test figures beside them (and their mean)

Prints one table (micro P / R / F1, macro F1, per-type F1); ``--json`` writes it, ``--plot`` draws each type's F1 per
method (with the runs' mean and spread).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from bench.common import config, data_module
from modules.entities import OUTSIDE, score_tags
from run.build import build


def most_frequent_tag(train_words: Sequence[Sequence[str]], train_tags: Sequence[Sequence[str]],
                      words: Sequence[Sequence[str]]) -> list[list[str]]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for sentence, tags in zip(train_words, train_tags, strict=True):
        for word, tag in zip(sentence, tags, strict=True):
            counts[word.lower()][tag] += 1
    return [[counts[w.lower()].most_common(1)[0][0] if w.lower() in counts else OUTSIDE for w in s] for s in words]


def shape(word: str) -> str:
    out = []
    for ch in word:
        kind = "X" if ch.isupper() else "x" if ch.islower() else "d" if ch.isdigit() else ch
        if not out or out[-1] != kind:
            out.append(kind)
    return "".join(out)[:6]


def word_features(sentence: Sequence[str], i: int) -> dict[str, object]:
    word = sentence[i]
    features: dict[str, object] = {
        "bias": 1.0, "lower": word.lower(), "suffix3": word[-3:].lower(), "prefix3": word[:3].lower(),
        "shape": shape(word), "title": word.istitle(), "upper": word.isupper(), "digit": word.isdigit(),
        "mention": word.startswith("@"), "hashtag": word.startswith("#"), "url": word.lower().startswith("http"),
        "first": i == 0,
    }
    for offset in (-1, 1):
        j = i + offset
        if 0 <= j < len(sentence):
            features.update({f"{offset}:lower": sentence[j].lower(), f"{offset}:title": sentence[j].istitle(),
                             f"{offset}:shape": shape(sentence[j])})
        else:
            features[f"{offset}:edge"] = True
    return features


def crf_tagger(train_words: Sequence[Sequence[str]], train_tags: Sequence[Sequence[str]],
               words: Sequence[Sequence[str]], seed: int = 0) -> list[list[str]]:
    try:
        import sklearn_crfsuite
    except ImportError:
        raise SystemExit("tunelab: error: the CRF baseline needs sklearn-crfsuite; `pip install sklearn-crfsuite`") from None
    crf = sklearn_crfsuite.CRF(algorithm="lbfgs", c1=0.1, c2=0.1, max_iterations=200, all_possible_transitions=True)
    crf.fit([[word_features(s, i) for i in range(len(s))] for s in train_words], [list(t) for t in train_tags])
    return [list(t) for t in crf.predict([[word_features(s, i) for i in range(len(s))] for s in words])]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="train.py overrides (default: experiment=wnut16_ner)")
    parser.add_argument("--run", action="append", default=[], help="a trained run folder (repeatable): its metrics.json "
                                                                    "test figures join the table, and their mean")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="a PNG of each entity type's F1 per method")
    args = parser.parse_args(argv)
    overrides = args.overrides if any(o.startswith("experiment=") for o in args.overrides) else ["experiment=wnut16_ner", *args.overrides]
    cfg = config(overrides)
    dm = data_module(cfg, build(cfg.backbone).processor)
    train, test = dm.datasets["train"], dm.datasets["test"]
    print(f"split of {' '.join(overrides)}: {len(train)} train / {len(test)} test sentences "
          f"({sum(map(len, test.words))} test words)")
    results = {}
    for name, tagger in (("most frequent tag", most_frequent_tag), ("CRF (sklearn-crfsuite)", crf_tagger)):
        started = time.perf_counter()
        predicted = tagger(train.words, train.tags, test.words)
        results[name] = {**score_tags(test.tags, predicted, dm.label_names), "seconds": time.perf_counter() - started}
    runs = []
    for run in args.run:
        metrics = json.loads((Path(run) / "metrics.json").read_text())
        runs.append({k[len("test/"):]: v for k, v in metrics.items() if k.startswith("test/")})
        results[f"run {Path(run).name}"] = runs[-1]
    if len(runs) > 1:
        import statistics

        keys = set.intersection(*(set(r) for r in runs))
        results[f"runs: mean of {len(runs)}"] = {k: statistics.mean(r[k] for r in runs) for k in keys}
        results[f"runs: sd of {len(runs)}"] = {k: statistics.stdev(r[k] for r in runs) for k in keys}
    types = sorted({k[3:] for r in results.values() for k in r if k.startswith("f1/")})
    header = ["method", "precision", "recall", "f1", "f1_macro", *(f"f1/{t}" for t in types)]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, r in results.items():
        print("| " + " | ".join([name, *(f"{r.get(h, float('nan')):.3f}" for h in header[1:])]) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"overrides": overrides, "results": results}, indent=2))
    if args.plot:
        plot(results, ["f1", "f1_macro", *(f"f1/{t}" for t in types)], Path(args.plot))
    return results


def plot(results: dict[str, dict[str, float]], keys: list[str], path: Path) -> None:
    """Grouped bars: each metric (micro F1, macro F1, each type's F1) for each method; runs as their mean +- sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = next((v for k, v in results.items() if k.startswith("runs: mean")), None)
    sd = next((v for k, v in results.items() if k.startswith("runs: sd")), {})
    shown = {k: v for k, v in results.items() if not k.startswith("run")}
    if mean is not None:
        shown[f"tunelab ({next(k for k in results if k.startswith('runs: mean')).split('of ')[1]} seeds)"] = mean
    else:
        shown.update({k: v for k, v in results.items() if k.startswith("run ")})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(keys)), 3.8))
    width = 0.8 / len(shown)
    for i, (name, values) in enumerate(shown.items()):
        xs = [j + i * width for j in range(len(keys))]
        errors = [sd.get(k, 0.0) for k in keys] if values is mean else None
        ax.bar(xs, [values.get(k, 0.0) for k in keys], width, yerr=errors, label=name, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], [k.replace("f1/", "") for k in keys], rotation=40,
                  ha="right", fontsize=8)
    ax.set_ylabel("entity F1 (test)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("W-NUT 2016, held-out tweets: micro F1, macro F1 and F1 per type", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
