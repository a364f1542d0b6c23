"""Backbone adapters, found by name: ``build_backbone(kind="hf_text", ...)``, ``kind="hf_audio"``, ..."""

from modules.backbones.base import (
    BACKBONES,
    Backbone,
    BackboneOutput,
    LayerGroup,
    build_backbone,
    check_layer_groups,
    export_checkpoint,
    register_backbone,
)
from modules.backbones.hf_audio import HFAudioBackbone
from modules.backbones.hf_text import HFTextBackbone
from modules.backbones.timm_backbone import TimmBackbone

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneOutput",
    "HFAudioBackbone",
    "HFTextBackbone",
    "LayerGroup",
    "TimmBackbone",
    "build_backbone",
    "check_layer_groups",
    "export_checkpoint",
    "register_backbone",
]
