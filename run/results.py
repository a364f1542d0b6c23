"""What a run leaves in its folder, and when: its resolved config and inputs before fitting; after it, the final
metrics (fit, end-of-run callbacks, the test of the best checkpoint), the exported backbone and LoRA adapters,
``metrics.json``, the summary table and the trackers' summaries."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from callbacks.run_end import run_end_metrics
from run.build import Parts
from run.checkpoints import read_checkpoint
from run.secrets import redact
from run.tracking import finish_tracking

log = logging.getLogger("tunelab")


def write_config(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """``config.yaml``: the resolved config, secrets redacted (what eval, predict, export and resume read); returned."""
    resolved = redact(OmegaConf.to_container(cfg, resolve=True))
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(resolved), run_dir / "config.yaml")
    return resolved


def write_inputs(trainer: Any, parts: Parts, run_dir: Path) -> None:
    """The data's files (labels / vocabulary, data report) and the backbone's architecture (config + tokenizer or
    feature extractor): eval, predict and export rebuild the model from these, offline."""
    if trainer.is_global_zero:
        parts.datamodule.save_to(run_dir)
        parts.backbone.save_architecture(run_dir / "backbone")


def best_checkpoint(trainer: Any) -> str | None:
    """The best checkpoint the monitored metric picked, if one was saved."""
    return getattr(trainer.checkpoint_callback, "best_model_path", "") or None


class RunMetrics(dict):
    """A run's final metrics (metric name -> value), knowing which one the run monitored."""

    def __init__(self, values: dict[str, float], monitor: str) -> None:
        super().__init__(values)
        self.monitor = monitor

    @property
    def monitored(self) -> float | None:
        """The best value of the monitored metric (what sweepers optimise), else its last value."""
        return self.get(f"best/{self.monitor}", self.get(self.monitor))


def fit_metrics(cfg: DictConfig, trainer: Any, parts: Parts) -> RunMetrics:
    """The metrics of fitting: the last logged values (of the run before its resume too), the end-of-run callbacks'
    (``callbacks.run_end``), parameter counts and the best monitored value."""
    # a resumed run: what it logged before the checkpoint, then what it logged since (a run resumed after its last
    # step logs no training figure again)
    logged = {**getattr(parts.task, "resumed_callback_metrics", {}), **{k: float(v) for k, v in trainer.callback_metrics.items()}}
    metrics = RunMetrics(logged, str(cfg.monitor))
    metrics.update(run_end_metrics(trainer, parts.task, parts.datamodule))
    if "nonfinite/stopped_at_step" in metrics:
        log.warning(f"training stopped at optimizer step {int(metrics['nonfinite/stopped_at_step'])}: non-finite loss or "
                    "gradients (on_nonfinite=stop); the best checkpoint and the test metrics predate it")
    params = list(parts.task.parameters())
    metrics["params/total"] = float(sum(p.numel() for p in params))
    metrics["params/trainable"] = float(sum(p.numel() for p in params if p.requires_grad))
    best_score = getattr(trainer.checkpoint_callback, "best_model_score", None)
    if best_score is not None:
        metrics[f"best/{cfg.monitor}"] = float(best_score)
    return metrics


def test_best(cfg: DictConfig, trainer: Any, parts: Parts) -> dict[str, float]:
    """The test metrics of the best checkpoint (the final weights without one); none without a test split: the
    validation set picked the checkpoint, so it is never relabelled as a test set."""
    if not cfg.get("test_after_fit"):
        return {}
    if not parts.has_test:
        log.warning("the data has no test split: no test/* metrics (the validation set picked the checkpoint, so it is "
                    "no test set); give a test file/split or set data.test_fraction > 0")
        return {}
    best = best_checkpoint(trainer)
    if best is None:
        log.warning("no best checkpoint (fast_dev_run, or no monitored metric): testing the final weights")
    results = trainer.test(parts.task, datamodule=parts.datamodule, ckpt_path=best, verbose=False)
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def save_artifacts(trainer: Any, parts: Parts, exports: list[Path], run_dir: Path) -> None:
    """The best backbone in the Hugging Face format (``export_backbone``) and a LoRA run's adapters alone, from the
    best checkpoint (the final weights without one; a sharded model's shards gathered)."""
    from modules.lora import save_adapters
    from modules.scaling import full_state_dict
    from run.export import export_backbone

    lora = getattr(parts.backbone, "lora", None) is not None
    if not exports and not lora:
        return
    best = best_checkpoint(trainer)
    state = full_state_dict(parts.task) if best is None else None  # every rank takes part in gathering shards
    if trainer.is_global_zero:
        state = read_checkpoint(best)["state_dict"] if best else state
        which = "best" if best else "final"
        for target in exports:
            folder = export_backbone(run_dir, state, target)
            log.info(f"saved the {which} backbone to {folder}; use it with backbone.name_or_path={folder}")
        if lora:
            node = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml").backbone, resolve=True)
            folder = save_adapters(state, node, parts.backbone.lora_targets, run_dir / "adapters")
            log.info(f"saved the {which} LoRA adapters and head to {folder}")
    trainer.strategy.barrier()


def report(trainer: Any, metrics: dict[str, float], loggers: list[Any], run_dir: Path, started: float) -> None:
    """``metrics.json``, the summary table and the trackers' summaries (rank 0)."""
    metrics["time/total_s"] = time.time() - started
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        print_summary(metrics, run_dir, best_checkpoint(trainer))
        finish_tracking(loggers, run_dir, metrics)


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
