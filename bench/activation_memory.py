"""Peak memory of one training step with and without activation checkpointing (same model, same batch).

The default task's model (MiniLM + head) takes one forward + backward on a batch of real BBC News texts. On a GPU the
figure is ``torch.cuda.max_memory_allocated``; on CPU, where torch keeps no allocator statistics, each configuration
runs in a fresh process and the figure is that process's peak resident memory during the step minus its resident
memory just before it (weights, optimizer-free); glibc's mmap threshold is fixed (``MALLOC_MMAP_THRESHOLD_``) so
blocks freed while loading are handed back, not reused unseen by the step. Prints both and the ratio.

    python -m bench.activation_memory [--batch-size 32] [--max-length 512] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F


def rss_mb() -> float:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(checkpointing: bool, batch_size: int, max_length: int, device: str) -> dict[str, float]:
    """One step in this process; the memory it took (MB)."""
    from bench.common import default_task, take_batches
    from modules.scaling import ScalePlan, apply_plan

    overrides = [f"data.batch_size={batch_size}", f"data.max_length={max_length}"]
    batch = {k: v.to(device) for k, v in take_batches(overrides, 1)[0].items()}
    model, _ = default_task(overrides)
    apply_plan(model, ScalePlan(activation_checkpointing=checkpointing))
    model.to(device).train()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mb()
        if peak_rss_mb() > before + 50:
            print(f"note: loading peaked at {peak_rss_mb():.0f} MB, above the {before:.0f} MB held now", file=sys.stderr)
    F.cross_entropy(model(batch), batch["labels"]).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_mb()
    return {"step_mb": peak - before, "tokens": float(batch["input_ids"].numel())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--worker", choices=["off", "on"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.worker:
        print(json.dumps(worker(args.worker == "on", args.batch_size, args.max_length, device)))
        return
    results = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-m", "bench.activation_memory", "--worker", mode, "--device", device,
                              f"--batch-size={args.batch_size}", f"--max-length={args.max_length}"],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)})
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"activation_checkpointing={mode == 'on'}: {results[mode]['step_mb']:.0f} MB for one step "
              f"({int(results[mode]['tokens'])} tokens)")
    what = "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS of a fresh process"
    print(f"device {device} ({what}): with / without = {results['on']['step_mb'] / results['off']['step_mb']:.3f}")


if __name__ == "__main__":
    main()
