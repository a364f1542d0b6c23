"""Killed with SIGKILL in the middle of an epoch and resumed from the last step checkpoint: the run ends
with exactly the weights of an uninterrupted one, for every modality and under 2-process DDP; ``resume=`` continues
in the run's own folder with its metrics whole. Signals stop at a step boundary with a checkpoint; a kill while saving
leaves the previous checkpoint whole."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from run.checkpoints import read_checkpoint
from tests.conftest import ROOT, TINY_SCRATCH, run_train
from tests.test_joint import FAST_JOINT

TINY_TEXT = [a for a in TINY_SCRATCH if "probe" not in a]
TINY_SPEECH = ["experiment=speech_digits_scratch", "data.source=${paths.cache_dir}/speech/tiny_digits", "data.generate.n=120",
               "data.generate.heldout_voices=2", "data.batch_size=8", "data.speed_perturb=[0.9,1.0,1.1]",
               "+backbone.config_overrides.hidden_size=64", "+backbone.config_overrides.num_hidden_layers=2"]
# the Whisper encoder adapter (random tiny weights): log-mel input at the clips' real length
TINY_WHISPER = ["experiment=speech_digits_scratch", "backbone=whisper", "backbone.name_or_path=null", "backbone.from_scratch=true",
                "backbone.size=tiny", "data.source=${paths.cache_dir}/speech/tiny_digits", "data.generate.n=120",
                "data.generate.heldout_voices=2", "data.batch_size=8"]
TINY_MLM = ["experiment=mlm_bbc", "data.max_documents=20", "data.block_size=32", "data.batch_size=16",
            "backbone.config_overrides.hidden_size=32", "backbone.config_overrides.num_hidden_layers=2",
            "backbone.config_overrides.num_attention_heads=2", "backbone.config_overrides.intermediate_size=64",
            "backbone.train_tokenizer.vocab_size=600", "export_backbone=null"]
# random crops (digits' augmentation) decoded by 2 loader workers
TINY_VISION = ["experiment=digits_scratch", "data.max_train_samples=320", "data.max_eval_samples=64", "data.batch_size=32",
               "data.num_workers=2"]
# name: overrides. Each is killed at a step drawn at random (seeded by the name) across its run, resumed from the last
# checkpoint before it (every 3 steps)
CASES = {
    "text": TINY_TEXT,
    # 2 micro-batches per step, an EMA of the weights and last.ckpt at every step boundary (the timed checkpoint)
    "text_accumulate_ema": [*TINY_TEXT, "trainer.accumulate_grad_batches=2", "callbacks=ema", "callbacks.ema.decay=0.5",
                            "callbacks.timed_checkpoint.minutes=0"],
    "vision": TINY_VISION,
    "speech": TINY_SPEECH,  # length-grouped batches, speed perturbation
    "speech_whisper": [*TINY_WHISPER, "data.speed_perturb=[0.9,1.0,1.1]"],
    "mlm": TINY_MLM,  # masking drawn per batch
    "joint": [a for a in FAST_JOINT if "datasets_seen" not in a],
    "ner": ["experiment=wnut16_ner", *TINY_TEXT],  # token classification on tweets: entity scores as epoch metrics
    # LoRA adapters switched on group by group, every 3 steps
    "text_lora": [*TINY_TEXT, "finetune=lora", "finetune.strategy=gradual", "finetune.unit=step", "finetune.every=3"],
    "text_ddp": [*TINY_TEXT, "data.batch_size=8", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
    # sharded checkpoint folders; gradual unfreezing: a group joins every 3 steps, as checkpoints are saved
    "text_fsdp2": [*TINY_TEXT, "data.batch_size=8", "trainer=fsdp2", "trainer.accelerator=cpu", "trainer.devices=2",
                   "finetune=gradual", "finetune.unit=step", "finetune.every=3"],
}
COMMON = ["trainer.max_epochs=2", "trainer.deterministic=true", "callbacks.early_stopping=null",
          "callbacks.last_checkpoint.every_n_train_steps=3", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false"]


def train(run_dir: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python train.py`` in a process of its own (the one that gets killed, and every DDP run)."""
    args = [*overrides, *COMMON, f"paths.cache_dir={cache}", f"hydra.run.dir={run_dir}"]
    # a session of its own: the kill takes every process of the run (DDP ranks too), never pytest
    # not pytest's W&B service (in-process runs start one and export its address): a killed run would stay "in use" there
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**env, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def load(ckpt: Path) -> dict:
    """A checkpoint file or sharded folder these tests' own runs wrote (a full unpickle; shards gathered)."""
    return read_checkpoint(ckpt, trust=True)


def step_of(ckpt: Path) -> int:
    """The optimizer step a checkpoint was saved at."""
    return load(ckpt)["global_step"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = load(run_dir / "checkpoints" / "last.ckpt")
    return {"global_step": torch.tensor(ckpt["global_step"]), **ckpt["state_dict"]}


def train_here(run_dir: Path, cache: Path, *overrides: str) -> None:
    """The same run in this process (no start-up cost), one thread like the subprocesses, so sums add up alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_train(run_dir, [*overrides, *COMMON], cache)
    finally:
        torch.set_num_threads(threads)


def kill_step(case: str, total: int) -> int:
    """Where the run of ``case`` is killed: a step drawn at random, seeded by the name, after the first checkpoint
    (step 3) and before the last step."""
    return random.Random(case).randint(4, total - 1)


# the fast tier resumes the hardest single-process case; the slow tier (pytest -m slow) every modality, DDP and FSDP2
@pytest.mark.parametrize("case", [c if c == "text_accumulate_ema" else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_kill_mid_epoch_then_resume_ends_bit_identical(case: str, tmp_path: Path, cache_dir: Path) -> None:
    """SIGKILL at a random step, resumed from the last checkpoint: the final weights, ``metrics.json`` (validation, test
    and the train figures) and, in the run's own folder, ``metrics.csv`` row for row equal an uninterrupted run's."""
    overrides = CASES[case]
    ddp = "trainer=ddp" in overrides or "trainer=fsdp2" in overrides  # several processes: every run in subprocesses
    cache = cache_dir  # one session cache: the tiny speech corpus and tokenizers are made once
    if ddp:
        whole = train(tmp_path / "whole", cache, *overrides)
        assert whole.returncode == 0, whole.stderr[-3000:]
    else:
        train_here(tmp_path / "whole", cache, *overrides)
    kill_at = kill_step(case, step_of(tmp_path / "whole" / "checkpoints" / "last.ckpt"))
    killed = train(tmp_path / "killed", cache, *overrides, "+callbacks.kill._target_=tests.probes.KillAtStep",
                   f"+callbacks.kill.step={kill_at}")
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL: no cleanup, no final checkpoint
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    saved_at = step_of(last)
    assert kill_at - 3 <= saved_at < kill_at  # the last step checkpoint before the kill
    if "callbacks.timed_checkpoint.minutes=0" in overrides:
        assert saved_at == kill_at - 1  # the timed checkpoint: at every optimizer-step boundary
    if ddp:  # ckpt_path: a new run folder from the checkpoint
        resumed = train(tmp_path / "resumed", cache, *overrides, f"ckpt_path={last}")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "not resumable" not in resumed.stderr
    else:  # resume=: the same run, continued in its own folder with its own config
        train_here(tmp_path / "killed", cache, f"resume={tmp_path / 'killed'}", "+callbacks.kill=null")
    resumed = tmp_path / ("resumed" if ddp else "killed")
    what = f"{case}: after kill -9 at step {kill_at} and resume from step {saved_at}"
    assert_same_weights(tmp_path / "whole", resumed, what)
    assert_same_metrics_json(tmp_path / "whole", resumed, what)
    if not ddp:
        assert_same_metrics_csv(tmp_path / "whole", resumed)


def assert_same_weights(a_dir: Path, b_dir: Path, what: str) -> None:
    a, b = final_weights(a_dir), final_weights(b_dir)
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), f"{what}: {name} differs"


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(file)]


def assert_same_metrics_csv(whole: Path, resumed: Path) -> None:
    """The resumed run's metrics.csv holds the whole run: every row of the uninterrupted run, once, in order, with the
    same values (the interrupted epoch's train figures too: their running state is in the checkpoint)."""
    a, b = metric_rows(whole), metric_rows(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x == y


def assert_same_metrics_json(whole: Path, resumed: Path, what: str) -> None:
    """The final metrics, all of them but the wall-clock times."""
    a, b = (json.loads((run / "metrics.json").read_text()) for run in (whole, resumed))
    assert {k: v for k, v in a.items() if not k.startswith("time/")} == {k: v for k, v in b.items() if not k.startswith("time/")}, what


@pytest.mark.slow
def test_sigterm_saves_at_the_step_then_resume_is_exact(tmp_path: Path, cache_dir: Path) -> None:
    """SIGTERM in the middle of step 8 (mid-epoch): the step completes, last.ckpt is saved at step 8, the run exits
    143 with one line saying how to continue; ``resume=`` ends bit-identical to an uninterrupted run, metrics whole."""
    train_here(tmp_path / "whole", cache_dir, *TINY_TEXT)
    run = tmp_path / "stopped"
    stopped = train(run, cache_dir, *TINY_TEXT, "+callbacks.stop._target_=tests.probes.SignalAtStep", "+callbacks.stop.step=8")
    assert stopped.returncode == 128 + 15, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (f"tunelab: stopped: SIGTERM at optimizer step 8: saved {run}/checkpoints/"
                                                        f"last.ckpt; continue with: python train.py resume={run}")
    assert step_of(run / "checkpoints" / "last.ckpt") == 8
    assert not (run / "metrics.json").exists()  # no test, no export: it only stopped
    resumed = train(run, cache_dir, f"resume={run}", "+callbacks.stop=null")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "whole", run, "after SIGTERM at step 8 and resume=")
    assert_same_metrics_json(tmp_path / "whole", run, "after SIGTERM at step 8 and resume=")
    assert_same_metrics_csv(tmp_path / "whole", run)
    assert (run / "train.log").read_text().count("received SIGTERM") == 1  # one log, continued


@pytest.mark.slow
def test_sigterm_between_micro_batches_stops_at_the_end_of_the_optimizer_step(tmp_path: Path, cache_dir: Path) -> None:
    """Under gradient accumulation (2 micro-batches a step) SIGTERM after the backward of micro-batch 7, the first half
    of step 4: the run trains micro-batch 8, takes step 4, saves it and stops; ``resume=`` ends with the weights, EMA,
    metrics.json and metrics.csv of an uninterrupted run (a save after micro-batch 7 would lose its gradients)."""
    overrides = [*TINY_TEXT, "trainer.accumulate_grad_batches=2", "callbacks=ema", "callbacks.ema.decay=0.5"]
    train_here(tmp_path / "whole", cache_dir, *overrides)
    run = tmp_path / "stopped"
    stopped = train(run, cache_dir, *overrides, "+callbacks.stop._target_=tests.probes.SignalAtMicroBatch", "+callbacks.stop.batch=7")
    assert stopped.returncode == 128 + 15, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith("tunelab: stopped: SIGTERM at optimizer step 4: saved ")
    assert step_of(run / "checkpoints" / "last.ckpt") == 4
    resumed = train(run, cache_dir, f"resume={run}", "+callbacks.stop=null")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "whole", run, "after SIGTERM in the middle of step 4 and resume=")
    assert_same_metrics_json(tmp_path / "whole", run, "after SIGTERM in the middle of step 4 and resume=")
    assert_same_metrics_csv(tmp_path / "whole", run)


@pytest.mark.slow
def test_killed_during_the_test_then_resumed_writes_each_checkpoint_once(tmp_path: Path, cache_dir: Path) -> None:
    """SIGKILL at the first test batch, after training wrote its checkpoints: ``resume=`` validates the last step again
    and tests, ending with the uninterrupted run's metrics and one best checkpoint, not a second copy (``-v1``)."""
    train_here(tmp_path / "whole", cache_dir, *TINY_TEXT)
    run = tmp_path / "killed"
    killed = train(run, cache_dir, *TINY_TEXT, "+callbacks.kill._target_=tests.probes.KillDuringTest")
    assert killed.returncode == -9, killed.stderr[-3000:]
    before = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    resumed = train(run, cache_dir, f"resume={run}", "+callbacks.kill=null")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == before == ["best-epoch01-step12.ckpt", "last.ckpt"]
    assert_same_weights(tmp_path / "whole", run, "after kill -9 during the test and resume=")
    assert_same_metrics_json(tmp_path / "whole", run, "after kill -9 during the test and resume=")


@pytest.mark.parametrize("name", ["SIGINT", pytest.param("SIGUSR1", marks=pytest.mark.slow)])
def test_ctrl_c_and_slurm_warning_stop_at_the_step_with_a_checkpoint(tmp_path: Path, cache_dir: Path, name: str) -> None:
    run = tmp_path / "run"
    stopped = train(run, cache_dir, *TINY_TEXT, "+callbacks.stop._target_=tests.probes.SignalAtStep", "+callbacks.stop.step=4",
                    f"+callbacks.stop.signal={name}")
    signum = {"SIGINT": 2, "SIGUSR1": 10}[name]
    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1].startswith(f"tunelab: stopped: {name} at optimizer step 4: saved ")
    assert step_of(run / "checkpoints" / "last.ckpt") == 4


@pytest.mark.slow
def test_kill_while_saving_leaves_the_previous_checkpoint_whole(tmp_path: Path, cache_dir: Path) -> None:
    """SIGKILL with half of the step-6 checkpoint written: last.ckpt is still the step-3 one and loads; resume= goes on
    from it (and clears the half-written file)."""
    run = tmp_path / "run"
    killed = train(run, cache_dir, *TINY_TEXT, "+callbacks.kill._target_=tests.probes.KillDuringSave", "+callbacks.kill.step=6")
    assert killed.returncode == -9, killed.stderr[-3000:]
    partial = list((run / "checkpoints").glob(".*.partial-*"))
    assert partial, "the kill did not happen during a save"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)  # our run's own file
    assert ckpt["global_step"] == 3 and "state_dict" in ckpt
    resumed = train(run, cache_dir, f"resume={run}", "+callbacks.kill=null")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step_of(run / "checkpoints" / "last.ckpt") == 12  # 2 epochs of 6
    assert not list((run / "checkpoints").glob(".*.partial-*"))


@pytest.mark.slow
def test_resume_continues_tensorboard_and_the_wandb_run(tmp_path: Path, cache_dir: Path) -> None:
    """Killed at step 5, resumed from step 3 with resume=: TensorBoard holds every step once (the killed run's steps 4-5
    purged), and the resumed run logs to the same W&B run id (offline here)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loggers = ["logger=[csv,tensorboard,wandb]", "logger.wandb.offline=true", "trainer.log_every_n_steps=1"]
    whole, run = tmp_path / "whole", tmp_path / "run"
    train_here(whole, cache_dir, *TINY_TEXT, *loggers)
    killed = train(run, cache_dir, *TINY_TEXT, *loggers, "+callbacks.kill._target_=tests.probes.KillAtStep", "+callbacks.kill.step=5")
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_id = (run / "wandb_run_id").read_text()
    resumed = train(run, cache_dir, f"resume={run}", "+callbacks.kill=null")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "wandb_run_id").read_text() == run_id
    offline_runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(name.endswith(f"-{run_id}") for name in offline_runs)

    def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
        events = EventAccumulator(str(folder / "tensorboard")).Reload()
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) >= 2  # the same folder, continued
    for tag in ("train/loss_step", "val/loss"):
        assert scalars(run, tag) == scalars(whole, tag), tag
    assert_same_metrics_csv(whole, run)


def test_resume_config_is_the_runs_own_with_key_overrides_and_secrets_given_again(tmp_path: Path) -> None:
    """resume= reads the run's config.yaml, not the defaults; key=value applies on top; a group change, a misspelt key
    or a secret that was redacted (and not given again) is one line."""
    from omegaconf import OmegaConf

    from modules.errors import ConfigError
    from run.resume import resume_config
    from run.secrets import redact
    from tests.conftest import compose_config

    run = tmp_path / "run"
    saved = compose_config(run, ["optimizer.lr=3e-4", "+hf_token=s3cret"])
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"stand-in")
    written = redact(OmegaConf.to_container(saved, resolve=True))
    del written["trainer"]["gradient_clip_val"]  # a key this run's config does not have (an older version's run)
    OmegaConf.save(OmegaConf.create(written), run / "config.yaml")
    groups = ["backbone", "data", "trainer", "callbacks", "experiment"]

    def resume(*overrides: str):
        now = compose_config(tmp_path / "now", [f"resume={run}", *overrides])
        return resume_config(now, [f"resume={run}", *overrides], groups)

    with pytest.raises(ConfigError, match=r"resume: hf_token was redacted from the saved config.yaml \(a secret\)"):
        resume()
    cfg = resume("trainer.max_epochs=4", "+hf_token=s3cret")
    assert cfg.optimizer.lr == 3e-4 and cfg.trainer.max_epochs == 4 and cfg.hf_token == "s3cret"  # the default lr is 1e-4
    assert cfg.ckpt_path == str(run / "checkpoints" / "last.ckpt") and cfg.paths.output_dir == str(run)
    with pytest.raises(ConfigError, match="'backbone=bert_scratch' picks another config option"):
        resume("backbone=bert_scratch", "+hf_token=s3cret")
    # trainer=: where the run continues (its placement keys), how long and how it trains stay the run's own
    moved = resume("trainer=ddp", "trainer.devices=3", "+hf_token=s3cret", "trainer.max_epochs=4")
    assert moved.trainer.strategy == "ddp" and moved.trainer.devices == 3 and moved.trainer.sync_batchnorm
    assert moved.trainer.max_epochs == 4 and moved.optimizer.lr == 3e-4 and "gradient_clip_val" not in moved.trainer
    with pytest.raises(ConfigError, match="'trainer.gradient_clip_val=1.0': trainer.gradient_clip_val is not in the run's"):
        resume("+hf_token=s3cret", "trainer.gradient_clip_val=1.0")


def test_a_resume_refused_by_a_check_leaves_the_run_folder_untouched(tmp_path: Path, cache_dir: Path) -> None:
    """resume= with an override that a pre-flight check refuses: one line, and the run's config.yaml (and every other
    file of its folder) stays as it was; only a resume that passes every check records its overrides. (train.log, which
    Hydra opens at start-up, may grow: it records the refused attempt.)"""
    run = tmp_path / "run"
    train_here(run, cache_dir, *TINY_TEXT, "trainer.max_steps=2", "test_after_fit=false")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    refused = train(run, cache_dir, f"resume={run}", "trainer.max_steps=4", "trainer.devices=999")
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1].startswith("tunelab: error: trainer.devices=999"), refused.stderr[-2000:]
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    log = run / "train.log"
    assert after.pop(log, b"").startswith(before.pop(log, b""))
    assert after == before


def test_a_loader_resumed_mid_epoch_skips_only_in_that_epoch_with_persistent_workers() -> None:
    """2 persistent loader workers keep the DataLoader's iterator, and its index sampler, from epoch to epoch: the
    batches skipped on resuming (already trained) must be skipped in the resumed epoch only (found by a kill at a
    random step: the resumed vision run also skipped them in the next epoch, and ended 6 steps short)."""
    from datamodules.sampling import EpochAwareLoader, EpochShuffleSampler

    sampler = EpochShuffleSampler(20, seed=1)
    loader = EpochAwareLoader(list(range(20)), batch_size=4, sampler=sampler, num_workers=2, persistent_workers=True,
                              resume_at=(0, 3))
    whole = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        whole[epoch] = [batch.tolist() for batch in EpochAwareLoader(list(range(20)), batch_size=4, sampler=sampler)]
    seen = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        seen[epoch] = [batch.tolist() for batch in loader]
    assert seen[0] == whole[0][3:]  # the first 3 batches were trained before the checkpoint
    assert seen[1] == whole[1]  # the next epoch whole


def test_a_run_continued_into_a_new_folder_keeps_its_best_checkpoint_record(tmp_path: Path) -> None:
    """``ckpt_path=`` from another run: Lightning would forget the best score (a new folder) and take the next
    validation's checkpoint as the best, whatever its score, so the test would score another model (found by the
    FSDP2 resume case: best at step 12 instead of step 6). The best file is carried over with its record."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks import BestCheckpoint

    old_dir, new_dir = tmp_path / "old" / "checkpoints", tmp_path / "new" / "checkpoints"
    old_dir.mkdir(parents=True)
    best = old_dir / "best-epoch00-step6.ckpt"
    best.write_bytes(b"the best weights")
    before = ModelCheckpoint(dirpath=str(old_dir), monitor="val/acc", mode="max", save_top_k=1)
    before.best_model_path, before.best_model_score = str(best), torch.tensor(0.75)
    before.best_k_models, before.kth_best_model_path, before.kth_value = {str(best): torch.tensor(0.75)}, str(best), torch.tensor(0.75)
    after = BestCheckpoint(dirpath=str(new_dir), monitor="val/acc", mode="max", save_top_k=1)
    assert after.state_key == before.state_key  # checkpoints of either class restore into the other
    after.load_state_dict(before.state_dict())
    barriers = []
    after.on_train_start(SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda: barriers.append(1))), None)
    carried = new_dir / best.name
    assert carried.read_bytes() == b"the best weights" and barriers == [1]
    assert after.best_model_path == str(carried) and float(after.best_model_score) == 0.75
    assert after.best_k_models == {str(carried): torch.tensor(0.75)}
    # a worse score later is no new best (Lightning's own check, on the carried record)
    one_process = SimpleNamespace(strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, **_: decision))
    assert not after.check_monitor_top_k(one_process, torch.tensor(0.5))
    assert after.check_monitor_top_k(one_process, torch.tensor(0.9))
    # the files are gone: the record starts afresh, said in the log
    best.unlink()
    fresh = BestCheckpoint(dirpath=str(tmp_path / "third"), monitor="val/acc", mode="max", save_top_k=1)
    fresh.load_state_dict(before.state_dict())
    assert fresh.best_model_score is None and fresh.best_model_path == ""


# -- elastic resume: killed on N processes, continued on M ------------------------------------------------------------
SAMPLE_LOG = "+callbacks.samples._target_=tests.probes.SampleLog"
# 93 training texts (odd) in micro-batches of 5: 19 per epoch, the last short, padded to whole steps of 10 samples
ELASTIC_TEXT = [*TINY_TEXT, "data.max_train_samples=93", "data.batch_size=5", "data.global_batch_size=10", SAMPLE_LOG]
# two image datasets (random crops), one drawn per optimizer step, each with its own batch size: no global batch in
# samples; the micro-batches per step (processes x accumulation) carry over
ELASTIC_JOINT = [*CASES["joint"], SAMPLE_LOG]
ON_2 = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
FSDP2_ON_2 = ["trainer=fsdp2", "trainer.accelerator=cpu", "trainer.devices=2"]
GRADUAL = ["finetune=gradual", "finetune.unit=step", "finetune.every=3"]  # a group joins every 3 steps
# name: (how the run starts, what the resume changes, (processes, strategy) of the two segments)
ELASTIC = {
    "ddp_2_to_1": ([*ELASTIC_TEXT, *ON_2], ["trainer.devices=1"], ((2, "ddp"), (1, "ddp"))),
    "single_1_to_ddp_2": (ELASTIC_TEXT, ON_2, ((1, "single"), (2, "ddp"))),
    # sharded folders resharded at load, with the unfreezing schedule carried over
    "fsdp2_2_to_1": ([*ELASTIC_TEXT, *FSDP2_ON_2, *GRADUAL], ["trainer.devices=1"], ((2, "fsdp2"), (1, "fsdp2"))),
    # a sharded folder read as one full checkpoint by a single process; a DDP file sharded onto FSDP2
    "fsdp2_2_to_single_1": ([*ELASTIC_TEXT, *FSDP2_ON_2, *GRADUAL], ["trainer=cpu"], ((2, "fsdp2"), (1, "single"))),
    "ddp_2_to_fsdp2_2": ([*ELASTIC_TEXT, *ON_2, *GRADUAL], FSDP2_ON_2, ((2, "ddp"), (2, "fsdp2"))),
    "joint_ddp_2_to_1": ([*ELASTIC_JOINT, *ON_2, "trainer.strategy=ddp_find_unused_parameters_true"], ["trainer.devices=1"],
                         ((2, "ddp"), (1, "ddp"))),
}
# BatchNorm models (the joint preset's CNN): each forward pass normalises its micro-batch, as on one process, so the
# parameters match as closely as any; the running statistics do not: under DDP they follow rank 0's micro-batches
# (DDP broadcasts its buffers), on one process every micro-batch, so they (and the evaluation figures) differ
BATCHNORM = {"joint_ddp_2_to_1"}
# weights after a resume on another number of processes: the same gradients summed in another order (an all-reduce
# over 2 processes vs accumulation in 1), float32 rounding of ~1e-7 relative per step, grown by AdamW's normalisation
# over the run's ~20 steps; a real difference (one micro-batch other, or one step more) moves weights by ~1e-3
ELASTIC_TOLERANCE = {"rtol": 1e-4, "atol": 2e-5}


def sample_steps(run_dir: Path, pattern: str = "samples_rank*.jsonl", before: int | None = None) -> dict:
    """(epoch, optimizer step) -> the sorted micro-batches (each a sorted tuple of sample digests) it trained on."""
    steps: dict = {}
    for path in run_dir.glob(pattern):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if before is None or row["step"] < before:
                steps.setdefault((row["epoch"], row["step"]), []).append(tuple(sorted(row["samples"])))
    return {key: sorted(batches) for key, batches in steps.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ELASTIC))
def test_killed_on_n_processes_resumes_on_m_with_the_same_samples_per_step(case: str, tmp_path: Path, cache_dir: Path) -> None:
    """kill -9 mid-epoch, then ``resume=<run>`` on another number of processes: every optimizer step trains the same
    micro-batches as the uninterrupted run's (read off the batches), the global batch and the schedule stay, and the
    final weights and metrics match within float rounding; ``config.yaml`` records both segments."""
    start, change, placements = ELASTIC[case]
    whole = train(tmp_path / "whole", cache_dir, *start)
    assert whole.returncode == 0, whole.stderr[-3000:]
    total = step_of(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    kill_at = kill_step(case, total)
    run = tmp_path / "run"
    killed = train(run, cache_dir, *start, "+callbacks.kill._target_=tests.probes.KillAtStep",
                   f"+callbacks.kill.step={kill_at}")
    assert killed.returncode == -9, killed.stderr[-3000:]
    saved_at = step_of(run / "checkpoints" / "last.ckpt")
    at_kill = final_weights(run)  # the weights the resumed steps start from
    for path in run.glob("samples_rank*.jsonl"):
        path.rename(path.with_suffix(".killed"))
    resumed = train(run, cache_dir, f"resume={run}", "+callbacks.kill=null", *change)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    what = f"{case}: killed at step {kill_at}, resumed from step {saved_at}"

    expected = sample_steps(tmp_path / "whole")
    got = {**sample_steps(run, "samples_rank*.killed", before=saved_at), **sample_steps(run)}
    assert len(expected) == total and sorted(got) == sorted(expected), what
    assert got == expected, what
    assert all(len(batches) == 2 for batches in expected.values())  # 10 samples a step: 2 micro-batches of 5

    a, b = final_weights(tmp_path / "whole"), final_weights(run)
    assert a.keys() == b.keys()
    params = [k for k in a if "running_" not in k and "num_batches_tracked" not in k and k != "global_step"]

    def apart(x: dict, y: dict) -> float:
        return max(float((x[k].float() - y[k].float()).norm() / y[k].float().norm().clamp_min(1e-12)) for k in params)

    assert apart(at_kill, a) > 1e-3, f"{what}: the resumed steps hardly move the weights: the comparison would not tell"
    x, y = (json.loads((r / "metrics.json").read_text()) for r in (tmp_path / "whole", run))
    assert x.keys() == y.keys()
    if case in BATCHNORM:
        assert "BatchNorm normalises each forward pass" in resumed.stderr
        print(f"{what}: parameters {apart(b, a):.3g} apart, after moving {apart(at_kill, a):.3g}")
        for name in params:
            torch.testing.assert_close(b[name], a[name], **ELASTIC_TOLERANCE, msg=f"{what}: {name}")
        return
    print(f"{what}: weights {apart(b, a):.3g} apart (largest relative difference of a tensor), after moving "
          f"{apart(at_kill, a):.3g}")
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, **ELASTIC_TOLERANCE, msg=f"{what}: {name}")
    # every epoch figure (all processes' batches); not a "_step" value: that is one micro-batch's, rank 0's on 2
    # processes and the step's last on 1
    for key in (k for k in x if not k.startswith("time/") and not k.endswith("_step")):
        assert y[key] == pytest.approx(x[key], rel=1e-3, abs=1e-4), f"{what}: {key}"

    from omegaconf import OmegaConf

    segments = OmegaConf.to_container(OmegaConf.load(run / "config.yaml").segments)
    assert [(s["world_size"], s["strategy"]) for s in segments] == list(placements)
    assert [s["accumulate_grad_batches"] for s in segments] == [2 // world for world, _ in placements]
    assert [s["global_batch_size"] for s in segments] == [None if case.startswith("joint") else 10] * 2
    assert [s["from_step"] for s in segments] == [0, saved_at]


# -- elastic resume, the parts (fast) ------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "batch", "drop_last", "grouped"),
                         [(93, 5, False, False), (93, 5, True, False), (41, 4, False, True), (7, 5, False, False)])
def test_train_shards_deal_the_same_micro_batches_per_step_on_any_number_of_processes(size: int, batch: int,
                                                                                      drop_last: bool, grouped: bool) -> None:
    """4 processes, 2 accumulating 2, or 1 accumulating 4: every optimizer step trains the same micro-batches (an odd
    split, a short last micro-batch, length grouping, fewer micro-batches than a step takes); every process gets as
    many; every sample is trained, and only the last step repeats some (from the epoch's start) to fill it."""
    from datamodules.sampling import EpochTaggedSampler, LengthGroupedBatchSampler, TrainShards

    lengths = [float(i * 7 % 13) for i in range(size)]

    def steps(world_size: int, accumulate: int) -> list[list[tuple]]:
        mine = []
        for rank in range(world_size):
            order = EpochTaggedSampler(size, seed=3)
            source = LengthGroupedBatchSampler(order, lengths, batch, shuffle=True, seed=3, pool=2) if grouped else None
            shards = TrainShards(order, batch, drop_last, world_size, rank, accumulate, source)
            shards.set_epoch(2)
            mine.append(list(shards))
            assert len(mine[-1]) == len(shards)
        assert len({len(m) for m in mine}) == 1
        return [sorted(tuple(b) for m in mine for b in m[s * accumulate:(s + 1) * accumulate])
                for s in range(len(mine[0]) // accumulate)]

    one = steps(1, 4)
    assert steps(2, 2) == one and steps(4, 1) == one
    keys = [k for step in one for micro in step for k in micro]
    assert {e for e, _ in keys} == {2}  # tagged with the epoch: augmentation seeded per (epoch, sample)
    trained = {i for _, i in keys}
    assert len(trained) == size - (size % batch if drop_last and size > batch else 0)  # drop_last: the short one
    per_step = 4 * batch
    assert len(keys) - len(trained) < per_step  # repeats only to fill the last step
    assert all(len(micro) == batch for step in one for micro in step) or not drop_last
    # one process, no accumulation: the epoch's order in plain chunks, as the loader always cut it
    order = EpochTaggedSampler(size, seed=3)
    plain = TrainShards(order, batch, drop_last, 1, 0, 1)
    plain.set_epoch(2)
    keys = list(order)
    chunks = [keys[i:i + batch] for i in range(0, size, batch)]
    assert list(plain) == (chunks[:-1] if drop_last and size % batch and size > batch else chunks)


def test_a_position_saved_on_n_processes_is_the_same_global_cursor_on_m() -> None:
    from datamodules.sampling import position_for
    from modules.errors import ConfigError
    from modules.task import rescale_batch_progress

    assert position_for(1, 6, 2, 1) == (1, 12) and position_for(1, 6, 2, 4) == (1, 3) and position_for(0, 5, 1, 1) == (0, 5)
    with pytest.raises(ConfigError, match="12 micro-batches of epoch 1 on 2 process"):
        position_for(1, 6, 2, 5)
    # Lightning's per-process counters: 6 micro-batches each on 2 processes -> 12 on one (the epoch's part of the total)
    counts = {"ready": 6, "started": 6, "processed": 6, "completed": 5}
    ckpt = {"loops": {"fit_loop": {"epoch_loop.batch_progress": {"current": dict(counts), "total": {
        k: v + 19 for k, v in counts.items()}, "is_last_batch": False}}}}
    rescale_batch_progress(ckpt, 2, 1)
    progress = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert progress["current"] == {"ready": 12, "started": 12, "processed": 12, "completed": 11}
    assert progress["total"] == {"ready": 31, "started": 31, "processed": 31, "completed": 30}


def test_epoch_metrics_of_several_processes_combine_into_one_on_resume(tmp_path: Path) -> None:
    """A checkpoint of 2 processes resumed on 1: its running train metrics (accuracy, a weighted loss mean, a sum) hold
    every batch both trained, as if one process had seen them all."""
    from run.build import build, build_task
    from tests.conftest import compose_config

    cfg = compose_config(tmp_path, TINY_TEXT)
    labels = ["a", "b", "c", "d", "e"]

    def task():
        return build_task(cfg, build(cfg.backbone), {"num_classes": 5, "label_names": labels}, schedule=False)

    generator = torch.Generator().manual_seed(0)
    logits, target = torch.randn(40, 5, generator=generator), torch.randint(0, 5, (40,), generator=generator)
    losses, sizes = torch.rand(6, generator=generator), [7, 7, 7, 7, 7, 5]
    ranks, whole = [task(), task()], task()
    for module, part in zip([*ranks, whole], [slice(0, 13), slice(13, 40), slice(0, 40)], strict=True):
        module.train_metrics.update(logits[part], target[part])
    for i, (loss, n) in enumerate(zip(losses, sizes, strict=True)):
        for module in (ranks[i % 2], whole):
            module.epoch_aggregate("train/loss", "mean", "cpu").update(loss, weight=torch.tensor(float(n)))
            module.epoch_aggregate("train/seen", "sum", "cpu").update(torch.tensor(float(n)))
    resumed = task()
    resumed.load_metric_states([r.metric_states() for r in ranks])
    for name, value in whole.train_metrics.compute().items():
        assert float(resumed.train_metrics.compute()[name]) == pytest.approx(float(value)), name
    for key in ("train/loss", "train/seen"):
        assert float(resumed.epoch_aggregates[key].compute()) == pytest.approx(float(whole.epoch_aggregates[key].compute()))


def test_the_global_batch_derives_the_accumulation_and_a_resume_keeps_it(tmp_path: Path) -> None:
    from run.elastic import plan
    from tests.conftest import compose_config

    cfg = compose_config(tmp_path, [*TINY_TEXT, "data.global_batch_size=64"])
    segment = plan(cfg, None)
    assert cfg.trainer.accumulate_grad_batches == 4 and segment["global_batch_size"] == 64 and len(cfg.segments) == 1
    # saved by 2 processes with no accumulation (16 x 2 = 32 a step), continued on 1: 2 micro-batches a step
    ckpt = {"global_step": 7, "world_size": 2, "accumulate": 1, "TextDataModule": {"batches_done": 3, "batch_size": 16}}
    cfg = compose_config(tmp_path, [*TINY_TEXT, "ckpt_path=x.ckpt"])
    segment = plan(cfg, ckpt)
    assert cfg.trainer.accumulate_grad_batches == 2 and segment["global_batch_size"] == 32 and segment["from_step"] == 7
    plan(cfg, ckpt)  # the same segment again (a DDP process re-reading config.yaml): recorded once
    assert len(cfg.segments) == 1
    cfg = compose_config(tmp_path, [*TINY_TEXT, "ckpt_path=x.ckpt", "trainer.devices=2"])
    assert plan(cfg, ckpt)["accumulate_grad_batches"] == 1  # the same world: nothing to derive
