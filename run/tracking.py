"""What a team sees of a run in W&B or MLflow: the code version, the redacted config, how the monitored metric is
summarised, the final metrics, and the run's reports (parameter report, LR plot, confusion matrix) as media."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("tunelab")

ROOT = Path(__file__).resolve().parents[1]
# the run folder's reports that are published: plots as images, tables as tables (the parameter report's table is
# logged by ParameterReport itself)
REPORTS = ("parameter_report", "lr", "lr_history", "confusion_matrix", "compile")
WANDB_TABLES = ("lr_history", "confusion_matrix")


def start_loggers(cfg: Any, run_dir: Path, resolved: Mapping[str, Any], ckpt: Mapping[str, Any] | None) -> list[Any]:
    """The run's loggers, carrying the redacted config (``resolved``) and the tracking metadata; a resumed run's
    continue where it left them (``ckpt``: the checkpoint it resumes from)."""
    from run.build import build_each
    from run.resume import continued_loggers, remember_wandb_runs

    logger_cfg = cfg.get("logger")
    if cfg.get("resume") and ckpt is not None:
        logger_cfg = continued_loggers(logger_cfg, run_dir, dict(ckpt))
    allow_mlflow_file_store(logger_cfg)
    loggers = build_each(logger_cfg)
    start_tracking(loggers, resolved, str(cfg.monitor), str(cfg.monitor_mode))
    remember_wandb_runs(loggers, run_dir)
    return loggers


def allow_mlflow_file_store(logger_cfg: Mapping[str, Any] | None) -> None:
    """MLflow 3 keeps its file store (a folder, no server) only on request; ``logger=mlflow`` asks for it when its
    ``tracking_uri`` is a folder. A database or server URI is left alone."""
    import os

    node = (logger_cfg or {}).get("mlflow")
    uri = str((node or {}).get("tracking_uri") or "")
    if node is not None and (uri.startswith("file:") or "://" not in uri):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def git_state(root: Path = ROOT) -> dict[str, Any]:
    """The commit the code runs from, and whether tracked files differ from it (``dirty``); empty outside a git clone."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": dirty, "branch": branch}


def kind(logger: Any) -> str:
    return {"WandbLogger": "wandb", "MLFlowLogger": "mlflow"}.get(type(logger).__name__, "")


def start_tracking(loggers: Sequence[Any], resolved: Mapping[str, Any], monitor: str, mode: str) -> None:
    """Log the redacted config with the git state; W&B summarises ``monitor`` by its best value (what sweeps read)."""
    git = git_state()
    if git.get("dirty"):
        log.warning(f"the code has uncommitted changes to tracked files (commit {git['commit'][:10]} + changes); the run "
                    "records git.dirty=true")
    for logger in loggers:
        logger.log_hyperparams({**resolved, "git": git} if git else dict(resolved))
        if kind(logger) == "wandb":
            logger.experiment.define_metric(monitor, summary=mode)  # the sweep's metric: its best value, not its last
        elif kind(logger) == "mlflow":
            client, run_id = logger.experiment, logger.run_id
            for key, value in mlflow_tags(resolved.get("tracking") or {}, git).items():
                client.set_tag(run_id, key, value)


def mlflow_tags(tracking: Mapping[str, Any], git: Mapping[str, Any]) -> dict[str, str]:
    """``tracking`` and the git state as MLflow run tags (MLflow's own names where it has them)."""
    tags = {"group": tracking.get("group"), "job_type": tracking.get("job_type"),
            "mlflow.note.content": tracking.get("notes")}
    tags.update({str(tag): "true" for tag in tracking.get("tags") or ()})
    if git:
        tags.update({"mlflow.source.git.commit": git["commit"], "mlflow.source.git.branch": git["branch"],
                     "git_dirty": str(git["dirty"]).lower()})
    return {k: str(v) for k, v in tags.items() if v is not None}


def finish_tracking(loggers: Sequence[Any], run_dir: Path, metrics: Mapping[str, float]) -> None:
    """The final metrics (best and test) in each tracker's summary, and the run's reports as media and tables."""
    reports = sorted(p for p in (Path(run_dir) / "reports").glob("*") if p.stem in REPORTS and p.suffix in (".png", ".csv"))
    for logger in loggers:
        if kind(logger) == "wandb":
            publish_wandb(logger, metrics, reports)
        elif kind(logger) == "mlflow":
            publish_mlflow(logger, metrics, reports, run_dir)


def publish_wandb(logger: Any, metrics: Mapping[str, float], reports: Sequence[Path]) -> None:
    import pandas as pd
    import wandb

    run = logger.experiment
    run.summary.update({k: v for k, v in metrics.items() if not k.startswith(("val/", "train/"))})
    media: dict[str, Any] = {}
    for path in reports:
        if path.suffix == ".png":
            media[f"reports/{path.stem}"] = wandb.Image(str(path))
        elif path.stem in WANDB_TABLES:
            frame = pd.read_csv(path)
            media[f"reports/{path.stem}_table"] = wandb.Table(dataframe=frame.astype(str) if path.stem == "confusion_matrix"
                                                              else frame)
    if media:
        run.log(media)


def publish_mlflow(logger: Any, metrics: Mapping[str, float], reports: Sequence[Path], run_dir: Path) -> None:
    client, run_id = logger.experiment, logger.run_id
    for key, value in metrics.items():
        if key.startswith(("best/", "test/", "time/", "params/")):
            client.log_metric(run_id, key, float(value))
    for path in reports:
        client.log_artifact(run_id, str(path), artifact_path="reports")
    for name in ("config.yaml", "metrics.json", "labels.json", "data_report.json"):
        if (Path(run_dir) / name).is_file():
            client.log_artifact(run_id, str(Path(run_dir) / name))


def close_loggers(loggers: Sequence[Any], failed: bool) -> None:
    """Finish each W&B run (a sweep's next run starts a fresh one), as failed when the run raised."""
    for logger in loggers:
        if kind(logger) == "wandb" and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish(exit_code=1 if failed else 0)
