"""Fused training kernels (Triton) with pure-PyTorch references, and the one switch that turns them on.

One file per op: ``layer_norm`` (bias + dropout + residual add + LayerNorm) and ``cross_entropy``
(linear + cross-entropy, chunked over rows). ``surgery`` swaps the fused modules into a Hugging Face
encoder instance. The op files define their Triton kernels at import, and Triton decides then whether
they run interpreted (``TRITON_INTERPRET=1``): so this package imports them only when the kernels are on.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from modules.errors import ConfigError

log = logging.getLogger(__name__)

KERNEL_MODES = ("auto", "torch", "triton")


def triton_installed() -> bool:
    """Whether ``import triton`` can work (it ships with the CUDA builds of torch on Linux)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_can_run(device: torch.device | None = None) -> bool:
    """Whether a Triton kernel can run on ``device`` (any device: whether one exists that it can run on)."""
    if not triton_installed():
        return False
    if triton_interpreted():
        return True
    if device is None:
        return torch.cuda.is_available()
    return device.type == "cuda"


def resolve_kernels(mode: str, backbone: str) -> str:
    """``auto`` -> ``triton`` on a CUDA machine with Triton, else ``torch``. ``triton`` where Triton cannot run
    stays ``triton`` with a logged warning (the fused modules then compute the same in PyTorch), or, without
    Triton installed at all, becomes ``torch`` with a logged warning."""
    if mode not in KERNEL_MODES:
        raise ConfigError(f"backbone.kernels={mode!r} is unknown; choose one of {', '.join(KERNEL_MODES)}")
    if mode == "auto":
        return "triton" if triton_installed() and torch.cuda.is_available() else "torch"
    if mode == "triton" and not triton_installed():  # the op modules import Triton: the plain model then
        log.warning("backbone.kernels=triton for %s, but Triton is not installed (it comes with the CUDA builds of "
                    "torch): running the model as Hugging Face builds it", backbone)
        return "torch"
    if mode == "triton" and not triton_can_run():
        # stated fallback, not an error: the fused modules keep the same arithmetic in PyTorch (the chunked
        # cross-entropy still never builds all the logits), so a config runs unchanged on a CPU machine
        log.warning(
            "backbone.kernels=triton for %s, but there is no CUDA GPU and TRITON_INTERPRET is not set: the fused "
            "modules run their PyTorch path (TRITON_INTERPRET=1 runs the Triton kernels in the CPU interpreter, "
            "slowly)", backbone,
        )
    return mode


def use_kernels(model: torch.nn.Module, mode: str, backbone: str) -> str:
    """Apply ``backbone.kernels=mode`` to ``model`` in place; returns what runs: ``triton`` or ``torch``."""
    resolved = resolve_kernels(mode, backbone)
    if resolved == "torch":
        return "torch"
    from modules.kernels.surgery import apply_kernels  # defines the Triton kernels: only when they are on

    return "triton" if apply_kernels(model, backbone, strict=mode == "triton") else "torch"
