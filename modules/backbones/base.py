"""The backbone-adapter protocol every task shares: features in, ordered layer groups out."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modules.errors import ConfigError


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


@dataclass
class LayerGroup:
    """A named, ordered slice of a model's parameters (input side first)."""

    name: str
    params: dict[str, nn.Parameter] = field(default_factory=dict)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.params.values())

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params.values() if p.requires_grad)

    def set_trainable(self, trainable: bool) -> None:
        for p in self.params.values():
            p.requires_grad_(trainable)


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
        """Write the wrapped model and its processor in the Hugging Face format (a ``name_or_path`` for later runs)."""
        if not self.exportable:
            raise ConfigError(f"{type(self).__name__} cannot be saved in the Hugging Face format; "
                              "leave export_backbone=null and use the run's checkpoints")
        model = self.model
        if getattr(self, "lora", None) is not None:  # LoRA adapters merged into the base weights: a plain HF model
            from modules.lora import merged_copy

            model = merged_copy(self).model
        out = Path(directory).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        if hasattr(self.processor, "save_pretrained"):
            self.processor.save_pretrained(out)
        return out


def groups_around_blocks(
    model: nn.Module, blocks_prefix: str, *, prefix: str = "", pre_name: str = "embeddings", post_name: str = "final"
) -> list[LayerGroup]:
    """Split ``model``'s parameters into [pre, block 0 .. N-1, post] around a list of blocks.

    Parameters registered before the first block go to ``pre_name``; those of ``blocks_prefix.i``
    to ``block_i``; everything after to ``post_name``. Empty groups are left out.
    """
    blocks = model.get_submodule(blocks_prefix)
    pre, post = LayerGroup(pre_name), LayerGroup(post_name)
    per_block = [LayerGroup(f"block_{i}") for i in range(len(blocks))]
    seen_block = False
    for name, param in model.named_parameters():
        full = prefix + name
        if name.startswith(blocks_prefix + "."):
            index = int(name[len(blocks_prefix) + 1 :].split(".", 1)[0])
            per_block[index].params[full] = param
            seen_block = True
        elif seen_block:
            post.params[full] = param
        else:
            pre.params[full] = param
    return [g for g in [pre, *per_block, post] if g.params]


def find_block_list(model: nn.Module) -> str:
    """Name of the ``nn.ModuleList`` holding the most parameters: a transformer's layer stack."""
    best, best_size = None, -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    if best is None:
        raise ConfigError(f"{type(model).__name__} has no list of blocks to build layer groups from")
    return best


def check_layer_groups(model: nn.Module, groups: Iterable[LayerGroup]) -> None:
    """Raise if ``groups`` do not cover every parameter of ``model`` exactly once."""
    seen: dict[int, str] = {}
    for group in groups:
        for name, p in group.params.items():
            if id(p) in seen:
                raise AssertionError(f"parameter {name} is in groups {seen[id(p)]!r} and {group.name!r}")
            seen[id(p)] = group.name
    missing = [n for n, p in model.named_parameters() if id(p) not in seen]
    if missing:
        raise AssertionError(f"{len(missing)} parameters are in no layer group, first: {missing[:3]}")


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


def rebuild_backbone(run_dir: str | Path) -> Backbone:
    """A run's backbone architecture with fresh weights, rebuilt from its ``config.yaml`` and ``backbone/`` folder
    (no download; ``modules.inference.architecture_node``)."""
    from omegaconf import OmegaConf

    from modules.inference import architecture_node

    run_dir = Path(run_dir)
    node = architecture_node(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml").backbone, resolve=True), run_dir)
    node.pop("_target_", None)
    return build_backbone(**node)


def export_state(run_dir: str | Path, state: Mapping[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Save the ``backbone.*`` weights of a task's full state dict as a Hugging Face model folder: the run's
    architecture rebuilt, given these weights, written by ``Backbone.save_pretrained``."""
    backbone = rebuild_backbone(run_dir)
    backbone.load_state_dict({k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")})
    return backbone.save_pretrained(out_dir)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Save the backbone of a tunelab run's checkpoint as a Hugging Face model folder (any exportable kind).

    The checkpoint (a file, or a sharded checkpoint folder whose shards are gathered) is read with ``weights_only``;
    ``export_state`` does the rest - the one export path that ``export_backbone`` and WiSE-FT use too.
    ``export.py`` exports the whole task.
    """
    from modules.inference import is_checkpoint, read_checkpoint

    ckpt = Path(checkpoint).expanduser()
    config_path = ckpt.parent.parent / "config.yaml"
    if not is_checkpoint(ckpt) or not config_path.is_file():
        raise ConfigError(f"{ckpt} is not a checkpoint inside a tunelab run folder (needs {config_path})")
    return export_state(ckpt.parent.parent, read_checkpoint(ckpt)["state_dict"], out_dir)
