"""Every experiment preset composes and runs (fast_dev_run); every debug preset composes.

Presets that build on an earlier run (``requires``) must instead fail with the hint saying how to make it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from modules.errors import ConfigError
from tests.conftest import CONFIG_DIR, compose_config, run_train

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
DEBUGS = sorted(p.stem for p in (CONFIG_DIR / "debug").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_preset_runs(experiment: str, tmp_path: Path, cache_dir: Path) -> None:
    overrides = [f"experiment={experiment}", "debug=fast_dev_run", "trainer.enable_progress_bar=false"]
    cfg = compose_config(tmp_path, overrides, cache_dir)
    assert cfg.trainer.fast_dev_run
    if cfg.needs_internet:
        pytest.skip(f"{experiment} downloads from the hub; composed only (offline)")
    missing = [r for r in cfg.requires if not Path(r.path).exists()]
    if missing:  # builds on an earlier run (tests/test_speech.py chains such pairs): the error must say how
        with pytest.raises(ConfigError, match=re.escape(missing[0].hint)):
            run_train(tmp_path, overrides, cache_dir)
        return
    metrics = run_train(tmp_path, overrides, cache_dir)
    assert any(k.startswith("test/") for k in metrics), metrics
    assert (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize("debug", DEBUGS)
def test_debug_preset_composes(debug: str, tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, [f"debug={debug}"])
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


def test_limit_batches_preset_runs_real_loop(tmp_path: Path, cache_dir: Path) -> None:
    """The debug preset most people start from: a few real batches, checkpoints and reports."""
    metrics = run_train(tmp_path, ["debug=limit_batches", "data.max_length=32", "trainer.enable_progress_bar=false"], cache_dir)
    assert "test/acc" in metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
