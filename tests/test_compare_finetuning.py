"""The strategy-comparison preset: one multirun command, one table of every job."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_SCRATCH


@pytest.mark.slow
def test_multirun_writes_the_comparison_table(tmp_path: Path, cache_dir: Path) -> None:
    tiny = [o for o in TINY_SCRATCH if not o.startswith("+callbacks.probe")]
    args = ["--multirun", "comparison=finetune_strategies", "finetune=linear_probe,gradual", *tiny,
            "finetune.every=2", "trainer.max_steps=5", "trainer.max_epochs=10", "callbacks.early_stopping=null",
            f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={tmp_path}"]
    out = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "finetune_comparison.csv")))
    assert [r["strategy"] for r in rows] == ["linear_probe", "gradual"]
    probe, gradual = rows
    assert float(probe["trainable params (end)"]) == 32 * 5 + 5  # the head alone
    assert float(gradual["trainable params (end)"]) > float(probe["trainable params (end)"])
    assert float(probe["mean trainable share"]) < 0.001 < float(gradual["mean trainable share"]) < 1.0
    assert all(0.0 <= float(r["test acc"]) <= 1.0 and float(r["wall time (s)"]) > 0 for r in rows)
    assert (tmp_path / "finetune_comparison.md").read_text().startswith("| strategy |")
    assert (tmp_path / "finetune_comparison.png").exists()
    assert "finetune_comparison" in out.stdout
