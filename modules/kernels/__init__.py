"""Fused training kernels (Triton) with pure-PyTorch references, and the one switch that turns them on.

One file per op: ``layer_norm`` (bias + dropout + residual add + LayerNorm) and ``cross_entropy``
(linear + cross-entropy, chunked over rows). ``surgery`` swaps the fused modules into a Hugging Face
encoder instance. The op files define their Triton kernels at import, and Triton decides then whether
they run interpreted (``TRITON_INTERPRET=1``): so this package imports them only when the kernels are on.
"""

from __future__ import annotations

import logging

import torch

from modules.errors import ConfigError
from modules.kernels.runtime import triton_can_run, triton_installed, triton_interpreted

__all__ = ["KERNEL_MODES", "MEASURED_FASTER", "OPS", "device_class", "resolve_kernels", "triton_can_run", "triton_installed",
           "triton_interpreted", "use_kernels"]

log = logging.getLogger(__name__)

KERNEL_MODES = ("auto", "torch", "triton")
OPS = ("layer_norm", "cross_entropy")
# What `backbone.kernels=auto` turns on: per class of GPU (``device_class``), the fused ops measured faster than the
# PyTorch path *and* than torch.compile of the same function, each with the measurement it rests on (bench/kernels.py
# on that class of device, recorded in docs/benchmarks.md). Until an op has such a measurement, auto means the PyTorch
# modules. The first H200 check (2026-12-04) measured both ops slower than eager in whole training steps: none here.
MEASURED_FASTER: dict[str, dict[str, str]] = {}


def device_class(device: torch.device | None = None) -> str:
    """``sm_90`` (Hopper), ``sm_80`` (Ampere), ...: kernels tuned for one class behave alike on its members."""
    if not torch.cuda.is_available():
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def resolve_kernels(mode: str, backbone: str) -> frozenset[str]:
    """The fused ops to use. ``torch``: none. ``triton``: every op; where Triton cannot run they stay on with a
    logged warning (the fused modules then compute the same in PyTorch), and without Triton installed at all it is
    none, with a logged warning. ``auto``: the ops measured faster on this machine's class of GPU (``MEASURED_FASTER``)."""
    if mode not in KERNEL_MODES:
        raise ConfigError(f"backbone.kernels={mode!r} is unknown; choose one of {', '.join(KERNEL_MODES)}")
    if mode == "torch":
        return frozenset()
    if mode == "auto":
        if not (triton_installed() and torch.cuda.is_available()):
            return frozenset()
        measured = MEASURED_FASTER.get(device_class(), {})
        if not measured:
            log.info("backbone.kernels=auto for %s: the PyTorch modules (no fused op is measured faster than PyTorch "
                     "and torch.compile on %s; backbone.kernels=triton turns them on anyway)", backbone, device_class())
        return frozenset(measured)
    if not triton_installed():  # the op modules import Triton: the plain model then
        log.warning("backbone.kernels=triton for %s, but Triton is not installed (it comes with the CUDA builds of "
                    "torch): running the model as Hugging Face builds it", backbone)
        return frozenset()
    if not triton_can_run():
        # stated fallback, not an error: the fused modules keep the same arithmetic in PyTorch (the chunked
        # cross-entropy still never builds all the logits), so a config runs unchanged on a CPU machine
        log.warning(
            "backbone.kernels=triton for %s, but there is no CUDA GPU and TRITON_INTERPRET is not set: the fused "
            "modules run their PyTorch path (TRITON_INTERPRET=1 runs the Triton kernels in the CPU interpreter, "
            "slowly)", backbone,
        )
    return frozenset(OPS)


def use_kernels(model: torch.nn.Module, blocks: str, mode: str, backbone: str) -> frozenset[str]:
    """Apply ``backbone.kernels=mode`` to ``model`` (its stack of blocks: the module list ``blocks``) in place;
    returns the fused ops in use (the fused LayerNorm only if the model has post-LN sub-layers to swap)."""
    ops = resolve_kernels(mode, backbone)
    if "layer_norm" in ops:
        from modules.kernels.surgery import apply_kernels  # defines the Triton kernels: only when they are on

        if not apply_kernels(model, blocks, backbone, strict=mode == "triton"):
            ops = ops - {"layer_norm"}
    return ops
