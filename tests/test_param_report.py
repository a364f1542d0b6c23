"""The parameter report's numbers equal the model's and follow requires_grad changes mid-fit."""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from callbacks import ParameterReport
from callbacks.param_report import parameter_report, summary
from modules import Classifier
from modules.backbones import build_backbone
from tests.test_backbones import TINY_BERT


def tiny_classifier() -> Classifier:
    backbone = build_backbone("hf_text", **TINY_BERT)
    return Classifier(backbone, num_classes=3, optimizer=partial(torch.optim.AdamW, lr=1e-3))


def batches(n: int = 6) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1000, 2000, (12,), generator=g), "attention_mask": torch.ones(12, dtype=torch.long),
             "labels": torch.tensor(i % 3)} for i in range(n * 4)]
    return DataLoader(data, batch_size=4)


def test_report_numbers_equal_the_model() -> None:
    model = tiny_classifier()
    groups = model.layer_groups()
    rows = parameter_report(model, groups)
    assert [r.group for r in rows] == ["embeddings", "block_0", "block_1", "block_2", "head"]
    assert [r.depth for r in rows] == list(range(5))
    assert sum(r.params for r in rows) == sum(p.numel() for p in model.parameters())
    assert rows[-1].params == 32 * 3 + 3 and rows[-1].module_types == "Linear"
    assert "Embedding x3" in rows[0].module_types
    model.backbone.model.embeddings.requires_grad_(False)
    rows = parameter_report(model, groups)
    totals = summary(rows)
    assert rows[0].trainable == 0 and rows[1].trainable == rows[1].params
    assert totals["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert totals["depth"] == 5 and totals["trainable_depth"] == 4


class FreezeEmbeddingsAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            pl_module.backbone.model.embeddings.requires_grad_(False)


def test_report_refreshes_when_trainability_changes(tmp_path: Path) -> None:
    model = tiny_classifier()
    report = ParameterReport(print_table=False)
    # the freezing callback runs first, so the report sees the change at the same batch
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=5, callbacks=[FreezeEmbeddingsAt(3), report],
                         logger=pl.loggers.CSVLogger(tmp_path, name="csv", version=""), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, train_dataloaders=batches())
    assert report.refreshes == 2
    history = list(csv.DictReader(open(tmp_path / "reports" / "parameter_report_history.csv")))
    assert sorted({int(r["step"]) for r in history}) == [0, 3]
    emb = [r for r in history if r["group"] == "embeddings"]
    assert int(emb[0]["trainable"]) == int(emb[0]["params"]) and int(emb[1]["trainable"]) == 0
    latest = list(csv.DictReader(open(tmp_path / "reports" / "parameter_report.csv")))
    assert int(latest[0]["trainable"]) == 0
    assert (tmp_path / "reports" / "parameter_report.png").stat().st_size > 5000
    logged = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    trainable_logged = [float(r["params/trainable"]) for r in logged if r.get("params/trainable")]
    assert trainable_logged[0] > trainable_logged[-1] == sum(p.numel() for p in model.parameters() if p.requires_grad)
