"""``auto``: a short search over the knobs that matter for fine-tuning, within a wall-time budget, then the winner tested.

Each trial is ``python train.py`` in a process of its own (a crash fails that trial, not the study), on the run's own
validation split, never its test split (``test_after_fit=false``); on small data (``folds``) each trial is instead
scored by k-fold cross-validation, the mean of its folds. Trial 0 is the configuration as given (the
defaults); Optuna's TPE proposes the rest, and its median pruner stops a trial whose validation figure after an
epoch is behind the median of the earlier trials at that epoch (``callbacks.OptunaPruning``). Every trial trains
``trainer.max_epochs=auto`` (enough epochs for ``budget.min_steps`` optimizer steps and at least the preset's own,
early stopping on the monitor)
and is capped by the time left, so the study ends within ``minutes``. The study is an Optuna journal in its folder:
the same command continues it.

Then the winner - the trial with the best validation figure - is trained again on the training and validation data
together (``data.train_on_val``) for the epochs its best checkpoint had, and tested once; the test split is touched
by that run alone. (Data whose validation split is its own, not carved from the training data: the winning trial's
best checkpoint is tested instead.) The folder holds ``trials.csv`` / ``trials.md`` / ``trials.png`` (every trial:
knobs, state, figure, minutes), ``auto_result.json`` and ``experiment/auto_winner.yaml``, a preset that reruns the
winner: ``python train.py hydra.searchpath=[file://<folder>] experiment=auto_winner`` (add ``+data.train_on_val=true``
for the final run's data). ``minutes`` bounds the search; the final run, about one trial long, comes on top.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from callbacks.optuna_pruning import PRUNED_FILE, median_pruner
from modules.errors import ConfigError
from search.tables import plot_bars, write_table

log = logging.getLogger("tunelab")

JOURNAL = "optuna_journal.log"
ROOT = Path(__file__).resolve().parent.parent


def knob_space(cfg: DictConfig) -> dict[str, tuple[str, Callable[[], Any]]]:
    """The knobs ``auto`` can search on this config: name -> (config key or group, Optuna distribution maker).
    A knob the config has no place for (label smoothing without a ``task.label_smoothing``, freezing on a backbone
    trained from scratch) is not offered."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    lr = float(OmegaConf.select(cfg, "optimizer.lr"))
    pretrained = not OmegaConf.select(cfg, "backbone.from_scratch", default=False) and (
        OmegaConf.select(cfg, "backbone.pretrained", default=True) is not False
        or OmegaConf.select(cfg, "backbone.checkpoint_path", default=None) is not None)  # timm weights from a file
    space: dict[str, tuple[str, Callable[[], Any]]] = {
        "lr": ("optimizer.lr", lambda: FloatDistribution(lr / 10, lr * 10, log=True)),
    }
    if pretrained:
        space["finetune"] = ("finetune", lambda: CategoricalDistribution(["full", "gradual", "partial"]))
    if OmegaConf.select(cfg, "task.lr_decay") is not None:
        space["lr_decay"] = ("task.lr_decay", lambda: FloatDistribution(0.6, 1.0))
    if OmegaConf.select(cfg, "task.label_smoothing") is not None:
        space["label_smoothing"] = ("task.label_smoothing", lambda: FloatDistribution(0.0, 0.2))
    augment = OmegaConf.select(cfg, "data.augment")
    if isinstance(augment, DictConfig) and randaugment_magnitude(augment.get("auto_augment")) is not None:
        space["augment"] = (RANDAUGMENT, lambda: IntDistribution(0, 9))
    elif "speed_perturb" in (OmegaConf.select(cfg, "data") or {}) and speed_spread(cfg.data.speed_perturb) is not None:
        space["augment"] = (SPEED_PERTURB, lambda: FloatDistribution(0.0, 0.15))
    return space


# the augmentation-strength knob: images, RandAugment's magnitude with severity rising with it (``inc1``; 0: off,
# at most 9: see datamodules.vision.safe_randaugment); speech, the spread s of speed perturbation
# ([1 - s, 1, 1 + s]; 0: off). Text has none.
RANDAUGMENT, SPEED_PERTURB = "data.augment.auto_augment", "data.speed_perturb"


def randaugment_magnitude(policy: Any) -> int | None:
    """The magnitude of a timm RandAugment policy (``rand-m9-mstd0.5`` -> 9), 0 for none, None for another policy
    (AutoAugment, AugMix: the knob leaves it alone)."""
    from datamodules.vision import randaugment_options

    if policy is None:
        return 0
    options = randaugment_options(policy)
    return None if options is None else int(options.get("m", 10))  # timm's default magnitude: 10


def speed_spread(factors: Any) -> float | None:
    """s of speed factors ``[1 - s, 1, 1 + s]`` (0 for none), None for another set (the knob leaves it alone)."""
    values = sorted(float(f) for f in (factors or [1.0]))
    spread = round(max(abs(v - 1.0) for v in values), 6)
    if set(values) == {1.0}:
        return 0.0
    symmetric = len(values) == 3 and all(math.isclose(v, w) for v, w in zip(values, (1 - spread, 1.0, 1 + spread), strict=True))
    return spread if symmetric else None


def config_value(key: str, value: Any) -> str:
    """A knob's value as its override's right-hand side."""
    if key == RANDAUGMENT:
        return f"rand-m{int(value)}-mstd0.5-inc1" if value else "null"
    if key == SPEED_PERTURB:
        return f"[{1 - value:.4g},1.0,{1 + value:.4g}]" if value > 0 else "null"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def chosen_knobs(cfg: DictConfig, names: Sequence[str] | None) -> dict[str, tuple[str, Any]]:
    """The knobs asked for (all this config offers when None): name -> (key, distribution); one line for a name that
    is not a knob of this config."""
    space = knob_space(cfg)
    names = list(names) if names else list(space)
    unknown = [n for n in names if n not in space]
    if unknown:
        raise ConfigError(f"--knobs {','.join(unknown)}: not a knob of this run; choose from {', '.join(space)}")
    return {name: (space[name][0], space[name][1]()) for name in names}


def defaults_of(cfg: DictConfig, knobs: Mapping[str, tuple[str, Any]]) -> dict[str, Any]:
    """Trial 0: every knob at the configuration's own value (clipped into its range)."""
    from optuna.distributions import CategoricalDistribution

    values = {}
    for name, (key, dist) in knobs.items():
        if key == "finetune":
            value = OmegaConf.select(cfg, "finetune.strategy", default="full")
            values[name] = value if value in dist.choices else dist.choices[0]
        elif isinstance(dist, CategoricalDistribution):
            values[name] = dist.choices[0]
        elif key == RANDAUGMENT:
            values[name] = min(max(randaugment_magnitude(OmegaConf.select(cfg, key)), dist.low), dist.high)
        elif key == SPEED_PERTURB:
            values[name] = min(max(speed_spread(OmegaConf.select(cfg, key)), dist.low), dist.high)
        else:
            values[name] = min(max(float(OmegaConf.select(cfg, key)), dist.low), dist.high)
    return values


def overrides_of(knobs: Mapping[str, tuple[str, Any]], params: Mapping[str, Any]) -> list[str]:
    # ++: the preset may not name the key at all (no RandAugment policy in data.augment)
    return [f"{'++' if key == RANDAUGMENT else ''}{key}={config_value(key, params[name])}" for name, (key, _) in knobs.items()]


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python <script> <args>`` from the checkout, in a process of its own (not the W&B service of the caller)."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True, env=env)


def last_line(done: subprocess.CompletedProcess) -> str:
    return (done.stderr.strip().splitlines() or ["no output"])[-1]


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


class Study:
    """One ``auto`` study in ``folder`` over ``base`` (the user's overrides) and ``knobs``; with ``folds``, every trial is
    scored by k-fold cross-validation instead of the validation split."""

    def __init__(self, folder: Path, base: Sequence[str], knobs: Mapping[str, tuple[str, Any]], monitor: str,
                 direction: str, seed: int = 0, folds: int | None = None, grid: Mapping[str, list[Any]] | None = None,
                 min_epochs: int | None = None) -> None:
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.folder, self.base, self.knobs, self.monitor, self.direction = folder, list(base), dict(knobs), monitor, direction
        self.folds, self.grid, self.min_epochs = folds, dict(grid) if grid else None, min_epochs
        folder.mkdir(parents=True, exist_ok=True)
        self.journal = folder / JOURNAL
        self.study = optuna.create_study(
            study_name="auto", storage=JournalStorage(JournalFileBackend(str(self.journal))), direction=direction,
            sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=4),
            pruner=optuna.pruners.NopPruner() if self.grid else median_pruner(), load_if_exists=True)
        spec = {"base": self.base, "knobs": {n: k for n, (k, _) in self.knobs.items()}, "monitor": monitor, "folds": folds,
                "grid": self.grid}
        saved = read_json(folder / "auto.json")
        if saved is not None and {"folds": None, "grid": None, **saved} != spec:
            raise ConfigError(f"{folder} holds an auto study of other overrides, knobs or folds ({saved}); give another --dir")
        (folder / "auto.json").write_text(json.dumps(spec, indent=2))
        if self.grid and not self.study.trials:  # every combination queued once (a continued study keeps its queue)
            for point in itertools.product(*self.grid.values()):
                self.study.enqueue_trial(dict(zip(self.grid, point, strict=True)))

    def train(self, run_dir: Path, overrides: Sequence[str], minutes_left: float, *extra: str
              ) -> tuple[subprocess.CompletedProcess, float | None]:
        """One ``train.py`` of a trial, on the validation split only, capped by the time left: its process and the best
        validation figure (None: it validated nothing)."""
        floor = [f"budget.min_epochs={self.min_epochs}"] if self.min_epochs else []
        done = run_script("train.py", *self.base, *overrides, "trainer.max_epochs=auto", *floor,
                          f"budget.minutes={max(minutes_left, 0.05):.3f}", "test_after_fit=false",
                          f"hydra.run.dir={run_dir}", *extra)
        return done, (read_json(run_dir / "metrics.json") or {}).get(f"best/{self.monitor}")

    def run_trial(self, minutes_left: float) -> dict[str, Any]:
        """Ask for a trial, train it in a process of its own (capped by the time left), tell the study."""
        import optuna

        trial = self.study.ask({name: dist for name, (_, dist) in self.knobs.items()})
        run_dir = self.folder / f"trial_{trial.number:03d}"
        overrides = overrides_of(self.knobs, trial.params)
        log.info(f"auto: trial {trial.number}: {' '.join(overrides)}")
        started = time.time()
        if self.folds:
            state, value, extra = self.cross_validate(trial, run_dir, overrides, started + minutes_left * 60)
        else:
            pruning = [] if self.grid else [
                "+callbacks.auto_pruning._target_=callbacks.OptunaPruning", f"+callbacks.auto_pruning.storage={self.journal}",
                "+callbacks.auto_pruning.study_name=auto", f"+callbacks.auto_pruning.trial_id={trial._trial_id}",
                f"+callbacks.auto_pruning.monitor={self.monitor}"]
            done, value = self.train(run_dir, overrides, minutes_left, *pruning)
            pruned, extra = read_json(run_dir / PRUNED_FILE), {}
            if done.returncode != 0:
                state, extra = "failed", {"error": last_line(done)}
            elif value is None:  # the time cap ended it before its first validation
                state = "out of time"
            else:
                state = f"pruned after epoch {pruned['epoch']}" if pruned is not None else "complete"
        row = {"trial": trial.number, **trial.params, "minutes": round((time.time() - started) / 60, 2),
               "folder": run_dir.name, "state": state, self.monitor: value, **extra}
        if state == "complete":
            self.study.tell(trial, float(value))
        else:
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED if state.startswith("pruned")
                            else optuna.trial.TrialState.FAIL)
            if state == "failed":
                log.warning(f"auto: trial {trial.number} failed: {extra['error']}")
        return row

    def cross_validate(self, trial: Any, run_dir: Path, overrides: Sequence[str], deadline: float
                       ) -> tuple[str, float | None, dict[str, Any]]:
        """The trial on every fold in turn (``data.num_folds``/``data.fold``: the test split kept aside, the rest cut
        into seeded, stratified folds). Its figure is the mean of the folds' best validation figures; after each fold
        the running mean goes to the median pruner, which may stop the trial from its third fold on."""
        values: list[float] = []
        for fold in range(self.folds):
            left = (deadline - time.time()) / 60
            if left <= 0:
                return f"out of time after {fold} folds", None, {"folds": values}
            done, value = self.train(run_dir / f"fold_{fold}", overrides, left, f"data.num_folds={self.folds}",
                                     f"data.fold={fold}")
            if done.returncode != 0:
                return "failed", None, {"error": f"fold {fold}: {last_line(done)}", "folds": values}
            if value is None:
                return f"out of time in fold {fold}", None, {"folds": values}
            values.append(float(value))
            mean = sum(values) / len(values)
            trial.report(mean, step=fold)
            if fold < self.folds - 1 and trial.should_prune():
                return f"pruned after fold {fold}", mean, {"folds": values}
        return "complete", sum(values) / len(values), {"folds": values}


def grid_of(cfg: DictConfig, knobs: Mapping[str, tuple[str, Any]]) -> dict[str, list[Any]]:
    """``--grid``: a few values per knob, every combination trained in full (no pruning): the baseline ``auto`` is
    measured against. lr: the preset's x 1/10, 1/3, 1, 3, 10; the freezing strategy: every one; lr_decay 0.75, 1;
    label smoothing 0, 0.1; augmentation: off, RandAugment magnitude 5 and 9 (speech: speed spread 0, 0.1)."""
    lr = float(OmegaConf.select(cfg, "optimizer.lr"))
    values: dict[str, list[Any]] = {}
    for name, (key, dist) in knobs.items():
        if name == "lr":
            values[name] = [lr / 10, lr / 3, lr, lr * 3, lr * 10]
        elif name == "finetune":
            values[name] = list(dist.choices)
        elif name == "lr_decay":
            values[name] = [0.75, 1.0]
        elif name == "label_smoothing":
            values[name] = [0.0, 0.1]
        elif name == "augment":
            values[name] = [0, 5, 9] if key == RANDAUGMENT else [0.0, 0.1]
        else:
            raise ConfigError(f"--grid: no grid values for knob {name}")
    return values


SMALL_DATA = 1000  # --folds auto: a run that trains and validates on fewer examples is scored by 5-fold cross-validation
AUTO_FOLDS = 5


def choose_folds(cfg: DictConfig, folds: str | int | None) -> int | None:
    """``--folds``: a number (>= 2) of folds, 0 / None for the validation split, or ``auto``: 5 folds when the run
    trains and validates on fewer than 1,000 examples (one validation example then weighs too much to rank trials)
    and its validation split is carved from the training data; else the validation split."""
    if folds in (None, 0, "0", "none"):
        return None
    if "num_folds" not in (cfg.get("data") or {}):
        if folds == "auto":
            return None
        raise ConfigError(f"--folds {folds}: this data has no folds (data.num_folds); use --folds 0 (the validation split)")
    if folds != "auto":
        try:
            count = int(folds)
        except ValueError:
            count = 0
        if count < 2:
            raise ConfigError(f"--folds {folds!r}: give a number of folds >= 2, 0 for the validation split, or auto")
        return count
    examples = examples_seen(cfg)
    if examples is None:
        log.info("auto: the validation split is the data's own: trials are scored on it (--folds K to cross-validate)")
        return None
    if examples >= SMALL_DATA:
        log.info(f"auto: {examples} examples to train and validate on: trials are scored on the validation split")
        return None
    log.info(f"auto: {examples} examples to train and validate on (< {SMALL_DATA}): trials are scored by "
             f"{AUTO_FOLDS}-fold cross-validation (--folds 0: the validation split)")
    return AUTO_FOLDS


def examples_seen(cfg: DictConfig) -> int | None:
    """How many examples a plain run trains and validates on (its capped train + val), None when the validation split
    is the data's own (not carved from the training data, so not part of a fold)."""
    from modules.errors import DataError
    from run.build import build, data_config

    if "val_fraction" not in cfg.data:  # joint data: validation on the target's split as the target configures it
        return None
    backbone = build(cfg.backbone)
    datamodule = build({**data_config(cfg), "train_on_val": True}, processor=backbone.processor)
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
    except DataError as err:
        if "validation split of its own" in str(err):
            return None
        raise
    return len(datamodule.datasets["train"])


def run_auto(base: Sequence[str], minutes: float, folder: Path, knob_names: Sequence[str] | None = None,
             max_trials: int | None = None, seed: int = 0, folds: str | int | None = "auto", grid: bool = False
             ) -> dict[str, Any]:
    """The whole study: trials until the budget would be overrun, then the winner's test. Returns the summary."""
    from run.config import compose_config

    if not minutes > 0:
        raise ConfigError(f"--minutes={minutes:g} must be > 0")
    cfg = compose_config(list(base))
    from run.checks import complete_config

    cfg = complete_config(cfg)
    monitor, mode = str(cfg.monitor), str(cfg.monitor_mode)
    knobs = chosen_knobs(cfg, knob_names)
    folds = choose_folds(cfg, folds)
    points = grid_of(cfg, knobs) if grid else None
    preset_epochs = OmegaConf.select(cfg, "trainer.max_epochs")  # a trial never trains fewer epochs than the preset
    study = Study(folder, base, knobs, monitor, "maximize" if mode == "max" else "minimize", seed, folds, points,
                  preset_epochs if isinstance(preset_epochs, int) and preset_epochs > 0 else None)
    if points:  # every combination once, whatever the time
        size = math.prod(len(v) for v in points.values())
        max_trials = min(max_trials or size, size)
        log.info(f"auto: a full grid of {size} trials: {points}")
    elif not study.study.trials:
        study.study.enqueue_trial(defaults_of(cfg, knobs))
    started, rows = time.time(), load_rows(folder)
    durations = [r["minutes"] for r in rows if r.get("minutes")]
    while max_trials is None or len(rows) < max_trials:
        left = minutes - (time.time() - started) / 60
        expected = sorted(durations)[len(durations) // 2] if durations else 0.0
        if left <= 0 or (durations and left < 0.5 * expected):
            break
        row = study.run_trial(left)
        rows.append(row)
        durations.append(row["minutes"])
        save_rows(rows, folder, monitor, list(knobs), folds)
        if row["trial"] == 0 and row["state"] == "failed" and not points:
            raise ConfigError(f"auto: the configuration as given failed as trial 0 ({row['error']}); fix it first "
                              f"(python train.py {' '.join(base)})")
    finished = [r for r in rows if r.get(monitor) is not None]
    if not finished:
        raise ConfigError(f"--minutes={minutes:g} is too small for one trial: trial 0 validated nothing in that time; "
                          "give more minutes (or less data: data.max_train_samples)")
    sign = 1 if mode == "max" else -1
    winner = max((r for r in finished if r["state"] == "complete"), key=lambda r: sign * r[monitor], default=None)
    winner = winner or max(finished, key=lambda r: sign * r[monitor])
    epochs = best_epoch(folder / winner["folder"]) + 1
    overrides = [*overrides_of(knobs, {k: winner[k] for k in knobs}), f"trainer.max_epochs={epochs}"]
    write_preset(folder, base, overrides)
    final, tested = final_run(folder, base, overrides, folder / winner["folder"], folds)
    summary = {"trials": len(rows), "folds": folds, "grid": points, "minutes": round(sum(r["minutes"] for r in rows), 2), "winner": winner, "overrides": overrides, "final": final,
               "test": tested, "rerun": f"python train.py hydra.searchpath=[file://{folder.resolve()}] experiment=auto_winner"}
    (folder / "auto_result.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def load_rows(folder: Path) -> list[dict[str, Any]]:
    table = folder / "trials.json"
    return json.loads(table.read_text()) if table.is_file() else []


def save_rows(rows: list[dict[str, Any]], folder: Path, monitor: str, knobs: list[str], folds: int | None = None) -> None:
    (folder / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
    headers = ["trial", *knobs, "state", monitor, *(["per fold"] if folds else []), "minutes"]
    shown = [{**r, "per fold": " ".join(f"{v:.4f}" for v in r.get("folds", []))} for r in rows]
    title = f"auto: {len(rows)} trials" + (f", each the mean of {folds}-fold cross-validation" if folds else "")
    write_table(shown, headers, folder, "trials", title)
    values = [r.get(monitor) if r.get(monitor) is not None else math.nan for r in rows]
    plot_bars([f"{r['trial']} {r['state'].split()[0]}" for r in rows], values, f"auto: {monitor} per trial",
              folder / "trials.png")


def write_preset(folder: Path, base: Sequence[str], overrides: Sequence[str]) -> Path:
    """``experiment/auto_winner.yaml``: the base overrides and the winner's knobs as a preset (group choices as
    ``override /group: option`` defaults, the base experiment included, values nested)."""
    defaults: list[Any] = []
    values: dict[str, Any] = {}
    for item in [*base, *overrides]:
        key, _, value = item.partition("=")
        key = key.lstrip("+")
        if key == "experiment":
            defaults.insert(0, value)  # the preset this run started from, in the same group
        elif "." not in key:
            defaults.append({f"override /{key}": value})
        else:
            node = values
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = yaml.safe_load(value)
    path = folder / "experiment" / "auto_winner.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({"defaults": [*defaults, "_self_"], **values}, sort_keys=False)
    path.write_text("# @package _global_\n# written by auto.py: the winning trial, as a preset\n" + text)
    return path


def best_epoch(run_dir: Path) -> int:
    """The epoch of a trial's best checkpoint (``best-epochNN-stepS.ckpt``): how long the winner trains again (a
    cross-validated trial: the folds' mean, rounded)."""
    folds = sorted(run_dir.glob("fold_*"))
    if folds:
        return round(sum(best_epoch(f) for f in folds) / len(folds))
    found = sorted(run_dir.glob("checkpoints/best-epoch*-step*.ckpt"))
    if not found:
        raise ConfigError(f"auto: the winning trial {run_dir} saved no best checkpoint")
    return int(found[-1].name.split("-epoch", 1)[1].split("-", 1)[0])


def final_run(folder: Path, base: Sequence[str], overrides: Sequence[str], winner_dir: Path, folds: int | None = None
              ) -> tuple[str, dict[str, Any]]:
    """The winner trained again on the training and validation data together (``data.train_on_val``: the search is
    over, nothing is held out but the test split), for the winner's epochs, its last weights tested once. Data with a
    validation split of its own (not carved from the training data): the winning trial's best checkpoint is tested
    instead, or, after cross-validation (no one trial's model saw all the training split), the winner is trained
    again on the training split. Returns what was tested and the test figures."""
    run_dir = folder / "final"
    log.info(f"auto: the winner on train + val: {' '.join(overrides)}")
    done = run_script("train.py", *base, *overrides, "+data.train_on_val=true", "callbacks.early_stopping=null",
                      "callbacks.model_checkpoint.monitor=null", f"hydra.run.dir={run_dir}")
    if done.returncode == 0:
        metrics = read_json(run_dir / "metrics.json") or {}
        return "the winner retrained on train + val (final/)", {k: v for k, v in metrics.items() if k.startswith("test/")}
    tail = last_line(done)
    if "validation split of its own" not in tail and "needs one carved" not in tail:
        raise ConfigError(f"auto: the final run failed: {tail}")
    if folds:
        log.info(f"auto: {tail.removeprefix('tunelab: error: ')}: the winner is trained again on the training split")
        done = run_script("train.py", *base, *overrides, "callbacks.early_stopping=null",
                          "callbacks.model_checkpoint.monitor=null", f"hydra.run.dir={run_dir}")
        if done.returncode != 0:
            raise ConfigError(f"auto: the final run failed: {last_line(done)}")
        metrics = read_json(run_dir / "metrics.json") or {}
        return ("the winner retrained on the training split (final/; the data has a validation split of its own)",
                {k: v for k, v in metrics.items() if k.startswith("test/")})
    log.info(f"auto: {tail.removeprefix('tunelab: error: ')}: the winning trial's best checkpoint is tested instead")
    return (f"the winning trial's best checkpoint ({winner_dir.name}; the data has a validation split of its own)",
            test_winner(winner_dir, folder / "winner_test"))


def test_winner(run_dir: Path, out: Path) -> dict[str, Any]:
    """The winner's best checkpoint on the test split, once (``eval.py``, its report into ``out``)."""
    done = run_script("eval.py", str(run_dir), "--split", "test", "--out", str(out))
    if done.returncode != 0:
        raise ConfigError(f"auto: testing the winner ({run_dir}) failed: {last_line(done)}")
    return read_json(out / "metrics.json") or {}


def study_name(overrides: Sequence[str]) -> str:
    """The default study folder's name: the preset, else the data, the overrides gave (``study`` if neither)."""
    found = dict(o.lstrip("+").split("=", 1) for o in overrides if "=" in o)
    return str(found.get("experiment") or found.get("data") or "study").replace("/", "_")
