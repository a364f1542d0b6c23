"""Training throughput: tunelab (``python train.py``) vs Hugging Face ``transformers.Trainer`` on the same fine-tune.

Both fine-tune the same all-MiniLM-L6-v2 weights on the same BBC News training split (tokenized once, by the same
tokenizer, to the same max length), with the same batch size, learning rate and one epoch, on this machine's CPU
threads. The HF side is what its docs recommend (``AutoModelForSequenceClassification``, ``DataCollatorWithPadding``,
no evaluation or saving during training); the tunelab side is ``train.train`` with the default config plus
``data.group_by_length=true`` (checkpoints, reports and validation still on, but not timed). Each side's clock runs
from the start of its first training step to the end of its last. Prints samples/s and the ratio (target >= 1.2).

    python -m bench.hf_trainer [--max-train-samples N] [--batch-size 16] [--max-length 128] [--group-by-length true]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from bench.common import config, data_module


class EpochClock(pl.Callback):
    """Training samples, and the time from the first training batch's start to the last one's end, written to
    ``<run>/epoch_clock.json`` at the end of fitting."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end = 0.0
        self.samples = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()
        self.samples += len(batch["labels"])

    def on_fit_end(self, trainer, pl_module) -> None:
        clock = {"samples": self.samples, "seconds": self.end - (self.start or self.end)}
        (Path(trainer.default_root_dir) / "epoch_clock.json").write_text(json.dumps(clock))


def tunelab_samples_per_s(overrides: list[str], out: Path) -> tuple[float, int]:
    import train
    from run.config import job_config

    train.train(job_config([*overrides, "test_after_fit=false", "+callbacks.epoch_clock._target_=bench.hf_trainer.EpochClock"],
                           out))
    clock = json.loads((out / "epoch_clock.json").read_text())
    return clock["samples"] / clock["seconds"], clock["samples"]


def hf_samples_per_s(overrides: list[str], out: Path) -> tuple[float, int]:
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from run.build import build

    cfg = config(overrides)
    backbone = build(cfg.backbone)
    datamodule = data_module(cfg, backbone.processor)
    data = datamodule.datasets["train"]
    dataset = Dataset.from_dict({"input_ids": data.input_ids, "labels": data.labels})

    class Clock(TrainerCallback):
        start: float | None = None
        end = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if self.start is None:
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

    torch.manual_seed(cfg.seed)
    model = AutoModelForSequenceClassification.from_pretrained(backbone.source, num_labels=datamodule.num_classes)
    clock = Clock()
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=cfg.data.batch_size, num_train_epochs=1,
                             learning_rate=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay, warmup_steps=cfg.scheduler.warmup,
                             lr_scheduler_type="linear", save_strategy="no", eval_strategy="no", report_to=[],
                             logging_strategy="no", use_cpu=True, seed=cfg.seed, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorWithPadding(backbone.processor),
            callbacks=[clock]).train()
    return len(dataset) / (clock.end - clock.start), len(dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-train-samples", type=int, default=None, help="cap the training split (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--group-by-length", default="true", choices=["true", "false"], help="tunelab's length grouping")
    args = parser.parse_args()
    overrides = [f"data.batch_size={args.batch_size}", f"data.max_length={args.max_length}", "trainer.max_epochs=1",
                 "trainer.enable_progress_bar=false", "logger=csv"]
    if args.max_train_samples:
        overrides.append(f"data.max_train_samples={args.max_train_samples}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu; MiniLM on BBC News, batch "
          f"{args.batch_size}, max length {args.max_length}, 1 epoch, train split {args.max_train_samples or 'all'}")
    with tempfile.TemporaryDirectory() as tmp:
        hf, n_hf = hf_samples_per_s(overrides, Path(tmp) / "hf")
        print(f"transformers.Trainer: {hf:.2f} samples/s ({n_hf} samples)")
        ours, n_ours = tunelab_samples_per_s([*overrides, f"data.group_by_length={args.group_by_length}"], Path(tmp) / "tl")
        print(f"tunelab (group_by_length={args.group_by_length}): {ours:.2f} samples/s ({n_ours} samples)")
    print(f"ratio tunelab / Trainer: {ours / hf:.3f} (target >= 1.2)")


if __name__ == "__main__":
    main()
