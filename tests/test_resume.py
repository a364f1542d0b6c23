"""Killed with SIGKILL in the middle of an epoch and resumed from the last step checkpoint: the run ends
with exactly the weights of an uninterrupted one, for every modality and under 2-process DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY_SCRATCH, run_train
from tests.test_joint import FAST_JOINT

TINY_TEXT = [a for a in TINY_SCRATCH if "probe" not in a]
TINY_SPEECH = ["experiment=speech_digits_scratch", "data.source=${paths.cache_dir}/speech/tiny_digits", "data.generate.n=120",
               "data.generate.heldout_voices=2", "data.batch_size=8", "data.speed_perturb=[0.9,1.0,1.1]",
               "+backbone.config_overrides.hidden_size=64", "+backbone.config_overrides.num_hidden_layers=2"]
TINY_MLM = ["experiment=mlm_bbc", "data.max_documents=20", "data.block_size=32", "data.batch_size=16",
            "backbone.config_overrides.hidden_size=32", "backbone.config_overrides.num_hidden_layers=2",
            "backbone.config_overrides.num_attention_heads=2", "backbone.config_overrides.intermediate_size=64",
            "backbone.train_tokenizer.vocab_size=600", "export_backbone=null"]
# random crops (digits' augmentation) decoded by 2 loader workers
TINY_VISION = ["experiment=digits_scratch", "data.max_train_samples=320", "data.max_eval_samples=64", "data.batch_size=32",
               "data.num_workers=2"]
# name: (overrides, step to kill at); checkpoints every 3 steps, so each resumes mid-epoch from step kill_at // 3 * 3
CASES = {
    "text": (TINY_TEXT, 11),  # 6 steps per epoch: resumes at step 9, batch 3 of epoch 1
    "vision": (TINY_VISION, 13),  # 10 steps per epoch: resumes at step 12, batch 2 of epoch 1
    "speech": (TINY_SPEECH, 5),  # length-grouped batches, speed perturbation
    "mlm": (TINY_MLM, 5),  # masking drawn per batch
    "joint": ([a for a in FAST_JOINT if "datasets_seen" not in a], 11),  # 8 steps per epoch: resumes at 9, joint epoch 1
    "text_ddp": ([*TINY_TEXT, "data.batch_size=8", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], 5),
}
COMMON = ["trainer.max_epochs=2", "trainer.deterministic=true", "callbacks.early_stopping=null", "test_after_fit=false",
          "callbacks.last_checkpoint.every_n_train_steps=3", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false"]


def train(run_dir: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python train.py`` in a process of its own (the one that gets killed, and every DDP run)."""
    args = [*overrides, *COMMON, f"paths.cache_dir={cache}", f"hydra.run.dir={run_dir}"]
    # a session of its own: the kill takes every process of the run (DDP ranks too), never pytest
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {"global_step": torch.tensor(ckpt["global_step"]), **ckpt["state_dict"]}


def train_here(run_dir: Path, cache: Path, *overrides: str) -> None:
    """The same run in this process (no start-up cost), one thread like the subprocesses, so sums add up alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_train(run_dir, [*overrides, *COMMON], cache)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_kill_mid_epoch_then_resume_ends_bit_identical(case: str, tmp_path: Path, cache_dir: Path) -> None:
    overrides, kill_at = CASES[case]
    ddp = "trainer=ddp" in overrides
    cache = cache_dir  # one session cache: the tiny speech corpus and tokenizers are made once
    if ddp:
        whole = train(tmp_path / "whole", cache, *overrides)
        assert whole.returncode == 0, whole.stderr[-3000:]
    else:
        train_here(tmp_path / "whole", cache, *overrides)
    killed = train(tmp_path / "killed", cache, *overrides, "+callbacks.kill._target_=tests.probes.KillAtStep",
                   f"+callbacks.kill.step={kill_at}")
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL: no cleanup, no final checkpoint
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    saved_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert saved_at == kill_at // 3 * 3 and saved_at < kill_at  # the last step checkpoint before the kill
    if ddp:
        resumed = train(tmp_path / "resumed", cache, *overrides, f"ckpt_path={last}")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "not resumable" not in resumed.stderr
    else:
        train_here(tmp_path / "resumed", cache, *overrides, f"ckpt_path={last}")
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), f"{case}: {name} differs after kill -9 at step {kill_at} and resume"
