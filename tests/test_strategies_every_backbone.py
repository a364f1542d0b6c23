"""Every freezing strategy runs, unchanged, on every backbone family (text, vision, speech) and on token classification."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from callbacks import STRATEGIES
from tests.conftest import TINY_SCRATCH, run_train
from tests.test_finetuning import changed, probe
from tests.test_resume import TINY_WHISPER

PROBE = "+callbacks.probe._target_=tests.probes.TrainingProbe"
BACKBONES = {
    "text": list(TINY_SCRATCH),
    "vision": ["experiment=digits_scratch", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", PROBE],
    "speech": ["experiment=speech_digits_scratch", "data.source=${paths.cache_dir}/speech/tiny_digits", "data.generate.n=120",
               "data.generate.heldout_voices=2", "data.batch_size=8", "+backbone.config_overrides.hidden_size=64",
               "+backbone.config_overrides.num_hidden_layers=2", "+backbone.config_overrides.intermediate_size=128",
               "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", PROBE],
    "speech_whisper": [*TINY_WHISPER, "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", PROBE],
    "ner": ["experiment=wnut16_ner", *TINY_SCRATCH],  # token classification: a tiny BERT tagging tweets
}
KNOBS = ["finetune.unit=step", "finetune.every=1", "finetune.at=2", "finetune.top_k=1",
         "finetune.milestones=[{at: 2, groups: [all]}]"]


def expected_trainable(strategy: str, names: list[str], step: int) -> list[str]:
    """What should train after ``step`` optimizer steps, written out independently of the callback."""
    head, backbone = names[-1], names[:-1]
    if strategy == "full":
        return names
    if strategy == "linear_probe":
        return [head]
    if strategy == "partial":
        return [backbone[-1], head]
    if strategy in ("freeze_then_unfreeze", "milestones"):
        return names if step >= 2 else [head]
    return [*backbone[len(backbone) - min(step, len(backbone)) :], head]  # gradual, every=1


@pytest.mark.parametrize("strategy", STRATEGIES)
# the fast tier runs every strategy on text; the slow tier (pytest -m slow) on every backbone family
@pytest.mark.parametrize("family", [f if f == "text" else pytest.param(f, marks=pytest.mark.slow) for f in sorted(BACKBONES)])
def test_strategy_on_backbone(family: str, strategy: str, tmp_path: Path, cache_dir: Path) -> None:
    overrides = [*BACKBONES[family], f"finetune={strategy}", *KNOBS, "trainer.max_steps=4", "trainer.max_epochs=50",
                 "test_after_fit=false", "callbacks.early_stopping=null"]
    if family == "speech" and not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("the speech corpus needs espeak-ng and sox (apt-get install -y espeak-ng sox)")
    run_train(tmp_path, overrides, cache_dir)
    state = probe(tmp_path)
    names = list(state["start"])
    assert len(state["steps"]) == 4
    for record in state["steps"]:
        assert record["trainable"] == expected_trainable(strategy, names, record["step"]), (family, strategy, record["step"])
    ever_trained = {g for record in state["steps"] for g in record["trainable"]}
    for group in names:
        if group not in ever_trained:
            assert not changed(state, group), f"{group} was frozen throughout but moved"
    assert changed(state, names[-1])


@pytest.mark.slow
@pytest.mark.parametrize("family", [*sorted(BACKBONES), "mlm", "joint"])
def test_lr_range_test_on_every_task(family: str, tmp_path: Path, cache_dir: Path) -> None:
    """tune=[batch_size,lr] on every task and backbone family (tune=lr on joint data): the finder's trials, then a curve,
    a suggestion inside the swept range (or the configured LR kept, said so), the applied LR in config.yaml and in the
    run's first optimizer step (every group scaled from it)."""
    import json

    from omegaconf import OmegaConf

    from tests.test_joint import FAST_JOINT
    from tests.test_resume import TINY_MLM

    tasks = {**BACKBONES, "mlm": [*TINY_MLM, PROBE], "joint": [*(a for a in FAST_JOINT if "datasets_seen" not in a), PROBE]}
    if family == "speech" and not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("the speech corpus needs espeak-ng and sox (apt-get install -y espeak-ng sox)")
    sized = family != "joint"  # joint data has a batch size per dataset: the finder refuses it (tested in test_finetuning)
    tune = ["tune=[batch_size,lr]", "tune.batch_size.max_batch_size=24", "tune.batch_size.steps=2"] if sized else ["tune=lr"]
    rule = "minimum" if family == "speech" else "steepest"  # minimum: the rule that trains CTC from scratch (docs/auto.md)
    run_train(tmp_path, [*tasks[family], *tune, "tune.lr_find.steps=12", f"tune.lr_find.rule={rule}", "trainer.max_steps=2", "trainer.max_epochs=50",
                         "test_after_fit=false", "callbacks.early_stopping=null", "scheduler=constant"], cache_dir)
    if sized:  # nothing runs out of memory on this machine: the finder reaches the cap, then the range test runs at it
        trials = json.loads((tmp_path / "batch_find.json").read_text())
        assert all(t["fits"] and t["peak_bytes"] > 0 for t in trials["trials"]), trials["trials"]
        assert OmegaConf.load(tmp_path / "config.yaml").data.batch_size == trials["found_batch_size"] == max(
            t["batch_size"] for t in trials["trials"])
    found = json.loads((tmp_path / "lr_find.json").read_text())
    assert found["rule"].startswith(rule) and found["suggested_lr"] == found["suggestions"][rule]
    assert len(found["curve"]) >= 5 and all(c["loss"] == c["loss"] for c in found["curve"][:5])
    cfg = OmegaConf.load(tmp_path / "config.yaml")
    assert cfg.optimizer.lr == found["applied_lr"] == cfg.tune.lr_find.applied
    if found["suggested_lr"] is not None:
        assert 1e-7 <= found["suggested_lr"] <= 1.0 and found["applied_lr"] == found["suggested_lr"]
    first = probe(tmp_path)["steps"][0]["lr"]
    head = list(first)[-1]
    assert first[head] == pytest.approx(cfg.optimizer.lr * float(cfg.task.get("head_lr_scale", 1.0)), rel=1e-9), first
