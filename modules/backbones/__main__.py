"""``python -m modules.backbones export <run>/checkpoints/X.ckpt <folder>``: a run's backbone in Hugging Face format."""

import argparse
import sys

from modules.backbones import export_checkpoint
from modules.errors import UserInputError

parser = argparse.ArgumentParser(prog="python -m modules.backbones", description="export a run's backbone")
sub = parser.add_subparsers(dest="command", required=True)
export = sub.add_parser("export", help="checkpoint -> Hugging Face folder (usable as backbone.name_or_path)")
export.add_argument("checkpoint")
export.add_argument("out_dir")
args = parser.parse_args()
try:
    print(f"saved {export_checkpoint(args.checkpoint, args.out_dir)}")
except UserInputError as err:
    sys.exit(f"tunelab: error: {err}")
