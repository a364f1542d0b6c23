"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T + bias`` against targets, never building
the full (rows x vocab) logits.

Rows are processed in chunks: each chunk's logits are computed, turned into the loss and, in place,
into the gradient of the loss with respect to them (a Triton kernel, or the same arithmetic in
PyTorch), which is then pushed into the gradients of the hidden states, the weight and the bias right
away. The forward pass thus leaves only those gradients behind, and the backward pass scales them.
With the PyTorch arithmetic this is also the memory-saving path on a CPU.

Import this module only after ``TRITON_INTERPRET`` is set (if it is to be): Triton reads it when the
kernel below is defined.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from modules.errors import ConfigError
from modules.kernels.runtime import triton_can_run

BACKENDS = ("triton", "torch")


@triton.jit
def _loss_and_grad_kernel(
    LOGITS, TARGET, LOSS, PRED, stride, n_cols, ignore_index, smoothing,
    BLOCK: tl.constexpr,
):
    """One row: its (label-smoothed) loss and arg-max, and its logits overwritten by d(loss)/d(logits)."""
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride
    target = tl.load(TARGET + row)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK)
    # online softmax: running max, running sum of exp(x - max), plain sum (for the smoothing term)
    run_max = tl.full((), float("-inf"), tl.float32)
    run_sum = tl.zeros((), tl.float32)
    total = tl.zeros((), tl.float32)
    best = tl.zeros((), tl.int32)
    for start in range(0, n_cols, BLOCK):
        inside = start + cols < n_cols
        x = tl.load(ptr + start + cols, mask=inside, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, axis=0)
        best = tl.where(block_max > run_max, tl.argmax(x, axis=0) + start, best)
        new_max = tl.maximum(run_max, block_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        total += tl.sum(tl.where(inside, x, 0.0), axis=0)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    safe_target = tl.where(valid, target, 0)
    target_logit = tl.load(ptr + safe_target).to(tl.float32)
    loss = (1.0 - smoothing) * (lse - target_logit) + smoothing * (lse - total / n_cols)
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(PRED + row, best.to(tl.int64))
    # d(loss)/d(logit_j) = softmax_j - (1 - smoothing) * [j == target] - smoothing / n_cols; 0 for ignored rows
    scale = tl.where(valid, 1.0, 0.0)
    for start in range(0, n_cols, BLOCK):
        inside = start + cols < n_cols
        x = tl.load(ptr + start + cols, mask=inside, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - smoothing / n_cols - tl.where(start + cols == safe_target, 1.0 - smoothing, 0.0)
        tl.store(ptr + start + cols, grad * scale, mask=inside)


def _loss_and_grad_torch(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's arithmetic in PyTorch: (per-row loss, arg-max, d(loss)/d(logits)), in one (rows x vocab) buffer.

    Works in place on ``logits`` (on a float32 copy of half-precision ones), as the kernel does: no second
    buffer of the chunk's size, which is what keeps the chunked path's memory low on a CPU.
    """
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    preds = logits.argmax(-1)
    work = logits.float()  # the same tensor when already float32
    target_logit = work.gather(1, safe[:, None]).squeeze(1)
    mean_logit = work.mean(-1)
    top = work.amax(-1, keepdim=True)
    work.sub_(top).exp_()  # exp(x - max), in place
    total = work.sum(-1, keepdim=True)
    lse = (top + total.log()).squeeze(1)
    loss = (1.0 - smoothing) * (lse - target_logit) + smoothing * (lse - mean_logit)
    grad = work.div_(total)  # the softmax
    grad.sub_(smoothing / logits.shape[1])
    grad.scatter_add_(1, safe[:, None], grad.new_full((len(safe), 1), -(1.0 - smoothing)))
    grad.mul_(valid[:, None])
    return torch.where(valid, loss, 0.0), preds, grad.to(logits.dtype)


# a GPU chunk's logits (bf16) take about this much memory: few chunks, so few passes over the (vocab x hidden) weight
# gradient (the H200 check measured 16,384 rows in 1,024-row chunks 2x slower than compiled dense logits), and still
# a fraction of the dense logits' memory
GPU_CHUNK_BYTES = 256 * 2**20


def default_chunk_size(rows: int, hidden: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk. On a GPU: the power of two whose chunk of bf16 logits is about ``GPU_CHUNK_BYTES`` (1,024 to
    8,192 rows). On a CPU: about as many as make a chunk's logits as large as all the hidden states (Liger's rule),
    at least 64 (measured: bench/kernels.py)."""
    if device.type == "cuda":
        return max(1024, min(8192, 2 ** int(math.log2(max(1, GPU_CHUNK_BYTES // (2 * vocab))))))
    liger = triton.next_power_of_2(math.ceil(rows / math.ceil(vocab / hidden)))
    return max(64, min(liger, 4096))


@torch.library.custom_op("tunelab::linear_cross_entropy_fwd", mutates_args=())
def _forward_op(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
    ignore_index: int, label_smoothing: float, sum_reduction: bool, chunk_size: int, use_triton: bool,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, arg-max per row, d loss/d hidden, d loss/d weight, d loss/d bias); the last two empty if not wanted."""
    if use_triton and not triton_can_run(hidden.device):
        raise ConfigError(
            f"the Triton cross-entropy kernel got a {hidden.device.type} tensor; it needs CUDA (or "
            f"TRITON_INTERPRET=1 for the CPU interpreter); use backbone.kernels=torch"
        )
    rows, vocab = hidden.shape[0], weight.shape[0]
    weight, target = weight.to(hidden.dtype), target.contiguous()
    d_hidden = torch.empty_like(hidden)
    d_weight = torch.zeros(weight.shape if weight_grad else (0,), dtype=torch.float32, device=hidden.device)
    d_bias = torch.zeros(vocab if bias is not None else 0, dtype=torch.float32, device=hidden.device)
    losses = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    preds = torch.empty(rows, dtype=torch.int64, device=hidden.device)
    for start in range(0, rows, chunk_size):
        end = min(start + chunk_size, rows)
        h = hidden[start:end]
        logits = h @ weight.T if bias is None else torch.addmm(bias.to(h.dtype), h, weight.T)
        if use_triton:
            _loss_and_grad_kernel[(end - start,)](
                logits, target[start:end], losses[start:end], preds[start:end], logits.stride(0), vocab,
                ignore_index, label_smoothing, BLOCK=min(triton.next_power_of_2(vocab), 4096), num_warps=8,
            )
            grad = logits  # the kernel wrote the gradient over the logits
        else:
            losses[start:end], preds[start:end], grad = _loss_and_grad_torch(
                logits, target[start:end], ignore_index, label_smoothing
            )
        del logits
        torch.mm(grad, weight, out=d_hidden[start:end])
        if weight_grad:
            if grad.dtype == torch.float32:
                d_weight.addmm_(grad.T, h)
            else:  # half-precision matmul, accumulated across chunks in float32
                d_weight += grad.T @ h
        if bias is not None:
            d_bias += grad.sum(0, dtype=torch.float32)
        del grad
    scale = 1.0 if sum_reduction else 1.0 / (target != ignore_index).sum().clamp(min=1).float()
    loss = losses.sum() * scale
    d_hidden.mul_(scale)
    d_weight.mul_(scale)
    d_bias.mul_(scale)
    return loss, preds, d_hidden, d_weight.to(weight.dtype), d_bias.to(bias.dtype if bias is not None else weight.dtype)


@_forward_op.register_fake
def _(hidden, weight, target, bias, ignore_index, label_smoothing, sum_reduction, chunk_size, use_triton, weight_grad):
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty(hidden.shape[0], dtype=torch.int64),
        torch.empty_like(hidden),
        hidden.new_empty(weight.shape if weight_grad else (0,), dtype=hidden.dtype),
        hidden.new_empty(weight.shape[0] if bias is not None else 0, dtype=bias.dtype if bias is not None else hidden.dtype),
    )


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, target, bias, *_ = inputs
    ctx.save_for_backward(*output[2:])
    # the saved outputs get no gradient: no zero-filled tensors of their size (a vocab x hidden one here)
    ctx.set_materialize_grads(False)
    ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)


def _backward(ctx, d_loss, _d_preds, _d_hidden, _d_weight, _d_bias):
    d_hidden, d_weight, d_bias = ctx.saved_tensors
    weight_dtype, bias_dtype = ctx.dtypes
    # scaled in place: the forward pass's buffers become the gradients (no second vocab x hidden matrix);
    # a second backward through the same graph (retain_graph) would scale them twice
    return (
        d_hidden.mul_(d_loss),
        d_weight.mul_(d_loss).to(weight_dtype) if d_weight.numel() else None,
        None,
        d_bias.mul_(d_loss).to(bias_dtype) if bias_dtype is not None else None,
        None, None, None, None, None, None,
    )


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
    chunk_size: int | None = None, backend: str = "triton",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy of ``hidden @ weight.T + bias`` vs ``target``, arg-max prediction per row), chunked.

    ``hidden`` is (rows, hidden), ``weight`` (vocab, hidden); ``backend`` ``triton`` or ``torch`` (the
    PyTorch arithmetic, e.g. on a CPU). With ``mean`` and every row ignored the loss is 0 (not NaN).
    """
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"linear_cross_entropy reduction={reduction!r}; choose mean or sum")
    if backend not in BACKENDS:
        raise ConfigError(f"linear_cross_entropy backend={backend!r}; choose one of {', '.join(BACKENDS)}")
    if torch.is_autocast_enabled(hidden.device.type):
        # a custom op is not autocast-aware: cast like autocast would for a linear layer
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    rows = hidden2.shape[0]
    chunk = chunk_size or default_chunk_size(rows, hidden2.shape[1], weight.shape[0], hidden2.device)
    return _forward_op(
        hidden2, weight, target.reshape(-1), bias, ignore_index, float(label_smoothing), reduction == "sum",
        chunk, backend == "triton", weight.requires_grad,
    )[:2]


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
    chunk_size: int | None = None, backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense computation: all the logits at once, then ``F.cross_entropy`` (chunk_size, backend unused)."""
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    loss = F.cross_entropy(
        logits.float(), target.reshape(-1), ignore_index=ignore_index, label_smoothing=label_smoothing,
        reduction=reduction,
    )
    return loss, logits.detach().argmax(-1)
