"""Export a trained run for use outside tunelab, checked against the run's own model on its data.

    python export.py RUN                                  # every format: hf, onnx, torchscript
    python export.py RUN --format onnx --out model/       # one format
    python export.py RUN --weights wise_ft                # the WiSE-FT model (or raw: an EMA run's un-averaged weights)
    python export.py RUN --format backbone --out enc/     # the backbone alone (a later run's backbone.name_or_path)

Formats: ``hf`` (a Hugging Face folder for the Auto classes; image classifiers as a timm folder), ``onnx``
(dynamic batch and sequence/time axes, checked with onnxruntime), ``torchscript`` (traced; refused where tracing does
not generalise); ``all`` is these three. ``backbone``: the backbone alone in the Hugging Face format (text and audio). Each lands in ``<out>/<format>/`` (default ``<run>/export/``) with ``export_report.json``: the
largest difference from the run's model on two real batches of different shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from run.cli import CommandParser, add_run_arguments, run_command


def parse(argv: Sequence[str]) -> Any:
    parser = CommandParser(prog="export.py", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--format", default="all", help="hf, onnx, torchscript, backbone, a comma-separated list, or all "
                                                        "(hf, onnx and torchscript)")
    parser.add_argument("--out", default=None, help="the export folder (default <run>/export)")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> None:
    from modules.errors import ConfigError
    from run.export import FORMATS, TASK_FORMATS, export_run
    from run.trained import load_run

    args = parse(argv)
    formats = list(TASK_FORMATS) if args.format == "all" else [f.strip() for f in args.format.split(",") if f.strip()]
    if not formats or any(f not in FORMATS for f in formats):
        raise ConfigError(f"--format {args.format!r}: choose from {', '.join(FORMATS)}, a comma-separated list, or all "
                          f"({', '.join(TASK_FORMATS)})")
    if args.device not in ("auto", "cpu"):
        raise ConfigError("--device: exports are traced and checked on the CPU; leave out --device")
    run = load_run(args.run, (), args.checkpoint, args.weights, args.trust_checkpoint)
    out = Path(args.out).expanduser() if args.out else run.run_dir / "export"
    report = export_run(run, formats, out, skip_failures=args.format == "all")
    done = {fmt: info for fmt, info in report["formats"].items() if fmt in formats and "skipped" not in info}
    for fmt, info in done.items():
        print(f"{fmt}: {info['folder']}  (max abs difference {max(info['max_abs_difference']):.1e}; {info['loads_with']})")
    for fmt in formats:
        if fmt not in done:
            print(f"{fmt}: skipped: {report['formats'][fmt]['skipped']}")
    print(f"report: {out / 'export_report.json'}")
    if not done:
        raise ConfigError(f"no format could be exported: {report['formats'][formats[0]]['skipped']}")


if __name__ == "__main__":
    run_command(main)
