"""Backbone adapters, found by name: ``build_backbone(kind="hf_text", ...)``."""

from modules.backbones.base import (
    BACKBONES,
    Backbone,
    BackboneOutput,
    LayerGroup,
    build_backbone,
    check_layer_groups,
    register_backbone,
)
from modules.backbones.hf_text import HFTextBackbone
from modules.backbones.timm_backbone import TimmBackbone

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneOutput",
    "HFTextBackbone",
    "LayerGroup",
    "TimmBackbone",
    "build_backbone",
    "check_layer_groups",
    "register_backbone",
]
