"""The one abstraction everything builds on: a model's parameters in ordered layer groups, and its blocks.

A backbone adapter cuts its model into groups, input side first (embeddings -> block 0 .. N-1 -> final norm), each
parameter in exactly one group; the task adds its head as the last group. Freezing schedules, layer-wise LR decay,
parameter reports, FSDP units, activation checkpointing, regional compilation and LoRA targets all derive from these
groups. ``repeated_blocks`` is the one notion of "the blocks": each group's module that sits in a module list or
sequence, of a class more than one group holds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from modules.errors import ConfigError


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


def largest_block_list(model: nn.Module) -> str:
    """Name of the ``nn.ModuleList`` / ``nn.Sequential`` (two or more children) holding the most parameters: the
    model's stack of blocks, which an adapter cuts its layer groups around."""
    best, best_size = None, -1
    for name, module in model.named_modules():
        if name and isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    if best is None:
        raise ConfigError(f"{type(model).__name__} has no list of blocks to build layer groups from")
    return best


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


def group_modules(root: nn.Module, group: LayerGroup) -> list[tuple[str, nn.Module]]:
    """The largest submodules of ``root`` made only of ``group``'s parameters (with their names), outermost first:
    ``[("encoder.layer.3", BertLayer)]`` for a BERT block, ``[("blocks.11", Block), ("norm", LayerNorm)]`` for the
    last group of a timm ViT."""
    wanted = {id(p) for p in group.params.values()}
    inside: dict[str, bool] = {}
    found: dict[str, nn.Module] = {}
    for name in group.params:
        parts = name.split(".")[:-1]
        for depth in range(1, len(parts) + 1):
            path = ".".join(parts[:depth])
            if path not in inside:
                params = {id(p) for p in root.get_submodule(path).parameters()}
                inside[path] = bool(params) and params <= wanted
            if inside[path]:
                found.setdefault(path, root.get_submodule(path))
                break
    return list(found.items())


def repeated_blocks(owner: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks of ``owner`` (a task or a backbone: anything with ``layer_groups()``), input side first: per layer
    group, the one module in it that sits in (or is) a module list or sequence, of a class that more than one group
    holds - BERT's ``encoder.layer.i``, wav2vec2's ``encoder.layers.i``, timm's ``blocks.i`` or ResNet's
    ``layer1..4``; never the first group (embeddings, stem), final norms or heads."""

    def listed(name: str, module: nn.Module) -> bool:
        parent = owner.get_submodule(name.rsplit(".", 1)[0]) if "." in name else owner
        return isinstance(parent, (nn.ModuleList, nn.Sequential)) or isinstance(module, (nn.ModuleList, nn.Sequential))

    # the first group is the input side (embeddings, stem, feature encoder) by the layer-group protocol
    per_group = [[(n, m) for n, m in group_modules(owner, g) if listed(n, m)] for g in owner.layer_groups()[1:]]
    groups_per_class = Counter(cls for found in per_group for cls in {type(m) for _, m in found})
    blocks = []
    for found in per_group:
        repeated = [(n, m) for n, m in found if groups_per_class[type(m)] > 1]
        if len(repeated) == 1:
            blocks.append(repeated[0])
    return blocks
