"""A run folder is one run: ``resume=<run folder>`` continues it there, with its own config, its newest
checkpoint, and its logs (CSV, TensorBoard, W&B) continued rather than restarted."""

from __future__ import annotations

import copy
import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig, OmegaConf, open_dict

from modules.errors import ConfigError
from run.checkpoints import is_checkpoint
from run.config import apply_overrides, upgrade
from run.secrets import REDACTED

log = logging.getLogger("tunelab")

WANDB_ID_FILE = "wandb_run_id"
# checkpoints a run can continue from: ours, and Lightning's SLURM auto-requeue checkpoint
RESUMABLE = ("last.ckpt", "hpc_ckpt_*.ckpt")


def run_folder_of(resume: str) -> Path:
    """``resume`` names a run folder, or a checkpoint inside one (``<run>/checkpoints/x.ckpt``)."""
    path = Path(str(resume)).expanduser()
    if is_checkpoint(path) and path.parent.name == "checkpoints":
        path = path.parent.parent
    if not (path / "config.yaml").is_file():
        what = "does not exist" if not path.exists() else "holds no config.yaml (not a tunelab run folder)"
        raise ConfigError(f"resume={resume!r} {what}; give the folder of the run to continue (outputs/<run_name>/<date_time>)")
    return path


def newest_checkpoint(run_dir: Path, resume: str) -> Path:
    """The checkpoint to continue from: the named one, else the newest of last.ckpt / SLURM's hpc_ckpt_*.ckpt."""
    named = Path(str(resume)).expanduser()
    if is_checkpoint(named):
        return named
    found = [p for pattern in RESUMABLE for p in (run_dir / "checkpoints").glob(pattern)]
    found += list(run_dir.glob("hpc_ckpt_*.ckpt"))  # Lightning writes these to trainer.default_root_dir
    if not found:
        raise ConfigError(f"resume={resume!r}: the run saved no checkpoint to continue from (checkpoints/last.ckpt); "
                          "start it again, or set callbacks.last_checkpoint.every_n_train_steps so long runs save one")
    return max(found, key=lambda p: p.stat().st_mtime)


def resume_config(cfg: DictConfig, overrides: Sequence[str], groups: Sequence[str]) -> DictConfig:
    """The run's own saved config, with the ``key=value`` overrides given now (e.g. a longer ``trainer.max_epochs``)
    applied on top; ``ckpt_path`` set to its newest checkpoint.

    Args:
        cfg: the config composed for this command (it supplies values the saved config had to redact).
        overrides: this command's overrides (Hydra's ``overrides.task``).
        groups: the config group names: choosing another option of a group cannot apply to a resolved config.
    """
    resume = str(cfg.resume)
    if cfg.get("ckpt_path"):
        raise ConfigError(f"give resume={resume!r} or ckpt_path={cfg.ckpt_path!r}, not both: resume continues a run in its "
                          "own folder, ckpt_path starts a new run folder from a checkpoint")
    run_dir = run_folder_of(resume)
    checkpoint = newest_checkpoint(run_dir, resume)
    saved = OmegaConf.load(run_dir / "config.yaml")
    upgrade(saved)
    given = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~") == "resume"]
    placement = [o for o in given if o.split("=", 1)[0] == "trainer"]
    if placement:  # trainer=ddp|fsdp2|cpu|gpu...: where it runs now; how long and how it trains stay the run's
        place_trainer(saved, cfg)
    apply_overrides(saved, [o for o in given if o not in placement], groups, "resume",
                    "a resumed run keeps its own config, so give only key=value changes (e.g. trainer.max_epochs=5, "
                    "trainer.devices=1) or trainer=<option>, or start a new run")
    for key in redacted_keys(OmegaConf.to_container(saved, resolve=False)):
        fresh = OmegaConf.select(cfg, key, default=None)
        if fresh in (None, REDACTED):
            raise ConfigError(f"resume: {key} was redacted from the saved config.yaml (a secret); give it again "
                              f"({key}=...), or better, set it in the environment")
        OmegaConf.update(saved, key, fresh, force_add=True)
    with open_dict(saved):
        saved.resume = resume
        saved.ckpt_path = str(checkpoint)
        saved.paths.output_dir = str(run_dir)
    log.info(f"resuming the run in {run_dir} from {saved.ckpt_path}")
    return saved


# what a trainer option (configs/trainer/) decides: where and on how many processes the run trains
PLACEMENT = ("accelerator", "devices", "num_nodes", "strategy", "sync_batchnorm", "precision")


def place_trainer(saved: DictConfig, cfg: DictConfig) -> None:
    """A resumed run moved to the trainer option this command picked (``resume=<run> trainer=fsdp2``): its placement
    keys (``PLACEMENT``) from the option, everything else (epochs, accumulation, clipping, limits) the run's own."""
    with open_dict(saved):
        for key in PLACEMENT:
            if key in cfg.trainer:
                saved.trainer[key] = copy.deepcopy(cfg.trainer[key])
            elif key in saved.trainer:
                del saved.trainer[key]
    log.info(f"resume: trainer placement now {', '.join(f'{k}={saved.trainer.get(k)}' for k in PLACEMENT if k in saved.trainer)}")


def redacted_keys(config: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose saved value is the redaction marker (``config``: a plain container)."""
    if isinstance(config, dict):
        return [k for key, value in config.items() for k in redacted_keys(value, f"{prefix}{key}.")]
    if isinstance(config, list):
        return [k for i, value in enumerate(config) for k in redacted_keys(value, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if config == REDACTED else []


def logged_step(ckpt: dict[str, Any]) -> int:
    """The logging step of a checkpoint: rows logged after it carry larger steps (Lightning logs with the number
    of batches that stepped the optimizer, which the checkpoint stores)."""
    loop = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    return int(loop.get("_batches_that_stepped", ckpt.get("global_step", 0)))


def continued_loggers(logger_cfg: DictConfig | None, run_dir: Path, ckpt: dict[str, Any]) -> DictConfig | None:
    """The logger configs of a resumed run, pointed at what the run already wrote: the CSV file keeps its rows up to
    the checkpoint, TensorBoard purges the events after it, W&B re-attaches to the stored run id."""
    if not logger_cfg:
        return logger_cfg
    step = logged_step(ckpt)
    logger_cfg = copy.deepcopy(logger_cfg)
    with open_dict(logger_cfg):
        for node in logger_cfg.values():
            if node is None or "_target_" not in node:
                continue
            target = str(node._target_)
            if target.endswith("CSVLogger"):
                node._target_ = "run.resume.ContinuedCSVLogger"
                node.resume_step = step
            elif target.endswith("TensorBoardLogger"):
                node.purge_step = step + 1  # SummaryWriter drops older events from this step on
            elif target.endswith("WandbLogger"):
                id_file = run_dir / WANDB_ID_FILE
                if id_file.is_file():
                    node.id = id_file.read_text().strip()
                    node.resume = "allow"
                else:
                    log.warning(f"no {WANDB_ID_FILE} in {run_dir}: W&B starts a new run for the resumed one")
    return logger_cfg


def remember_wandb_runs(loggers: Sequence[Any], run_dir: Path) -> None:
    """Store the W&B run id in the run folder, so ``resume=`` re-attaches to the same W&B run (rank 0 only)."""
    from lightning.pytorch.utilities import rank_zero_only

    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and rank_zero_only.rank == 0:
            (run_dir / WANDB_ID_FILE).write_text(str(logger.experiment.id))


class ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing an existing ``metrics.csv`` instead of deleting it: rows up to the
    checkpoint's step stay, later ones (the killed run's steps, about to be replayed) go. A row the resumed run logs
    again (the same metrics at a step it kept, e.g. the report at step 0) replaces the old one in place."""

    def __init__(self, log_dir: str, resume_step: int) -> None:
        self.resume_step = resume_step
        self._kept: dict[tuple[int, frozenset[str]], int] = {}  # (step, metric names) -> row number
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as file:
            reader = csv.DictReader(file)
            rows, header = list(reader), list(reader.fieldnames or [])
        kept = [row for row in rows if row_step(row) <= self.resume_step]
        self.metrics_keys = sorted(header)
        for i, row in enumerate(kept):
            self._kept.setdefault(signature(row), i)
        self._write(kept)
        if len(kept) < len(rows):
            log.info(f"metrics.csv: kept {len(kept)} rows up to step {self.resume_step}, dropped {len(rows) - len(kept)} "
                     "logged after the checkpoint (the resumed run logs them again)")

    def _write(self, rows: list[dict[str, Any]]) -> None:
        with open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)

    def save(self) -> None:
        replaced = {}
        if self._kept and self.metrics:
            fresh = []
            for metrics in self.metrics:
                row = self._kept.pop(signature(metrics), None)
                if row is None:
                    fresh.append(metrics)
                else:
                    replaced[row] = metrics
            self.metrics = fresh
        if replaced:
            with open(self.metrics_file_path, newline="") as file:
                rows = list(csv.DictReader(file))
            for i, metrics in replaced.items():
                rows[i] = {key: metrics.get(key, "") for key in self.metrics_keys}
            self._write(rows)
        super().save()


def signature(row: dict[str, Any]) -> tuple[int, frozenset[str]]:
    """A CSV row's step and the metrics it holds (empty cells are metrics it does not hold)."""
    return row_step(row), frozenset(k for k, v in row.items() if v not in ("", None))


def row_step(row: dict[str, Any]) -> int:
    step = row.get("step")
    return -1 if step in ("", None) else int(float(step))


class ContinuedCSVLogger(CSVLogger):
    """``CSVLogger`` for a resumed run (``resume=``): appends to the run's ``metrics.csv``, never deletes it."""

    def __init__(self, *args: Any, resume_step: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuedWriter(self.log_dir, self.resume_step)
        return self._experiment
