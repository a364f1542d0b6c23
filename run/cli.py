"""What the entry scripts beside ``train.py`` (eval, predict, export) share: one-line errors for bad arguments and
bad input, the ``--device`` option, and a Trainer that only runs inference."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from modules.errors import ConfigError, UserInputError


class CommandParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one ``tunelab: error:`` line (the usage is in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        sys.exit(f"tunelab: error: {message} (see python {self.prog} --help)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that pick a trained model: the run, its checkpoint and which weights."""
    parser.add_argument("run", help="a run folder (outputs/<run_name>/<date_time>) or a checkpoint inside one")
    parser.add_argument("--checkpoint", default="best", help="best (the run's monitored metric picked it), last, or a .ckpt file")
    parser.add_argument("--weights", default="checkpoint",
                        help="checkpoint (as saved; EMA weights when EMA was on) | raw (an EMA run's un-averaged weights) | "
                             "wise_ft (the WiSE-FT model at its best α) | wise_ft:ALPHA")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a full unpickle of a checkpoint that weights_only loading refuses (runs its code)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def trainer_options(device: str) -> dict[str, Any]:
    """Lightning ``accelerator`` / ``devices`` for ``--device``."""
    import torch

    if device == "auto":
        return {"accelerator": "gpu" if torch.cuda.is_available() else "cpu", "devices": 1}
    if device == "cpu":
        return {"accelerator": "cpu", "devices": 1}
    if device == "cuda" or device.startswith("cuda:"):
        index = device.partition(":")[2]
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is visible here; use --device cpu")
        if index and not (index.isdigit() and int(index) < torch.cuda.device_count()):
            raise ConfigError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices (0..N-1)")
        return {"accelerator": "gpu", "devices": [int(index)] if index else 1}
    raise ConfigError(f"--device {device!r} is unknown; choose auto, cpu, cuda or cuda:N")


def torch_device(device: str) -> Any:
    """The ``torch.device`` for ``--device``."""
    import torch

    options = trainer_options(device)
    if options["accelerator"] == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", options["devices"][0] if isinstance(options["devices"], list) else 0)


def inference_trainer(device: str, out: Path, callbacks: Sequence[Any] = (), precision: Any = "32-true",
                      progress: bool = True) -> Any:
    """A Trainer for test / validate / predict: no loggers, no checkpoints, one device."""
    import lightning.pytorch as pl

    options = trainer_options(device)
    if options["accelerator"] == "cpu" and str(precision).startswith("16"):
        precision = "bf16-mixed"  # fp16 autocast is GPU-only
    return pl.Trainer(**options, precision=precision, logger=False, enable_checkpointing=False, default_root_dir=str(out),
                      callbacks=list(callbacks), enable_model_summary=False, enable_progress_bar=progress)


def run_command(main: Callable[[Sequence[str]], Any], argv: Sequence[str] | None = None) -> None:
    """Run an entry script's ``main``: user mistakes end as one ``tunelab: error:`` line, exit status 1."""
    import torch

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "onnxscript", "onnx_ir",
                  "torch.onnx", "torch.export", "torch._export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_float32_matmul_precision("high")
    try:
        main(list(sys.argv[1:] if argv is None else argv))
    except UserInputError as err:
        sys.exit(f"tunelab: error: {err}")
