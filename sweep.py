"""Run a W&B sweep spec on this machine with W&B's own search engine (random, grid, bayes, hyperband), offline or online.

    python sweep.py configs/sweep/digits_bayes.yaml --count 8            # state, runs and summary in sweeps/<name>/
    python sweep.py configs/sweep/digits_bayes.yaml --count 12           # the same sweep, continued to 12 runs
    python sweep.py configs/sweep/bbc_random.yaml --count 4 trainer.max_epochs=1   # extra overrides for every run

The same spec runs on a W&B server: ``wandb sweep configs/sweep/X.yaml``, then ``wandb agent <ID>`` on each machine.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="a W&B sweep spec, e.g. configs/sweep/digits_bayes.yaml")
    parser.add_argument("--count", type=int, default=1,
                        help="runs the sweep holds when this command ends (runs already in its folder count)")
    parser.add_argument("--dir", default=None, help="the sweep folder (default: sweeps/<spec name>); the same one continues it")
    parser.add_argument("--wandb", default="offline", choices=("offline", "online", "off"),
                        help="the runs log to W&B offline (default; `wandb sync` uploads them), online, or not at all")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random and bayes proposals")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run, after the spec's own")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][sweep][%(levelname)s] - %(message)s")

    from modules.errors import UserInputError
    from search.wandb_sweep import LocalSweep, SweepInterrupted, import_search_engine

    if args.count < 1:
        sys.exit(f"tunelab: error: --count={args.count} must be >= 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        sys.exit(f"tunelab: error: {bad[0]!r} is not a key=value override for the runs")
    try:
        import_search_engine()
    except ImportError:
        sys.exit("tunelab: error: the offline search engine is W&B's `sweeps` package, which `pip install -e .` brings; "
                 "install it with: pip install 'sweeps>=0.2,<0.3'")
    try:
        spec_name = Path(args.spec).stem
        sweep = LocalSweep(args.spec, args.dir or Path("sweeps") / spec_name, args.wandb, args.seed, args.overrides)
        runs = sweep.run(args.count)
    except UserInputError as err:
        sys.exit(f"tunelab: error: {err}")
    except SweepInterrupted as stop:
        print(f"tunelab: stopped: {stop}", file=sys.stderr)
        sys.exit(130)
    done = [r for r in runs if r.state != "pending"]
    if done and all(r.state == "failed" for r in done):
        sys.exit(f"tunelab: error: every run of the sweep failed ({len(done)}); the last: {done[-1].error}")
    print(f"sweep folder: {sweep.folder.resolve()} ({len(done)} runs; summary.md, summary.png, best.json)")


if __name__ == "__main__":
    main()
