"""Freezing schedules stay correct under 2-process DDP (gloo on CPU) and resume exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import ROOT, TINY_SCRATCH, run_train
from tests.test_finetuning import GROUPS, changed, probe


def test_gradual_unfreezing_under_ddp_keeps_ranks_identical(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*TINY_SCRATCH, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "finetune=gradual",
            "finetune.unit=step", "finetune.every=2", "trainer.max_steps=8", "trainer.max_epochs=100",
            "test_after_fit=false", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rank0, rank1 = probe(run_dir, 0), probe(run_dir, 1)
    assert [s["trainable"] for s in rank0["steps"]] == [s["trainable"] for s in rank1["steps"]]
    assert rank0["steps"][-1]["trainable"] == ["block_0", "block_1", "block_2", "head"]
    for group in GROUPS:
        assert torch.equal(rank0["start"][group], rank1["start"][group]), f"{group} differs at start"
        assert torch.equal(rank0["end"][group], rank1["end"][group]), f"{group} differs across ranks after training"
    for group in ("block_0", "block_1", "block_2", "head"):  # unfrozen mid-run (or from the start) and trained
        assert changed(rank0, group), group
    assert not changed(rank0, "embeddings")  # never reached by the schedule


def test_resume_mid_schedule_ends_with_the_same_weights(tmp_path: Path, cache_dir: Path) -> None:
    common = [*TINY_SCRATCH, "finetune=gradual", "finetune.unit=epoch", "finetune.every=1", "trainer.deterministic=true",
              "test_after_fit=false", "scheduler=cosine", "scheduler.warmup=3", "callbacks.early_stopping=null",
              "trainer.max_epochs=3"]
    run_train(tmp_path / "whole", common, cache_dir)
    # the same run, stopped after its second epoch (as if preempted), then resumed from last.ckpt
    stop = ["+callbacks.stop._target_=tests.probes.StopAfterEpoch", "+callbacks.stop.epoch=1"]
    run_train(tmp_path / "first", [*common, *stop], cache_dir)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 12
    run_train(tmp_path / "resumed", [*common, f"ckpt_path={last}"], cache_dir)
    whole, resumed = probe(tmp_path / "whole"), probe(tmp_path / "resumed")
    epoch2_whole = [s for s in whole["steps"] if s["epoch"] == 2]
    assert epoch2_whole and epoch2_whole == resumed["steps"]  # same steps, same frozen set, same LRs
    assert epoch2_whole[0]["trainable"] == ["block_1", "block_2", "head"]
    for group in GROUPS:
        assert torch.equal(whole["end"][group], resumed["end"][group]), f"{group} differs after resuming"


def test_wise_ft_sweeps_under_ddp(tmp_path: Path, cache_dir: Path) -> None:
    """The α sweep runs on every process with the run's trainer: no nested Trainer beside a live process group."""
    import csv
    import json

    run_dir = tmp_path / "run"
    args = [*TINY_SCRATCH, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=2",
            "callbacks=wise_ft", "callbacks.wise_ft.alphas=[0,0.5,1]", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(open(run_dir / "wise_ft" / "wise_ft.csv")))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [float(r["alpha"]) for r in rows] == [0.0, 0.5, 1.0]
    # α=1 is the best checkpoint itself: the sweep's validation (sharded like training's) gives its score
    assert float(rows[-1]["val/acc"]) == metrics["best/val/acc"]
    assert metrics["best/wise_ft_val_acc"] == max(float(r["val/acc"]) for r in rows) and "test/acc" in metrics
    logged = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    assert sum(1 for r in logged if r.get("val/acc")) == 2  # the sweep's validations are not in the training curves
