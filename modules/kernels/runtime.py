"""Whether Triton is there, and where its kernels can run: on CUDA devices, or anywhere in its CPU interpreter."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_installed() -> bool:
    """Whether ``import triton`` can work (it ships with the CUDA builds of torch on Linux); asked once."""
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
