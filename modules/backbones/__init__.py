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

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneOutput",
    "HFTextBackbone",
    "LayerGroup",
    "build_backbone",
    "check_layer_groups",
    "register_backbone",
]
