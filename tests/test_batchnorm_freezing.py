"""Frozen BatchNorm layers keep their running statistics unless train_bn=true (on a CNN backbone)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from callbacks import FinetuneSchedule
from modules import Classifier
from modules.backbones.base import Backbone, BackboneOutput
from modules.layer_groups import check_layer_groups, groups_around_blocks


class SmallConvNet(Backbone):
    """A stem and two conv-BN blocks: the smallest backbone with BatchNorm in every group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(2)])
        self.feature_dim = 8

    def forward(self, batch):
        x = self.stem(batch["pixel_values"])
        for block in self.blocks:
            x = block(x)
        features = x.flatten(2).transpose(1, 2)
        return BackboneOutput(features=features, pooled=features.mean(1))

    def layer_groups(self):
        return groups_around_blocks(self, "blocks", pre_name="stem")


def images() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(1, 8, 8, generator=g) * 3 + 1, "labels": torch.tensor(i % 2)} for i in range(32)]
    return DataLoader(data, batch_size=8)


def fit(tmp_path: Path, train_bn: bool) -> tuple[Classifier, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Classifier(SmallConvNet(), num_classes=2, optimizer=partial(torch.optim.SGD, lr=0.1))
    check_layer_groups(model, model.layer_groups())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[FinetuneSchedule(strategy="partial", top_k=1, train_bn=train_bn)])
    trainer.fit(model, train_dataloaders=images(), val_dataloaders=images())
    return model, before


@pytest.mark.parametrize("train_bn", [False, True])
def test_frozen_bn_statistics(tmp_path: Path, train_bn: bool) -> None:
    model, before = fit(tmp_path, train_bn)
    after = model.state_dict()
    frozen_stats = ["backbone.stem.1.running_mean", "backbone.stem.1.running_var", "backbone.blocks.0.1.running_mean"]
    frozen_weights = ["backbone.stem.0.weight", "backbone.blocks.0.0.weight"]
    for key in frozen_weights:
        assert torch.equal(before[key], after[key]), key  # frozen convolutions never move
    for key in frozen_stats:
        assert torch.equal(before[key], after[key]) != train_bn, key
    # BN affine weights of frozen groups train only with train_bn
    assert torch.equal(before["backbone.stem.1.weight"], after["backbone.stem.1.weight"]) != train_bn
    # the top block trains either way, statistics included
    assert not torch.equal(before["backbone.blocks.1.1.running_mean"], after["backbone.blocks.1.1.running_mean"])
    assert not torch.equal(before["backbone.blocks.1.0.weight"], after["backbone.blocks.1.0.weight"])
