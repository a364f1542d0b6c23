"""Whether Triton is there, and where its kernels can run: on CUDA devices, or anywhere in its CPU interpreter."""

from __future__ import annotations

import importlib.util
import os

import torch

_INSTALLED: list[bool] = []  # asked once; a plain global, which torch.compile traces (some releases break on lru_cache)


def triton_installed() -> bool:
    """Whether ``import triton`` can work (it ships with the CUDA builds of torch on Linux); asked once."""
    if not _INSTALLED:
        _INSTALLED.append(importlib.util.find_spec("triton") is not None)
    return _INSTALLED[0]


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
