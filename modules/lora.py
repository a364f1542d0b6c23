"""LoRA adapters (Hugging Face ``peft``) on any backbone: injected into the model *instance* the adapter built.

``peft.inject_adapter_in_model`` swaps each target ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` for a LoRA layer that
holds the original as ``base_layer`` plus ``lora_A`` / ``lora_B``; no library class is patched and the backbone's
``forward`` is unchanged. Adapter parameters sit inside the modules they adapt, so they fall into the same layer groups
as their base weights: parameter reports, layer-wise LR decay and freezing schedules (which then switch adapters on,
group by group) work unchanged. Every base weight of the backbone is frozen for good (``base_weight_names``: the
freezing schedule pins them, whatever it unfreezes); the head trains fully.

The architecture (targets included) is part of the backbone's config (``backbone.lora``, set by ``finetune=lora``), so
checkpoints, resume, eval and predict rebuild the same wrapped modules; ``merge_lora`` folds the adapters into the base
weights for export, and ``save_adapters`` writes them alone in peft's format.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modules.errors import ConfigError

ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)  # what peft's LoRA wraps (Conv1d/Conv2d: since peft 0.14)
ADAPTER_PREFIX = "lora_"  # peft's names: lora_A, lora_B (lora_embedding_*, lora_magnitude_* for variants)


@dataclass(frozen=True)
class LoraSpec:
    """``backbone.lora``: rank, scale (alpha / rank), dropout on the adapter input, and the modules to adapt.

    ``targets``: ``auto`` (every linear / convolution inside the backbone's repeated blocks: the attention and MLP
    projections of transformers, the convolutions of ResNet stages) or a list of module names, each matching a module
    by its full name or its last parts (``query``, ``attention.self.value``, ``qkv``)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] = "auto"

    @classmethod
    def from_config(cls, node: Mapping[str, Any]) -> LoraSpec:
        unknown = sorted(set(node) - {"rank", "alpha", "dropout", "targets"})
        if unknown:
            raise ConfigError(f"backbone.lora has unknown keys {unknown}; it takes rank, alpha, dropout, targets")
        rank, alpha, dropout = node.get("rank", 8), node.get("alpha", 16.0), node.get("dropout", 0.0)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigError(f"backbone.lora.rank={rank!r} must be a whole number >= 1")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
            raise ConfigError(f"backbone.lora.alpha={alpha!r} must be a number > 0")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"backbone.lora.dropout={dropout!r} must be a number in [0, 1)")
        targets = node.get("targets", "auto")
        if isinstance(targets, str) and targets != "auto":
            targets = [targets]
        if not isinstance(targets, str):
            targets = tuple(targets or ())
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ConfigError(f"backbone.lora.targets={list(targets)!r} must be auto or a list of module names")
        return cls(int(rank), float(alpha), float(dropout), targets)


def is_adapter(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA adapter (``...query.lora_A.default.weight``)."""
    return any(part.startswith(ADAPTER_PREFIX) for part in name.split("."))


def has_lora(backbone: nn.Module) -> bool:
    return getattr(backbone, "lora", None) is not None


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linears and convolutions LoRA can wrap: grouped (depthwise) convolutions left out, as peft supports them only
    when the rank divides by the groups."""
    return {n: m for n, m in model.named_modules()
            if n and isinstance(m, ADAPTABLE) and not is_adapter(n) and getattr(m, "groups", 1) == 1}


def default_targets(backbone: Any) -> list[str]:
    """Every linear / convolution inside the backbone's repeated blocks (names relative to ``backbone.model``); a
    backbone without repeated blocks: every one outside its first layer group (embeddings, stem)."""
    from modules.layer_groups import repeated_blocks

    adaptable = adaptable_modules(backbone.model)
    blocks = [name for name, _ in repeated_blocks(backbone)]
    inside = [n for n in adaptable if any(f"model.{n}".startswith(b + ".") for b in blocks)]
    if inside:
        return inside
    first = set(backbone.layer_groups()[0].params)
    return [n for n, m in adaptable.items() if not any(f"model.{n}.{p}" in first for p, _ in m.named_parameters())]


def resolve_targets(backbone: Any, spec: LoraSpec) -> list[str]:
    """The full names (in ``backbone.model``) of the modules ``spec.targets`` names; a name matching nothing is an
    error that lists the names there are."""
    adaptable = adaptable_modules(backbone.model)
    if spec.targets == "auto":
        targets = default_targets(backbone)
    else:
        targets, missing = [], []
        for wanted in spec.targets:
            found = [n for n in adaptable if n == wanted or n.endswith("." + wanted)]
            (targets.extend(found) if found else missing.append(wanted))
        if missing:
            # the last part of each name, or the last two where it is an index in a Sequential ("downsample.0")
            leaves = sorted({".".join(n.split(".")[-2:]) if n.rsplit(".", 1)[-1].isdigit() else n.rsplit(".", 1)[-1]
                             for n in adaptable})
            raise ConfigError(
                f"backbone.lora.targets: {', '.join(map(repr, missing))} match no linear or convolution of "
                f"{type(backbone.model).__name__}; its module names end in: {', '.join(leaves[:12])}"
                f"{', ...' if len(leaves) > 12 else ''} (e.g. {next(iter(adaptable), '?')})")
        targets = list(dict.fromkeys(targets))
    if not targets:
        raise ConfigError(f"backbone.lora: {type(backbone.model).__name__} has no linear or convolution to adapt")
    return targets


def peft_config(spec: LoraSpec, targets: Sequence[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(targets))


def apply_lora(backbone: Any, spec: LoraSpec) -> Any:
    """Wrap the target modules of ``backbone.model`` with LoRA layers, in place; freeze every base weight."""
    from peft import inject_adapter_in_model

    targets = resolve_targets(backbone, spec)
    try:
        inject_adapter_in_model(peft_config(spec, targets), backbone.model)
    except ValueError as err:  # a layer peft cannot adapt with these settings
        raise ConfigError(f"backbone.lora: peft cannot adapt {type(backbone.model).__name__} as asked "
                          f"({str(err).splitlines()[0][:200]}); change backbone.lora.targets or rank") from None
    for name, param in backbone.named_parameters():
        param.requires_grad_(is_adapter(name))
    backbone.lora = spec
    backbone.lora_targets = targets
    if random_init(backbone):
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"finetune=lora on a randomly initialised backbone ({backbone.source}): its base weights stay "
                       "frozen at random values and only the low-rank adapters and the head train; load pretrained "
                       "weights (backbone.pretrained=true or backbone.checkpoint_path) or train it fully (finetune=full)")
    return backbone


def random_init(backbone: Any) -> bool:
    """Whether the backbone's weights are random (built from scratch, no hub or local weights loaded)."""
    source = str(getattr(backbone, "source", ""))
    return source.startswith("scratch:") or source.endswith("(random init)")


def base_weight_names(task: nn.Module) -> set[str]:
    """Names (in ``task``) of the backbone's base weights under LoRA: frozen whatever a schedule says."""
    backbone = getattr(task, "backbone", None)
    if backbone is None or not has_lora(backbone):
        return set()
    return {f"backbone.{n}" for n, _ in backbone.named_parameters() if not is_adapter(n)}


def merge_lora(backbone: Any) -> Any:
    """Fold every adapter into its base weight (W + scale * B @ A) and put the plain module back, in place: the
    backbone has its original modules and state-dict keys again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not has_lora(backbone):
        return backbone
    wrapped = [(n, m) for n, m in backbone.model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in wrapped:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = backbone.model.get_submodule(parent_name) if parent_name else backbone.model
        setattr(parent, child, module.get_base_layer())
    if hasattr(backbone.model, "peft_config"):
        del backbone.model.peft_config
    backbone.lora = None
    return backbone


def merged_copy(backbone: Any) -> Any:
    """A copy of ``backbone`` with its adapters merged (the backbone itself keeps them)."""
    return merge_lora(copy.deepcopy(backbone))


def save_adapters(state: Mapping[str, torch.Tensor], backbone_node: Mapping[str, Any], targets: Sequence[str],
                  out_dir: str | Path) -> Path:
    """The adapters (and the head) of a task state dict, alone, in peft's format: ``adapter_model.safetensors`` +
    ``adapter_config.json`` (``PeftModel.from_pretrained(<the base model>, out_dir)`` loads them), ``head.safetensors``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = LoraSpec.from_config(backbone_node.get("lora") or {})
    prefix = "backbone.model."
    adapters = {}
    for key, value in state.items():
        if key.startswith(prefix) and is_adapter(key):
            # peft's file format: no adapter name, under PeftModel's base_model.model.
            adapters["base_model.model." + key[len(prefix):].replace(".default.", ".")] = value.detach().cpu().contiguous()
    save_file(adapters, out / "adapter_model.safetensors")
    config = peft_config(spec, targets)
    config.base_model_name_or_path = str(backbone_node.get("name_or_path") or backbone_node.get("model_name") or "")
    config.save_pretrained(str(out))
    head = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith("head.")}
    if head:
        save_file(head, out / "head.safetensors")
    (out / "tunelab_lora.json").write_text(json.dumps({**asdict(spec), "targets_resolved": list(targets)}, indent=1))
    return out
