"""A trained run, loaded back for evaluation, prediction and export: the run folder is enough.

The run's ``config.yaml`` says what was built, ``backbone/`` (config + tokenizer or feature extractor, written
by ``train.py``) rebuilds the architecture without a download, the checkpoint (read with ``weights_only``)
gives the weights and the data-derived arguments (label names, vocabulary), and the data is built with the
model's label set, so label ids cannot drift.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from modules.errors import ConfigError, DataError, UserInputError

log = logging.getLogger("tunelab")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# the task arguments train.py fills in from the data; a checkpoint's hyperparameters hold them
DATA_ARGUMENTS = ("num_classes", "label_names", "vocab", "heads", "target")
WEIGHT_CHOICES = "checkpoint (as saved: EMA weights when EMA was on), raw (the un-averaged weights of an EMA run), " \
                 "wise_ft (the WiSE-FT model at its best α), wise_ft:ALPHA (interpolated at ALPHA)"


def config_groups() -> list[str]:
    """The config group names (folders of ``configs/``)."""
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and not p.name.startswith("_"))


def locate_run(path: str | Path) -> tuple[Path, Path | None]:
    """(run folder, checkpoint or None) for a run folder or a checkpoint inside one."""
    given = Path(str(path)).expanduser()
    if not given.exists():
        raise ConfigError(f"{path} does not exist; give a run folder (outputs/<run_name>/<date_time>) or a checkpoint in one")
    checkpoint = given if is_checkpoint(given) else None
    run_dir = given
    if checkpoint is not None:
        run_dir = given.parent.parent if given.parent.name == "checkpoints" else given.parent
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} holds no config.yaml, so it is not a tunelab run folder; give the folder train.py "
                          "printed as 'run folder', or a checkpoint inside its checkpoints/")
    return run_dir, checkpoint


def pick_checkpoint(run_dir: Path, which: str = "best", trust: bool = False) -> Path:
    """The run's best checkpoint (the one its monitored metric picked), or ``last``."""
    folder = run_dir / "checkpoints"
    last = folder / "last.ckpt"
    if which not in ("best", "last"):
        path = Path(which).expanduser()
        if not is_checkpoint(path):
            raise ConfigError(f"--checkpoint {which!r} is neither best, last nor a checkpoint file")
        return path
    if which == "last":
        if not is_checkpoint(last):
            raise ConfigError(f"{run_dir} has no checkpoints/last.ckpt; use --checkpoint best or a checkpoint file")
        return last
    candidates = sorted(p for p in folder.glob("*.ckpt") if p.name != "last.ckpt" and not p.name.startswith("hpc_ckpt"))
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1 and is_checkpoint(last):  # save_top_k > 1: the best one, as the last checkpoint's state says
        state = read_checkpoint(last, trust)
        for key, value in (state.get("callbacks") or {}).items():
            best = Path(str(value.get("best_model_path") or "")) if key.startswith("ModelCheckpoint") else None
            if best and best.name and is_checkpoint(folder / best.name) and value.get("monitor"):
                return folder / best.name
    if candidates:
        raise ConfigError(f"{folder} holds {len(candidates)} checkpoints and no last.ckpt that says which is best; name one "
                          f"with --checkpoint (e.g. {candidates[0]})")
    if is_checkpoint(last):
        log.warning(f"{run_dir} has no best checkpoint (no monitored metric, or fast_dev_run): using last.ckpt")
        return last
    raise ConfigError(f"{run_dir} has no checkpoint (checkpoints/*.ckpt); the run saved none (fast_dev_run?): train again")


# the file beside the shards of a sharded (FSDP / FSDP2) checkpoint folder: everything but weights and optimizer states
SHARDED_META = "meta.pt"
# where Lightning puts the model's tensors in a sharded checkpoint: FSDP2 (ModelParallelStrategy) / FSDP1
SHARDED_MODEL_KEYS = ("state_dict", "model")


def is_sharded_checkpoint(path: Path) -> bool:
    """A checkpoint *folder* written by sharded training (each process its shards, plus ``meta.pt``)."""
    return Path(path).is_dir() and (Path(path) / SHARDED_META).is_file()


def is_checkpoint(path: Path) -> bool:
    """A checkpoint file, or a sharded checkpoint folder."""
    return Path(path).is_file() or is_sharded_checkpoint(path)


def sharded_checkpoint_shapes(path: Path) -> dict[str, torch.Size]:
    """Name -> shape of the model tensors of a sharded checkpoint, from its metadata alone (nothing is loaded)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata()
    shapes = {}
    for key, item in metadata.state_dict_metadata.items():
        where = (metadata.planner_data or {}).get(key) or key.split(".", 1)
        if where[0] in SHARDED_MODEL_KEYS and hasattr(item, "size"):
            shapes[".".join(map(str, where[1:]))] = item.size
    return shapes


def load_sharded_checkpoint(path: Path, weights_only: bool = True) -> dict[str, Any]:
    """A sharded checkpoint folder consolidated into one Lightning checkpoint dict on CPU: the model's full tensors
    (gathered from every process's shards) under ``state_dict`` and ``meta.pt``'s entries; optimizer states are left
    out. Needs no process group: one process reads every shard."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(path)), no_dist=True,
                     planner=_EmptyStateDictLoadPlanner(keys=set(SHARDED_MODEL_KEYS)))
    model = next((state[k] for k in SHARDED_MODEL_KEYS if k in state), {})
    meta = torch.load(Path(path) / SHARDED_META, map_location="cpu", weights_only=weights_only)
    return {**meta, "state_dict": model}


def read_checkpoint(path: Path, trust: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint (a file, or a sharded checkpoint folder), read with ``weights_only`` (tensors and
    plain values, no code); a checkpoint that pickles objects loads only when ``trust`` says its source is trusted."""
    load = (lambda safe: load_sharded_checkpoint(path, weights_only=safe)) if is_sharded_checkpoint(path) else (
        lambda safe: torch.load(path, map_location="cpu", weights_only=safe, mmap=True))
    try:
        ckpt = load(True)
    except pickle.UnpicklingError as err:
        if not trust:
            raise ConfigError(f"{path} pickles objects other than tensors and plain values ({str(err).splitlines()[0][:100]}); "
                              "loading it runs code: only if you trust its source, add --trust-checkpoint") from None
        # the user vouched for this file with --trust-checkpoint: a full unpickle, as they asked
        ckpt = load(False)
    except Exception as err:  # noqa: BLE001 - a truncated zip, a text file, a folder: "not a checkpoint"
        raise ConfigError(f"{path} is not a readable checkpoint ({type(err).__name__}: "
                          f"{(str(err).splitlines() or ['no detail'])[0][:120]}); a run killed while saving leaves one: "
                          "use another (--checkpoint last, or a file in the run's checkpoints/)") from None
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise ConfigError(f"{path} is not a Lightning checkpoint (it has no state_dict); give a .ckpt that train.py saved")
    return dict(ckpt)


def state_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state`` is not this model's weights (missing names, other shapes, extra names), or None."""
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    extra = [k for k in state if k not in own]
    if not (missing or wrong or extra):
        return None
    first = (f"{missing[0]} is missing" if missing else
             f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, the model's {tuple(own[wrong[0]].shape)}" if wrong else
             f"{extra[0]} is not the model's")
    return f"{len(missing)} tensors missing, {len(wrong)} of another shape, {len(extra)} unknown; {first}"


def architecture_node(node: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The backbone's config changed to rebuild its architecture only (the checkpoint has the weights): from the
    run's ``backbone/`` folder for Hugging Face models, without pretrained downloads for timm."""
    import json

    node = dict(node)
    saved = run_dir / "backbone"
    kind = node.get("kind")
    if kind in ("hf_text", "hf_audio") and (saved / "config.json").is_file():
        config = json.loads((saved / "config.json").read_text())
        overrides = {"vocab_size": config["vocab_size"]} if "vocab_size" in config and kind == "hf_text" else {}
        node.update(name_or_path=str(saved), from_scratch=True, config_overrides=overrides, model_type=None)
        if kind == "hf_text":
            node.update(tokenizer=None, train_tokenizer=None)
        else:
            node.update(size=None, feature_extractor=str(saved), freeze_feature_encoder=False)
    elif kind == "timm":
        node.update(pretrained=False, checkpoint_path=None, remap_keys=None)
    elif kind in ("hf_text", "hf_audio"):
        log.warning(f"{run_dir} has no backbone/ folder (a run from before it was saved): building the backbone from "
                    "the run's config, which may need its original files or a download")
    if kind in ("hf_text", "hf_audio"):
        # the plain modules: same weights and keys as the fused ones, and exporters cannot trace custom ops
        node["kernels"] = "torch"
    return node


@dataclass
class TrainedRun:
    """A run folder's model, weights loaded, in eval mode; ``cfg`` is the run's config with the overrides given."""

    run_dir: Path
    cfg: DictConfig
    checkpoint: Path
    model: Any
    weights: str  # what the loaded weights are, for reports: "best checkpoint", "EMA weights", "WiSE-FT α=0.50"

    @property
    def kind(self) -> str:
        return str(getattr(type(self.model), "data_kind", ""))

    @property
    def data_node(self) -> DictConfig:
        """The data config of what the model reads: a joint run's target dataset's."""
        data = self.cfg.data
        if data.get("datasets") and data.get("target") in data.datasets:
            return data.datasets[data.target]
        return data

    def datamodule(self) -> Any:
        """The run's data (with the overrides given), labelled with the model's label set."""
        from train import build

        node = OmegaConf.to_container(self.cfg.data, resolve=True)
        extra: dict[str, Any] = {}
        labels = getattr(self.model, "label_names", None)
        if labels and "datasets" not in node:
            extra["label_names"] = list(labels)
        if self.kind == "ctc" and (self.run_dir / "vocab.json").is_file() and not node.get("vocab_file"):
            extra["vocab_file"] = str(self.run_dir / "vocab.json")
        datamodule = build(OmegaConf.create(node), processor=self.model.backbone.processor, **extra)
        spec = datamodule.data_spec()
        if self.kind == "ctc" and list(spec.vocab) != list(self.model.vocab.tokens):
            raise DataError(f"the data's character vocabulary ({len(spec.vocab)} tokens) is not the model's "
                            f"({len(self.model.vocab.tokens)}); set data.vocab_file={self.run_dir / 'vocab.json'}")
        if labels and list(spec.label_names) != list(labels):
            raise DataError(f"the data's labels ({', '.join(spec.label_names[:8])}) are not the model's "
                            f"({', '.join(list(labels)[:8])}); evaluate on data labelled with the run's label set")
        return datamodule


def load_run(path: str | Path, overrides: Sequence[str] = (), checkpoint: str = "best", weights: str = "checkpoint",
             trust: bool = False) -> TrainedRun:
    """Load a run folder (or a checkpoint in one) for inference.

    Args:
        overrides: ``key=value`` changes to the run's config (e.g. ``data.data_files.test=other.csv``);
            ``data=<option>`` evaluates on another data config.
        checkpoint: ``best``, ``last`` or a checkpoint file (a file given as ``path`` wins).
        weights: ``checkpoint``, ``raw``, ``wise_ft`` or ``wise_ft:ALPHA`` (see ``WEIGHT_CHOICES``).
        trust: allow a full unpickle of a checkpoint that ``weights_only`` refuses.
    """
    from modules.runs import apply_overrides
    from train import build

    run_dir, named = locate_run(path)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    data_option = [o for o in overrides if o.split("=", 1)[0] == "data"]
    keys = [o for o in overrides if o.split("=", 1)[0] != "data"]
    if data_option:
        swap_data(cfg, data_option[-1].split("=", 1)[1], [o for o in keys if o.lstrip("+~").startswith("data.")])
        keys = [o for o in keys if not o.lstrip("+~").startswith("data.")]
    apply_overrides(cfg, keys, config_groups(), "eval", "only data=<option> can change here; give key=value changes")
    ckpt_path = named or pick_checkpoint(run_dir, checkpoint, trust)
    ckpt = read_checkpoint(ckpt_path, trust)

    from train import check_task_and_data

    with open_dict(cfg):
        try:
            check_task_and_data(cfg)  # the task and the (new) data match
        except ConfigError as err:  # no Hydra context here: name the run's task and the data option given
            task = str(cfg.task._target_).rsplit(".", 1)[-1]
            data = data_option[-1] if data_option else "the run's data"
            raise ConfigError(str(err).replace("task=?", f"the run's task ({task})").replace("data=?", data)
                              .replace("pick matching groups (e.g. the presets in configs/experiment/)",
                                       "evaluate on data of the kind the run trained on")) from None
    backbone = build(OmegaConf.create(architecture_node(OmegaConf.to_container(cfg.backbone, resolve=True), run_dir)))
    task_cls = hydra.utils.get_class(cfg.task._target_)
    data_args = data_arguments(ckpt, run_dir, task_cls)
    # what a task needs only to train is swapped for what rebuilds it (a distilled student: no teacher)
    rebuild = task_cls.inference_kwargs(ckpt.get("hyper_parameters") or {}) if hasattr(task_cls, "inference_kwargs") else {}
    try:
        model = build(cfg.task, backbone=backbone, optimizer=build(cfg.optimizer), scheduler=None, **data_args, **rebuild)
    except UserInputError:
        raise
    except Exception:  # noqa: BLE001 - Hydra wraps the task's TypeError; the cause is the missing data arguments
        if data_args or cfg.task._target_.endswith("MaskedLM"):
            raise
        raise ConfigError(f"{ckpt_path} has no hyper_parameters and {run_dir} no labels.json / vocab.json, so the label "
                          "set is unknown; give a checkpoint train.py saved, inside its run folder") from None
    state, described = select_weights(ckpt, ckpt_path, run_dir, weights, cfg, model)
    problem = state_mismatch(model.state_dict(), state)
    if problem:
        raise ConfigError(f"{ckpt_path} holds another model than {run_dir}/config.yaml builds ({problem}); give a checkpoint "
                          "of this run, or the run folder that saved it")
    model.load_state_dict(state)
    model.eval()
    log.info(f"loaded {described} from {ckpt_path}")
    return TrainedRun(run_dir, cfg, ckpt_path, model, described)


def data_arguments(ckpt: dict[str, Any], run_dir: Path, task_cls: type) -> dict[str, Any]:
    """The task arguments that came from the data: the checkpoint's hyperparameters, else the run folder's
    ``labels.json`` / ``vocab.json`` (only those the task's constructor takes)."""
    import inspect
    import json

    hparams = ckpt.get("hyper_parameters") or {}
    accepted = set(inspect.signature(task_cls.__init__).parameters)
    found = {k: hparams[k] for k in DATA_ARGUMENTS if k in hparams and k in accepted}
    if found:
        return found
    labels, vocab = run_dir / "labels.json", run_dir / "vocab.json"
    if vocab.is_file():
        return {"vocab": json.loads(vocab.read_text())["tokens"]}
    if labels.is_file():
        info = json.loads(labels.read_text())
        if "datasets" in info:
            return {"heads": {n: d["label_names"] for n, d in info["datasets"].items()}, "target": info["target"]}
        return {"num_classes": len(info["label_names"]), "label_names": info["label_names"]}
    return {}


def select_weights(ckpt: dict[str, Any], ckpt_path: Path, run_dir: Path, weights: str, cfg: DictConfig,
                   model: Any) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict ``weights`` names, and a description of it."""
    ema = "ema_raw_state_dict" in ckpt
    if weights == "checkpoint":
        return dict(ckpt["state_dict"]), f"{ckpt_path.stem} ({'EMA weights' if ema else 'trained weights'})"
    if weights == "raw":
        if not ema:
            raise ConfigError(f"--weights raw: {ckpt_path.name} has no separate raw weights (EMA was off), so its weights "
                              "are the trained ones; leave out --weights")
        return dict(ckpt["ema_raw_state_dict"]), f"{ckpt_path.stem} (raw weights, not the EMA)"
    if weights == "wise_ft":
        saved = run_dir / str(OmegaConf.select(cfg, "callbacks.wise_ft.dirname", default="wise_ft")) / "best_alpha.pt"
        if not saved.is_file():
            raise ConfigError(f"--weights wise_ft: {saved} does not exist; train with callbacks=wise_ft "
                              "callbacks.wise_ft.save_best=true, or pick an α with --weights wise_ft:0.5")
        best = read_checkpoint(saved)
        return dict(best["state_dict"]), f"WiSE-FT at its best α={float(best['alpha']):.2f}"
    if weights.startswith("wise_ft:"):
        try:
            alpha = float(weights.split(":", 1)[1])
        except ValueError:
            alpha = float("nan")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"--weights {weights}: α must be a number in [0, 1] (0 = the pretrained backbone, 1 = fine-tuned)")
        import lightning.pytorch as pl

        from modules.interpolation import backbone_state, interpolate_states, snapshot
        from train import build

        pl.seed_everything(int(cfg.seed), verbose=False)  # as train.py does: a from-scratch init repeats too
        pretrained = snapshot(build(cfg.backbone))  # the backbone as the run started: its pretrained weights
        tuned = dict(ckpt["state_dict"])
        mixed = interpolate_states(pretrained, backbone_state(tuned), alpha)
        tuned.update({f"backbone.{k}": v for k, v in mixed.items()})
        return tuned, f"WiSE-FT at α={alpha:.2f} ({ckpt_path.stem})"
    raise ConfigError(f"--weights {weights!r} is unknown; choose {WEIGHT_CHOICES}")


def swap_data(cfg: DictConfig, option: str, data_overrides: Sequence[str]) -> None:
    """Replace the run's ``data`` node by the config option ``data=<option>`` (with ``data.*`` overrides)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            composed = compose(config_name="train", overrides=[f"data={option}", *data_overrides])
    except HydraException as err:
        raise ConfigError(f"data={option}: {' '.join(str(err).split())[:200]}") from None
    finally:
        GlobalHydra.instance().clear()
    with open_dict(composed):
        composed.paths = cfg.paths
        composed.seed = cfg.seed
    with open_dict(cfg):
        cfg.data = OmegaConf.create(OmegaConf.to_container(composed.data, resolve=True))
