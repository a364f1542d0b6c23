"""Freezing schedules stay correct under 2-process DDP (gloo on CPU) and resume exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY_SCRATCH, run_train
from tests.test_finetuning import GROUPS, changed, probe


# slow: the fast tier keeps 2-process gradual unfreezing under FSDP2 and a 2-process DDP evaluation
@pytest.mark.slow
@pytest.mark.parametrize("lora", [pytest.param(False, id="full_weights"), pytest.param(True, id="lora")])
def test_gradual_unfreezing_under_ddp_keeps_ranks_identical(lora: bool, tmp_path: Path, cache_dir: Path) -> None:
    """With LoRA the schedule switches the blocks' adapters on (their base weights stay pinned), late ones synced alike."""
    run_dir = tmp_path / "run"
    args = [*TINY_SCRATCH, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "finetune=gradual",
            "finetune.unit=step", "finetune.every=2", "trainer.max_steps=8", "trainer.max_epochs=100",
            "test_after_fit=false", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]
    if lora:
        args = [a for a in args if a != "finetune=gradual"] + ["finetune=lora", "finetune.strategy=gradual"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rank0, rank1 = probe(run_dir, 0), probe(run_dir, 1)
    assert [s["trainable"] for s in rank0["steps"]] == [s["trainable"] for s in rank1["steps"]]
    key = "some_trainable" if lora else "trainable"  # LoRA: a block's adapters train, never all of it
    assert rank0["steps"][-1][key] == ["block_0", "block_1", "block_2", "head"]
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


@pytest.mark.slow
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


def test_gradual_unfreezing_under_fsdp2_matches_one_process(tmp_path: Path, cache_dir: Path) -> None:
    """2-process FSDP2 (gloo) with gradual unfreezing by steps, layer-wise LR decay and per-group warm-up under a decaying
    schedule: the gathered weights equal a 1-process run with the same global batch (and so do the LRs), groups never unfrozen stay bit-identical, groups unfrozen mid-run move; the exported backbone (gathered
    from the shards, rank 0 writes) loads with AutoModel and holds the best checkpoint's weights."""
    from transformers import AutoModel

    from run.checkpoints import is_sharded_checkpoint, read_checkpoint

    # the global batch is the whole (32-example) training set, so both runs train on the same examples at every step
    # (Lightning's distributed sampler deals each epoch's examples to the processes in its own shuffled order); no
    # dropout: the two runs draw their random numbers on different processes
    common = [*TINY_SCRATCH, "data.max_train_samples=32", "+trainer.check_val_every_n_epoch=4",
              "finetune=gradual", "finetune.unit=step", "finetune.every=2", "trainer.max_steps=8",
              "task.lr_decay=0.7", "finetune.unfreeze_warmup=2",  # layer-wise LR decay, per-group warm-up, decaying LR
              "trainer.max_epochs=100", "task.dropout=0", "+backbone.config_overrides.hidden_dropout_prob=0",
              "+backbone.config_overrides.attention_probs_dropout_prob=0", "callbacks.early_stopping=null"]
    run_dir = tmp_path / "fsdp2"
    args = [*common, "data.batch_size=16", "trainer=fsdp2", "trainer.accelerator=cpu", "trainer.devices=2",
            "export_backbone=hf", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_train(tmp_path / "one", [*common, "data.batch_size=32", "test_after_fit=false"], cache_dir)
    finally:
        torch.set_num_threads(threads)
    rank0, rank1, one = probe(run_dir, 0), probe(run_dir, 1), probe(tmp_path / "one")
    schedule = [s["trainable"] for s in one["steps"]]
    assert [s["lr"] for s in rank0["steps"]] == [s["lr"] for s in one["steps"]]
    step4 = one["steps"][4]["lr"]  # block_1 joined at step 4: one group below the top, first of 2 warm-up steps
    assert step4["block_1"] == pytest.approx(step4["head"] * 0.7 * 0.5)
    assert [s["trainable"] for s in rank0["steps"]] == [s["trainable"] for s in rank1["steps"]] == schedule
    assert schedule[0] == ["head"] and schedule[-1] == ["block_0", "block_1", "block_2", "head"]
    for group in GROUPS:
        assert torch.equal(rank0["end"][group], rank1["end"][group]), f"{group} differs across ranks"
        torch.testing.assert_close(rank0["end"][group], one["end"][group], rtol=1e-5, atol=1e-6, msg=f"{group}: FSDP2 vs 1 process")
    assert torch.equal(rank0["start"]["embeddings"], rank0["end"]["embeddings"])  # never reached by the schedule
    for group in ("block_0", "block_1", "block_2", "head"):  # unfrozen mid-run (or from the start), then trained
        assert changed(rank0, group), group
    best = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    assert is_sharded_checkpoint(best)  # a folder of per-process shards
    weights = read_checkpoint(best)["state_dict"]
    exported = AutoModel.from_pretrained(run_dir / "hf").state_dict()
    backbone = {k[len("backbone.model."):]: v for k, v in weights.items() if k.startswith("backbone.model.")}
    assert backbone and set(backbone) <= set(exported)  # AutoModel adds a fresh pooler (the run pooled by mean)
    for name, tensor in backbone.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.slow
def test_two_nodes_through_torchrun_end_with_identical_ranks(tmp_path: Path, cache_dir: Path) -> None:
    """``torchrun --nnodes=2 --nproc-per-node=1`` on localhost, one launcher per "node" (as on two machines sharing a
    file system), DDP with compile=regional: Lightning takes the world from torchrun's environment, and both ranks end
    with the same weights."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_dir = tmp_path / "run"
    args = [*TINY_SCRATCH, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2", "compile=regional",
            "finetune=gradual", "finetune.unit=step", "finetune.every=2", "trainer.max_steps=6", "trainer.max_epochs=100",
            "test_after_fit=false",
            f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}", "train.py", *args],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for node in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    rank0, rank1 = probe(run_dir, 0), probe(run_dir, 1)
    assert len(rank0["steps"]) == len(rank1["steps"]) == 6
    for group in GROUPS:
        assert torch.equal(rank0["end"][group], rank1["end"][group]), f"{group} differs across the nodes"
    assert changed(rank0, "head") and changed(rank0, "block_2")
    assert json.loads((run_dir / "metrics.json").read_text())["compile/frames"] >= 1


def test_evaluation_shards_score_every_example_once_in_equal_numbers_of_batches() -> None:
    """Under W processes each example of an evaluation split falls in exactly one process's batches (no padding
    repeats), every process gets the same number of batches (FSDP gathers weights in each forward), none too large."""
    from datamodules.eval_shards import EvalShards

    for size in range(2, 41):
        for world in (2, 3, 4):
            for batch in (2, 3, 5, 16):
                if size < world:
                    continue
                shards = [EvalShards(size, batch, world, rank) for rank in range(world)]
                seen = [i for s in shards for b in s for i in b]
                assert sorted(seen) == list(range(size)), (size, world, batch)
                assert len({len(list(s)) for s in shards}) == 1 and all(len(s) == len(list(s)) for s in shards)
                assert all(0 < len(b) <= batch for s in shards for b in s)
    # lengths: each process longest first, as one process evaluates
    shard = EvalShards(7, 2, 2, 0, lengths=[1, 9, 3, 8, 5, 2, 7])
    assert [i for b in shard for i in b] == [6, 4, 2, 0]


ODD_SPLITS = {  # an evaluation split of 33 examples: 2 processes cannot share it evenly
    "text": [*TINY_SCRATCH, "data.max_eval_samples=33"],
    "ner": ["experiment=wnut16_ner", *TINY_SCRATCH, "data.max_eval_samples=33"],  # entity counts summed over processes
    "vision": ["experiment=digits_scratch", "data.max_train_samples=128", "data.max_eval_samples=33", "data.batch_size=32",
               "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"],
    "speech": ["experiment=speech_digits_scratch", "data.source=${paths.cache_dir}/speech/tiny_digits", "data.generate.n=120",
               "data.generate.heldout_voices=2", "data.batch_size=8", "+backbone.config_overrides.hidden_size=64",
               "+backbone.config_overrides.num_hidden_layers=2", "+backbone.config_overrides.intermediate_size=128",
               "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"],
}


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp2", marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", [f if f == "text" else pytest.param(f, marks=pytest.mark.slow) for f in ODD_SPLITS])
def test_two_processes_score_an_odd_sized_split_as_one_process_does(family: str, strategy: str, tmp_path: Path,
                                                                    cache_dir: Path) -> None:
    """2 processes (gloo) on validation and test splits whose size the world size does not divide: the in-run test and
    last validation metrics equal ``eval.py`` in one process on the same checkpoints (Lightning's padded sampler would
    count an example twice)."""
    import shutil

    import eval as eval_script

    if family == "speech" and not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("the speech corpus needs espeak-ng and sox (apt-get install -y espeak-ng sox)")
    run_dir = tmp_path / "run"
    args = [*ODD_SPLITS[family], f"trainer={strategy}", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1",
            "callbacks.early_stopping=null", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]
    done = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    in_run = json.loads((run_dir / "metrics.json").read_text())
    tested = eval_script.evaluate(eval_script.parse([str(run_dir), "--out", str(tmp_path / "test"), "--no-progress"]))
    validated = eval_script.evaluate(eval_script.parse([str(run_dir), "--split", "val", "--checkpoint", "last",
                                                        "--out", str(tmp_path / "val"), "--no-progress"]))
    for name, value in {**tested["metrics"], **validated["metrics"]}.items():
        if name in in_run and name.startswith(("test/", "val/")):
            assert in_run[name] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, in_run[name], value)
    assert any(n.startswith("test/") for n in in_run) and any(n.startswith("val/") for n in validated["metrics"])
