"""Compose the config, build data + model + trainer, fit, test the best checkpoint, report.

    python train.py                      # the default experiment (MiniLM on BBC News, offline)
    python train.py --help               # config groups and their options
"""

from __future__ import annotations

import json
import logging
import numbers
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

# torch, Lightning and the project's modules are imported inside train(): `--help` stays instant

log = logging.getLogger("tunelab")

# runs whose weights are meaningless by design (one batch; a few memorised batches)
SMOKE_TRAINER_KEYS = ("fast_dev_run", "overfit_batches")


def run_dir_resolver(resume: Any, default: str) -> str:
    """Hydra's run folder: the one ``resume`` names (a run folder, or a checkpoint inside one), else ``default``."""
    if resume in (None, ""):
        return default
    path = Path(str(resume))
    if path.suffix == ".ckpt" and path.parent.name == "checkpoints":
        path = path.parent.parent
    return str(path)


if not OmegaConf.has_resolver("tunelab.run_dir"):
    OmegaConf.register_new_resolver("tunelab.run_dir", run_dir_resolver)
if not OmegaConf.has_resolver("tunelab.folder_name"):  # e.g. a W&B group named after the multirun's folder
    OmegaConf.register_new_resolver("tunelab.folder_name", lambda path: Path(str(path)).name)


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
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from callbacks.preemption import Preemption
    from callbacks.secrets import redact
    from modules.errors import Preempted
    from modules.runs import continue_loggers, remember_wandb_runs, resume_config
    from modules.scaling import ScalePlan
    from modules.tracking import allow_mlflow_file_store, finish_tracking, start_tracking

    started = time.time()
    if cfg.get("resume"):  # the run's own config, continued in its folder from its newest checkpoint
        hydra_cfg = HydraConfig.get()
        cfg = resume_config(cfg, list(hydra_cfg.overrides.task), list(hydra_cfg.runtime.choices))
    check_config(cfg)
    task_cls = check_task_and_data(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cpu_safe_sync_batchnorm(cfg)
    resolved = redact(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.save(OmegaConf.create(resolved), run_dir / "config.yaml")

    check_requirements(cfg.get("requires"))
    exports = export_targets(cfg.export_backbone, run_dir, smoke_run(cfg)) if cfg.get("export_backbone") else []
    backbone = build(cfg.backbone)
    check_backbone(cfg, backbone, task_cls, exports)
    datamodule = build(cfg.data, processor=backbone.processor)
    spec = datamodule.data_spec()
    scheduler = build(cfg.scheduler) if cfg.get("scheduler") else None
    model = build(cfg.task, backbone=backbone, optimizer=build(cfg.optimizer), scheduler=scheduler, **spec.task_kwargs())
    model.scale_plan = ScalePlan(compile=cfg.get("compile"), activation_checkpointing=bool(cfg.get("activation_checkpointing")))
    check_monitor(cfg, model)
    ckpt = check_checkpoint(cfg.get("ckpt_path"), model)
    if cfg.get("resume") and ckpt is not None:
        continue_loggers(cfg.get("logger"), run_dir, ckpt)
    del ckpt

    # the freezing schedule goes first, so reports see its changes at the same step
    callbacks = ([build(cfg.finetune)] if cfg.get("finetune") else []) + build_each(cfg.get("callbacks"))
    check_strategy(cfg, callbacks)
    allow_mlflow_file_store(cfg.get("logger"))
    check_lora(cfg, callbacks)
    loggers = build_each(cfg.get("logger"))
    start_tracking(loggers, resolved, str(cfg.monitor), str(cfg.monitor_mode))
    remember_wandb_runs(loggers, run_dir)
    trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if trainer.is_global_zero:
        datamodule.save_to(run_dir)
        backbone.save_architecture(run_dir / "backbone")  # eval / predict / export rebuild it from here, offline

    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SIGTERMException:  # SIGTERM / SIGINT / SIGUSR1: Preemption saved last.ckpt at the step boundary
        stop = next((cb for cb in trainer.callbacks if isinstance(cb, Preemption)), None)
        raise Preempted(getattr(stop, "received", None) or "SIGTERM", trainer.global_step,
                        getattr(stop, "path", None), run_dir) from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for callback in trainer.callbacks:
        if hasattr(callback, "final_metrics"):  # e.g. non-finite steps skipped, or where training was stopped
            metrics.update(callback.final_metrics())
    if "nonfinite/stopped_at_step" in metrics:
        log.warning(f"training stopped at optimizer step {int(metrics['nonfinite/stopped_at_step'])}: non-finite loss or "
                    "gradients (on_nonfinite=stop); the best checkpoint and the test metrics predate it")
    for callback in trainer.callbacks:  # work that needs the fitted model and the run's trainer (WiSE-FT's α sweep)
        if hasattr(callback, "after_fit"):
            metrics.update(callback.after_fit(trainer, model, datamodule))
    metrics["params/total"] = float(sum(p.numel() for p in model.parameters()))
    metrics["params/trainable"] = float(sum(p.numel() for p in model.parameters() if p.requires_grad))
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    best_score = getattr(trainer.checkpoint_callback, "best_model_score", None)
    if best_score is not None:
        metrics[f"best/{cfg.monitor}"] = float(best_score)
    tested = False
    if cfg.get("test_after_fit") and not spec.has_test:
        log.warning("the data has no test split: no test/* metrics (the validation set picked the checkpoint, so it is "
                    "no test set); give a test file/split or set data.test_fraction > 0")
    elif cfg.get("test_after_fit"):
        if best is None:
            log.warning("no best checkpoint (fast_dev_run, or no monitored metric): testing the final weights")
        results = trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
        metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})
        tested = True
    if exports:
        export_backbones(model, trainer, exports, best, tested, run_dir)
    if getattr(model.backbone, "lora", None) is not None and trainer.is_global_zero:
        save_lora_adapters(model, best, run_dir)
    metrics["time/total_s"] = time.time() - started

    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        print_summary(metrics, run_dir, best)
        finish_tracking(loggers, run_dir, metrics)
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":  # flush and close, so sweeps start a fresh run
            logger.experiment.finish()
    return metrics


def export_backbones(model: Any, trainer: Any, exports: list[Path], best: str | None, tested: bool, run_dir: Path) -> None:
    """``export_backbone``: the best backbone (the final one without a best checkpoint) in the Hugging Face format.

    A sharded model (FSDP2) is gathered from every process's shards first, then rank 0 writes it."""
    import torch

    from modules.backbones.base import export_checkpoint, export_state
    from modules.scaling import full_state_dict, is_sharded

    which = "best" if best else "final"
    folders = []
    if is_sharded(model):
        if best and not tested:  # the best weights are in the checkpoint folder, not in the model: gather them there
            folders = [export_checkpoint(best, t) for t in exports] if trainer.is_global_zero else []
        else:  # testing loaded the best weights (or there is none): gather the model's shards, every rank takes part
            state = full_state_dict(model)
            folders = [export_state(run_dir, state, t) for t in exports] if trainer.is_global_zero else []
        trainer.strategy.barrier()
    else:
        if best and not tested:  # testing already loaded the best weights
            # our own checkpoint, written by this run: a full unpickle is safe
            model.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
        if trainer.is_global_zero:
            folders = [model.backbone.save_pretrained(target) for target in exports]
    for folder in folders:
        log.info(f"saved the {which} backbone to {folder}; use it with backbone.name_or_path={folder}")


def save_lora_adapters(model: Any, best: str | None, run_dir: Path) -> None:
    """LoRA runs: the best adapters (and head) alone, in peft's format, in ``<run>/adapters/`` (a few MB at most)."""
    import torch

    from modules.lora import save_adapters

    # our own checkpoint, written by this run: a full unpickle is safe
    state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"] if best else model.state_dict()
    node = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml").backbone, resolve=True)
    folder = save_adapters(state, node, model.backbone.lora_targets, run_dir / "adapters")
    log.info(f"saved the {'best' if best else 'final'} LoRA adapters and head to {folder}")


def check_lora(cfg: DictConfig, callbacks: Sequence[Any]) -> None:
    """LoRA (``finetune=lora``, i.e. ``backbone.lora``) with what it cannot combine with, refused before training."""
    from modules.errors import ConfigError

    if not OmegaConf.select(cfg, "backbone.lora", default=None):
        return
    kind = strategy_kind(cfg)
    if kind in ("fsdp", "fsdp2"):
        raise ConfigError(f"finetune=lora with trainer={kind} is not supported (sharding units would mix frozen base weights "
                          "and trainable adapters, untested here); LoRA's optimizer state is small: use trainer=ddp")
    refused = [type(cb).__name__ for cb in callbacks if type(cb).__name__ == "WiseFT"]
    if refused:
        raise ConfigError("callbacks=wise_ft with finetune=lora: interpolating the adapters' A and B factors does not "
                          "interpolate the weight change B@A; use one or the other")


def check_config(cfg: DictConfig) -> None:
    """Types and ranges of the values people change most, checked before anything heavy starts."""
    from modules.errors import ConfigError

    def number(key: str, low: float | None = None, integer: bool = False, allow: tuple = (), low_open: bool = False) -> None:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or value in allow:
            return
        kind = "a whole number" if integer else "a number"
        ok = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if not ok:
            bound = "" if low is None else f" {'>' if low_open else '>='} {low}"
            extra = f" (or {', '.join(map(str, allow))})" if allow else ""
            raise ConfigError(f"{key}={value!r} must be {kind}{bound}{extra}")

    number("trainer.max_epochs", 1, integer=True, allow=(-1,))
    number("trainer.max_steps", 1, integer=True, allow=(-1,))
    number("trainer.accumulate_grad_batches", 1, integer=True)
    number("trainer.gradient_clip_val", 0)
    number("trainer.log_every_n_steps", 1, integer=True)
    number("optimizer.lr", 0, low_open=True)
    number("optimizer.weight_decay", 0)
    if cfg.get("on_nonfinite") not in (None, "error", "skip", "stop"):
        raise ConfigError(f"on_nonfinite={cfg.on_nonfinite!r} is unknown; choose one of error, skip, stop")
    number("seed", 0, integer=True)
    if cfg.get("compile") not in (None, "regional", "full"):
        raise ConfigError(f"compile={cfg.compile!r} is unknown; choose null (eager), regional (each block) or full")
    if not isinstance(cfg.get("activation_checkpointing", False), bool):
        raise ConfigError(f"activation_checkpointing={cfg.activation_checkpointing!r} must be true or false")
    number("trainer.num_nodes", 1, integer=True)
    devices = OmegaConf.select(cfg, "trainer.devices", default=None)
    ok = (devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1))
          or (OmegaConf.is_list(devices) and len(devices) > 0 and all(isinstance(d, int) and d >= 0 for d in devices)))
    if devices is not None and not ok:
        raise ConfigError(f"trainer.devices={devices!r} must be a whole number >= 1, -1 (all), auto, or a list of device "
                          "ids such as [0,1]")
    for key in ("data.batch_size", "data.eval_batch_size"):
        number(key, 1, integer=True)
    endless = OmegaConf.select(cfg, "trainer.max_epochs") == -1 and OmegaConf.select(cfg, "trainer.max_steps") in (-1, None)
    if endless and cfg.get("scheduler"):
        raise ConfigError("trainer.max_epochs=-1 with no trainer.max_steps trains without end, but scheduler="
                          f"{cfg.scheduler.get('_target_', '?').rsplit('.', 1)[-1]} needs the run's length; set "
                          "trainer.max_steps, a positive trainer.max_epochs, or scheduler=null")


def config_choice(group: str) -> str:
    """The option picked for a config group (``data=bbc_news`` -> ``bbc_news``), for messages."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return str(HydraConfig.get().runtime.choices.get(group) or "?")
    except ValueError:  # no Hydra context (a config built by hand)
        return "?"


def data_class_attr(node: DictConfig, attr: str) -> Any:
    """A class attribute of the datamodule ``node`` builds (joint data: its target dataset's)."""
    cls = hydra.utils.get_class(node._target_)
    value = getattr(cls, attr, None)
    if not isinstance(value, str) and node.get("datasets") and node.get("target") in node.datasets:
        return data_class_attr(node.datasets[node.target], attr)
    return value


def check_task_and_data(cfg: DictConfig) -> type:
    """The task class, after checking it trains on this data; fills in the task's default ``monitor``."""
    from modules.errors import ConfigError

    try:
        task_cls = hydra.utils.get_class(cfg.task._target_)
        data_kind = data_class_attr(cfg.data, "kind") if cfg.data.get("_target_") else None
    except Exception as err:  # noqa: BLE001 - a misspelt _target_: Hydra's message is long
        raise ConfigError(f"cannot import a class named in the config ({str(err).splitlines()[0]})") from None
    wants = getattr(task_cls, "data_kind", "")
    if data_kind and wants and data_kind != wants:
        raise ConfigError(f"task={config_choice('task')} trains on {wants} data, but data={config_choice('data')} is "
                          f"{data_kind} data; pick matching groups (e.g. the presets in configs/experiment/)")
    default_name, default_mode = getattr(task_cls, "default_monitor", ("val/loss", "min"))
    with open_dict(cfg):
        if cfg.get("monitor") is None:
            cfg.monitor, cfg.monitor_mode = default_name, cfg.get("monitor_mode") or default_mode
        elif cfg.get("monitor_mode") is None:
            lower = ("loss", "wer", "cer", "perplexity", "error")
            cfg.monitor_mode = "min" if any(str(cfg.monitor).endswith(w) for w in lower) else "max"
    if cfg.monitor_mode not in ("min", "max"):
        raise ConfigError(f"monitor_mode={cfg.monitor_mode!r} must be min or max")
    return task_cls


def check_backbone(cfg: DictConfig, backbone: Any, task_cls: type, exports: list[Path]) -> None:
    """The backbone reads the data's modality, and can be exported when ``export_backbone`` asks for it."""
    from modules.errors import ConfigError

    wanted = data_class_attr(cfg.data, "modality") if cfg.data.get("_target_") else None
    have = getattr(backbone, "modality", "")
    if wanted and have and wanted != have:
        raise ConfigError(f"data={config_choice('data')} is {wanted} data, but backbone={config_choice('backbone')} reads "
                          f"{have}; pick a {wanted} backbone (see `python train.py --help`, group backbone)")
    if exports and not getattr(backbone, "exportable", False):
        raise ConfigError(f"export_backbone is set, but backbone={config_choice('backbone')} ({type(backbone).__name__}) "
                          "cannot be saved in the Hugging Face format; set export_backbone=null and use the run's checkpoints")


def strategy_kind(cfg: DictConfig) -> str:
    """``fsdp2``, ``fsdp``, ``ddp`` or ``single``: what ``trainer.strategy`` asks for (before it is built)."""
    strategy = (cfg.get("trainer") or {}).get("strategy", "auto")
    name = str(strategy.get("_target_", "") if OmegaConf.is_dict(strategy) else strategy).rsplit(".", 1)[-1].lower()
    if name.startswith(("fsdp2", "modelparallel")):
        return "fsdp2"
    if name.startswith("fsdp"):
        return "fsdp"
    return "ddp" if name.startswith("ddp") else "single"


def check_strategy(cfg: DictConfig, callbacks: Sequence[Any]) -> None:
    """The strategy fits the machine and the run's callbacks, checked before any process is started."""
    import os

    import torch

    from modules.errors import ConfigError
    from modules.scaling import FULL_COMPILE_UNDER_FSDP2

    trainer = cfg.get("trainer") or {}
    kind = strategy_kind(cfg)
    accelerator = str(trainer.get("accelerator", "auto"))
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if kind == "fsdp" and not (on_gpu and torch.cuda.is_available()):
        raise ConfigError("trainer=fsdp (FSDP1) needs CUDA GPUs and this machine has none; on CPU processes use "
                          "trainer=fsdp2 trainer.accelerator=cpu (FSDP2 over gloo)")
    devices = trainer.get("devices")
    if isinstance(devices, int) and devices > 1:
        have = torch.cuda.device_count() if on_gpu else (os.cpu_count() or 1)
        what = "GPUs" if on_gpu else "CPU cores (one process per device)"
        if devices > have:
            raise ConfigError(f"trainer.devices={devices} but this machine has {have} {what}; set trainer.devices<={have}"
                              " (trainer.num_nodes spreads a run over several machines)")
    if kind == "fsdp2":
        from callbacks.ema import WeightEMA
        from callbacks.wise_ft import WiseFT

        refused = [type(cb).__name__ for cb in callbacks if isinstance(cb, (WeightEMA, WiseFT))]
        if refused:
            raise ConfigError(f"{refused[0]} keeps a full copy of the weights beside the sharded model, which FSDP2 does "
                              "not support here; drop it (callbacks=default) or train with trainer=ddp")
        if cfg.get("compile") == "full":
            raise ConfigError(FULL_COMPILE_UNDER_FSDP2)


def check_monitor(cfg: DictConfig, model: Any) -> None:
    """``monitor`` names a metric the task logs (checked now, not after the first epoch)."""
    from modules.errors import ConfigError

    names = model.monitorable() if hasattr(model, "monitorable") else None
    monitor = str(cfg.monitor)
    if names and monitor.startswith(("val/", "train/")) and monitor not in names:
        raise ConfigError(f"monitor={monitor!r} is not a metric this task logs; choose one of: {', '.join(names)}")


def check_checkpoint(ckpt_path: str | None, model: Any) -> dict[str, Any] | None:
    """``ckpt_path`` exists, loads, and holds this task's weights (names and shapes), before training starts.

    Returns the checkpoint (memory-mapped: its tensors are not read), or None without ``ckpt_path``."""
    import torch

    from modules.errors import ConfigError
    from modules.inference import (
        SHARDED_META,
        is_checkpoint,
        is_sharded_checkpoint,
        sharded_checkpoint_shapes,
        state_mismatch,
    )

    if not ckpt_path:
        return None

    path = Path(str(ckpt_path)).expanduser()
    if not is_checkpoint(path):
        raise ConfigError(f"ckpt_path={ckpt_path!r} does not exist; give <run>/checkpoints/last.ckpt of the run to resume")
    try:  # a Lightning checkpoint pickles more than tensors; this one is about to be resumed from anyway.
        if is_sharded_checkpoint(path):  # names and shapes from the shards' metadata; the rest from meta.pt
            # meta.pt is the same pickle Lightning's own resume of this folder unpickles right after this check
            ckpt = torch.load(path / SHARDED_META, map_location="cpu", weights_only=False)
            ckpt["state_dict"] = {k: torch.empty(size, device="meta") for k, size in sharded_checkpoint_shapes(path).items()}
        else:  # mmap: only the names and shapes are read now, not the weights (Lightning reads them once, later)
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        state = ckpt["state_dict"]
    except Exception as err:  # noqa: BLE001 - truncated zip, unpickling, missing key: all mean "not a checkpoint"
        raise ConfigError(f"ckpt_path={ckpt_path!r} is not a readable Lightning checkpoint ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:120] if str(err) else 'no detail'}); a run killed while saving "
                          "leaves one: resume from an earlier checkpoint") from None
    problem = state_mismatch(model.state_dict(), state)
    if problem:
        raise ConfigError(f"ckpt_path={ckpt_path!r} holds another model ({problem}); resume with the config of the run "
                          "that saved it")
    return ckpt


def smoke_run(cfg: DictConfig) -> bool:
    """A smoke run (``debug=fast_dev_run``, ``debug=overfit``): its weights must not replace real artifacts."""
    trainer = cfg.get("trainer") or {}
    return any(trainer.get(k) not in (None, False, 0) for k in SMOKE_TRAINER_KEYS)


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


def export_targets(export: Any, run_dir: Path, smoke: bool = False) -> list[Path]:
    """``export_backbone``: one folder or a list (relative to the run folder, or absolute).

    A smoke run (``debug=fast_dev_run`` and friends) exports only inside its own run folder: one
    batch of training must never overwrite an encoder that a later preset reads.
    """
    from modules.errors import ConfigError

    targets = [export] if isinstance(export, str) else list(export) if isinstance(export, Sequence) else None
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"export_backbone={export!r} must be a folder or a list of folders (or null to export nothing)")
    folders = [(run_dir / Path(t).expanduser()).resolve() for t in targets]
    if smoke:
        outside = [f for f in folders if not f.is_relative_to(run_dir.resolve())]
        if outside:
            log.warning(f"smoke run (fast_dev_run / overfit_batches): not exporting to {', '.join(map(str, outside))}")
        folders = [f for f in folders if f not in outside]
    return folders


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

    from modules.errors import Preempted, UserInputError

    torch.set_float32_matmul_precision("high")
    try:
        metrics = train(cfg)
    except UserInputError as err:
        sys.exit(f"tunelab: error: {err}")
    except Preempted as stop:  # a clean stop, not an error: 128 + the signal number, as a shell reports it
        print(f"tunelab: stopped: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    return metrics.get(f"best/{cfg.monitor}", metrics.get(cfg.monitor))


def check_command_line(argv: Sequence[str], config_name: str = "train") -> None:
    """Compose the config once before Hydra does: a misspelt key, an unknown option or preset, or an override
    Hydra cannot parse becomes one ``tunelab: error:`` line (Hydra prints several, then a hint about stack traces)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException

    if any(arg.startswith("-") for arg in argv):  # --help, --cfg, --multirun (sweeps: Hydra parses those itself)
        return
    try:
        with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent / "configs"), version_base="1.3"):
            compose(config_name=config_name, overrides=list(argv))
    except MissingConfigException as err:
        group, _, option = str(err.missing_cfg_file or "").rpartition("/")
        if group and err.options:
            sys.exit(f"tunelab: error: {group}={option} is not an option of {group}; choose one of: {', '.join(err.options)}")
        sys.exit(f"tunelab: error: {' '.join(str(err).split())}")
    except OverrideParseException as err:
        sys.exit(f"tunelab: error: cannot parse the override {err.override!r}: {' '.join(str(err).split())}")
    except HydraException as err:
        text = " ".join(str(err).split())
        text = text.replace(". To append to your config use", ": no such key; to add a new key use")
        sys.exit(f"tunelab: error: {text} (python train.py --help lists the groups and options)")
    finally:
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    main()
