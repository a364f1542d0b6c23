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
