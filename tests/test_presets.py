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
# a comparison is a multirun over one choice; without --multirun it runs its first job, on the experiment it names
COMPARISONS = {"finetune_strategies": None, "joint_vs_target": "joint_fashion_digits", "lora_vs_full": None,
               "distillation": "bbc_distill"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_preset_runs(experiment: str, tmp_path: Path, cache_dir: Path) -> None:
    overrides = [f"experiment={experiment}", "debug=fast_dev_run", "trainer.enable_progress_bar=false"]
    cfg = compose_config(tmp_path, overrides, cache_dir)
    if cfg.data.get("generate"):  # a synthesised corpus: a small one is enough for one batch (the full size is slow)
        overrides.append("data.generate.n=240")
        if cfg.data.generate.get("other_n"):  # and a few festival clips for the other synthesiser's test split
            overrides.append("data.generate.other_n=24")
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
    # test metrics exactly when the data has a test split (the MLM corpus has none: never val relabelled)
    assert any(k.startswith("test/") for k in metrics) == has_test_split(tmp_path), metrics
    assert (tmp_path / "config.yaml").exists()


def has_test_split(run_dir: Path) -> bool:
    """From the run's data report (joint data: the target dataset's)."""
    import json

    labels = run_dir / "labels.json"
    target = json.loads(labels.read_text()).get("target") if labels.exists() else None
    report = run_dir / ("datasets/" + target if target else "") / "data_report.json"
    return "test" in json.loads(report.read_text())["sizes"]


def test_every_comparison_is_listed() -> None:
    assert sorted(COMPARISONS) == sorted(p.stem for p in (CONFIG_DIR / "comparison").glob("*.yaml"))


@pytest.mark.parametrize("comparison", sorted(COMPARISONS))
def test_comparison_preset_runs(comparison: str, tmp_path: Path, cache_dir: Path) -> None:
    experiment = COMPARISONS[comparison]
    overrides = [f"comparison={comparison}", "debug=fast_dev_run", "trainer.enable_progress_bar=false",
                 *([f"experiment={experiment}"] if experiment else [])]
    cfg = compose_config(tmp_path, overrides, cache_dir)
    assert cfg.run_name.startswith("compare_")
    missing = [r for r in cfg.requires if not Path(r.path).exists()]
    if missing:  # its experiment builds on an earlier run (a distillation teacher): the error must say how to make it
        with pytest.raises(ConfigError, match=re.escape(missing[0].hint)):
            run_train(tmp_path, overrides, cache_dir)
        return
    metrics = run_train(tmp_path, overrides, cache_dir)
    assert any(k.startswith("test/") for k in metrics), metrics


SEARCHES = sorted(f"{group}={p.stem}" for group in ("hparams_search", "cv") for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("search", SEARCHES)
def test_search_and_cross_validation_presets_run_one_job(search: str, tmp_path: Path, cache_dir: Path) -> None:
    """Without --multirun a search / cross-validation preset runs one job of it: its experiment, its monitor, its
    tracking group (the multirun itself is tested in tests/test_team_workflow.py)."""
    overrides = [search, "debug=fast_dev_run", "trainer.enable_progress_bar=false"]
    cfg = compose_config(tmp_path, overrides, cache_dir)
    assert cfg.tracking.group, "the runs of one search share a W&B group"
    if search.startswith("cv="):
        assert cfg.data.num_folds >= 2 and cfg.data.fold == 0
    metrics = run_train(tmp_path, overrides, cache_dir)
    assert any(k.startswith("test/") for k in metrics), metrics


@pytest.mark.parametrize("debug", DEBUGS)
def test_debug_preset_composes(debug: str, tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, [f"debug={debug}"])
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


@pytest.mark.slow
def test_limit_batches_preset_runs_real_loop(tmp_path: Path, cache_dir: Path) -> None:
    """The debug preset most people start from: a few real batches, checkpoints and reports."""
    metrics = run_train(tmp_path, ["debug=limit_batches", "data.max_length=32", "trainer.enable_progress_bar=false"], cache_dir)
    assert "test/acc" in metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_the_config_tree_ships_in_the_wheel(tmp_path: Path) -> None:
    """The wheel holds the packages and every YAML file of the config tree (``run.config`` finds it beside them)."""
    import subprocess
    import sys
    import zipfile

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                          str(CONFIG_DIR.parent)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    names = set(zipfile.ZipFile(next(tmp_path.glob("tunelab-*.whl"))).namelist())
    wanted = {str(p.relative_to(CONFIG_DIR.parent)) for p in CONFIG_DIR.rglob("*.yaml")}
    assert wanted and wanted <= names, sorted(wanted - names)[:5]
    assert {"run/build.py", "search/wandb_sweep.py", "modules/layer_groups.py"} <= names
    assert not {"train.py", "eval.py", "sweep.py"} & names, "entry scripts run from the checkout; never import names"
    assert "hydra_plugins/tunelab_optuna/optuna_sweeper.py" in names, "hparams_search= needs the sweeper plugin"


@pytest.mark.parametrize("trainer", sorted(p.stem for p in (CONFIG_DIR / "trainer").glob("*.yaml")))
def test_trainer_preset_composes_and_its_strategy_imports(trainer: str, tmp_path: Path) -> None:
    """GPU presets (fsdp, gpu, gpu_fp16) cannot run here: they compose and name a strategy class that exists."""
    import hydra

    cfg = compose_config(tmp_path, [f"trainer={trainer}"])
    strategy = cfg.trainer.get("strategy", "auto")
    if not isinstance(strategy, str):
        assert hydra.utils.get_class(strategy._target_)
        if "auto_wrap_policy" in strategy:  # FSDP1 wraps the same blocks FSDP2 shards
            assert hydra.utils.instantiate(strategy.auto_wrap_policy).__class__.__name__ == "BlockWrapPolicy"


def test_slurm_launcher_is_sized_from_the_trainer() -> None:
    """hydra/launcher=slurm (hydra-submitit-launcher): one SLURM job per multirun job, nodes and tasks from the trainer."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", "trainer=fsdp2", "trainer.devices=4",
                                                      "trainer.num_nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.signal_delay_s > 0  # SIGUSR1 before the time limit: the Preemption callback saves at the step
