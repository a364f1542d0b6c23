"""Pre-flight checks: everything a run can be told is wrong before anything heavy starts, each as one line that names
the culprit and the fix (``modules.errors.ConfigError``).

``check_config`` looks at values alone; ``complete_config`` returns the config with what follows from it filled in
(the task's monitor); ``check_parts`` / ``check_callbacks`` look at what was built from it.
"""

from __future__ import annotations

import copy
import logging
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from modules.errors import ConfigError

log = logging.getLogger("tunelab")

# runs whose weights are meaningless by design (one batch; a few memorised batches)
SMOKE_TRAINER_KEYS = ("fast_dev_run", "overfit_batches")
# the ending of a monitored metric whose best value is the smallest
LOWER_IS_BETTER = ("loss", "wer", "cer", "perplexity", "error")


def check_config(cfg: DictConfig) -> None:
    """Types and ranges of the values people change most."""

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

    number("trainer.max_epochs", 1, integer=True, allow=(-1, "auto"))
    number("trainer.max_steps", 1, integer=True, allow=(-1,))
    number("trainer.accumulate_grad_batches", 1, integer=True)
    number("trainer.gradient_clip_val", 0)
    number("trainer.log_every_n_steps", 1, integer=True)
    number("optimizer.lr", 0, low_open=True)
    number("optimizer.weight_decay", 0)
    if cfg.get("on_nonfinite") not in (None, "error", "skip", "stop"):
        raise ConfigError(f"on_nonfinite={cfg.on_nonfinite!r} is unknown; choose one of error, skip, stop")
    number("seed", 0, integer=True)
    from modules.scaling import COMPILE_OPTIONS, ScalePlan, plan_fields

    ScalePlan(**plan_fields(cfg))  # compile=, compile_options.*: one line for a value torch.compile would refuse
    unknown = set(cfg.get("compile_options") or {}) - set(COMPILE_OPTIONS)
    if unknown:
        raise ConfigError(f"compile_options.{sorted(unknown)[0]} is unknown; compile_options takes {', '.join(COMPILE_OPTIONS)}")
    if (cfg.get("compile") and (cfg.get("compile_options") or {}).get("dynamic") is False
            and "pad_to_multiple_of" in (cfg.get("data") or {}) and cfg.data.pad_to_multiple_of is None):
        log.warning("compile_options.dynamic=false compiles each padded length anew (up to data.max_length of them); "
                    "data.pad_to_multiple_of=64 (or 8) keeps the shapes few")
    for key in ("activation_checkpointing", "trust_checkpoint"):
        if not isinstance(cfg.get(key, False), bool):
            raise ConfigError(f"{key}={cfg.get(key)!r} must be true or false")
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
    check_requirements(cfg.get("requires"))


def check_requirements(requires: Any) -> None:
    """Presets that build on an earlier run list ``{path, hint}`` entries; fail early with the hint."""
    for entry in requires or ():
        if not isinstance(entry, Mapping) or "path" not in entry:
            raise ConfigError(f"requires entry {entry!r} must be a mapping with 'path' and 'hint'")
        if not Path(str(entry["path"])).expanduser().exists():
            raise ConfigError(f"{entry['path']} does not exist; {entry.get('hint') or 'make it first'}")


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


def complete_config(cfg: DictConfig, training: bool = True) -> DictConfig:
    """A copy of ``cfg`` with what follows from it filled in, after checking the task trains on the data: the task's
    own ``monitor`` (and its mode) when none is given, and for ``training``, ``trainer.sync_batchnorm`` off on CPU
    processes (torch's SyncBatchNorm is GPU-only under DDP: the run says so and keeps per-process statistics)."""
    try:
        task_cls = hydra.utils.get_class(cfg.task._target_)
        data_kind = data_class_attr(cfg.data, "kind") if cfg.data.get("_target_") else None
    except Exception as err:  # noqa: BLE001 - a misspelt _target_: Hydra's message is long
        raise ConfigError(f"cannot import a class named in the config ({str(err).splitlines()[0]})") from None
    wants = getattr(task_cls, "data_kind", "")
    if data_kind and wants and data_kind != wants:
        raise ConfigError(f"task={config_choice('task')} trains on {wants} data, but data={config_choice('data')} is "
                          f"{data_kind} data; pick matching groups (e.g. the presets in configs/experiment/)")
    cfg = copy.deepcopy(cfg)
    default_name, default_mode = getattr(task_cls, "default_monitor", ("val/loss", "min"))
    with open_dict(cfg):
        if cfg.get("monitor") is None:
            cfg.monitor, cfg.monitor_mode = default_name, cfg.get("monitor_mode") or default_mode
        elif cfg.get("monitor_mode") is None:
            cfg.monitor_mode = "min" if any(str(cfg.monitor).endswith(w) for w in LOWER_IS_BETTER) else "max"
        if training and (cfg.get("trainer") or {}).get("sync_batchnorm") and not on_gpus(cfg):
            log.warning("trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm has no CPU support under DDP); "
                        "running with per-process BatchNorm statistics on CPU")
            cfg.trainer.sync_batchnorm = False
    if cfg.monitor_mode not in ("min", "max"):
        raise ConfigError(f"monitor_mode={cfg.monitor_mode!r} must be min or max")
    return cfg


def on_gpus(cfg: DictConfig) -> bool:
    """Whether the trainer will run on CUDA GPUs."""
    import torch

    accelerator = str((cfg.get("trainer") or {}).get("accelerator", "auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def strategy_kind(cfg: DictConfig) -> str:
    """``fsdp2``, ``fsdp``, ``ddp`` or ``single``: what ``trainer.strategy`` asks for (before it is built)."""
    strategy = (cfg.get("trainer") or {}).get("strategy", "auto")
    name = str(strategy.get("_target_", "") if OmegaConf.is_dict(strategy) else strategy).rsplit(".", 1)[-1].lower()
    if name.startswith(("fsdp2", "modelparallel")):
        return "fsdp2"
    if name.startswith("fsdp"):
        return "fsdp"
    return "ddp" if name.startswith("ddp") else "single"


def check_backbone(cfg: DictConfig, backbone: Any) -> None:
    """The backbone reads the data's modality (checked before the data is prepared with its processor)."""
    wanted = data_class_attr(cfg.data, "modality") if cfg.data.get("_target_") else None
    have = getattr(backbone, "modality", "")
    if wanted and have and wanted != have:
        raise ConfigError(f"data={config_choice('data')} is {wanted} data, but backbone={config_choice('backbone')} reads "
                          f"{have}; pick a {wanted} backbone (see `python train.py --help`, group backbone)")


def check_parts(cfg: DictConfig, parts: Any) -> None:
    """What was built fits together: the backbone can be exported when ``export_backbone`` asks for it, a teacher-logit
    cache can hit, and ``monitor`` names a metric the task logs."""
    if cfg.get("export_backbone") and not getattr(parts.backbone, "exportable", False):
        raise ConfigError(f"export_backbone is set, but backbone={config_choice('backbone')} ({type(parts.backbone).__name__}) "
                          "cannot be saved in the Hugging Face format; set export_backbone=null and use the run's checkpoints")
    if getattr(parts.task, "cache", None) is not None and getattr(parts.datamodule, "random_train_inputs", False):
        raise ConfigError("task.cache_teacher=true, but the training inputs change every epoch (random augmentation, "
                          "mixup or speed perturbation), so the teacher-logit cache would never be read and would grow every "
                          "epoch; set task.cache_teacher=false, or train without random augmentation (data.augment=null)")
    names = parts.task.monitorable()
    monitor = str(cfg.monitor)
    if names and monitor.startswith(("val/", "train/")) and monitor not in names:
        raise ConfigError(f"monitor={monitor!r} is not a metric this task logs; choose one of: {', '.join(names)}")


def check_callbacks(cfg: DictConfig, callbacks: Sequence[Any]) -> None:
    """The strategy fits the machine and the run's callbacks; LoRA is not combined with what it cannot take."""
    import os

    import torch

    from callbacks.ema import WeightEMA
    from callbacks.wise_ft import WiseFT
    from modules.scaling import full_compile_refusal

    kind = strategy_kind(cfg)
    gpus = on_gpus(cfg)
    if kind in ("fsdp", "fsdp2"):  # before the machine checks: a config that cannot work is refused anywhere
        refused = [type(cb).__name__ for cb in callbacks if isinstance(cb, (WeightEMA, WiseFT))]
        if refused:
            raise ConfigError(f"{refused[0]} keeps a full copy of the weights beside the sharded model, which trainer={kind} "
                              "does not support here; drop it (callbacks=default) or train with trainer=ddp")
        if cfg.get("compile") == "full":
            raise ConfigError(full_compile_refusal(kind))
    if kind == "fsdp" and not (gpus and torch.cuda.is_available()):
        raise ConfigError("trainer=fsdp (FSDP1) needs CUDA GPUs and this machine has none; on CPU processes use "
                          "trainer=fsdp2 trainer.accelerator=cpu (FSDP2 over gloo)")
    devices = (cfg.get("trainer") or {}).get("devices")
    if isinstance(devices, int) and devices > 1:
        have = torch.cuda.device_count() if gpus else (os.cpu_count() or 1)
        what = "GPUs" if gpus else "CPU cores (one process per device)"
        if devices > have:
            raise ConfigError(f"trainer.devices={devices} but this machine has {have} {what}; set trainer.devices<={have}"
                              " (trainer.num_nodes spreads a run over several machines)")
    if OmegaConf.select(cfg, "backbone.lora", default=None):
        if kind in ("fsdp", "fsdp2"):
            raise ConfigError(f"finetune=lora with trainer={kind} is not supported (sharding units would mix frozen base "
                              "weights and trainable adapters, untested here); LoRA's optimizer state is small: use trainer=ddp")
        if any(isinstance(cb, WiseFT) for cb in callbacks):
            raise ConfigError("callbacks=wise_ft with finetune=lora: interpolating the adapters' A and B factors does not "
                              "interpolate the weight change B@A; use one or the other")


def smoke_run(cfg: DictConfig) -> bool:
    """A smoke run (``debug=fast_dev_run``, ``debug=overfit``): its weights must not replace real artifacts."""
    trainer = cfg.get("trainer") or {}
    return any(trainer.get(k) not in (None, False, 0) for k in SMOKE_TRAINER_KEYS)


def export_targets(cfg: DictConfig, run_dir: Path) -> list[Path]:
    """``export_backbone``: one folder or a list (relative to the run folder, or absolute); none when unset.

    A smoke run (``debug=fast_dev_run`` and friends) exports only inside its own run folder: one
    batch of training must never overwrite an encoder that a later preset reads.
    """
    export = cfg.get("export_backbone")
    if not export:
        return []
    targets = [export] if isinstance(export, str) else list(export) if isinstance(export, Sequence) else None
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"export_backbone={export!r} must be a folder or a list of folders (or null to export nothing)")
    folders = [(run_dir / Path(t).expanduser()).resolve() for t in targets]
    if smoke_run(cfg):
        outside = [f for f in folders if not f.is_relative_to(run_dir.resolve())]
        if outside:
            log.warning(f"smoke run (fast_dev_run / overfit_batches): not exporting to {', '.join(map(str, outside))}")
        folders = [f for f in folders if f not in outside]
    return folders
