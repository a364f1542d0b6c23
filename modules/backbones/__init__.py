"""Backbone adapters, found by name: ``build_backbone(kind="hf_text", ...)``, ``kind="hf_audio"``, ``kind="timm"``,
``kind="whisper_encoder"``.

Every adapter follows ``base.Backbone``: features in, ordered layer groups out (``modules.layer_groups``). This package
also holds the two things done to any backbone: building it (with LoRA adapters injected when asked) and saving it in
the Hugging Face format (``save_backbone``: the one backbone export every entry point uses).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modules.backbones.base import BACKBONES, Backbone, BackboneOutput, register_backbone
from modules.backbones.hf_audio import HFAudioBackbone
from modules.backbones.hf_text import HFTextBackbone
from modules.backbones.timm_backbone import TimmBackbone
from modules.backbones.whisper import WhisperEncoderBackbone
from modules.errors import ConfigError
from modules.layer_groups import LayerGroup, check_layer_groups


def build_backbone(kind: str, lora: Mapping[str, Any] | None = None, **kwargs: Any) -> Backbone:
    """Build the adapter registered as ``kind`` (e.g. ``hf_text``) with ``kwargs``; with ``lora`` (rank, alpha,
    dropout, targets: ``modules.lora``), LoRA adapters are injected into the model it built."""
    if kind not in BACKBONES:
        raise ConfigError(f"backbone.kind={kind!r} is unknown; available: {', '.join(sorted(BACKBONES))}")
    if not lora:
        return BACKBONES[kind](**kwargs)
    from modules.lora import LoraSpec, apply_lora

    spec = LoraSpec.from_config(lora)
    if kwargs.get("kernels") == "triton":
        raise ConfigError("backbone.kernels=triton with LoRA: the fused kernels read the dense weights directly and would "
                          "skip the adapters; set backbone.kernels=torch (or auto)")
    if "kernels" in kwargs:  # auto: the plain modules, which LoRA wraps
        kwargs["kernels"] = "torch"
    return apply_lora(BACKBONES[kind](**kwargs), spec)


def save_backbone(backbone: Backbone, directory: str | Path) -> Path:
    """``backbone`` in the Hugging Face format (model + tokenizer / feature extractor), usable as a later run's
    ``backbone.name_or_path``; LoRA adapters are merged into the base weights of a copy first."""
    if backbone.lora is not None:
        from modules.lora import merged_copy

        backbone = merged_copy(backbone)
    return backbone.save_pretrained(directory)


__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneOutput",
    "HFAudioBackbone",
    "HFTextBackbone",
    "LayerGroup",
    "TimmBackbone",
    "WhisperEncoderBackbone",
    "build_backbone",
    "check_layer_groups",
    "register_backbone",
    "save_backbone",
]
