"""Compose the config, check it, build data + model + trainer, fit, test the best checkpoint, report.

    python train.py                      # the default experiment (MiniLM on BBC News, offline)
    python train.py --help               # config groups and their options

The pieces live in ``run/`` (build, checks, checkpoints, resume, results, tracking); this file only wires them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from run.config import check_command_line  # importing it registers the resolvers the configs use

if TYPE_CHECKING:
    from run.results import RunMetrics

# torch, Lightning and the rest of the project are imported inside train(): `--help` stays instant


def train(cfg: DictConfig) -> RunMetrics:
    """Run one experiment; return its final metrics (``best/<monitor>`` included)."""
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from callbacks.preemption import preempted
    from modules.errors import TrainingError
    from modules.scaling import graph_break_refusal
    from run import batch_find, budget, checks, elastic, lr_find, results
    from run.build import build, build_callbacks, build_parts
    from run.checkpoints import check_checkpoint
    from run.resume import resume_config
    from run.tracking import close_loggers, start_loggers

    started = time.time()
    if cfg.get("resume"):  # the run's own config, continued in its folder from its newest checkpoint
        hydra_cfg = HydraConfig.get()
        cfg = resume_config(cfg, list(hydra_cfg.overrides.task), list(hydra_cfg.runtime.choices))
    checks.check_config(cfg)
    budget.check(cfg)
    lr_find.check(cfg)
    batch_find.check(cfg)
    cfg = checks.complete_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    exports = checks.export_targets(cfg, run_dir)

    pl.seed_everything(cfg.seed, workers=True)
    parts = build_parts(cfg)
    checks.check_parts(cfg, parts)
    ckpt = check_checkpoint(cfg.get("ckpt_path"), parts.task, cfg.get("trust_checkpoint", False))
    callbacks = build_callbacks(cfg)
    checks.check_callbacks(cfg, callbacks)
    sized = batch_find.run(cfg, parts, ckpt)  # tune=batch_size: the largest micro-batch that fits becomes data.batch_size
    elastic.plan(cfg, ckpt)  # the global batch on this many processes; this segment recorded in config.yaml
    budget.resolve(cfg, parts.datamodule)  # trainer.max_epochs=auto, budget.minutes: from the data's size
    range_test = lr_find.run(cfg, parts, ckpt)  # tune=lr: the suggestion becomes optimizer.lr before config.yaml

    resolved = results.write_config(cfg, run_dir)  # every check passed: only now is the run folder written
    if sized is not None:
        batch_find.save(*sized, run_dir)
    if range_test is not None:
        lr_find.save(*range_test, run_dir)
    loggers = start_loggers(cfg, run_dir, resolved, ckpt)
    del ckpt
    failed = True
    try:
        trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        results.write_inputs(trainer, parts, run_dir)
        try:
            resumed = {"ckpt_path": cfg.ckpt_path, "weights_only": not cfg.trust_checkpoint} if cfg.get("ckpt_path") else {}
            trainer.fit(parts.task, datamodule=parts.datamodule, **resumed)
        except SIGTERMException:  # SIGTERM / SIGINT / SIGUSR1: Preemption saved last.ckpt at the step boundary
            raise preempted(trainer, run_dir) from None
        metrics = results.fit_metrics(cfg, trainer, parts)
        metrics.update(results.test_best(cfg, trainer, parts))
        results.save_artifacts(trainer, parts, exports, run_dir)
        results.report(trainer, metrics, loggers, run_dir, started)
        failed = False
    except Exception as err:  # compile_options.fullgraph made a graph break an error: one line, not dynamo's page
        refusal = graph_break_refusal(parts.task.scale_plan, err)
        if refusal is None:
            raise
        raise TrainingError(refusal) from None
    finally:
        close_loggers(loggers, failed)
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Entry point; returns the monitored metric of the best checkpoint so sweepers can optimise it."""
    import torch

    from modules.errors import Preempted, UserInputError

    torch.set_float32_matmul_precision("high")
    try:
        metrics = train(cfg)
    except UserInputError as err:
        sys.exit(f"tunelab: error: {err}")
    except Preempted as stop:  # a clean stop, not an error: 128 + the signal number, as a shell reports it
        print(f"tunelab: stopped: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    return metrics.monitored


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
