"""Evaluate a trained run: its best checkpoint on its test split, or on any data.

    python eval.py outputs/bbc_news-minilm/2026-12-02_10-00-00              # the run's test split again
    python eval.py RUN data.data_files.test=other.csv                        # another test file (same labels)
    python eval.py RUN data=csv data.data_files.train=a.csv ...              # another data config
    python eval.py RUN --split val --checkpoint last --weights raw --out DIR
    python eval.py RUN --whisper-zero-shot                                   # baseline: the untrained Whisper it started from

Writes ``metrics.json`` (the names ``train.py`` reports: ``test/acc``, ``test/wer``, ...), ``eval_info.json`` (which
run, checkpoint, weights, split and overrides; the report's totals), ``predictions.jsonl`` /
``.csv`` (one row per example) and the task's report: ``confusion_matrix.{csv,png}`` + ``per_class.{csv,md}`` for
classifiers, ``wer_report.{md,csv}`` for speech, into ``<run>/eval/<split>-<time>/`` unless ``--out`` says where.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from run.cli import CommandParser, add_run_arguments, run_command


def parse(argv: Sequence[str]) -> Any:
    parser = CommandParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="key=value changes to the run's config (data.data_files.test=..., "
                                                     "data=<option>, data.eval_batch_size=...)")
    parser.add_argument("--split", default="test", choices=["test", "val"], help="which split to evaluate")
    parser.add_argument("--out", default=None, help="the folder for the results (default <run>/eval/<split>-<time>)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per batch (default: the run's)")
    parser.add_argument("--precision", default=None, help="Lightning precision (default: the run's trainer.precision)")
    parser.add_argument("--top-k", type=int, default=5, help="(label, probability) pairs per example (classifiers)")
    parser.add_argument("--save-outputs", action="store_true",
                        help="also write outputs.npz: each example's logits (classifiers) or frame log-probabilities (CTC)")
    parser.add_argument("--whisper-zero-shot", action="store_true",
                        help="a baseline: the pretrained Whisper (encoder and decoder) the run started from, untrained, "
                             "greedy decoding on the same split and scored the same way (Whisper-encoder CTC runs)")
    parser.add_argument("--language", default=None, help="the language token for --whisper-zero-shot (default en)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k {args.top_k} must be >= 1")
    if args.language is not None and not args.whisper_zero_shot:
        parser.error(f"--language {args.language} only applies to --whisper-zero-shot (a CTC run has no language token)")
    return args


def evaluate(args: Any) -> dict[str, Any]:
    """Test (or validate) the run's model on the split; write metrics, predictions and the task's report."""
    from callbacks.task_reports import ConfusionMatrixReport
    from modules.errors import ConfigError
    from run.cli import inference_trainer
    from run.reports import (
        add_correctness,
        class_report,
        collect_predictions,
        entity_report,
        speech_report,
        write_predictions,
    )
    from run.trained import load_run

    run = load_run(args.run, args.overrides, args.checkpoint, args.weights, args.trust_checkpoint)
    model, weights = run.model, run.weights
    if args.whisper_zero_shot:
        from omegaconf import OmegaConf

        from modules.whisper_zero_shot import (
            WhisperZeroShot,
            alphabet_of,
            whisper_source,
            zero_shot_processor,
        )

        if run.kind != "ctc":
            raise ConfigError(f"--whisper-zero-shot evaluates speech recognition; {run.run_dir} is a {run.kind} run")
        source = whisper_source(OmegaConf.to_container(run.cfg.backbone, resolve=True))
        model = WhisperZeroShot(source, alphabet_of(run.model.vocab.tokens), language=args.language or "en")
        weights = f"zero-shot Whisper ({source}), greedy"
        datamodule = run.datamodule(processor=zero_shot_processor(source))
    else:
        datamodule = run.datamodule()
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size {args.batch_size} must be >= 1")
        datamodule.eval_batch_size = args.batch_size
    if not datamodule.has_split(args.split):
        raise ConfigError(f"the data has no {args.split} split; give one (e.g. data.data_files.{args.split}=FILE)"
                          + (" or evaluate the validation split with --split val" if args.split == "test" else ""))
    name = f"{args.split}{'-whisper-zero-shot' if args.whisper_zero_shot else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out or run.run_dir / "eval" / name).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    trainer = inference_trainer(args.device, out, [ConfusionMatrixReport(dirname=".")],
                                args.precision or run.cfg.trainer.get("precision", "32-true"), not args.no_progress)
    check = trainer.test if args.split == "test" else trainer.validate
    metrics = {k: float(v) for k, v in check(model, datamodule=datamodule, verbose=False)[0].items()}
    model.predict_top_k, model.predict_outputs = args.top_k, args.save_outputs
    rows = collect_predictions(trainer, model, datamodule, args.split)
    if args.save_outputs:
        import numpy as np

        outputs = {f"example_{r['index']}": r.pop("outputs").numpy() for r in rows if "outputs" in r}
        np.savez_compressed(out / "outputs.npz", **outputs)
    add_correctness(rows)
    write_predictions(rows, out)
    report: dict[str, Any] = {}
    if run.kind in ("classification", "joint_classification"):
        report = class_report(rows, model.label_names, out)
    elif run.kind == "ctc":
        report = speech_report(rows, out)
    elif run.kind == "token_classification":
        report = entity_report(rows, model.label_names, out)
    result = {"metrics": metrics, "report": report, "run": str(run.run_dir), "checkpoint": str(run.checkpoint),
              "weights": weights, "split": args.split, "examples": len(rows), "overrides": list(args.overrides),
              "skipped": sum("error" in r for r in rows)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (out / "eval_info.json").write_text(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=2))
    print_metrics(metrics, out)
    return result


def print_metrics(metrics: dict[str, float], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Evaluation")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        table.add_row(key, f"{metrics[key]:.4f}")
    console = Console()
    console.print(table)
    console.print(f"results: {out.resolve()}")


def main(argv: Sequence[str]) -> None:
    evaluate(parse(argv))


if __name__ == "__main__":
    run_command(main)
