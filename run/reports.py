"""Per-example predictions joined with their references, and the reports built from them: a per-class table
for classifiers, a WER/CER report (substitutions, deletions, insertions; worst utterances) for speech."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def collect_predictions(trainer: Any, model: Any, datamodule: Any, split: str) -> list[dict[str, Any]]:
    """The task's ``predict_step`` over the split's evaluation loader (the batches ``trainer.test`` saw, on its
    device and precision), each output joined with the example it belongs to (``datamodule.describe``), in dataset
    order. (Not ``trainer.predict``: it rebuilds custom batch samplers such as the length-grouped one.)"""
    import torch

    loader = datamodule.prediction_loader(split)
    planned = [[key[1] if isinstance(key, tuple) else int(key) for key in batch] for batch in loader.batch_sampler]
    device = trainer.strategy.root_device
    model.to(device).eval()
    examples = datamodule.describe(split)
    rows: dict[int, dict[str, Any]] = {}
    with torch.inference_mode(), trainer.precision_plugin.forward_context():
        for index, batch in enumerate(loader):
            ids = batch.get("indices", planned[index])  # speech: the clips left after unreadable ones were skipped
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            for i, out in zip(ids, model.predict_step(batch, index), strict=True):
                rows[i] = {**examples[i], **out}
    for i in (i for batch in planned for i in batch if i not in rows):  # data.on_bad_input=skip left them out
        rows[i] = {**examples[i], "error": "unreadable: skipped (data.on_bad_input=skip)"}
    return [rows[i] for i in sorted(rows)]


def add_correctness(rows: list[dict[str, Any]]) -> None:
    """Classification rows: ``correct``; speech rows: per-utterance word and character error counts (jiwer's
    alignment, the same edit distance as the task's torchmetrics WER / CER)."""
    import jiwer

    for row in rows:
        if "error" in row:
            continue
        if "predicted" in row and "label" in row:
            row["correct"] = row["predicted"] == row["label"]
        if "transcript" in row and "reference" in row:
            words = jiwer.process_words(row["reference"], row["transcript"])
            s, d, i = words.substitutions, words.deletions, words.insertions
            n = len(row["reference"].split())
            row.update(words=n, substitutions=s, deletions=d, insertions=i, wer=(s + d + i) / max(1, n))
            chars = jiwer.process_characters(row["reference"], row["transcript"])
            errors = chars.substitutions + chars.deletions + chars.insertions
            row.update(chars=len(row["reference"]), char_errors=errors, cer=errors / max(1, len(row["reference"])))


def write_predictions(rows: Sequence[dict[str, Any]], out: Path) -> None:
    """``predictions.jsonl`` (every field) and ``predictions.csv`` (top-k as ``label:p;label:p``)."""
    write_rows(rows, out / "predictions.jsonl")
    write_rows(rows, out / "predictions.csv")


def write_rows(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Rows as JSON lines (``.jsonl``) or CSV (any other name: one column per field, in order of appearance)."""
    if path.suffix.lower() == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([flatten(row.get(c)) for c in columns] for row in rows)


def flatten(value: Any) -> Any:
    """A CSV cell: top-k pairs as ``label:p;label:p``, other lists and mappings as JSON."""
    if isinstance(value, list) and value and all(isinstance(v, list) and len(v) == 2 for v in value):
        return ";".join(f"{a}:{b:.4f}" if isinstance(b, float) else f"{a}:{b}" for a, b in value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        return round(value, 6)
    return value


def class_report(rows: Sequence[dict[str, Any]], label_names: Sequence[str], out: Path) -> dict[str, float]:
    """Precision, recall, F1 and support per class (``per_class.csv``, ``per_class.md``); returns the accuracy."""
    from sklearn.metrics import precision_recall_fscore_support

    rows = [r for r in rows if "error" not in r]
    truth, predicted = [r["label"] for r in rows], [r["predicted"] for r in rows]
    p, r, f, n = precision_recall_fscore_support(truth, predicted, labels=list(label_names), zero_division=0)
    table = [{"label": name, "precision": float(a), "recall": float(b), "f1": float(c), "support": int(d)}
             for name, a, b, c, d in zip(label_names, p, r, f, n, strict=True)]
    with open(out / "per_class.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    accuracy = sum(a == b for a, b in zip(truth, predicted, strict=True)) / max(1, len(rows))
    lines = [f"{len(rows)} examples, accuracy {accuracy:.4f}", "", "| label | precision | recall | f1 | support |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {t['label']} | {t['precision']:.3f} | {t['recall']:.3f} | {t['f1']:.3f} | {t['support']} |" for t in table]
    (out / "per_class.md").write_text("\n".join(lines) + "\n")
    return {"accuracy": accuracy}


def speech_report(rows: Sequence[dict[str, Any]], out: Path, worst: int = 20) -> dict[str, float]:
    """Corpus WER and CER with their error types (``wer_report.md``) and every utterance (``wer_report.csv``)."""
    skipped = sum("error" in r for r in rows)
    rows = [r for r in rows if "error" not in r]
    words = sum(r["words"] for r in rows)
    s, d, i = (sum(r[k] for r in rows) for k in ("substitutions", "deletions", "insertions"))
    chars, char_errors = sum(r["chars"] for r in rows), sum(r["char_errors"] for r in rows)
    totals = {"wer": (s + d + i) / max(1, words), "cer": char_errors / max(1, chars), "words": words,
              "substitutions": s, "deletions": d, "insertions": i, "utterances": len(rows),
              "exact": sum(r["reference"] == r["transcript"] for r in rows), "skipped": skipped}
    fields = ["index", "audio", "reference", "transcript", "wer", "cer", "words", "substitutions", "deletions", "insertions"]
    with open(out / "wer_report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"WER {totals['wer']:.4f} over {words} words ({s} substitutions, {d} deletions, {i} insertions); "
             f"CER {totals['cer']:.4f}; {totals['exact']} of {len(rows)} utterances exact.", "",
             f"Worst {min(worst, len(rows))} utterances:", "", "| audio | reference | transcript | WER |", "|---|---|---|---:|"]
    for r in sorted(rows, key=lambda r: (-r["wer"], r["index"]))[:worst]:
        lines.append(f"| {Path(str(r['audio'])).name} | {r['reference']} | {r['transcript']} | {r['wer']:.2f} |")
    (out / "wer_report.md").write_text("\n".join(lines) + "\n")
    return totals


def entity_report(rows: Sequence[dict[str, Any]], label_names: Sequence[str], out: Path) -> dict[str, float]:
    """A tagger's entity scores recomputed from its per-sentence predictions (over the words the in-run metrics count:
    words cut off by ``max_length`` are left out of both sides), per type as ``entities.{csv,md,png}``, and every mistake as
    ``mistakes.jsonl`` (``missed``: a gold entity predicted nowhere at its place; ``spurious``: a predicted entity at a
    place no gold one has; ``wrong_type``: the right words, another type; each with its words), counted by kind in
    ``mistakes.md``."""
    from callbacks.task_reports import write_entity_report
    from modules.entities import entity_spans, tag_scores

    rows = [r for r in rows if "error" not in r]
    gold = [list(r["tags"]) for r in rows]  # the scored words (datamodule.describe)
    predicted = [list(r["predicted_tags"]) for r in rows]
    scores = tag_scores(gold, predicted, label_names)
    write_entity_report(scores.report(), out, title=f"Entity F1 per type ({len(rows)} sentences)")
    mistakes, counts = [], {"missed": 0, "spurious": 0, "wrong_type": 0}
    for row, g, p in zip(rows, gold, predicted, strict=True):
        words = row["words"]
        gold_at = {(a, b): kind for kind, a, b in entity_spans(g)}
        pred_at = {(a, b): kind for kind, a, b in entity_spans(p)}
        found = []
        for (a, b), kind in gold_at.items():
            if (a, b) not in pred_at:
                found.append({"kind": "missed", "gold": kind, "words": " ".join(words[a:b]), "start": a, "end": b})
            elif pred_at[(a, b)] != kind:
                found.append({"kind": "wrong_type", "gold": kind, "predicted": pred_at[(a, b)],
                              "words": " ".join(words[a:b]), "start": a, "end": b})
        for (a, b), kind in pred_at.items():
            if (a, b) not in gold_at:
                found.append({"kind": "spurious", "predicted": kind, "words": " ".join(words[a:b]), "start": a, "end": b})
        for mistake in found:
            counts[mistake["kind"]] += 1
            mistakes.append({"index": row["index"], "row": row.get("row"), **mistake, "sentence": " ".join(words)})
    with open(out / "mistakes.jsonl", "w") as file:
        for mistake in mistakes:
            file.write(json.dumps(mistake, ensure_ascii=False) + "\n")
    values = {k: float(v) for k, v in scores.compute().items()}
    lines = [f"{len(rows)} sentences: entity F1 {values['f1']:.4f} (precision {values['precision']:.4f}, recall "
             f"{values['recall']:.4f}), macro F1 {values['f1_macro']:.4f}", "",
             f"Mistakes ({len(mistakes)}; each in mistakes.jsonl with its words): {counts['missed']} missed, "
             f"{counts['spurious']} spurious, {counts['wrong_type']} of the wrong type (a wrong boundary counts as one "
             "missed and one spurious)", ""]
    lines += ["| kind | gold | predicted | words |", "|---|---|---|---|"]
    lines += [f"| {m['kind']} | {m.get('gold', '')} | {m.get('predicted', '')} | {m['words']} |" for m in mistakes[:40]]
    (out / "mistakes.md").write_text("\n".join(lines) + "\n")
    return {**values, **counts}
