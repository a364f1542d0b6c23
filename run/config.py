"""The config tree: where it is, the resolvers it uses, composing it outside ``@hydra.main``, checking a command line
before Hydra does, and changing a run's saved ``config.yaml`` (key=value overrides, class paths of older runs).

Importing this module registers the resolvers; it imports neither torch nor Lightning (``--help`` stays instant).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from modules.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# classes that moved or merged since runs were saved: an older run folder still resumes, evaluates and exports
MOVED = {
    "modules.TextClassifier": "modules.Classifier",
    "modules.ImageClassifier": "modules.Classifier",
    "modules.runs.AtomicCheckpointIO": "run.checkpoints.AtomicCheckpointIO",
    "modules.runs.ContinuedCSVLogger": "run.resume.ContinuedCSVLogger",
    "modules.scaling.FSDP2Strategy": "run.checkpoints.FSDP2Strategy",
}


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


def config_groups() -> list[str]:
    """The config group names (folders of ``configs/``)."""
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and not p.name.startswith("_"))


def compose_config(overrides: Sequence[str] = (), hydra_node: bool = False) -> DictConfig:
    """The config ``python train.py <overrides>`` composes (with Hydra's own node if ``hydra_node``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra_node)
    finally:
        GlobalHydra.instance().clear()


def job_config(overrides: Sequence[str], output_dir: str | Path, cache_dir: str | Path | None = None) -> DictConfig:
    """The config of one ``python train.py <overrides>`` job writing into ``output_dir``, with Hydra's runtime set up as
    ``@hydra.main`` would (for running ``train.train`` in-process: benchmarks, tests)."""
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_config(overrides, hydra_node=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.paths.output_dir = str(output_dir)
        if cache_dir is not None:
            cfg.paths.cache_dir = str(cache_dir)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # a real job's config has no hydra node (HydraConfig holds it)
    return cfg


def check_command_line(argv: Sequence[str]) -> None:
    """Compose the config once before Hydra does: a misspelt key, an unknown option or preset, or an override
    Hydra cannot parse becomes one ``tunelab: error:`` line (Hydra prints several, then a hint about stack traces).
    A ``--multirun`` is checked with each swept option (its first value per sweep) the same way."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException

    if any(arg in ("--help", "-h", "--hydra-help", "--info", "--cfg", "-c", "--shell-completion") or
           arg.startswith(("--cfg=", "--info=", "--config-dir", "--config-name", "-cd", "-cn")) for arg in argv):
        return  # Hydra's own informational flags: nothing to run
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        if any(a in ("--multirun", "-m") for a in argv):
            overrides = first_job(overrides)
        cfg = compose_config(overrides)
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
    if any(a.startswith("hydra/launcher=") and a.endswith("slurm") for a in overrides):
        check_slurm_size(cfg)


def check_slurm_size(cfg: DictConfig) -> None:
    """``hydra/launcher=slurm`` asks SLURM for ``trainer.num_nodes`` nodes of ``trainer.devices`` tasks and GPUs: both must
    be counts (``auto`` means "what this machine has", and the machine that submits is not the one that trains)."""
    trainer = cfg.get("trainer") or {}
    for key in ("devices", "num_nodes"):
        value = trainer.get(key, 1)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            sys.exit(f"tunelab: error: hydra/launcher=slurm sizes each SLURM job from trainer.{key}, which is {value!r}; "
                     f"set trainer.{key}=<N> ({'GPUs per node' if key == 'devices' else 'nodes'})")


def first_job(overrides: Sequence[str]) -> list[str]:
    """A multirun's overrides with every sweep reduced to its first value (``lr=1e-5,1e-4`` -> ``lr=1e-5``); search
    spaces a sweeper samples from (``interval(...)``) are left out: the sweeper checks those itself."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, RangeSweep

    out = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if not override.is_sweep_override():
            out.append(override.input_line)
            continue
        value = override.value()
        key = override.get_key_element()
        if isinstance(value, ChoiceSweep) and value.list:
            out.append(f"{key}={value.list[0]}")
        elif isinstance(value, RangeSweep):
            out.append(f"{key}={value.start}")
    return out


def upgrade(saved: DictConfig) -> None:
    """A run's saved config, in place, in today's terms: class paths that moved since (``MOVED``)."""

    def walk(node: Any) -> None:
        if OmegaConf.is_dict(node):
            target = node.get("_target_")
            if isinstance(target, str) and target in MOVED:
                with open_dict(node):
                    node["_target_"] = MOVED[target]
            for value in node.values():
                walk(value)
        elif OmegaConf.is_list(node):
            for value in node:
                walk(value)

    walk(saved)


def apply_overrides(saved: DictConfig, overrides: Sequence[str], groups: Sequence[str], command: str, fix: str) -> None:
    """Apply ``key=value`` (``+key=``, ``~key``) overrides to a run's saved config, in place; a misspelt key is an
    error, and so is picking another option of a config group (``groups``): ``fix`` says what to do instead."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    OmegaConf.set_struct(saved, True)  # a misspelt override is an error, as on a fresh run
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as err:
        raise ConfigError(f"{command}: cannot parse the override {err.override!r}; write key=value") from None
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra.") or key == "hydra":
            continue
        if key in groups or key.split("/", 1)[0] in groups:
            raise ConfigError(f"{command}: {override.input_line!r} picks another config option; {fix}")
        try:
            if override.is_delete():
                with open_dict(saved):
                    parent, _, leaf = key.rpartition(".")
                    node = OmegaConf.select(saved, parent) if parent else saved
                    if node is not None and leaf in node:
                        del node[leaf]
            else:
                OmegaConf.update(saved, key, override.value(), merge=True, force_add=override.is_add())
        except Exception as err:  # a key the run's config does not have
            raise ConfigError(f"{command}: {override.input_line!r}: {key} is not in the run's config.yaml "
                              f"({type(err).__name__}); check the spelling, or add a new key with +{key}=...") from None


def swap_data(cfg: DictConfig, option: str, data_overrides: Sequence[str]) -> None:
    """Replace the run's ``data`` node by the config option ``data=<option>`` (with ``data.*`` overrides), in place."""
    from hydra.errors import HydraException

    try:
        composed = compose_config([f"data={option}", *data_overrides])
    except HydraException as err:
        raise ConfigError(f"data={option}: {' '.join(str(err).split())[:200]}") from None
    with open_dict(composed):
        composed.paths = cfg.paths
        composed.seed = cfg.seed
    with open_dict(cfg):
        cfg.data = OmegaConf.create(OmegaConf.to_container(composed.data, resolve=True))
