"""Team workflow: W&B sweep specs (with W&B's own schema and search engine, offline), the local sweep runner
(3 runs, interrupted and continued), Optuna presets (a study continued), k-fold cross-validation (folds, the
aggregate), and what W&B / MLflow runs carry (group, tags, git commit, media, the best checkpoint)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT
from tests.wandb_records import run_files, summary

SPECS = sorted((ROOT / "configs" / "sweep").glob("*.yaml"))
# digits + the small ResNet from scratch, a few seconds a run
DIGITS = ["experiment=digits_scratch", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
          "callbacks.parameter_report.print_table=false"]


def run(args: list[str], cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "WANDB_MODE": "offline", **env})
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return done


# -- W&B sweep specs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec_path", SPECS, ids=[p.stem for p in SPECS])
def test_every_sweep_spec_passes_wandbs_schema_and_expands_to_overrides_train_accepts(spec_path: Path) -> None:
    from sweeps import next_run, schema_violations_from_proposed_config

    from run.config import check_command_line
    from search.wandb_sweep import load_spec, train_command

    spec = load_spec(spec_path)
    assert schema_violations_from_proposed_config(spec) == []
    assert spec["command"][-1] == "${args_no_hyphens}" and spec["program"] == "train.py"
    np.random.seed(0)
    proposal = next_run(spec, [], validate=True)
    params = {k: v["value"] for k, v in proposal.config.items()}
    assert set(params) == set(spec["parameters"])
    command = train_command(spec, params)
    assert command[:2] == [sys.executable, str(ROOT / "train.py")]
    overrides = command[2:]
    assert all("=" in o and not o.startswith("-") for o in overrides)
    check_command_line(overrides)  # composes the real config: exits with a one-line error on a bad override
    monitor = [o for o in overrides if o.startswith("monitor=")]
    assert monitor == [f"monitor={spec['metric']['name']}"], "the sweep's metric must be the run's monitor"


def test_bayes_proposals_follow_the_finished_results(tmp_path: Path) -> None:
    from search.wandb_sweep import LocalSweep, SweepRunRecord

    spec = {"method": "bayes", "metric": {"name": "val/acc", "goal": "maximize"},
            "parameters": {"optimizer.lr": {"distribution": "uniform", "min": 0.0, "max": 1.0}},
            "command": ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]}
    (tmp_path / "bayes.yaml").write_text(yaml.safe_dump(spec))
    proposals = {}
    for sign in (1.0, -1.0):  # the metric rises with lr, or falls with it
        sweep = LocalSweep(tmp_path / "bayes.yaml", tmp_path / f"sweep{sign}")
        sweep.runs = [SweepRunRecord(name=f"{i:03d}", params={"optimizer.lr": x}, state="finished", metric=sign * x)
                      for i, x in enumerate([0.1, 0.3, 0.5, 0.7, 0.9])]
        proposals[sign] = sweep.propose()["optimizer.lr"]
    assert proposals[1.0] > 0.7 and proposals[-1.0] < 0.3, proposals


def test_hyperband_stops_a_run_that_trails_at_the_same_evaluation(tmp_path: Path) -> None:
    from search.wandb_sweep import LocalSweep, SweepRunRecord

    spec = {"method": "random", "metric": {"name": "val/acc", "goal": "maximize"},
            "parameters": {"optimizer.lr": {"values": [0.1, 0.2]}},
            "early_terminate": {"type": "hyperband", "min_iter": 2, "eta": 2},
            "command": ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]}
    (tmp_path / "hb.yaml").write_text(yaml.safe_dump(spec))
    sweep = LocalSweep(tmp_path / "hb.yaml", tmp_path / "sweep")
    sweep.runs = [SweepRunRecord(name=f"{i:03d}", params={"optimizer.lr": 0.1}, state="finished", metric=acc,
                                 history=[acc - 0.2, acc - 0.1, acc]) for i, acc in enumerate([0.8, 0.85, 0.9])]
    poor = SweepRunRecord(name="003", params={"optimizer.lr": 0.2}, state="running", history=[0.2, 0.25])
    good = SweepRunRecord(name="004", params={"optimizer.lr": 0.2}, state="running", history=[0.6, 0.7, 0.95])
    sweep.runs += [poor, good]
    # the first bracket (min_iter=2) compares the value at index 2: the third evaluation
    assert not sweep.should_stop(poor), "two evaluations: no bracket reached yet"
    poor.history.append(0.3)
    assert sweep.should_stop(poor) and not sweep.should_stop(good)


@pytest.mark.slow
def test_local_sweep_runs_offline_is_interrupted_and_continues(tmp_path: Path) -> None:
    """3 runs of a random spec through train.py; the second is interrupted mid-training (Ctrl-C on the
    runner, at step 3) and continues from its checkpoint when the same command runs again."""
    spec = {"name": "tiny-random", "program": "train.py", "method": "random",
            "metric": {"name": "val/acc", "goal": "maximize"},
            "parameters": {"optimizer.lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-2},
                           "data.batch_size": {"values": [8, 16]}},
            "command": ["${env}", "${interpreter}", "${program}", *DIGITS, "monitor=val/acc", "logger=[csv,wandb]",
                        "trainer.max_epochs=2", "trainer.limit_train_batches=4",
                        "+callbacks.interrupt._target_=tests.probes.InterruptParentAtStep", "+callbacks.interrupt.step=3",
                        "+callbacks.interrupt.run=runs/001", "${args_no_hyphens}"]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    folder = tmp_path / "sweep"
    # --wandb off: the runs log to CSV only (W&B's offline files are checked in the cross-validation test)
    command = [sys.executable, str(ROOT / "sweep.py"), str(tmp_path / "spec.yaml"), "--dir", str(folder), "--seed", "3",
               "--count", "3", "--wandb", "off"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    interrupted = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    output = interrupted.stdout + interrupted.stderr
    assert interrupted.returncode == 130, output[-3000:]
    assert "run the same command again to continue" in output.lower(), output[-2000:]
    state = json.loads((folder / "sweep.json").read_text())
    assert [r["state"] for r in state["runs"]] == ["finished", "preempted"]
    second = state["runs"][1]
    assert (folder / "runs" / "001" / "checkpoints" / "last.ckpt").is_file()
    assert not (folder / "runs" / "001" / "metrics.json").exists()

    run(command, tmp_path, PYTHONPATH=str(ROOT))
    state = json.loads((folder / "sweep.json").read_text())
    assert [r["state"] for r in state["runs"]] == ["finished"] * 3
    assert [r["resumed"] for r in state["runs"]] == [0, 1, 0]
    assert state["runs"][1]["params"] == second["params"], "the interrupted run continues with its own parameters"
    assert "resuming the run" in (folder / "runs" / "001" / "train.log").read_text()
    steps = [int(r["step"]) for r in csv.DictReader(open(folder / "runs" / "001" / "csv" / "metrics.csv")) if r.get("step")]
    assert steps == sorted(steps) and max(steps) == 8, "one log from step 0 to 8: continued, not restarted"
    assert any(0 < s_ <= 3 for s_ in steps), "the rows logged before the interruption are kept"
    # the proposals are the engine's: 3 distinct settings inside the spec's ranges, handed to train.py as overrides
    for record in state["runs"]:
        saved = yaml.safe_load((Path(record["folder"]) / "config.yaml").read_text())
        assert saved["optimizer"]["lr"] == pytest.approx(record["params"]["optimizer.lr"])
        assert saved["data"]["batch_size"] == record["params"]["data.batch_size"]
        assert 1e-3 <= record["params"]["optimizer.lr"] <= 1e-2
        metrics = json.loads((Path(record["folder"]) / "metrics.json").read_text())
        assert record["metric"] == pytest.approx(metrics["best/val/acc"])
        assert saved["tracking"]["group"] == "tiny-random" and saved["tracking"]["job_type"] == "sweep"
        assert list(saved["logger"]) == ["csv"] and not run_files(record["folder"])
    assert len({r["params"]["optimizer.lr"] for r in state["runs"]}) == 3
    rows = list(csv.DictReader(open(folder / "summary.csv")))
    assert [r["run"] for r in rows] == ["000", "001", "002"]
    best = json.loads((folder / "best.json").read_text())
    assert best["val/acc"] == max(r["metric"] for r in state["runs"])
    assert (folder / "summary.png").stat().st_size > 0


# -- Optuna -------------------------------------------------------------------------------------------------
@pytest.mark.slow  # the fast tier runs one job of each search preset (tests/test_presets.py)
def test_optuna_preset_runs_trials_and_continues_the_study(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "study"
    command = [sys.executable, str(ROOT / "train.py"), "--multirun", "hparams_search=digits_optuna", *DIGITS[1:],
               "trainer.max_epochs=1", "trainer.limit_train_batches=10", f"hydra.sweep.dir={sweep_dir}", "logger=csv"]
    run([*command, "hydra.sweeper.n_trials=2"], tmp_path)
    assert sorted(sweep_dir.glob("trial_*")) == [sweep_dir / "trial_0", sweep_dir / "trial_1"]
    before = {p: p.stat().st_mtime for p in sweep_dir.glob("trial_*/metrics.json")}
    run([*command, "hydra.sweeper.n_trials=3"], tmp_path)  # the same study, one more trial
    assert {p: p.stat().st_mtime for p in before} == before, "finished trials are not run again"

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="digits-optuna",
                              storage=JournalStorage(JournalFileBackend(str(sweep_dir / "optuna_journal.log"))))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.number for t in complete] == [0, 1, 2]
    for trial in complete:  # each trial's value is its run's best monitored metric, with the sampled overrides
        folder = sweep_dir / f"trial_{trial.number}"
        assert trial.value == pytest.approx(json.loads((folder / "metrics.json").read_text())["best/val/acc"])
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["optimizer"]["lr"] == pytest.approx(trial.params["optimizer.lr"])
        assert saved["data"]["batch_size"] == trial.params["data.batch_size"]
        assert 3e-4 <= trial.params["optimizer.lr"] <= 3e-2
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(t.value for t in complete)) and results["finished_trials"] == 3
    assert len(list(csv.DictReader(open(sweep_dir / "trials.csv")))) == 3 and (sweep_dir / "trials.png").is_file()


# -- k-fold cross-validation ---------------------------------------------------------------------------------
def test_fold_indices_are_disjoint_covering_balanced_and_stratified() -> None:
    from datamodules.base import fold_indices

    labels = ["a"] * 23 + ["b"] * 11 + ["c"] * 6
    folds = fold_indices(len(labels), 4, seed=5, labels=labels)
    flat = [i for f in folds for i in f]
    assert sorted(flat) == list(range(len(labels))) and len(flat) == len(set(flat))
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    for label, total in (("a", 23), ("b", 11), ("c", 6)):
        counts = [sum(labels[i] == label for i in f) for f in folds]
        assert max(counts) - min(counts) <= 1 and sum(counts) == total
    assert fold_indices(len(labels), 4, seed=5, labels=labels) == folds
    assert fold_indices(len(labels), 4, seed=6, labels=labels) != folds


def test_folds_of_digits_partition_the_training_pool_stratified_and_keep_the_test_split(tmp_path: Path) -> None:
    """The real datamodule (digits): the folds' validation sets are disjoint and together are the training pool
    (a plain run's train + val); each fold trains on the rest; the test split is a plain run's; stratified."""
    from collections import Counter

    from run.build import build, data_config
    from tests.conftest import compose_config

    def setup(*overrides: str) -> object:
        cfg = compose_config(tmp_path, ["experiment=digits_scratch", *overrides])
        dm = build(data_config(cfg), processor=build(cfg.backbone).processor)
        dm.setup()
        return dm

    def names(dm: object, role: str) -> list[str]:
        return list(dm.datasets[role].split.names)

    plain = setup()
    pool = sorted(names(plain, "train") + names(plain, "val"))
    pool_labels = Counter(plain.datasets["train"].split.labels) + Counter(plain.datasets["val"].split.labels)
    vals = []
    for fold in range(3):
        dm = setup("data.num_folds=3", f"data.fold={fold}")
        assert names(dm, "test") == names(plain, "test")
        assert sorted(names(dm, "train") + names(dm, "val")) == pool
        assert not set(names(dm, "train")) & set(names(dm, "val"))
        assert dm.report()["cross_validation"] == {"num_folds": 3, "fold": fold, "seed": 42}
        labels = Counter(dm.datasets["val"].split.labels)
        assert all(abs(labels[c] - pool_labels[c] / 3) <= 1 for c in pool_labels), (labels, pool_labels)
        vals.append(names(dm, "val"))
    assert sorted(v for fold in vals for v in fold) == pool, "the folds' validation sets partition the pool"
    # capped: the folds partition exactly what the capped plain run trains and validates on (auto's final run's data)
    caps = ("data.max_train_samples=300", "data.max_eval_samples=60")
    plain = setup(*caps)
    pool = sorted(names(plain, "train") + names(plain, "val"))
    assert len(pool) == 360
    vals = [names(setup(*caps, "data.num_folds=3", f"data.fold={fold}"), "val") for fold in range(3)]
    assert sorted(v for fold in vals for v in fold) == pool and [len(v) for v in vals] == [120, 120, 120]


def test_train_on_val_trains_on_exactly_a_plain_runs_train_and_val(tmp_path: Path) -> None:
    """``data.train_on_val`` (auto's final run): the training split is a plain run's training split and its validation
    split together, caps included; the test split is untouched; where it cannot hold, one line."""
    from modules.errors import ConfigError, DataError
    from run.build import build, data_config
    from tests.conftest import compose_config

    def setup(*overrides: str) -> object:
        cfg = compose_config(tmp_path, ["experiment=digits_scratch", "data.max_train_samples=300",
                                        "data.max_eval_samples=60", *overrides])
        dm = build(data_config(cfg), processor=build(cfg.backbone).processor)
        dm.setup()
        return dm

    def names(dm: object, role: str) -> list[str]:
        return sorted(dm.datasets[role].split.names)

    plain, joined = setup(), setup("+data.train_on_val=true")
    assert len(names(plain, "train")) == 300 and len(names(plain, "val")) == 60
    assert names(joined, "train") == sorted(names(plain, "train") + names(plain, "val"))
    assert names(joined, "test") == names(plain, "test") and names(joined, "val") == names(plain, "val")
    with pytest.raises(ConfigError, match="data.train_on_val trains on the validation share too"):
        setup("+data.train_on_val=true", "data.val_fraction=0")
    with pytest.raises(DataError, match="has a validation split of its own"):
        from datamodules.base import DataModuleBase

        class OwnVal(DataModuleBase):
            pass

        OwnVal(train_on_val=True).carve({"train": plain.datasets["train"].split, "val": plain.datasets["val"].split},
                                        None)
    # a source with validation and test splits of its own (the spoken corpus's held-out voices): refused too, never
    # trained on the train split alone under the name of train + val
    with pytest.raises(DataError, match="has a validation split of its own"):
        OwnVal(train_on_val=True).carve({"train": plain.datasets["train"].split, "val": plain.datasets["val"].split,
                                         "test": plain.datasets["test"].split}, None)


def test_folds_of_unlabelled_data_and_of_a_source_with_its_own_test_split() -> None:
    """The shared carving every datamodule uses, without labels (a corpus, speech sentences): random folds; and a
    source that brings its own test split keeps it whole."""
    from datamodules.base import DataModuleBase
    from datamodules.sources import Split

    def split(n: int, tag: str) -> Split:
        return Split({"text": [f"{tag}{i}" for i in range(n)]}, tag, list(range(n)))

    for folds in ({"train": split(50, "d")}, {"train": split(50, "d"), "test": split(7, "t")}):
        parts = []
        for fold in range(5):
            base = DataModuleBase(val_fraction=0.1, test_fraction=0.2, seed=3, num_folds=5, fold=fold)
            carved = base.carve(dict(folds), None)
            train, val, test = (carved[r].columns["text"] for r in ("train", "val", "test"))
            assert not set(train) & set(val) and not (set(train) | set(val)) & set(test)
            assert len(train) + len(val) + len(test) == sum(len(s) for s in folds.values())
            if "test" in folds:
                assert test == folds["test"].columns["text"]
            parts.append(val)
        flat = [v for p in parts for v in p]
        assert len(flat) == len(set(flat)) == len(train) + len(val)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_the_cross_validation_summary_labels_what_was_selected_on_the_fold(tmp_path: Path) -> None:
    """Each fold's best/* was chosen on that fold's validation data: the summary labels it selection-biased and gives,
    first, the estimates (last-epoch val/*, test/*), whose mean and std are the folds'."""
    from search.cross_validation import summarise

    values = {0: (0.90, 0.95, 0.88), 1: (0.80, 0.91, 0.86), 2: (0.85, 0.97, 0.87)}  # val/acc, best/val/acc, test/acc
    for fold, (val, best, test) in values.items():
        job = tmp_path / str(fold)
        job.mkdir()
        (job / "config.yaml").write_text(yaml.safe_dump({"data": {"fold": fold, "num_folds": 3}}))
        (job / "metrics.json").write_text(json.dumps({"val/acc": val, "best/val/acc": best, "test/acc": test, "time/total_s": 3.0}))
    rows = summarise(tmp_path, 3)
    assert [(r["metric"], r["kind"]) for r in rows] == [("test/acc", "estimate"), ("val/acc", "estimate"),
                                                        ("best/val/acc", "selection-biased"), ("time/total_s", "other")]
    assert rows[1]["mean"] == pytest.approx(0.85) and rows[1]["std"] == pytest.approx(0.05)
    summary = json.loads((tmp_path / "cv_summary.json").read_text())["metrics"]
    assert summary["best/val/acc"]["kind"] == "selection-biased" and summary["val/acc"]["kind"] == "estimate"
    table = {r["metric"]: r for r in csv.DictReader(open(tmp_path / "cv_summary.csv"))}
    assert table["best/val/acc"]["kind"] == "selection-biased"
    assert "selection-biased" in (tmp_path / "cv_summary.md").read_text()


@pytest.mark.slow
def test_cross_validation_command_aggregates_folds_and_groups_them_in_wandb(tmp_path: Path) -> None:
    """``--multirun cv=kfold``: one job per fold, the summary's mean / std are those of the folds' metrics; under W&B
    (offline) the folds are runs of one group that carry tags, notes, the git commit, the reports as media, the
    redacted config and (log_model) the best checkpoint as an artifact."""
    sweep_dir = tmp_path / "cv"
    run([sys.executable, str(ROOT / "train.py"), "--multirun", "cv=kfold", *DIGITS, "data.num_folds=3",
         "trainer.max_epochs=1", "trainer.limit_train_batches=8", f"hydra.sweep.dir={sweep_dir}",
         "logger=[csv,wandb]", "logger.wandb.log_model=true", "tracking.tags=[cv,digits]", "tracking.notes=three folds",
         "+tracking.api_key=s3cret-value"], tmp_path)
    folds = {}
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        fold = yaml.safe_load((job / "config.yaml").read_text())["data"]["fold"]
        folds[fold] = (job, json.loads((job / "metrics.json").read_text()))
    assert sorted(folds) == [0, 1, 2]
    rows = {r["metric"]: r for r in csv.DictReader(open(sweep_dir / "cv_summary.csv"))}
    for metric in ("test/acc", "best/val/acc", "val/loss"):
        values = [folds[f][1][metric] for f in range(3)]
        assert float(rows[metric]["mean"]) == pytest.approx(np.mean(values), abs=1e-9)
        assert float(rows[metric]["std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-9)
        assert [float(rows[metric][f"fold {f}"]) for f in range(3)] == pytest.approx(values)
    assert len({folds[f][1]["best/val/acc"] for f in range(3)}) > 1, "each fold validates on other examples"
    assert (sweep_dir / "cv_summary.png").stat().st_size > 0 and (sweep_dir / "cv_summary.md").is_file()

    from run.tracking import git_state

    groups = set()
    for fold, (job, _) in folds.items():
        sent = summary(run_files(job)[0])
        groups.add(sent["run"].run_group)
        assert list(sent["run"].tags) == ["cv", "digits"] and sent["run"].notes == "three folds"
        assert sent["run"].job_type == "fold"
        assert sent["config"]["git"]["commit"] == git_state()["commit"] and "dirty" in sent["config"]["git"]
        assert sent["config"]["data"]["fold"] == fold
        assert sent["config"]["tracking"]["api_key"] == "<redacted>"
        for report in ("reports/parameter_report", "reports/lr", "reports/confusion_matrix", "reports/confusion_matrix_table"):
            assert f"{report}/_type" in sent["history_keys"], (report, sorted(sent["history_keys"]))
        models = [json.loads(meta) for name, kind, meta in sent["artifacts"] if kind == "model"]
        assert any(m["original_filename"].startswith("best-") and m["score"] is not None for m in models), models
    assert groups == {"cv-digits_scratch-cv"}, groups


@pytest.mark.slow  # keeps the fast tier within 8 minutes; W&B logging stays in it (tests/test_training.py)
def test_mlflow_logs_to_a_local_file_store(tmp_path: Path) -> None:
    store = tmp_path / "mlruns"
    run([sys.executable, str(ROOT / "train.py"), *DIGITS[1:], "experiment=digits_scratch", "trainer.max_epochs=1",
         "trainer.limit_train_batches=5", f"hydra.run.dir={tmp_path / 'run'}", "logger=[csv,mlflow]",
         f"logger.mlflow.tracking_uri=file:{store}", "tracking.group=team-a", "tracking.tags=[baseline]",
         "tracking.notes=first try"], tmp_path)
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{store}")
    (run_info,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert run_info.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    assert run_info.data.metrics["best/val/acc"] == pytest.approx(metrics["best/val/acc"])
    tags = run_info.data.tags
    assert tags["group"] == "team-a" and tags["baseline"] == "true" and tags["mlflow.note.content"] == "first try"
    from run.tracking import git_state

    assert tags["mlflow.source.git.commit"] == git_state()["commit"]
    assert run_info.data.params["optimizer/lr"] == "0.003"
    artifacts = {a.path for a in client.list_artifacts(run_info.info.run_id)}
    reports = {a.path for a in client.list_artifacts(run_info.info.run_id, "reports")}
    assert {"config.yaml", "metrics.json"} <= artifacts
    assert {"reports/confusion_matrix.png", "reports/parameter_report.png", "reports/lr.png"} <= reports


# -- auto: a short search within a budget, then the winner tested --------------------------------------------------
def test_auto_offers_the_knobs_the_run_has_and_its_preset_reruns_the_winner(tmp_path: Path) -> None:
    from modules.errors import ConfigError
    from run.config import compose_config
    from search.auto import chosen_knobs, defaults_of, knob_space, write_preset

    pretrained, scratch = compose_config([]), compose_config(["experiment=digits_scratch"])
    assert list(knob_space(pretrained)) == ["lr", "finetune", "lr_decay", "label_smoothing"]
    # nothing to freeze in a random network; the augmentation strength for images (text has none)
    assert list(knob_space(scratch)) == ["lr", "lr_decay", "label_smoothing", "augment"]
    with pytest.raises(ConfigError, match="--knobs finetune: not a knob of this run; choose from lr, lr_decay"):
        chosen_knobs(scratch, ["lr", "finetune"])
    knobs = chosen_knobs(pretrained, None)
    lr = knobs["lr"][1]
    assert lr.log and lr.low == pytest.approx(1e-5) and lr.high == pytest.approx(1e-3)  # a decade around the preset's
    assert defaults_of(pretrained, knobs) == {"lr": pytest.approx(1e-4), "finetune": "full", "lr_decay": 1.0,
                                              "label_smoothing": 0.0}  # trial 0: the configuration as given
    # the winner as a preset: the base preset included, group choices as overrides, values nested
    write_preset(tmp_path, ["experiment=digits_scratch", "data.max_train_samples=200"],
                 ["optimizer.lr=0.002", "task.label_smoothing=0.1"])
    rerun = compose_config([f"hydra.searchpath=[file://{tmp_path}]", "experiment=auto_winner"])
    assert (rerun.optimizer.lr, rerun.task.label_smoothing, rerun.data.max_train_samples) == (0.002, 0.1, 200)
    assert rerun.backbone == scratch.backbone and rerun.trainer.max_epochs == scratch.trainer.max_epochs
    write_preset(tmp_path, ["data.max_train_samples=300"], ["finetune=gradual", "optimizer.lr=3e-5"])
    rerun = compose_config([f"hydra.searchpath=[file://{tmp_path}]", "experiment=auto_winner"])
    assert (rerun.finetune.strategy, rerun.optimizer.lr, rerun.data.max_train_samples) == ("gradual", 3e-5, 300)


def test_auto_augmentation_strength_is_randaugment_for_images_and_speed_perturbation_for_speech() -> None:
    """The ``augment`` knob: RandAugment's magnitude on images (0 off; trial 0 reads the preset's policy), the spread of
    speed perturbation on speech; the override builds the transform it names, and a policy of another kind is left
    alone. Pretrained timm weights from a file count as pretrained (the freezing strategy is a knob)."""
    from omegaconf import OmegaConf

    from datamodules.vision import build_transform
    from run.config import compose_config
    from search.auto import chosen_knobs, defaults_of, knob_space, overrides_of, randaugment_magnitude

    digits = compose_config(["experiment=digits_efficientnet_lite0"])
    knobs = chosen_knobs(digits, ["augment"])
    assert list(knob_space(digits)) == ["lr", "finetune", "lr_decay", "label_smoothing", "augment"]
    assert defaults_of(digits, knobs) == {"augment": 0}  # digits: no RandAugment
    assert overrides_of(knobs, {"augment": 0}) == ["++data.augment.auto_augment=null"]
    [override] = overrides_of(knobs, {"augment": 7})
    assert override == "++data.augment.auto_augment=rand-m7-mstd0.5-inc1"
    strong = compose_config(["experiment=digits_efficientnet_lite0", override])
    data_config = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
                   "crop_pct": 1.0}
    ops = [type(t).__name__ for t in build_transform(data_config, OmegaConf.to_container(strong.data.augment), True).transforms]
    assert "RandAugment" in ops and "RandAugment" not in [
        type(t).__name__ for t in build_transform(data_config, OmegaConf.to_container(digits.data.augment), True).transforms]
    # a preset whose data.augment names no policy at all (Fashion-MNIST's) takes the knob's override too
    fashion = compose_config(["experiment=digits_efficientnet_lite0", "data=fashion_mnist", override])
    assert fashion.data.augment.auto_augment == "rand-m7-mstd0.5-inc1" and fashion.data.augment.hflip == 0.5
    beans = compose_config(["experiment=hub_beans_vit"])
    assert defaults_of(beans, chosen_knobs(beans, ["augment"])) == {"augment": 9}  # the preset's rand-m9-mstd0.5-inc1
    assert randaugment_magnitude("augmix-m5-w3") is None and randaugment_magnitude("rand-mstd0.5") == 10
    assert "augment" not in knob_space(compose_config(["experiment=hub_beans_vit", "data.augment.auto_augment=augmix-m5"]))
    speech = compose_config(["experiment=hub_librispeech_wav2vec2"])
    knobs = chosen_knobs(speech, ["augment"])
    assert defaults_of(speech, knobs) == {"augment": pytest.approx(0.1)}  # [0.9, 1.0, 1.1]
    assert overrides_of(knobs, {"augment": 0.05}) == ["data.speed_perturb=[0.95,1.0,1.05]"]
    assert compose_config(["experiment=hub_librispeech_wav2vec2", "data.speed_perturb=[0.95,1.0,1.05]"]).data.speed_perturb == [
        0.95, 1.0, 1.05]
    assert "augment" not in knob_space(compose_config([]))  # text: no augmentation to search


def test_auto_scores_small_data_by_k_fold_and_prunes_between_folds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--folds auto``: 5 folds for a run that trains and validates on fewer than 1,000 carved examples, the validation
    split otherwise; a cross-validated trial scores the mean of its folds, and one behind the median after its third
    fold stops there (the trials' ``train.py`` replaced by a stand-in that returns each fold's figure)."""
    from types import SimpleNamespace

    from modules.errors import ConfigError
    from run.checks import complete_config
    from run.config import compose_config
    from search import auto

    small = complete_config(compose_config(["experiment=digits_scratch", "data.max_train_samples=400",
                                            "data.max_eval_samples=100"]))
    assert auto.choose_folds(small, "auto") == 5 and auto.examples_seen(small) == 500
    assert auto.choose_folds(complete_config(compose_config(["experiment=digits_scratch"])), "auto") is None  # 1,528
    assert auto.choose_folds(small, "3") == 3 and auto.choose_folds(small, "0") is None
    assert auto.choose_folds(compose_config(["experiment=joint_fashion_digits"]), "auto") is None
    with pytest.raises(ConfigError, match="--folds '1': give a number of folds >= 2"):
        auto.choose_folds(small, "1")

    figures = {0: [0.90, 0.92, 0.94, 0.92, 0.92], 1: [0.80, 0.90, 0.91, 0.93, 0.93], 2: [0.50, 0.55, 0.60, 0.9, 0.9]}
    calls: list[tuple[int, int]] = []

    def train(self, run_dir: Path, overrides, minutes_left, *extra):  # noqa: ANN001, ANN202
        trial, fold = int(run_dir.parent.name.split("_")[1]), int(run_dir.name.split("_")[1])
        assert "data.num_folds=5" in extra and f"data.fold={fold}" in extra
        calls.append((trial, fold))
        return SimpleNamespace(returncode=0), figures[trial][fold]

    monkeypatch.setattr(auto.Study, "train", train)
    knobs = auto.chosen_knobs(small, ["lr"])
    study = auto.Study(tmp_path, ["experiment=digits_scratch"], knobs, "val/acc", "maximize", folds=5)
    rows = [study.run_trial(10.0) for _ in range(3)]
    assert [r["state"] for r in rows] == ["complete", "complete", "pruned after fold 2"]
    assert rows[0]["val/acc"] == pytest.approx(0.92) and rows[0]["folds"] == figures[0]
    assert calls[-3:] == [(2, 0), (2, 1), (2, 2)]  # the third trial's last two folds never ran
    with pytest.raises(ConfigError, match="other overrides, knobs or folds"):
        auto.Study(tmp_path, ["experiment=digits_scratch"], knobs, "val/acc", "maximize", folds=3)

    # --grid: every combination of a few values per knob, once each, none pruned (no pruning callback in the trials)
    knobs = auto.chosen_knobs(small, ["lr", "label_smoothing", "augment"])
    grid = auto.grid_of(small, knobs)
    assert grid == {"lr": pytest.approx([3e-4, 1e-3, 3e-3, 9e-3, 3e-2]), "label_smoothing": [0.0, 0.1], "augment": [0, 5, 9]}

    def no_pruning(self, run_dir: Path, overrides, minutes_left, *extra):  # noqa: ANN001, ANN202
        assert not extra and not [o for o in overrides if "num_folds" in o]
        return SimpleNamespace(returncode=0), 0.5  # every point equally good: no point may stop early

    monkeypatch.setattr(auto.Study, "train", no_pruning)
    study = auto.Study(tmp_path / "grid", ["experiment=digits_scratch"], knobs, "val/acc", "maximize", grid=grid)
    rows = [study.run_trial(10.0) for _ in range(30)]
    assert {r["state"] for r in rows} == {"complete"}
    assert sorted((r["lr"], r["label_smoothing"], r["augment"]) for r in rows) == sorted(
        (lr, ls, m) for lr in grid["lr"] for ls in grid["label_smoothing"] for m in grid["augment"])


def test_trial_tables_keep_a_learning_rates_digits(tmp_path: Path) -> None:
    """trials.md / sweep tables: metrics to 4 places, learning rates to 3 significant figures (at 4 places, auto's BBC
    trials at lr 1.2e-4 and 8.7e-5 both read 0.0001)."""
    from search.tables import write_table

    rows = [{"trial": 0, "lr": 1.234e-4, "val/acc": 0.96412, "tokens": 12345.6, "lr_decay": 0.0},
            {"trial": 1, "lr": 8.7e-5, "val/acc": None, "tokens": 3.0, "lr_decay": 0.77}]
    write_table(rows, list(rows[0]), tmp_path, "trials", "trials", show=False)
    lines = (tmp_path / "trials.md").read_text().splitlines()
    assert lines[2] == "| 0 | 0.000123 | 0.9641 | 12,346 | 0.0000 |" and lines[3] == "| 1 | 8.7e-05 |  | 3.0000 | 0.7700 |"


def test_auto_compare_draws_every_arm_in_the_tables_order_with_accuracy_intervals(tmp_path: Path) -> None:
    """bench/auto_compare.py --replot: arms kept from several runs (an LR rule's arm added last) are drawn and tabled in
    one order (default, the range test's arms, auto, grid); an arm it does not know is refused, not drawn."""
    from bench import auto_compare

    arms = {"grid": 0.99, "tune_lr_valley": 0.985, "default": 0.98, "auto": 0.975, "tune_lr": 0.97}
    record = {"overrides": ["experiment=digits_scratch"], "minutes": 8, "test_size": 269,
              "arms": {a: {"seconds": 60.0, "test": {"test/acc": v, "test/loss": 0.1}} for a, v in arms.items()}}
    (tmp_path / "results.json").write_text(json.dumps(record))
    auto_compare.main(["--replot", str(tmp_path)])
    assert (tmp_path / "results.png").stat().st_size > 5000
    assert sorted(arms, key=auto_compare.ARMS.index) == ["default", "tune_lr", "tune_lr_valley", "auto", "grid"]
    record["arms"]["tune_lr_fastest"] = record["arms"]["default"]
    (tmp_path / "results.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="tune_lr_fastest"):
        auto_compare.main(["--replot", str(tmp_path)])


def test_a_trial_behind_the_median_at_an_epoch_is_pruned_and_says_so(tmp_path: Path) -> None:
    """``callbacks.OptunaPruning`` in a trial's own process: it reports each validation to the study through the
    journal file and stops the run when the median pruner prunes it."""
    from types import SimpleNamespace

    import optuna
    import torch
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from callbacks import OptunaPruning

    journal = str(tmp_path / "journal.log")
    study = optuna.create_study(study_name="auto", storage=JournalStorage(JournalFileBackend(journal)), direction="maximize")
    for value in (0.9, 0.8):  # two finished trials: 0.9 and 0.8 after each of epochs 0-2
        trial = study.ask()
        for epoch in range(3):
            trial.report(value, step=epoch)
        study.tell(trial, value)

    def validate(values: list[float]) -> SimpleNamespace:
        trial = study.ask()
        callback = OptunaPruning(journal, "auto", trial._trial_id, "val/acc")
        folder = tmp_path / f"trial_{trial.number}"
        folder.mkdir()
        for epoch, value in enumerate(values):
            trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, state=SimpleNamespace(fn="fit"),
                                      callback_metrics={"val/acc": torch.tensor(value)}, current_epoch=epoch,
                                      global_step=5 * (epoch + 1), default_root_dir=str(folder), should_stop=False)
            callback.on_validation_end(trainer, None)
            if trainer.should_stop:
                break
        return trainer

    ahead, behind = validate([0.5, 0.7, 0.95]), validate([0.1, 0.2, 0.3])
    assert not ahead.should_stop and not (Path(ahead.default_root_dir) / "pruned.json").exists()
    # behind the median from the first epoch, but stopped only at the third validation (a slow start is no verdict)
    assert behind.should_stop and behind.current_epoch == 2
    assert json.loads((Path(behind.default_root_dir) / "pruned.json").read_text()) == {"epoch": 2, "value": pytest.approx(0.3),
                                                                                      "step": 15}
    assert list(study.trials[-1].intermediate_values) == [0, 1, 2]


@pytest.mark.slow
def test_auto_searches_within_its_budget_prunes_tests_the_winner_once_and_continues(tmp_path: Path) -> None:
    """``auto.py`` on a small digits set: trial 0 is the preset as given, the trials never see the test split, the
    winner is tested once, the table / plot / preset are written, and the same command continues the study."""
    folder = tmp_path / "study"
    base = ["experiment=digits_scratch", "data.max_train_samples=400", "data.max_eval_samples=100", "budget.min_steps=40",
            "trainer.enable_progress_bar=false", f"paths.cache_dir={tmp_path / 'cache'}"]
    command = [sys.executable, str(ROOT / "auto.py"), "--minutes", "6", "--max-trials", "4", "--folds", "0", "--dir",
               str(folder), *base]
    started = time.time()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.time() - started < 6 * 60 + 180  # the search's budget, plus the winner's test and start-up
    rows = json.loads((folder / "trials.json").read_text())
    assert [r["trial"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["lr"] == pytest.approx(3e-3) and rows[0]["label_smoothing"] == 0.0  # the preset as given
    for row in rows:
        metrics = json.loads((folder / row["folder"] / "metrics.json").read_text())
        assert not [k for k in metrics if k.startswith("test/")], row  # the search never touches the test split
    result = json.loads((folder / "auto_result.json").read_text())
    assert result["winner"]["trial"] in {r["trial"] for r in rows if r["state"] == "complete"}
    # the winner again on train + val, for its best checkpoint's epochs, tested once
    assert result["final"].startswith("the winner retrained on train + val") and 0.0 < result["test"]["test/acc"] <= 1.0
    final = yaml.safe_load((folder / "final" / "config.yaml").read_text())
    assert final["data"]["train_on_val"] is True and f"trainer.max_epochs={final['trainer']['max_epochs']}" in result["overrides"]
    data = json.loads((folder / "final" / "data_report.json").read_text())["sizes"]
    trial = json.loads((folder / "trial_000" / "data_report.json").read_text())["sizes"]
    assert data["train"] == trial["train"] + trial["val"] and data["test"] == trial["test"]
    assert {p.name for p in folder.iterdir()} >= {"trials.csv", "trials.md", "trials.png", "experiment", "final"}
    assert "rerun it with: python train.py hydra.searchpath=" in done.stdout
    # the same command, one trial more: the study continues from its journal
    again = subprocess.run([*command[:5], "5", *command[6:]], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["trial"] for r in json.loads((folder / "trials.json").read_text())] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_auto_on_small_data_cross_validates_every_trial_then_trains_the_winner_on_every_fold(tmp_path: Path) -> None:
    """``auto.py --folds 3`` on 250 digits: each trial trains on every fold (its figure the folds' mean), no fold reads
    the test split, the folds' validation sets partition what the final run trains on, and the winner is tested once."""
    folder = tmp_path / "study"
    base = ["experiment=digits_scratch", "data.max_train_samples=200", "data.max_eval_samples=50", "budget.min_steps=24",
            "trainer.enable_progress_bar=false", f"paths.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run([sys.executable, str(ROOT / "auto.py"), "--minutes", "6", "--max-trials", "2", "--folds", "3",
                           "--knobs", "lr,augment", "--dir", str(folder), *base],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(3-fold cross-validation)" in done.stdout
    rows = json.loads((folder / "trials.json").read_text())
    assert [r["state"] for r in rows] == ["complete", "complete"] and rows[0]["augment"] == 0
    for row in rows:
        best, val_sizes = [], []
        for fold in range(3):
            run_dir = folder / row["folder"] / f"fold_{fold}"
            metrics = json.loads((run_dir / "metrics.json").read_text())
            assert not [k for k in metrics if k.startswith("test/")], run_dir  # the search never touches the test split
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
            assert (config["data"]["num_folds"], config["data"]["fold"]) == (3, fold)
            best.append(metrics["best/val/acc"])
            sizes = json.loads((run_dir / "data_report.json").read_text())["sizes"]
            val_sizes.append(sizes["val"])
            assert sizes["train"] + sizes["val"] == 250
        assert row["val/acc"] == pytest.approx(sum(best) / 3) and row["folds"] == pytest.approx(best)
        assert sum(val_sizes) == 250  # every example validates once
    result = json.loads((folder / "auto_result.json").read_text())
    assert result["folds"] == 3 and 0.0 < result["test"]["test/acc"] <= 1.0
    final = json.loads((folder / "final" / "data_report.json").read_text())["sizes"]
    assert final["train"] == 250  # the winner on everything the folds saw
    assert "per fold" in (folder / "trials.md").read_text()
