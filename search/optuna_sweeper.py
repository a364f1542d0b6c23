"""Optuna as a Hydra sweeper: ``python train.py --multirun hparams_search=NAME``.

The search space is written as Hydra sweep overrides (``interval(1e-5, 1e-3)``, ``tag(log, interval(...))``,
``choice(a, b)``, ``range(1, 5)``). Optuna is driven directly (ask / tell) with a journal file in the sweep folder,
so running the same command again continues the study: finished trials count, a trial cut short runs again.
(hydra-optuna-sweeper needs optuna<3; this needs no database and no plugin.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from modules.errors import ConfigError

log = logging.getLogger("tunelab")

JOURNAL = "optuna_journal.log"


def distribution(override: Override) -> Any:
    """An Optuna distribution from one sweep override (``tag(log, interval(a, b))``, ``choice(...)``, ``range(...)``)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value, name = override.value(), override.get_key_element()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution([plain(v) for v in value.list])
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step or 1
        if all(float(v).is_integer() for v in (start, stop, step)):
            return IntDistribution(int(start), int(stop) - int(step), step=int(step))
        return FloatDistribution(float(start), float(stop) - float(step), step=float(step))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if "int" in value.tags:
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ConfigError(f"hparams_search: {name}={override.input_line.split('=', 1)[-1]} is no search space; use "
                      "interval(a, b), tag(log, interval(a, b)), choice(a, b, ...) or range(a, b)")


def plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def override_value(value: Any) -> str:
    """A sampled value as Hydra override text (strings quoted when Hydra would read them otherwise)."""
    if isinstance(value, str) and not value.replace("_", "").replace("-", "").replace(".", "").isalnum():
        return repr(value)
    return str(value)


class OptunaSweeper(Sweeper):
    """Trials proposed by an Optuna sampler (TPE by default), each launched as one Hydra job.

    Args:
        params: dotted key -> search space, as a Hydra sweep override (see the module doc).
        n_trials: finished trials the study holds when the sweep ends (trials of earlier runs count).
        direction: maximize | minimize; null: from the config's ``monitor_mode`` (max -> maximize).
        study_name: the study (and the sweep folder's name in the presets).
        sampler: an Optuna sampler, or its config (``_target_`` + arguments).
        storage: the journal file (null: ``<sweep folder>/optuna_journal.log``).
    """

    def __init__(self, params: Mapping[str, Any] | None = None, n_trials: int = 20, direction: str | None = None,
                 study_name: str = "tunelab", sampler: Any = None, storage: str | None = None) -> None:
        self.params = dict(params or {})
        self.n_trials, self.direction, self.study_name = n_trials, direction, study_name
        self.sampler_cfg, self.storage = sampler, storage
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.hydra_context: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=task_function,
                                                                config=config)

    def search_space(self, arguments: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
        """Fixed overrides (the command line's plain ``key=value``) and name -> distribution (the preset's params,
        and any sweep override on the command line, which wins)."""
        parser = OverridesParser.create()
        fixed, space = [], {}
        for name, value in self.params.items():
            override = parser.parse_override(f"{name}={value}")
            if override.is_sweep_override():
                space[name] = distribution(override)
            else:
                fixed.append(f"{name}={value}")
        for override in parser.parse_overrides(list(arguments)):
            if override.is_sweep_override():
                space[override.get_key_element()] = distribution(override)
            else:
                fixed.append(override.input_line)
        if not space:
            raise ConfigError("hparams_search: the search space is empty; give hydra.sweeper.params, e.g. "
                              "optimizer.lr: tag(log, interval(1e-5, 1e-3))")
        return fixed, space

    def study_direction(self) -> str:
        direction = self.direction
        if direction is None:
            mode = OmegaConf.select(self.config, "monitor_mode", default=None)
            if mode is None:
                raise ConfigError("hparams_search: set hydra.sweeper.direction (maximize / minimize) or monitor_mode")
            direction = "maximize" if mode == "max" else "minimize"
        if direction not in ("maximize", "minimize"):
            raise ConfigError(f"hydra.sweeper.direction={direction!r}; choose maximize or minimize")
        return direction

    def sweep(self, arguments: list[str]) -> Any:
        import hydra
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        from optuna.trial import TrialState

        assert self.config is not None
        fixed, space = self.search_space(arguments)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        journal = Path(self.storage) if self.storage else sweep_dir / JOURNAL
        storage = JournalStorage(JournalFileBackend(str(journal)))
        sampler = self.sampler_cfg  # Hydra builds nested _target_ configs already
        if isinstance(sampler, Mapping):
            sampler = hydra.utils.instantiate(sampler)
        sampler = sampler or optuna.samplers.TPESampler(seed=0)
        study = optuna.create_study(study_name=self.study_name, storage=storage, sampler=sampler,
                                    direction=self.study_direction(), load_if_exists=True)
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # cut short last time: again
            study.tell(stale.number, state=TrialState.FAIL)
            study.enqueue_trial(stale.params, skip_if_exists=False)
            log.info(f"optuna: trial {stale.number} was cut short; its parameters run again")
        done = (TrialState.COMPLETE, TrialState.PRUNED)
        finished = len(study.get_trials(deepcopy=False, states=done))
        if finished:
            log.info(f"optuna: continuing study {self.study_name!r} in {journal} ({finished} finished trials)")
        returns = []
        while len(study.get_trials(deepcopy=False, states=done)) < self.n_trials:
            trial = study.ask(space)
            overrides = fixed + [f"{k}={override_value(v)}" for k, v in trial.params.items()]
            log.info(f"optuna: trial {trial.number}: {' '.join(overrides)}")
            self.validate_batch_is_legal([overrides])
            result = self.launcher.launch([tuple(overrides)], initial_job_idx=trial.number)[0]
            returns.append(result)
            try:
                value = result.return_value
            except Exception as err:  # noqa: BLE001 - the job raised: a failed trial, the study goes on
                log.warning(f"optuna: trial {trial.number} failed ({type(err).__name__}: {err})")
                study.tell(trial, state=TrialState.FAIL)
                continue
            if value is None or not math.isfinite(float(value)):
                log.warning(f"optuna: trial {trial.number} returned {value!r}: counted as failed")
                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, float(value))
        write_results(study, space, sweep_dir, str(OmegaConf.select(self.config, "monitor", default="value")))
        return returns


def write_results(study: Any, space: Mapping[str, Any], sweep_dir: Path, metric: str) -> None:
    """``trials.{csv,md}`` (every trial), ``trials.png`` (the metric against each parameter) and
    ``optimization_results.yaml`` (the best trial)."""
    import yaml
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import TrialState

    from search.tables import write_table
    from search.wandb_sweep import SweepRunRecord, plot_metric_vs_params

    trials = study.get_trials(deepcopy=False)
    rows = [{"trial": t.number, "state": t.state.name.lower(), **t.params, metric: t.value,
             "seconds": int(t.duration.total_seconds()) if t.duration else None} for t in trials]
    write_table(rows, ["trial", "state", *space, metric, "seconds"], sweep_dir, "trials",
                f"optuna study {study.study_name} ({study.direction.name.lower()} {metric})")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return
    best = study.best_trial
    (sweep_dir / "optimization_results.yaml").write_text(yaml.safe_dump(
        {"study": study.study_name, "direction": study.direction.name.lower(), "metric": metric,
         "best_trial": best.number, "best_value": float(best.value), "best_params": dict(best.params),
         "finished_trials": len(complete), "overrides": [f"{k}={override_value(v)}" for k, v in best.params.items()]},
        sort_keys=False))
    spec: dict[str, dict[str, Any]] = {}
    for name, dist in space.items():
        if isinstance(dist, (FloatDistribution, IntDistribution)):
            spec[name] = {"min": dist.low, "max": dist.high, "distribution": "log_uniform" if dist.log else "uniform"}
        elif isinstance(dist, CategoricalDistribution):
            spec[name] = {"values": list(dist.choices)}
    records = [SweepRunRecord(name=str(t.number), params=dict(t.params), metric=float(t.value)) for t in complete]
    plot_metric_vs_params(records, spec, metric, str(best.number), sweep_dir / "trials.png")
