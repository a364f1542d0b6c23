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

__all__ = ["KERNEL_MODES", "resolve_kernels", "triton_can_run", "triton_installed", "triton_interpreted", "use_kernels"]

log = logging.getLogger(__name__)

KERNEL_MODES = ("auto", "torch", "triton")


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


def use_kernels(model: torch.nn.Module, blocks: str, mode: str, backbone: str) -> str:
    """Apply ``backbone.kernels=mode`` to ``model`` (its stack of blocks: the module list ``blocks``) in place;
    returns what runs: ``triton`` or ``torch``."""
    resolved = resolve_kernels(mode, backbone)
    if resolved == "torch":
        return "torch"
    from modules.kernels.surgery import apply_kernels  # defines the Triton kernels: only when they are on

    return "triton" if apply_kernels(model, blocks, backbone, strict=mode == "triton") else "torch"
