"""Predict with a trained run on raw inputs: texts, images or audio in, one row per input out.

    python predict.py RUN news.txt                          # one text per line (- reads stdin)
    python predict.py RUN reviews.csv --column body         # a table column (CSV/TSV/JSON/JSONL/parquet)
    python predict.py RUN photos/ --out predictions.csv     # image files or folders
    python predict.py RUN clips/ manifest.jsonl --out transcripts.jsonl   # audio files, folders, manifests

Classifiers give ``predicted``, ``score`` and ``top_k`` ([label, probability] pairs); token classifiers (NER) give
``entities`` (type, character offsets, text, score) and each word's tag; speech models give the ``transcript``; masked
LMs fill each ``[MASK]`` (top-k tokens). Rows go to ``--out`` (.jsonl or .csv) or to
stdout as JSON lines; the progress bar and messages go to stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from run.cli import CommandParser, add_run_arguments, run_command


def parse(argv: Sequence[str]) -> Any:
    parser = CommandParser(prog="predict.py", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("inputs", nargs="+", help="text/table files or - (text); files or folders (images, audio); manifests")
    parser.add_argument("--column", default=None, help="the table column with the texts / audio paths (default: the run's "
                                                      "data.text_column / data.audio_column)")
    parser.add_argument("--out", default=None, help="predictions file, .jsonl or .csv (default: JSON lines on stdout)")
    parser.add_argument("--top-k", type=int, default=5, help="(label, probability) pairs per input (classifiers, masked LMs)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="32", choices=["32", "bf16", "16"],
                        help="32 (float32), bf16 or 16 (autocast; 16 needs a CUDA device)")
    parser.add_argument("--on-bad-input", default="error", choices=["error", "skip"],
                        help="an unreadable input: stop with one line, or skip it (a row with an error field) and count it")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_intermixed_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be >= 1")
    if args.out and Path(args.out).suffix.lower() not in (".jsonl", ".csv"):
        parser.error(f"--out {args.out}: write .jsonl or .csv")
    return args


def predict(args: Any) -> list[dict[str, Any]]:
    """Every input's prediction, in input order."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from datamodules import raw_inputs
    from datamodules.sources import TextEncoding
    from modules.errors import ConfigError, DataError
    from run.cli import torch_device
    from run.trained import load_run

    run = load_run(args.run, (), args.checkpoint, args.weights, args.trust_checkpoint)
    model, data = run.model, run.data_node
    modality = getattr(model.backbone, "modality", "")
    processor = model.backbone.processor
    if modality == "text":
        encoding = TextEncoding(data.get("encoding", "utf-8"), data.get("encoding_errors", "strict"))
        items = raw_inputs.read_texts(args.inputs, args.column or data.get("text_column", "text"), encoding)
        length = int(data.get("max_length") or data.get("block_size") or 512)
        tagging = run.kind == "token_classification"
        prepare, collate = (raw_inputs.word_preparation if tagging else raw_inputs.text_preparation)(processor, length)
    elif modality == "image":
        items = raw_inputs.find_files(args.inputs, raw_inputs.SUFFIXES["image"], args.column or "image", "image")
        prepare, collate = raw_inputs.image_preparation(processor)
    else:
        items = raw_inputs.find_files(args.inputs, raw_inputs.SUFFIXES["audio"], args.column or data.get("audio_column", "audio"),
                                      "audio")
        prepare, collate = raw_inputs.audio_preparation(processor)
    if not items:
        raise DataError(f"no inputs to predict in {', '.join(args.inputs)} (empty files?)")
    device = torch_device(args.device)
    model.to(device)
    model.predict_top_k = args.top_k
    loader = DataLoader(raw_inputs.RawDataset(items, prepare, args.on_bad_input), batch_size=args.batch_size,
                        collate_fn=raw_inputs.RawCollator(collate), num_workers=0)
    tokenizer = processor if run.kind == "mlm" else None
    texts = {item.name: item.content for item in items} if modality == "text" else {}
    rows: list[dict[str, Any]] = []
    failed = 0
    if args.precision == "16" and device.type != "cuda":
        raise ConfigError("--precision 16 needs a CUDA device (float16 autocast); on CPU use --precision bf16 or 32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float16,
                              enabled=args.precision != "32")
    with torch.inference_mode(), autocast, tqdm(total=len(items), desc="predict", unit=modality or "input",
                                                 file=sys.stderr, disable=args.no_progress) as progress:
        for index, batch in enumerate(loader):
            names, errors = batch.pop("names"), batch.pop("failed")
            outputs = model.predict_step(raw_inputs.to_device(batch, device), index) if names else []
            for name, out in zip(names, outputs, strict=True):
                if tokenizer is not None:
                    out = {"masks": [{**m, "top_k": [[tokenizer.convert_ids_to_tokens(int(t)), p] for t, p in m["top_k"]]}
                                     for m in out["masks"]]}
                if run.kind == "token_classification":
                    out = entities_in_text(processor, texts[name], out)
                shown = {"text": texts[name][:200]} if name in texts else {}
                rows.append({"input": name, **shown, **out})
            rows += [{"input": name, "error": message} for name, message in errors]
            failed += len(errors)
            progress.update(len(names) + len(errors))
    if failed:
        print(f"tunelab: skipped {failed} of {len(items)} inputs that could not be read (rows with an error field)",
              file=sys.stderr)
    order = {item.name: i for i, item in enumerate(items)}
    rows.sort(key=lambda r: order.get(r["input"], 0))
    return rows


def entities_in_text(tokenizer: Any, text: str, out: dict[str, Any]) -> dict[str, Any]:
    """A tagger's output on a raw text: each entity with its type, character offsets, words and score, and each
    word with its tag (words past max_length get none)."""
    from datamodules.raw_inputs import words_of

    words = words_of(tokenizer, text)
    entities = [{"type": e["type"], "start": words[e["start"]][1][0], "end": words[e["end"] - 1][1][1],
                 "text": text[words[e["start"]][1][0]:words[e["end"] - 1][1][1]], "score": e["score"]}
                for e in out["entities"]]
    tagged = [{"word": w, "start": a, "end": b, "tag": t, "score": p}
              for (w, (a, b)), t, p in zip(words, out["predicted_tags"], out["tag_scores"], strict=False)]
    return {"entities": entities, "words": tagged}


def write(rows: list[dict[str, Any]], out: str | None) -> None:
    from run.reports import write_rows

    if not out or out == "-":
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_rows(rows, path)
    print(f"tunelab: {len(rows)} predictions in {path}", file=sys.stderr)


def main(argv: Sequence[str]) -> None:
    args = parse(argv)
    write(predict(args), args.out)


if __name__ == "__main__":
    run_command(main)
