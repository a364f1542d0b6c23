"""A good model on new data in one command: a short search within a wall-time budget, then the winner tested.

    python auto.py --minutes 10 experiment=digits_scratch               # study in auto/<name>/; the same command continues it
    python auto.py --minutes 30 data=csv data.data_files.train=reviews.csv --knobs lr,finetune

Searches the knobs that matter for fine-tuning (lr, freezing strategy, layer-wise LR decay, label smoothing,
augmentation strength; each trial trains enough epochs for the data, with early stopping) on the validation split
(k-fold cross-validation for small data), stops weak trials early, and tests the winner once. Writes trials.{csv,md,png}, auto_result.json and experiment/auto_winner.yaml (a preset that
reruns the winner) into the study folder. The logic lives in ``search/auto.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True, help="wall-time budget of the search (the test after it "
                        "comes on top)")
    parser.add_argument("--dir", default=None, help="the study folder (default: auto/<the overrides' experiment or data>)")
    parser.add_argument("--knobs", default=None, help="comma-separated knobs to search (default: all this run offers: "
                        "lr, finetune, lr_decay, label_smoothing, augment)")
    parser.add_argument("--max-trials", type=int, default=None, help="stop after this many trials even with time left")
    parser.add_argument("--seed", type=int, default=0, help="seeds the search's proposals")
    parser.add_argument("--grid", action="store_true", help="instead of the search, every combination of a few values per "
                        "knob (lr x 1/10..10, each freezing strategy, ...), no pruning: a baseline to compare auto with")
    parser.add_argument("--folds", default="auto", help="score each trial by K-fold cross-validation (a number >= 2), on "
                        "the validation split (0), or auto (default): 5 folds when the run trains and validates on fewer "
                        "than 1,000 examples carved from its training data")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every trial (the data, a preset, ...)")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][auto][%(levelname)s] - %(message)s")

    from modules.errors import UserInputError
    from search.auto import run_auto, study_name

    folder = Path(args.dir or Path("auto") / study_name(args.overrides))
    try:
        summary = run_auto(args.overrides, args.minutes, folder, args.knobs.split(",") if args.knobs else None,
                           args.max_trials, args.seed, args.folds, args.grid)
    except UserInputError as err:
        sys.exit(f"tunelab: error: {err}")
    winner = summary["winner"]
    scored = f" ({summary['folds']}-fold cross-validation)" if summary["folds"] else ""
    print(f"auto: {summary['trials']} trials{scored} in {summary['minutes']} min; winner trial {winner['trial']}: "
          f"{' '.join(summary['overrides'])}")
    print(f"auto: test {summary['test']}")
    print(f"auto: rerun it with: {summary['rerun']}")


if __name__ == "__main__":
    main()
