"""Hugging Face speech encoders (wav2vec2, HuBERT, WavLM, data2vec-audio, ...) behind the backbone protocol."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, Wav2Vec2FeatureExtractor

from modules.backbones.base import Backbone, BackboneOutput, register_backbone, resolve_local_source
from modules.backbones.hf_text import load_pretrained
from modules.errors import ConfigError
from modules.kernels import use_kernels
from modules.layer_groups import LayerGroup, largest_block_list

log = logging.getLogger(__name__)

# Small encoders for training from scratch on CPU. Every size keeps wav2vec2's 320x downsampling
# (20 ms frames at 16 kHz) with a thinner, shallower conv front end, layer norm in the front end
# (so attention masks are valid), pre-norm transformer layers and no layer drop.
_SCRATCH = {
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "layerdrop": 0.0,
    "conv_bias": True,
    "mask_time_prob": 0.05,
    "mask_time_length": 5,
}
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {  # ~0.9M parameters
        **_SCRATCH,
        "conv_dim": (64, 64, 64, 64), "conv_kernel": (10, 8, 8, 8), "conv_stride": (5, 4, 4, 4),
        "hidden_size": 144, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 384,
        "num_conv_pos_embeddings": 32, "num_conv_pos_embedding_groups": 4,
        "hidden_dropout": 0.05, "attention_dropout": 0.05, "activation_dropout": 0.05, "feat_proj_dropout": 0.05,
        "final_dropout": 0.05,
    },
    "small": {  # ~6M parameters
        **_SCRATCH,
        "conv_dim": (128, 128, 128, 128, 128), "conv_kernel": (10, 8, 8, 4, 4), "conv_stride": (5, 4, 4, 2, 2),
        "hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 1024,
        "num_conv_pos_embeddings": 64, "num_conv_pos_embedding_groups": 8,
    },
    "base": {},  # the architecture's own defaults (wav2vec2-base: 95M parameters)
}


def audio_feature_extractor(config: Any, sampling_rate: int) -> Wav2Vec2FeatureExtractor:
    """The waveform feature extractor for a model built from a config (no pretrained one to load)."""
    # group-norm front ends must see zero padding, not an attention mask (see wav2vec2's docs)
    return Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=sampling_rate, padding_value=0.0, do_normalize=True,
        return_attention_mask=getattr(config, "feat_extract_norm", "layer") == "layer",
    )


@register_backbone("hf_audio")
class HFAudioBackbone(Backbone):
    """A transformers ``AutoModel`` speech encoder working on raw waveforms.

    Args:
        name_or_path: hub name (``facebook/wav2vec2-base``), local folder or ``pkg://package/sub``.
        from_scratch: build the architecture from its config with random weights.
        model_type: with ``from_scratch`` and no ``name_or_path``: ``wav2vec2``, ``hubert``, ``wavlm``, ...
        size: with ``from_scratch``: ``tiny``, ``small`` or ``base`` (see ``SIZES``).
        config_overrides: config fields to change (e.g. ``mask_time_prob``, ``hidden_size``).
        feature_extractor: where to load the feature extractor from, if not ``name_or_path``.
        freeze_feature_encoder: keep the convolutional feature encoder fixed (set false when
            training from scratch; fine-tuning schedules keep it frozen unless finetune.respect_frozen=false).
        sampling_rate: the rate of a feature extractor built for a from-scratch model.
        kernels: ``torch``, ``triton`` (fused residual + dropout + LayerNorm in post-LN encoder layers such
            as wav2vec2-base's; pre-LN ones do not match) or ``auto`` (see ``modules.kernels``).
    """

    modality = "audio"

    def __init__(
        self,
        name_or_path: str | None = None,
        from_scratch: bool = False,
        model_type: str | None = None,
        size: str | None = None,
        config_overrides: Mapping[str, Any] | None = None,
        feature_extractor: str | None = None,
        freeze_feature_encoder: bool = True,
        sampling_rate: int = 16000,
        trust_remote_code: bool = False,
        kernels: str = "auto",
    ) -> None:
        super().__init__()
        if size is not None and size not in SIZES:
            raise ConfigError(f"backbone.size={size!r} is unknown; choose one of {', '.join(SIZES)}")
        if size is not None and not from_scratch:
            raise ConfigError("backbone.size only applies with from_scratch=true (a pretrained model has its own size)")
        overrides = {**SIZES.get(size or "", {}), **dict(config_overrides or {})}
        source = resolve_local_source(name_or_path) if name_or_path else None
        if source is None and not (from_scratch and model_type):
            raise ConfigError("backbone.name_or_path is empty; give a hub name or folder, or from_scratch=true with model_type")
        if source is not None:
            config = load_pretrained(AutoConfig, source, "backbone config", trust_remote_code=trust_remote_code, **overrides)
        else:
            config = AutoConfig.for_model(model_type, **overrides)
        for required in ("conv_stride", "hidden_size"):
            if not hasattr(config, required):
                raise ConfigError(f"{type(config).__name__} is not a waveform encoder with a conv feature encoder; "
                                  "use wav2vec2, hubert, wavlm, data2vec-audio, unispeech(-sat) or sew")
        if from_scratch:
            self.model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
        else:
            self.model = load_pretrained(AutoModel, source, "backbone", config=config, trust_remote_code=trust_remote_code)
        self.model.train()  # transformers >= 5 returns models in eval mode
        extractor_source = resolve_local_source(feature_extractor) if feature_extractor else source
        if extractor_source is not None and (not from_scratch or feature_extractor):
            self.processor = load_pretrained(AutoFeatureExtractor, extractor_source, "feature extractor")
        else:
            self.processor = audio_feature_extractor(config, sampling_rate)
        if not hasattr(self.processor, "sampling_rate"):
            raise ConfigError(f"{type(self.processor).__name__} has no sampling_rate; it is not an audio feature extractor")
        self.source = source or f"scratch:{model_type}:{size or 'custom'}"
        self.feature_dim = int(config.hidden_size)
        self.pass_attention_mask = bool(getattr(self.processor, "return_attention_mask", True))
        if freeze_feature_encoder:
            if from_scratch:
                log.warning("freezing the randomly initialised feature encoder of a from-scratch model; "
                            "set backbone.freeze_feature_encoder=false to train it")
            self.feature_encoder.requires_grad_(False)
        self.fused_ops = use_kernels(self.model, largest_block_list(self.model), kernels, self.source)
        self.kernels = "triton" if self.fused_ops else "torch"

    @property
    def feature_encoder(self) -> torch.nn.Module:
        return self.model.feature_extractor

    def output_lengths(self, input_lengths: torch.Tensor) -> torch.Tensor:
        """Frames the conv feature encoder makes from ``input_lengths`` samples."""
        return self.model._get_feat_extract_output_lengths(input_lengths).long()

    def forward(self, batch: Mapping[str, torch.Tensor]) -> BackboneOutput:
        waves = batch["input_values"]
        mask = batch.get("attention_mask")
        out = self.model(waves, attention_mask=mask if self.pass_attention_mask else None)
        hidden = out.last_hidden_state
        if mask is None:
            frames = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        else:
            lengths = self.output_lengths(mask.sum(-1)).clamp(max=hidden.shape[1])
            frames = (torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]).long()
        weights = frames.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return BackboneOutput(features=hidden, pooled=pooled, mask=frames)

    def layer_groups(self) -> list[LayerGroup]:
        """conv feature encoder -> feature projection (+ positional conv) -> each transformer layer -> final norm.

        Post-norm models (wav2vec2-base) normalise *before* the first layer, so their encoder layer
        norm belongs with the projection; pre-norm ones (``do_stable_layer_norm``) normalise last.
        """
        layers = "encoder.layers."
        num_layers = len(self.model.encoder.layers)
        post_norm_last = bool(getattr(self.model.config, "do_stable_layer_norm", False))
        encoder = LayerGroup("feature_encoder")
        projection = LayerGroup("feature_projection")
        blocks = [LayerGroup(f"block_{i}") for i in range(num_layers)]
        final = LayerGroup("final")
        for name, param in self.model.named_parameters():
            full = "model." + name
            if name.startswith("feature_extractor."):
                encoder.params[full] = param
            elif name.startswith(layers):
                blocks[int(name[len(layers) :].split(".", 1)[0])].params[full] = param
            elif name.startswith("encoder.layer_norm.") and post_norm_last:
                final.params[full] = param
            elif name.startswith(("feature_projection.", "masked_spec_embed", "encoder.")):
                projection.params[full] = param
            else:  # adapters, heads of exotic variants: after the transformer
                final.params[full] = param
        return [g for g in (encoder, projection, *blocks, final) if g.params]
