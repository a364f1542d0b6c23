"""The backbone-adapter protocol every task shares: features in, ordered layer groups out."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modules.errors import ConfigError
from modules.layer_groups import LayerGroup


@dataclass
class BackboneOutput:
    """What a backbone returns for a batch.

    features: per-token / per-frame / per-patch features, (batch, length, width).
    pooled: one vector per example, (batch, width).
    mask: which positions of ``features`` are real (1) or padding (0), (batch, length), or None.
    """

    features: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor | None = None


class Backbone(nn.Module):
    """Base class of backbone adapters.

    An adapter wraps a library model (transformers, timm, ...) and provides:
      * ``forward(batch) -> BackboneOutput``;
      * ``feature_dim``: width of ``features`` and ``pooled``;
      * ``layer_groups()``: ordered groups (embeddings -> block 0 .. N-1 -> final), covering every
        parameter exactly once; freezing schedules and layer-wise LR decay are built on these only;
      * ``processor``: what the data side needs to prepare inputs (tokenizer, transforms, ...).
    """

    feature_dim: int
    processor: Any = None
    modality: str = ""  # what it reads: text, image or audio (matched against the data's)
    lora: Any = None  # the LoRA spec (modules.lora.LoraSpec) when adapters were injected by build_backbone(lora=...)

    @property
    def exportable(self) -> bool:
        """Whether ``save_pretrained`` can write it in the Hugging Face format."""
        return hasattr(getattr(self, "model", None), "save_pretrained")

    def forward(self, batch: Mapping[str, torch.Tensor]) -> BackboneOutput:  # pragma: no cover
        raise NotImplementedError

    def layer_groups(self) -> list[LayerGroup]:  # pragma: no cover
        raise NotImplementedError

    def save_architecture(self, directory: str | Path) -> Path | None:
        """What rebuilds this architecture without its weights or a download (config + tokenizer / feature
        extractor), written into the run folder so eval, predict and export need nothing else; None if the
        run's config alone rebuilds it (timm)."""
        model = getattr(self, "model", None)
        if not hasattr(getattr(model, "config", None), "save_pretrained"):
            return None
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(out)
        if hasattr(self.processor, "save_pretrained"):
            self.processor.save_pretrained(out)
        return out

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the wrapped model and its processor in the Hugging Face format, as they are (a backbone with LoRA
        adapters: ``modules.backbones.save_backbone`` merges them first)."""
        if not self.exportable:
            raise ConfigError(f"{type(self).__name__} cannot be saved in the Hugging Face format; "
                              "leave export_backbone=null and use the run's checkpoints")
        if self.lora is not None:  # peft's wrapped modules are no Hugging Face model
            raise ValueError("a backbone with LoRA adapters is saved with modules.backbones.save_backbone (merged)")
        out = Path(directory).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        if hasattr(self.processor, "save_pretrained"):
            self.processor.save_pretrained(out)
        return out


def resolve_local_source(source: str) -> str:
    """Turn ``pkg://package/sub/path`` into the installed folder; check local paths exist.

    Anything that is neither a ``pkg://`` URI nor looks like a filesystem path is returned as is
    (a hub name).
    """
    if source.startswith("pkg://"):
        package, _, sub = source[len("pkg://") :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"package {package!r} (from {source!r}) is not installed; `pip install {package.replace('_', '-')}`")
        path = Path(next(iter(spec.submodule_search_locations))) / sub
        if not path.exists():
            raise ConfigError(f"{source!r} resolves to {path}, which does not exist")
        return str(path)
    expanded = Path(source).expanduser()
    looks_local = source.startswith(("/", "./", "../", "~")) or expanded.exists() or source.count("/") > 1
    if looks_local:
        if not expanded.exists():
            raise ConfigError(f"path {source!r} does not exist; check the spelling or pass a hub name like 'org/model'")
        return str(expanded)
    return source


BACKBONES: dict[str, Callable[..., Backbone]] = {}


def register_backbone(kind: str) -> Callable[[type[Backbone]], type[Backbone]]:
    """Class decorator: make an adapter buildable as ``build_backbone(kind=...)``."""

    def add(cls: type[Backbone]) -> type[Backbone]:
        BACKBONES[kind] = cls
        return cls

    return add
