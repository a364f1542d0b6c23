"""Run many ``python train.py ARGS`` command lines in one go: the slow imports (torch, Lightning, transformers,
timm) happen once, then each command line runs ``train.py`` as ``__main__`` in a forked process of its own, with
its own stdout/stderr and exit status, exactly as the shell would see it. A case whose first argument names another
entry script (``eval.py``, ``predict.py``, ``export.py``) runs that script instead.

    python tests/cli_runner.py cases.json results.json     # cases: {name: [arg, ...]}
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


SCRIPTS = ("train.py", "eval.py", "predict.py", "export.py", "sweep.py")


def run_one(args: list[str], output: Path) -> int:
    """In a forked child: train.py (or the script ``args[0]`` names) as ``__main__`` with ``args``; returns its exit status."""
    script = args[0] if args and args[0] in SCRIPTS else "train.py"
    args = args[1:] if args and args[0] in SCRIPTS else args
    pid = os.fork()
    if pid == 0:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        signal.alarm(TIMEOUT_S)
        sys.argv = [str(ROOT / script), *args]
        code = 0
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        except SystemExit as exit_:  # what the interpreter would do with it
            if isinstance(exit_.code, int) or exit_.code is None:
                code = exit_.code or 0
            else:
                print(exit_.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - an uncaught error: the traceback the user would see
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main(cases_file: str, results_file: str) -> None:
    import lightning.pytorch  # noqa: F401 - imported once, before any fork
    import timm  # noqa: F401
    import transformers  # noqa: F401

    import datamodules  # noqa: F401
    import modules  # noqa: F401

    cases = json.loads(Path(cases_file).read_text())
    results = {}
    out_dir = Path(results_file).parent
    for i, (name, args) in enumerate(cases.items()):
        output = out_dir / f"case{i}.txt"
        sys.stdout.flush()
        sys.stderr.flush()
        code = run_one(args, output)
        results[name] = {"returncode": code, "output": output.read_text(errors="replace")}
    Path(results_file).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    main(*sys.argv[1:])
