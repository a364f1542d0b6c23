"""A W&B sweep spec run on this machine, with W&B's own search engine (the ``sweeps`` package behind
``wandb[sweeps]``: random, grid, bayes, hyperband early termination) and no W&B server.

Each proposed run is ``train.py`` started with the spec's ``command``, ``${args_no_hyphens}`` expanded to the proposed
``key=value`` overrides, in ``<sweep folder>/runs/<NNN>``. The sweep folder keeps the state (``sweep.json``), so the
same command continues an interrupted sweep: a run cut short resumes from its last checkpoint. After every run the
summary is rewritten: ``summary.{csv,md}``, ``summary.png`` (the metric against each parameter) and ``best.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modules.errors import ConfigError

log = logging.getLogger("tunelab")

ROOT = Path(__file__).resolve().parents[1]
STATE = "sweep.json"
# macros of a W&B sweep command this runner expands; ${args} (--key=value) is refused: Hydra takes key=value
MACROS = ("${env}", "${interpreter}", "${program}", "${args_no_hyphens}")
FAILED_IN_A_ROW = 3


@dataclass
class SweepRunRecord:
    """One run of the sweep, as kept in ``sweep.json``."""

    name: str
    params: dict[str, Any]
    state: str = "pending"  # running | finished | stopped (hyperband) | failed | preempted
    folder: str = ""
    metric: float | None = None
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed: int = 0  # times it was continued from its last checkpoint after an interruption
    error: str | None = None


def import_search_engine() -> Any:
    """The ``sweeps`` package (its pydantic-1 style model warns under pydantic 2, harmlessly: said once, here)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Valid config keys have changed in V2")
        import sweeps
    return sweeps


def load_spec(path: str | Path) -> dict[str, Any]:
    """The sweep spec, checked against W&B's own schema and for a ``command`` that Hydra understands."""
    SweepConfig = import_search_engine().SweepConfig  # noqa: N806 - the engine's class

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec {path} does not exist; the specs are in configs/sweep/")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"sweep spec {path} is not valid YAML ({' '.join(str(err).split())[:160]})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep spec {path} must be a mapping (method, metric, parameters, command)")
    try:
        SweepConfig(spec)
    except Exception as err:  # noqa: BLE001 - jsonschema's ValidationError and friends, all "bad spec"
        raise ConfigError(f"sweep spec {path} fails W&B's sweep schema: {' '.join(str(err).split())[:200]}") from None
    command = spec.get("command") or []
    if "${args_no_hyphens}" not in command:
        raise ConfigError(f"sweep spec {path}: its command must pass ${{args_no_hyphens}} (key=value, what Hydra parses), "
                          "e.g. command: [${env}, ${interpreter}, ${program}, ${args_no_hyphens}]")
    unknown = [a for a in command if str(a).startswith("${") and a not in MACROS]
    if unknown:
        raise ConfigError(f"sweep spec {path}: command macro {unknown[0]} is not supported here; use {', '.join(MACROS)}")
    if "metric" not in spec:
        raise ConfigError(f"sweep spec {path} needs a metric (name: the run's monitor, e.g. val/acc; goal)")
    return spec


def train_command(spec: Mapping[str, Any], params: Mapping[str, Any], program_root: Path = ROOT) -> list[str]:
    """The spec's ``command`` with its macros expanded, as ``wandb agent`` would (``${args_no_hyphens}``: key=value)."""
    out: list[str] = []
    for arg in spec["command"]:
        if arg == "${env}":
            continue
        if arg == "${interpreter}":
            out.append(sys.executable)
        elif arg == "${program}":
            out.append(str(program_root / str(spec.get("program", "train.py"))))
        elif arg == "${args_no_hyphens}":
            out.extend(f"{k}={v}" for k, v in params.items())
        else:
            out.append(str(arg))
    return out


def plain(value: Any) -> Any:
    """numpy scalars (the search engine returns np.float64) as Python values, for overrides and JSON."""
    return value.item() if hasattr(value, "item") else value


class LocalSweep:
    """A sweep spec run here, its state in ``folder``.

    Args:
        spec_path: a W&B sweep spec (configs/sweep/*.yaml).
        folder: the sweep folder (state, runs, summary); the same folder continues the sweep.
        wandb: online | offline | off (the runs log to CSV only).
        seed: seeds the random and bayes proposals (run ``i`` uses ``seed + i``).
        extra: more ``key=value`` overrides for every run (after the spec's own).
    """

    def __init__(self, spec_path: str | Path, folder: str | Path, wandb: str = "offline", seed: int = 0,
                 extra: Sequence[str] = (), poll_s: float = 2.0) -> None:
        if wandb not in ("online", "offline", "off"):
            raise ConfigError(f"--wandb={wandb!r}; choose online, offline or off")
        self.spec_path, self.spec = Path(spec_path), load_spec(spec_path)
        self.folder, self.wandb, self.seed, self.extra, self.poll_s = Path(folder), wandb, seed, list(extra), poll_s
        self.name = str(self.spec.get("name") or self.spec_path.stem)
        self.metric = str(self.spec["metric"]["name"])
        self.goal = str(self.spec["metric"].get("goal", "minimize"))
        self.runs: list[SweepRunRecord] = []
        self._child: subprocess.Popen | None = None
        self._interrupted: str | None = None
        self._load_state()

    # -- state --------------------------------------------------------------------------------------
    def _load_state(self) -> None:
        path = self.folder / STATE
        if not path.is_file():
            return
        state = json.loads(path.read_text())
        if state.get("spec") != self.spec:
            raise ConfigError(f"sweep folder {self.folder} holds a sweep of another spec; continue it with its own spec "
                              f"({state.get('spec_path')}), or give --dir for a new sweep")
        self.runs = [SweepRunRecord(**r) for r in state.get("runs", [])]
        log.info(f"continuing the sweep in {self.folder}: {len(self.runs)} runs so far")

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"spec": self.spec, "spec_path": str(self.spec_path), "name": self.name, "seed": self.seed,
                 "runs": [asdict(r) for r in self.runs]}
        temp = self.folder / f".{STATE}.partial"
        temp.write_text(json.dumps(state, indent=2, default=plain))
        os.replace(temp, self.folder / STATE)

    # -- the search engine ----------------------------------------------------------------------------
    def as_sweep_runs(self) -> list[Any]:
        """Our runs in the search engine's terms: config, state, the metric's history and best value."""
        from sweeps import RunState, SweepRun

        states = {"finished": RunState.finished, "stopped": RunState.finished, "failed": RunState.failed,
                  "running": RunState.running, "preempted": RunState.preempted, "pending": RunState.pending}
        out = []
        for run in self.runs:
            summary = {self.metric: run.metric} if run.metric is not None else {}
            # W&B's own field names (summaryMetrics, sampledHistory): what every version of the engine accepts
            out.append(SweepRun(name=run.name, state=states[run.state], config={k: {"value": v} for k, v in run.params.items()},
                                sampledHistory=[{self.metric: v} for v in run.history], summaryMetrics=summary))
        return out

    def propose(self) -> dict[str, Any] | None:
        """The next run's parameters from the search engine (None: a grid is exhausted)."""
        import warnings

        import numpy as np
        from sklearn.exceptions import ConvergenceWarning
        from sweeps import next_run

        np.random.seed(self.seed + len(self.runs))  # random / bayes draw from numpy's global generator
        with warnings.catch_warnings():  # the GP fit's length-scale warnings say nothing a user can act on
            warnings.simplefilter("ignore", ConvergenceWarning)
            proposal = next_run(self.spec, self.as_sweep_runs(), validate=True)
        if proposal is None:
            return None
        return {k: plain(v["value"]) for k, v in proposal.config.items() if isinstance(v, Mapping) and "value" in v}

    def should_stop(self, run: SweepRunRecord) -> bool:
        """Hyperband: does the engine stop this running run, given every run's metric history so far?"""
        if not self.spec.get("early_terminate"):
            return False
        from sweeps import stop_runs

        return any(r.name == run.name for r in stop_runs(self.spec, self.as_sweep_runs()))

    # -- running --------------------------------------------------------------------------------------
    def run(self, count: int) -> list[SweepRunRecord]:
        """Run until the sweep holds ``count`` runs (finished, stopped or failed) or a grid is exhausted."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for run in [r for r in self.runs if r.state in ("running", "preempted", "pending")]:
                self._execute(run, count)  # cut short last time: continue it first
            while len([r for r in self.runs if r.state != "pending"]) < count:
                params = self.propose()
                if params is None:
                    log.info(f"the grid is exhausted after {len(self.runs)} runs")
                    break
                run = SweepRunRecord(name=f"{len(self.runs):03d}", params=params)
                run.folder = str(self.folder / "runs" / run.name)
                self.runs.append(run)
                self.save()
                self._execute(run, count)
                failed = [r.state == "failed" for r in self.runs[-FAILED_IN_A_ROW:]]
                if len(failed) == FAILED_IN_A_ROW and all(failed):
                    raise ConfigError(f"{FAILED_IN_A_ROW} runs in a row failed; the last: {self.runs[-1].error} "
                                      f"(its log: {self.runs[-1].folder}/console.log)")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.save()
            self.summarise()
        return self.runs

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._interrupted = signal.Signals(signum).name
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signal.SIGTERM)  # train.py saves last.ckpt at the step boundary and exits

    def _execute(self, run: SweepRunRecord, count: int) -> None:
        folder = Path(run.folder)
        done = len([r for r in self.runs if r.state in ("finished", "stopped", "failed")])
        if run.state in ("running", "preempted") and (folder / "checkpoints" / "last.ckpt").is_file():
            command = [sys.executable, str(ROOT / "train.py"), f"resume={folder}"]
            run.resumed += 1
            what = "continuing"
        else:
            if folder.exists():  # started but nothing to continue from: start it again, cleanly
                shutil.rmtree(folder)
            command = [*train_command(self.spec, run.params), *self.extra]
            problem = config_problem(command[2:])
            if problem:  # a misspelt parameter name or a bad value: no process started for it
                run.state, run.error = "failed", problem
                print(f"[sweep {self.name}] run {run.name} failed: {problem}", flush=True)
                self.save()
                return
            command += self.run_overrides(run)
            what = "starting"
        settings = " ".join(f"{k}={v}" for k, v in run.params.items())
        print(f"[sweep {self.name}] run {run.name} ({done + 1}/{count}) {what}: {settings}", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        run.state = "running"
        self.save()
        started = time.time()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.wandb != "off":
            env["WANDB_MODE"] = self.wandb
        stopped = False
        with open(folder / "console.log", "a") as console:
            # its own session: a Ctrl-C reaches this runner only, which stops the run once, cleanly
            self._child = subprocess.Popen(command, cwd=os.getcwd(), stdout=console, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)
            while self._child.poll() is None:
                time.sleep(self.poll_s)
                run.history = self.read_history(folder)
                if not stopped and self._interrupted is None and run.history and self.should_stop(run):
                    stopped = True
                    print(f"[sweep {self.name}] run {run.name}: hyperband stops it after {len(run.history)} "
                          f"evaluations of {self.metric}", flush=True)
                    self._child.send_signal(signal.SIGTERM)
            code = self._child.returncode
            self._child = None
        run.seconds += time.time() - started
        run.history = self.read_history(folder)
        if self._interrupted and not stopped:
            run.state = "preempted"
            self.save()
            raise SweepInterrupted(self._interrupted, run.name)
        run.metric = self.read_metric(folder, run.history)
        if stopped:
            run.state = "stopped"
        elif code == 0:
            run.state = "finished"
        else:
            run.state = "failed"
            run.error = last_error(folder / "console.log")
        shown = f"{self.metric}={run.metric:.4f}" if run.metric is not None else f"no {self.metric}"
        print(f"[sweep {self.name}] run {run.name} {run.state} in {run.seconds:.0f} s: {shown}"
              + (f" ({run.error})" if run.error else ""), flush=True)
        self.save()
        self.summarise(show=False)

    def run_overrides(self, run: SweepRunRecord) -> list[str]:
        """Where the run goes and how it is labelled; ``logger=csv`` without W&B."""
        out = [f"hydra.run.dir={run.folder}", f"tracking.group={self.name}", "tracking.job_type=sweep"]
        return out + (["logger=csv"] if self.wandb == "off" else [])

    # -- reading a run ----------------------------------------------------------------------------------
    def read_history(self, folder: Path) -> list[float]:
        """The metric's values so far, in order, from the run's CSV log."""
        import csv

        path = folder / "csv" / "metrics.csv"
        if not path.is_file():
            return []
        values = []
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                value = row.get(self.metric)
                if value not in (None, ""):
                    values.append(float(value))
        return values

    def read_metric(self, folder: Path, history: Sequence[float]) -> float | None:
        """The run's value of the metric: its best (``best/<metric>``), the final one, else the best in its history."""
        path = folder / "metrics.json"
        if path.is_file():
            metrics = json.loads(path.read_text())
            for key in (f"best/{self.metric}", self.metric):
                if key in metrics and math.isfinite(float(metrics[key])):
                    return float(metrics[key])
        finite = [v for v in history if math.isfinite(v)]
        if not finite:
            return None
        return max(finite) if self.goal == "maximize" else min(finite)

    # -- the summary ----------------------------------------------------------------------------------
    def summarise(self, show: bool = True) -> None:
        from search.tables import write_table

        runs = [r for r in self.runs if r.state != "pending"]
        if not runs:
            return
        names = list(self.spec["parameters"])
        rows = [{"run": r.name, "state": r.state, **r.params, self.metric: r.metric, "seconds": int(round(r.seconds)),
                 "folder": r.folder} for r in runs]
        write_table(rows, ["run", "state", *names, self.metric, "seconds", "folder"], self.folder, "summary",
                    f"sweep {self.name} ({self.spec['method']}, {self.goal} {self.metric})", show)
        scored = [r for r in runs if r.metric is not None]
        if scored:
            best = (max if self.goal == "maximize" else min)(scored, key=lambda r: r.metric)
            (self.folder / "best.json").write_text(json.dumps(
                {"run": best.name, self.metric: best.metric, "params": best.params, "folder": best.folder,
                 "overrides": [f"{k}={v}" for k, v in best.params.items()]}, indent=2, default=plain))
            plot_metric_vs_params(scored, self.spec["parameters"], self.metric, best.name, self.folder / "summary.png")


class SweepInterrupted(Exception):
    def __init__(self, signal_name: str, run: str) -> None:
        super().__init__(f"{signal_name} during run {run}; it saved a checkpoint if it could. Run the same command "
                         "again to continue the sweep (that run resumes first)")


def config_problem(overrides: Sequence[str]) -> str | None:
    """What is wrong with a run's ``key=value`` overrides (composed here, as train.py would), or None."""
    from run.config import check_command_line

    try:
        check_command_line(list(overrides))
    except SystemExit as stop:
        return str(stop.code).removeprefix("tunelab: error: ")
    return None


def last_error(path: Path) -> str:
    """The one line that says why a run failed: its ``tunelab: error:`` line, else its last line."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.is_file() else []
    errors = [line for line in lines if line.startswith("tunelab: error:")]
    return (errors or lines or ["no output"])[-1][:300]


def plot_metric_vs_params(runs: Sequence[SweepRunRecord], parameters: Mapping[str, Any], metric: str, best: str,
                          path: Path) -> None:
    """One panel per parameter: the metric of every scored run against that parameter's value (best in red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    names = list(parameters)
    fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 3.3), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names, strict=False):
        values = [r.params.get(name) for r in runs]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = [float(v) for v in values]
            space = parameters[name]
            if "log" in str(space.get("distribution", "")) and min(xs) > 0:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
            if "min" in space and "max" in space:  # the whole search range, so a reader sees where runs landed
                ax.set_xlim(float(space["min"]), float(space["max"]))
        else:
            categories = sorted({str(v) for v in values})
            xs = [categories.index(str(v)) for v in values]
            ax.set_xticks(range(len(categories)), categories, rotation=20, ha="right")
        colors = ["tab:red" if r.name == best else "tab:blue" for r in runs]
        ax.scatter(xs, [r.metric for r in runs], c=colors)
        ax.set_xlabel(name)
    axes[0][0].set_ylabel(metric)
    fig.suptitle(f"{metric} against each parameter ({len(runs)} runs; best in red)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
