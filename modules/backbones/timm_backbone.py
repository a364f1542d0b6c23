"""Any timm image model (CNN, ViT, ...) behind the backbone protocol, with timm's own layer groups."""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from timm.models import group_parameters
from torch import nn

from modules.backbones.base import Backbone, BackboneOutput, register_backbone, resolve_local_source
from modules.errors import ConfigError
from modules.layer_groups import LayerGroup, groups_around_blocks, largest_block_list

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
# a key-remapping hook: (checkpoint state dict, the model's own state dict) -> renamed state dict
RemapHook = Callable[[StateDict, StateDict], StateDict]
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def remap_in_order(source: StateDict, target: StateDict) -> StateDict:
    """Pair checkpoint tensors with the model's tensors by position (for ports whose names differ).

    Both must list the same tensors in the same order with the same shapes; source tensors left
    over at the end (a classifier the model was built without) are dropped.
    """
    pairs = list(zip(source.items(), target.items(), strict=False))
    bad = [f"{sk} {tuple(sv.shape)} -> {tk} {tuple(tv.shape)}" for (sk, sv), (tk, tv) in pairs if sv.shape != tv.shape]
    if bad or len(source) < len(target):
        first = "; ".join(bad[:3]) or f"the checkpoint has {len(source)} tensors, the model {len(target)}"
        raise ConfigError(f"checkpoint does not map in order onto the model ({len(bad)} shape mismatches, first: {first})")
    if len(source) > len(target):
        log.info(f"remap_in_order: dropped {len(source) - len(target)} trailing checkpoint tensors: {list(source)[len(target):][:4]}")
    return {tk: sv for (_, sv), (tk, _) in pairs}


def rename_prefixes(renames: Mapping[str, str]) -> RemapHook:
    """A hook that renames key prefixes, e.g. ``{"module.": "", "backbone.": ""}`` (first match wins)."""

    def remap(source: StateDict, target: StateDict) -> StateDict:
        out = {}
        for key, value in source.items():
            for old, new in renames.items():
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
            out[key] = value
        return out

    return remap


def resolve_remap_hook(remap_keys: str | Mapping[str, str] | RemapHook | None) -> RemapHook | None:
    """``remap_keys`` as a callable: a dotted function path, a prefix mapping, or a callable."""
    if remap_keys is None or callable(remap_keys):
        return remap_keys
    if isinstance(remap_keys, Mapping):
        return rename_prefixes(remap_keys)
    module_name, _, attr = str(remap_keys).rpartition(".")
    try:
        hook = getattr(importlib.import_module(module_name), attr) if module_name else None
    except ImportError:
        hook = None
    if not callable(hook):
        raise ConfigError(
            f"backbone.remap_keys={remap_keys!r} is not an importable function; give a dotted path like "
            f"modules.backbones.timm_backbone.remap_in_order or a mapping of prefix renames"
        )
    return hook


def read_state_dict(path: str) -> StateDict:
    """Tensors of a ``.pth``/``.pt``/``.bin``/``.safetensors`` file, unwrapped from common checkpoint layouts."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state: Any = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - pickle, zip and format errors differ; name the file
            raise ConfigError(f"could not read checkpoint {path}: {str(err).splitlines()[0][:160]}") from None
    for key in ("state_dict_ema", "state_dict", "model", "module"):  # timm / Lightning / DeiT layouts
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"checkpoint {path} holds no state dict of tensors")
    return dict(state)


def create_timm_model(model_name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with unknown names and offline hub failures turned into a one-line fix."""
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=4, cutoff=0.6)
        raise ConfigError(f"backbone.model_name={model_name!r} is not a timm model; close names: {', '.join(close) or 'none'}")
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if not pretrained:
            raise
        raise ConfigError(
            f"could not download pretrained weights for {model_name!r} ({str(err).splitlines()[0][:160]}); offline, "
            f"set backbone.checkpoint_path to a local weights file (and backbone.pretrained=false)"
        ) from None


@register_backbone("timm")
class TimmBackbone(Backbone):
    """A ``timm.create_model`` image model without its classifier (``num_classes=0``).

    Args:
        model_name: any name ``timm.list_models()`` knows (``resnet50``, ``vit_base_patch16_224``, ...).
        pretrained: download timm's pretrained weights from the hub (needs internet once).
        checkpoint_path: a local weights file (or ``pkg://package/file``) loaded instead of the hub.
        remap_keys: how checkpoint keys become the model's keys: a mapping of prefix renames, a
            dotted path to a ``(checkpoint, model_state) -> state`` function (e.g.
            ``modules.backbones.timm_backbone.remap_in_order``), or such a callable.
        model_kwargs: extra ``timm.create_model`` arguments (``drop_path_rate``, ``img_size``, ...).
        data_config: overrides of timm's data config (``input_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct``) for the transforms, e.g. a small ``input_size``.
        fine_groups: use timm's fine layer groups (one per sub-block) instead of coarse ones.
        channels_last: run convolutions in channels-last memory format (faster on recent GPUs).
    """

    modality = "image"

    def __init__(
        self,
        model_name: str = "resnet18",
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        remap_keys: str | Mapping[str, str] | RemapHook | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        data_config: Mapping[str, Any] | None = None,
        fine_groups: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if pretrained and checkpoint_path:
            raise ConfigError("backbone.pretrained=true and backbone.checkpoint_path are both set; choose one")
        self.model_name = model_name
        self.model = create_timm_model(model_name, pretrained, num_classes=0, **dict(model_kwargs or {}))
        if checkpoint_path:
            self.source = resolve_local_source(checkpoint_path)
            self.load_checkpoint(self.source, resolve_remap_hook(remap_keys))
        else:
            self.source = f"timm:{model_name}" + (" (hub pretrained)" if pretrained else " (random init)")
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.fine_groups = fine_groups
        self.feature_dim = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)
        self.processor = self.resolve_data_config(data_config or {})

    # -- weights ---------------------------------------------------------------------------------
    def load_checkpoint(self, path: str, remap: RemapHook | None = None) -> None:
        """Load a local weights file; raise a one-line error listing the first keys that do not fit."""
        target = self.model.state_dict()
        state = read_state_dict(path)
        if remap is not None:
            state = remap(state, target)
        head = self.model.pretrained_cfg.get("classifier") or "\0"
        heads = (head,) if isinstance(head, str) else tuple(head)
        unexpected = [k for k in state if k not in target and not k.startswith(tuple(h + "." for h in heads))]
        missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items() if k in state and state[k].shape != v.shape]
        if unexpected or missing or shapes:
            parts = [f"{len(lst)} {what} (first: {', '.join(lst[:3])})"
                     for what, lst in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)) if lst]
            raise ConfigError(
                f"checkpoint {path} does not fit timm model {self.model_name!r}: {'; '.join(parts)}; "
                f"set backbone.remap_keys (prefix renames or a function) or pick the matching model_name"
            )
        self.model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)

    def resolve_data_config(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """timm's data config for this model (input size, mean/std, interpolation, crop) + overrides."""
        unknown = sorted(set(overrides) - set(DATA_CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"backbone.data_config has unknown keys {unknown}; allowed: {', '.join(DATA_CONFIG_KEYS)}")
        args = {k: (tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v) for k, v in overrides.items()}
        config = resolve_data_config(args=args, model=self.model)
        return {k: config[k] for k in DATA_CONFIG_KEYS if k in config}

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, torch.Tensor]) -> BackboneOutput:
        images = batch["pixel_values"]
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.model.forward_features(images)
        pooled = self.model.forward_head(features, pre_logits=True)
        if features.ndim == 4:  # a feature map: (B, C, H, W), or (B, H, W, C) for NHWC models
            if str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC"):
                features = features.flatten(1, 2)
            else:
                features = features.flatten(2).transpose(1, 2)
        return BackboneOutput(features=features, pooled=pooled, mask=None)

    # -- layer groups ----------------------------------------------------------------------------
    def layer_groups(self) -> list[LayerGroup]:
        """timm's own ordered groups (``group_matcher``: stem -> blocks -> final), else around the blocks."""
        params = dict(self.model.named_parameters())
        matcher = None
        try:
            matcher = self.model.group_matcher(coarse=not self.fine_groups)
        except (AttributeError, NotImplementedError):
            pass
        if matcher is None:
            return groups_around_blocks(self.model, largest_block_list(self.model), prefix="model.", pre_name="stem")
        grouped = group_parameters(self.model, matcher)
        groups = []
        for index, group_id in enumerate(sorted(grouped)):
            names = grouped[group_id]
            label = "stem" if index == 0 and isinstance(matcher, Mapping) and "stem" in matcher else group_label(names)
            groups.append(LayerGroup(label, {f"model.{n}": params[n] for n in names}))
        return groups


def group_label(names: Sequence[str]) -> str:
    """A readable name for a group of parameters: each top-level module's common path, joined by '+'."""
    by_root: dict[str, list[list[str]]] = {}
    for name in names:
        path = name.split(".")[:-1] or [name]
        by_root.setdefault(path[0], []).append(path)
    labels = []
    for paths in by_root.values():
        common: list[str] = []
        for level in zip(*paths, strict=False):
            if len(set(level)) > 1:
                break
            common.append(level[0])
        labels.append(".".join(common))
    return "+".join(labels[:3]) + ("+..." if len(labels) > 3 else "")
