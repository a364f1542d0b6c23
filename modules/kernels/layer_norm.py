"""Fused bias + dropout + residual add + LayerNorm: ``LayerNorm(dropout(x + bias) + residual)`` in one pass.

This is how every post-LN transformer sub-layer ends (BERT's ``BertSelfOutput``/``BertOutput``,
wav2vec2-base). Eager PyTorch makes four passes over the activations and stores the dropout mask;
the Triton kernels make one pass forward and one backward, save only the pre-norm sum and the
per-row mean and 1/std, and regenerate the dropout mask in the backward pass from (seed, element).

What a call costs on the host is kept to the launches themselves, because a sub-layer's work is small (a BERT-base
batch of 4,096 rows x 768 is 6 MiB: a few microseconds of bandwidth on an H100): the forward is one kernel launch
(two with dropout: the seed), the backward one kernel launch plus one reduction of the per-program partial sums of
the weight, LayerNorm-bias and bias gradients (no per-element atomics). Eagerly the op is a ``torch.autograd.Function``
over the launchers; only under ``torch.compile`` does it go through the registered custom ops, whose fake
implementations let Dynamo trace it without a graph break. Math is fp32 whatever the I/O dtype.

Import this module only after ``TRITON_INTERPRET`` is set (if it is to be): Triton reads it when the
kernels below are defined.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from modules.errors import ConfigError
from modules.kernels.runtime import triton_can_run

# -- Triton kernels ---------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    X, BIAS, RES, W, B, Y, H, MEAN, RSTD, SEED,
    stride_x, stride_res, stride_y, n_rows, n_cols, p, eps,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """``ROWS`` rows (one on a GPU), the whole row in one block: h = dropout(x + bias) + res;
    y = (h - mean) * rstd * w + b; saves h, mean and rstd."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_in = rows < n_rows
    col_in = cols < n_cols
    inside = row_in[:, None] & col_in[None, :]
    at = rows.to(tl.int64)[:, None]
    x = tl.load(X + at * stride_x + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(BIAS + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    if HAS_DROPOUT:
        # philox stream (seed, the element's flat index): the backward pass redraws the same mask
        keep = tl.rand(tl.load(SEED).to(tl.int32), rows[:, None] * n_cols + cols[None, :]) >= p
        x = tl.where(keep, x / (1.0 - p), 0.0)
    h = x + tl.load(RES + at * stride_res + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(h, axis=1) / n_cols
    centred = tl.where(inside, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=col_in, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_in, other=0.0).to(tl.float32)
    tl.store(Y + at * stride_y + cols[None, :], centred * rstd[:, None] * w[None, :] + b[None, :], mask=inside)
    tl.store(H + at * n_cols + cols[None, :], h, mask=inside)
    tl.store(MEAN + rows, mean, mask=row_in)
    tl.store(RSTD + rows, rstd, mask=row_in)


@triton.jit
def _backward_kernel(
    DY, H, W, MEAN, RSTD, SEED, DX, DRES, DW_PART, DB_PART, DBIAS_PART,
    stride_dy, n_rows, n_cols, rows_per_program, p,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """A contiguous run of rows, ``ROWS`` at a time: the input gradients, and this program's partial sums of dw, db and
    dbias, each written to its own row of the partial buffers (summed by the caller: no atomics). Without dropout the
    residual's gradient is the input's (``DRES`` is not written)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_in = cols < n_cols
    w = tl.load(W + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    db = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    dbias = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, ROWS):
        rows = start + tl.arange(0, ROWS)
        row_in = rows < last
        inside = row_in[:, None] & col_in[None, :]
        at = rows.to(tl.int64)[:, None]
        h = tl.load(H + at * n_cols + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(DY + at * stride_dy + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_in, other=0.0)[:, None]
        xhat = tl.where(inside, (h - tl.load(MEAN + rows, mask=row_in, other=0.0)[:, None]) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=1)[:, None] / n_cols
        c2 = tl.sum(wdy, axis=1)[:, None] / n_cols
        dh = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DROPOUT:
            tl.store(DRES + at * n_cols + cols[None, :], dh, mask=inside)
            keep = tl.rand(tl.load(SEED).to(tl.int32), rows[:, None] * n_cols + cols[None, :]) >= p
            dh = tl.where(keep, dh / (1.0 - p), 0.0)
        tl.store(DX + at * n_cols + cols[None, :], dh, mask=inside)
        dw += dy * xhat
        db += dy
        if HAS_BIAS:
            dbias += dh
    tl.store(DW_PART + pid * n_cols + cols, tl.sum(dw, axis=0), mask=col_in)
    tl.store(DB_PART + pid * n_cols + cols, tl.sum(db, axis=0), mask=col_in)
    if HAS_BIAS:
        tl.store(DBIAS_PART + pid * n_cols + cols, tl.sum(dbias, axis=0), mask=col_in)


# -- launch configuration: computed once per (width, device kind) --------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # not triton.cdiv: a jitted function, slow to call from the host on every launch


@functools.cache
def _config(n_cols: int, interpreted: bool) -> tuple[int, int, int]:
    """(rows per tile, block width, warps). On a GPU one row per program, its block sized to the row and the warps
    to the block (Triton's layer-norm tutorial), several rows only for narrow rows; in the interpreter, whose cost is
    per program and per loop step rather than per element, big tiles."""
    if n_cols > 65536:
        raise ConfigError(f"the fused LayerNorm handles widths up to 65536, not {n_cols}; use backbone.kernels=torch")
    block = triton.next_power_of_2(n_cols)
    if interpreted:
        return max(1, min(128, 65536 // block)), block, 1
    rows = max(1, 512 // block)
    return rows, block, min(max(rows * block // 256, 1), 16 if block > 8192 else 8)


@functools.cache
def _programs(device: torch.device) -> int:
    """Backward programs in flight: a few per multiprocessor on a GPU; few (long runs) in the interpreter."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _launch_forward(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, ln_bias: torch.Tensor,
                    bias: torch.Tensor | None, seed: torch.Tensor | None, p: float, eps: float,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, mean, rstd) with one kernel launch; y in the promoted dtype of x, residual and weight (what eager
    autocast gives: a LayerNorm's output in fp32)."""
    n_cols = x.shape[-1]
    x2, res2 = x.reshape(-1, n_cols), residual.reshape(-1, n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if res2.stride(-1) != 1:
        res2 = res2.contiguous()
    n_rows = x2.shape[0]
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, residual.dtype), weight.dtype)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    h = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    stats = torch.empty((2, n_rows), dtype=torch.float32, device=x.device)
    rows, block, warps = _config(n_cols, x.device.type != "cuda")
    if n_rows:
        _forward_kernel[(_cdiv(n_rows, rows),)](
            x2, bias if bias is not None else x2, res2, weight, ln_bias, y, h, stats[0], stats[1],
            seed if seed is not None else x2, x2.stride(0), res2.stride(0), y.stride(0), n_rows, n_cols, p, eps,
            HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0.0, ROWS=rows, BLOCK=block, num_warps=warps,
        )
    return y.view(x.shape), h, stats[0], stats[1]


def _launch_backward(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                     seed: torch.Tensor | None, p: float, has_bias: bool,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx, dresidual, dweight, dln_bias, dbias) with one kernel launch and one reduction; without dropout dx *is*
    dresidual (one buffer), and the three parameter gradients are rows of one reduced buffer."""
    n_rows, n_cols = h.shape
    dy2 = dy.reshape(-1, n_cols)
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    dx = torch.empty_like(h)
    dres = torch.empty_like(h) if p > 0.0 else dx
    rows, block, warps = _config(n_cols, h.device.type != "cuda")
    programs = max(1, min(_cdiv(n_rows, rows), _programs(h.device)))
    rows_per_program = rows * _cdiv(_cdiv(max(n_rows, 1), programs), rows)  # whole tiles
    programs = _cdiv(max(n_rows, 1), rows_per_program)
    partial = torch.empty((3 if has_bias else 2, programs, n_cols), dtype=torch.float32, device=h.device)
    if n_rows:
        _backward_kernel[(programs,)](
            dy2, h, weight, mean, rstd, seed if seed is not None else h, dx, dres, partial[0], partial[1], partial[-1],
            dy2.stride(0), n_rows, n_cols, rows_per_program, p,
            HAS_BIAS=has_bias, HAS_DROPOUT=p > 0.0, ROWS=rows, BLOCK=block, num_warps=warps,
        )
    else:
        partial.zero_()
    sums = partial.sum(1)
    if sums.dtype != weight.dtype:
        sums = sums.to(weight.dtype)
    return dx, dres, sums[0], sums[1], sums[2] if has_bias else None


# -- eager: an autograd Function over the launchers --------------------------------------------------------------


class _DropoutAddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, ln_bias, bias, seed, p, eps):  # noqa: ANN001, ANN205 - autograd's protocol
        y, h, mean, rstd = _launch_forward(x, residual, weight, ln_bias, bias, seed, p, eps)
        ctx.save_for_backward(h, weight, mean, rstd, seed)
        ctx.p, ctx.has_bias = p, bias is not None
        ctx.dtypes = (x.dtype, residual.dtype, ln_bias.dtype, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        h, weight, mean, rstd, seed = ctx.saved_tensors
        dx, dres, dw, db, dbias = _launch_backward(dy, h, weight, mean, rstd, seed, ctx.p, ctx.has_bias)
        x_dtype, res_dtype, ln_bias_dtype, bias_dtype = ctx.dtypes
        shape = dy.shape
        return (dx.view(shape).to(x_dtype), dres.view(shape).to(res_dtype), dw, db.to(ln_bias_dtype),
                dbias.to(bias_dtype) if dbias is not None else None, None, None, None)


# -- torch.compile: custom ops, opaque to Dynamo (traced through their fake implementations), with autograd -------


@torch.library.custom_op("tunelab::dropout_add_layer_norm_fwd", mutates_args=())
def _forward_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, ln_bias: torch.Tensor,
    bias: torch.Tensor | None, seed: torch.Tensor, p: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, mean, rstd): the output, and what the backward pass needs."""
    y, h, mean, rstd = _launch_forward(x, residual, weight, ln_bias, bias, seed, p, eps)
    return y, h, mean.clone(), rstd.clone()  # a custom op's outputs may not be views of one buffer


@_forward_op.register_fake
def _(x, residual, weight, ln_bias, bias, seed, p, eps):
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, residual.dtype), weight.dtype)
    return (
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty((n_rows, n_cols), dtype=out_dtype),
        x.new_empty(n_rows, dtype=torch.float32),
        x.new_empty(n_rows, dtype=torch.float32),
    )


@torch.library.custom_op("tunelab::dropout_add_layer_norm_bwd", mutates_args=())
def _backward_op(
    dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    seed: torch.Tensor, p: float, has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dresidual, dweight, dln_bias, dbias); dbias is empty without a bias."""
    dx, dres, dw, db, dbias = _launch_backward(dy, h, weight, mean, rstd, seed, p, has_bias)
    # separate tensors: a custom op's outputs may not alias one another
    return (dx, dres if dres is not dx else dx.clone(), dw.clone(), db.clone(),
            dbias.clone() if dbias is not None else h.new_empty(0, dtype=weight.dtype))


@_backward_op.register_fake
def _(dy, h, weight, mean, rstd, seed, p, has_bias):
    n_cols = h.shape[1]
    return (
        torch.empty_like(h), torch.empty_like(h), weight.new_empty(n_cols), weight.new_empty(n_cols),
        weight.new_empty(n_cols if has_bias else 0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, residual, weight, ln_bias, bias, seed, p, eps = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(h, weight, mean, rstd, seed)
    # h, mean and rstd get no gradient: no zero-filled tensors of their size
    ctx.set_materialize_grads(False)
    ctx.p, ctx.has_bias = p, bias is not None
    ctx.shapes = (x.shape, x.dtype, residual.shape, residual.dtype)
    ctx.dtypes = (ln_bias.dtype, bias.dtype if bias is not None else None)


def _backward(ctx, dy, _dh, _dmean, _drstd):
    if dy is None:  # the output was not used
        return (None,) * 8
    h, weight, mean, rstd, seed = ctx.saved_tensors
    dx, dres, dw, db, dbias = _backward_op(dy, h, weight, mean, rstd, seed, ctx.p, ctx.has_bias)
    x_shape, x_dtype, res_shape, res_dtype = ctx.shapes
    ln_bias_dtype, bias_dtype = ctx.dtypes
    return (
        dx.view(x_shape).to(x_dtype), dres.view(res_shape).to(res_dtype), dw, db.to(ln_bias_dtype),
        dbias.to(bias_dtype) if ctx.has_bias else None, None, None, None,
    )


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# -- public functions: the fused op and its reference share one signature --------------------------


def draw_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed from torch's generator (so ``torch.manual_seed`` reproduces masks); traceable."""
    return torch.randint(0, 2**31 - 1, (), device=device, dtype=torch.int64)


def dropout_add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, ln_bias: torch.Tensor,
    bias: torch.Tensor | None = None, p: float = 0.0, eps: float = 1e-5, seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``layer_norm(dropout(x + bias, p) + residual) * weight + ln_bias`` over the last dim, fused (Triton).

    ``seed`` (an int64 scalar tensor) fixes the dropout mask; by default one is drawn from torch's generator (only
    when ``p > 0``)."""
    if not triton_can_run(x.device):
        raise ConfigError(f"the Triton LayerNorm kernel got a {x.device.type} tensor; it needs CUDA (or TRITON_INTERPRET=1 "
                          "for the CPU interpreter); use backbone.kernels=torch")
    p, eps = float(p), float(eps)
    if seed is None and p > 0.0:
        seed = draw_seed(x.device)
    if torch.compiler.is_compiling():
        if seed is None:  # the op's schema takes a tensor; without dropout nothing reads it
            seed = x.new_zeros((), dtype=torch.int64)
        return _forward_op(x, residual, weight, ln_bias, bias, seed, p, eps)[0]
    return _DropoutAddLayerNorm.apply(x, residual, weight, ln_bias, bias, seed, p, eps)


def dropout_add_layer_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, ln_bias: torch.Tensor,
    bias: torch.Tensor | None = None, p: float = 0.0, eps: float = 1e-5, seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same computation in eager PyTorch (its dropout mask comes from torch's own generator, not ``seed``)."""
    if bias is not None:
        x = x + bias
    return F.layer_norm(F.dropout(x, p, training=p > 0) + residual, (x.shape[-1],), weight, ln_bias, eps)


def post_norm(
    x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm, bias: torch.Tensor | None, p: float
) -> torch.Tensor:
    """``norm(dropout(x + bias, p) + residual)``: fused where Triton runs on ``x``'s device, eager elsewhere."""
    if not triton_can_run(x.device):  # e.g. a CUDA machine training on CPU: the same arithmetic, eagerly
        return dropout_add_layer_norm_reference(x, residual, norm.weight, norm.bias, bias, p, norm.eps)
    return dropout_add_layer_norm(x, residual, norm.weight, norm.bias, bias, p, norm.eps)


class DropoutAddLayerNorm(nn.Module):
    """``LayerNorm(dropout(x + bias) + residual)`` around an existing ``nn.LayerNorm`` (its parameters)."""

    def __init__(self, norm: nn.LayerNorm, p: float = 0.0) -> None:
        super().__init__()
        self.norm = norm
        self.p = p

    def forward(self, x: torch.Tensor, residual: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return post_norm(x, residual, self.norm, bias, self.p if self.training else 0.0)
