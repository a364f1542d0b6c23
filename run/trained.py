"""A trained run, loaded back for evaluation, prediction and export: the run folder is enough.

The run's ``config.yaml`` says what was built, ``backbone/`` (config + tokenizer or feature extractor, written
by ``train.py``) rebuilds the architecture without a download, the checkpoint (read with ``weights_only``)
gives the weights and the data-derived arguments (label names, vocabulary), and the data is built with the
model's label set, so label ids cannot drift.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from modules.backbones.base import resolve_local_source
from modules.distillation import Teacher, check_same_inputs, file_identity, label_order
from modules.errors import ConfigError, DataError, UserInputError
from run.build import build, build_task, data_config
from run.checkpoints import is_checkpoint, read_checkpoint, state_mismatch
from run.checks import complete_config
from run.config import apply_overrides, config_groups, swap_data, upgrade

log = logging.getLogger("tunelab")

# the task arguments train.py fills in from the data; a checkpoint's hyperparameters hold them
DATA_ARGUMENTS = ("num_classes", "label_names", "vocab", "heads", "target")
WEIGHT_CHOICES = "checkpoint (as saved: EMA weights when EMA was on), raw (the un-averaged weights of an EMA run), " \
                 "wise_ft (the WiSE-FT model at its best α), wise_ft:ALPHA (interpolated at ALPHA)"


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


def architecture_node(node: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The backbone's config changed to rebuild its architecture only (the checkpoint has the weights): from the
    run's ``backbone/`` folder for Hugging Face models, without pretrained downloads for timm."""
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
    elif kind == "whisper_encoder" and (saved / "config.json").is_file():
        node.update(name_or_path=str(saved), convert_from=None, from_scratch=True, size=None, config_overrides={})
    elif kind == "timm":
        node.update(pretrained=False, checkpoint_path=None, remap_keys=None)
    elif kind in ("hf_text", "hf_audio"):
        log.warning(f"{run_dir} has no backbone/ folder (a run from before it was saved): building the backbone from "
                    "the run's config, which may need its original files or a download")
    if kind in ("hf_text", "hf_audio"):
        # the plain modules: same weights and keys as the fused ones, and exporters cannot trace custom ops
        node["kernels"] = "torch"
    return node


def rebuild_backbone(run_dir: str | Path, cfg: DictConfig | None = None) -> Any:
    """A run's backbone architecture (LoRA adapters included) with fresh weights, from its folder (``cfg``: its
    config.yaml, with any overrides), without a download."""
    run_dir = Path(run_dir)
    if cfg is None:
        cfg = OmegaConf.load(run_dir / "config.yaml")
        upgrade(cfg)
    return build(OmegaConf.create(architecture_node(OmegaConf.to_container(cfg.backbone, resolve=True), run_dir)))


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

    def datamodule(self, processor: Any = None) -> Any:
        """The run's data (with the overrides given), labelled with the model's label set; ``processor``: another
        feature extractor than the model's (zero-shot Whisper's 30 s window)."""
        node = data_config(self.cfg)
        extra: dict[str, Any] = {}
        labels = getattr(self.model, "label_names", None)
        if labels and "datasets" not in node:
            extra["label_names"] = list(labels)
        if self.kind == "ctc" and (self.run_dir / "vocab.json").is_file() and not node.get("vocab_file"):
            extra["vocab_file"] = str(self.run_dir / "vocab.json")
        datamodule = build(OmegaConf.create(node), processor=processor or self.model.backbone.processor, **extra)
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
    run_dir, named = locate_run(path)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    upgrade(cfg)
    data_option = [o for o in overrides if o.split("=", 1)[0] == "data"]
    keys = [o for o in overrides if o.split("=", 1)[0] != "data"]
    if data_option:
        swap_data(cfg, data_option[-1].split("=", 1)[1], [o for o in keys if o.lstrip("+~").startswith("data.")])
        keys = [o for o in keys if not o.lstrip("+~").startswith("data.")]
    apply_overrides(cfg, keys, config_groups(), "eval", "only data=<option> can change here; give key=value changes")
    ckpt_path = named or pick_checkpoint(run_dir, checkpoint, trust)
    ckpt = read_checkpoint(ckpt_path, trust)
    try:
        cfg = complete_config(cfg, training=False)  # the task and the (new) data match
    except ConfigError as err:  # no Hydra context here: name the run's task and the data option given
        task = str(cfg.task._target_).rsplit(".", 1)[-1]
        data = data_option[-1] if data_option else "the run's data"
        raise ConfigError(str(err).replace("task=?", f"the run's task ({task})").replace("data=?", data)
                          .replace("pick matching groups (e.g. the presets in configs/experiment/)",
                                   "evaluate on data of the kind the run trained on")) from None
    backbone = rebuild_backbone(run_dir, cfg)
    task_cls = hydra.utils.get_class(cfg.task._target_)
    data_args = data_arguments(ckpt, run_dir, task_cls)
    # what a task needs only to train is swapped for what rebuilds it (a distilled student: no teacher)
    rebuild = task_cls.inference_kwargs(ckpt.get("hyper_parameters") or {}) if hasattr(task_cls, "inference_kwargs") else {}
    try:
        model = build_task(cfg, backbone, {**data_args, **rebuild}, schedule=False)
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

        pl.seed_everything(int(cfg.seed), verbose=False)  # as train.py does: a from-scratch init repeats too
        pretrained = snapshot(build(cfg.backbone))  # the backbone as the run started: its pretrained weights
        tuned = dict(ckpt["state_dict"])
        mixed = interpolate_states(pretrained, backbone_state(tuned), alpha)
        tuned.update({f"backbone.{k}": v for k, v in mixed.items()})
        return tuned, f"WiSE-FT at α={alpha:.2f} ({ckpt_path.stem})"
    raise ConfigError(f"--weights {weights!r} is unknown; choose {WEIGHT_CHOICES}")


def load_teacher(source: str, data_labels: Sequence[str], processor: Any) -> Teacher:
    """A tunelab run folder / checkpoint, or a Hugging Face sequence classifier (folder or hub name), as a ``Teacher``."""
    path = Path(str(source)).expanduser()
    if path.exists() and ((path / "config.yaml").is_file() or is_checkpoint(path) and not path.is_dir()):
        try:
            run = load_run(path)
        except UserInputError as err:
            raise ConfigError(f"task.teacher={source!r} does not load: {err}") from None
        labels = getattr(run.model, "label_names", None)
        if not labels or not hasattr(run.model, "head"):
            raise ConfigError(f"task.teacher={source!r} is a run of {type(run.model).__name__}, not a classifier")
        check_same_inputs(source, run.model.backbone.processor, processor)
        order = label_order(source, labels, data_labels)
        identity = f"tunelab:{file_identity([run.checkpoint])}"
        return Teacher(run.model, "tunelab", order, int(run.model.backbone.feature_dim), identity, str(source))
    return load_hf_teacher(source, data_labels, processor)


def load_hf_teacher(source: str, data_labels: Sequence[str], processor: Any) -> Teacher:
    """A Hugging Face sequence classifier (folder or hub name) as a ``Teacher``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        where = resolve_local_source(str(source))
    except ConfigError as err:
        raise ConfigError(f"task.teacher={source!r} does not load: {err}") from None
    try:
        model = AutoModelForSequenceClassification.from_pretrained(where)
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"task.teacher={source!r} does not load as a tunelab run or a Hugging Face sequence classifier "
                          f"({str(err).splitlines()[0][:160]})") from None
    id2label = dict(getattr(model.config, "id2label", {}) or {})
    labels = [str(id2label[i]) for i in sorted(id2label)]
    order = label_order(source, labels, data_labels)
    check_same_inputs(source, tokenizer, processor)
    folder = Path(where)
    identity = f"hf:{file_identity(list(folder.iterdir()))}" if folder.is_dir() else f"hf:{where}"
    return Teacher(model, "hf", order, int(model.config.hidden_size), identity, str(source))
