"""Training step time of the default task: eager vs ``compile=regional`` vs ``compile=full``, side by side.

The default config's model (all-MiniLM-L6-v2 + head, its AdamW parameter groups) trains on the same real BBC News
batches in every mode. Each mode's first steps (compilation) are timed apart; then rounds alternate the modes
(eager, regional, full, eager, ...) so drift on a shared machine hits all of them. Prints the steady-state step
time per mode, the compile time, and the speed-up over eager (target: compile >= 1.15x per step).

    python -m bench.compile [--steps 10] [--rounds 3] [--warmup 3] [--batch-size 16] [--max-length 128]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import default_task, take_batches
from modules.optim import param_groups
from modules.scaling import ScalePlan, apply_plan, compile_stats

MODES = ("eager", "regional", "full")


def make(mode: str, overrides: list[str]) -> tuple[Any, torch.optim.Optimizer]:
    model, cfg = default_task(overrides)
    if mode != "eager":
        apply_plan(model, ScalePlan(compile=mode))
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model.layer_groups(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay))
    return model, optimizer


def train_steps(model: Any, optimizer: torch.optim.Optimizer, batches: list[dict]) -> float:
    """Seconds for one optimizer step per batch."""
    start = time.perf_counter()
    for batch in batches:
        loss = F.cross_entropy(model(batch), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="first steps per mode (compilation), timed apart")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    overrides = [f"data.batch_size={args.batch_size}", f"data.max_length={args.max_length}"]
    batches = take_batches(overrides, args.warmup + args.steps)
    warm, timed = batches[: args.warmup], batches[args.warmup :]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu; {args.batch_size} x <= "
          f"{args.max_length} tokens; {args.warmup} warm-up + {args.steps} x {args.rounds} timed steps per mode")
    models, first = {}, {}
    for mode in MODES:
        models[mode] = make(mode, overrides)
        first[mode] = train_steps(*models[mode], warm)
        print(f"{mode}: first {args.warmup} steps {first[mode]:.1f} s")
    per_step: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            per_step[mode].append(train_steps(*models[mode], timed) / len(timed))
        print(f"round {r + 1}: " + ", ".join(f"{m} {per_step[m][-1]:.3f} s/step" for m in MODES))
    eager = statistics.median(per_step["eager"])
    print("\nmode      s/step   speed-up vs eager   compile time (first steps minus as many steady ones)")
    for mode in MODES:
        step = statistics.median(per_step[mode])
        compile_s = first[mode] - args.warmup * step if mode != "eager" else 0.0
        print(f"{mode:9} {step:7.3f}   {eager / step:17.3f}x   {compile_s:8.1f} s")
    print(f"compile counts: {compile_stats()} (target: speed-up >= 1.15x)")


if __name__ == "__main__":
    main()
