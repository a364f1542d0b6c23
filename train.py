"""Compose the config, build data + model + trainer, fit, test the best checkpoint, report.

    python train.py                      # the default experiment (MiniLM on BBC News, offline)
    python train.py --help               # config groups and their options
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

# torch, Lightning and the project's modules are imported inside train(): `--help` stays instant

log = logging.getLogger("tunelab")

SECRET_KEY = re.compile(r"(api_?key|token|secret|password)", re.IGNORECASE)


def redact(config: Any) -> Any:
    """A plain copy of ``config`` with values of secret-looking keys replaced."""
    if isinstance(config, Mapping):
        return {k: "<redacted>" if SECRET_KEY.search(str(k)) else redact(v) for k, v in config.items()}
    if isinstance(config, list):
        return [redact(v) for v in config]
    return config


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets our one-line input errors through unwrapped."""
    from modules.errors import UserInputError

    kwargs.setdefault("_convert_", "all")  # plain lists/dicts, so checkpoints hold no OmegaConf types
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, UserInputError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def build_each(nodes: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a name -> config mapping, skipping entries set to null."""
    return [build(node) for node in (nodes or {}).values() if node is not None and "_target_" in node]


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one experiment; return its final metrics (``best/<monitor>`` included)."""
    import lightning.pytorch as pl
    import torch

    started = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cpu_safe_sync_batchnorm(cfg)
    resolved = redact(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.save(OmegaConf.create(resolved), run_dir / "config.yaml")

    check_requirements(cfg.get("requires"))
    exports = export_targets(cfg.export_backbone) if cfg.get("export_backbone") else []  # malformed: fail now, not after training
    backbone = build(cfg.backbone)
    datamodule = build(cfg.data, processor=backbone.processor)
    task_kwargs = datamodule.task_kwargs()
    scheduler = build(cfg.scheduler) if cfg.get("scheduler") else None
    model = build(cfg.task, backbone=backbone, optimizer=build(cfg.optimizer), scheduler=scheduler, **task_kwargs)

    # the freezing schedule goes first, so reports see its changes at the same step
    callbacks = ([build(cfg.finetune)] if cfg.get("finetune") else []) + build_each(cfg.get("callbacks"))
    loggers = build_each(cfg.get("logger"))
    for logger in loggers:
        logger.log_hyperparams(resolved)
    trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if trainer.is_global_zero:
        datamodule.save_to(run_dir)

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["params/total"] = float(sum(p.numel() for p in model.parameters()))
    metrics["params/trainable"] = float(sum(p.numel() for p in model.parameters() if p.requires_grad))
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    best_score = getattr(trainer.checkpoint_callback, "best_model_score", None)
    if best_score is not None:
        metrics[f"best/{cfg.monitor}"] = float(best_score)
    if cfg.get("test_after_fit"):
        if best is None:
            log.warning("no best checkpoint (fast_dev_run, or no monitored metric): testing the final weights")
        results = trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
        metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})
    if exports:
        if best and not cfg.get("test_after_fit"):  # testing already loaded the best weights
            model.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
        if trainer.is_global_zero:
            for target in exports:
                folder = model.backbone.save_pretrained(run_dir / Path(target).expanduser())
                log.info(f"saved the {'best' if best else 'final'} backbone to {folder}; use it with backbone.name_or_path={folder}")
    metrics["time/total_s"] = time.time() - started

    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        print_summary(metrics, run_dir, best)
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":  # flush and close, so sweeps start a fresh run
            logger.experiment.finish()
    return metrics


def cpu_safe_sync_batchnorm(cfg: DictConfig) -> None:
    """``trainer=ddp`` syncs BatchNorm statistics across processes, which torch's DDP only supports on
    GPUs; on CPU processes (gloo) turn it off, with a warning, instead of crashing at the first step."""
    import torch

    trainer = cfg.get("trainer") or {}
    if not trainer.get("sync_batchnorm"):
        return
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        log.warning("trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm has no CPU support under DDP); "
                    "running with per-process BatchNorm statistics on CPU")
        with open_dict(cfg):
            cfg.trainer.sync_batchnorm = False


def export_targets(export: Any) -> list[str]:
    """``export_backbone``: one folder or a list of them (e.g. the run folder and a stable path a later preset reads)."""
    from modules.errors import ConfigError

    targets = [export] if isinstance(export, str) else list(export) if isinstance(export, Sequence) else None
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"export_backbone={export!r} must be a folder or a list of folders (or null to export nothing)")
    return targets


def check_requirements(requires: Any) -> None:
    """Presets that build on an earlier run list ``{path, hint}`` entries; fail early with the hint."""
    from modules.errors import ConfigError

    for entry in requires or ():
        if not isinstance(entry, Mapping) or "path" not in entry:
            raise ConfigError(f"requires entry {entry!r} must be a mapping with 'path' and 'hint'")
        if not Path(str(entry["path"])).expanduser().exists():
            raise ConfigError(f"{entry['path']} does not exist; {entry.get('hint') or 'make it first'}")


def print_summary(metrics: dict[str, float], run_dir: Path, best: str | None) -> None:
    table = Table(title="Final metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        if key.startswith(("test/", "best/", "val/", "time/")):
            table.add_row(key, f"{metrics[key]:.4f}")
    console = Console()
    console.print(table)
    console.print(f"run folder: {run_dir.resolve()}")
    if best:
        console.print(f"best checkpoint: {best}")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Entry point; returns the monitored metric of the best checkpoint so sweepers can optimise it."""
    import torch

    from modules.errors import UserInputError

    torch.set_float32_matmul_precision("high")
    try:
        metrics = train(cfg)
    except UserInputError as err:
        sys.exit(f"tunelab: error: {err}")
    return metrics.get(f"best/{cfg.monitor}", metrics.get(cfg.monitor))


if __name__ == "__main__":
    main()
