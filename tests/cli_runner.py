"""Run many ``python train.py ARGS`` command lines in one go: the slow imports (torch, Lightning, transformers,
timm) happen once, then each command line runs ``train.py`` as ``__main__`` in a forked process of its own, with
its own stdout/stderr and exit status, exactly as the shell would see it; as many at once as there are cores (up to 4). A case whose first argument names another
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


SCRIPTS = ("train.py", "eval.py", "predict.py", "export.py", "sweep.py", "auto.py")


def start_one(args: list[str], output: Path) -> int:
    """Forks a child that runs train.py (or the script ``args[0]`` names) as ``__main__`` with ``args``; returns its
    pid (``os.waitpid`` gives its exit status)."""
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
    return pid


def main(cases_file: str, results_file: str) -> None:
    import lightning.pytorch  # noqa: F401 - imported once, before any fork
    import timm  # noqa: F401
    import transformers  # noqa: F401

    import datamodules  # noqa: F401
    import modules  # noqa: F401

    cases = json.loads(Path(cases_file).read_text())
    results = {}
    out_dir = Path(results_file).parent
    running: dict[int, tuple[str, Path]] = {}
    jobs = max(1, min(4, os.cpu_count() or 1))  # cases are independent (each its own run folder): one per core

    def reap() -> None:
        pid, status = os.wait()
        name, output = running.pop(pid)
        results[name] = {"returncode": os.waitstatus_to_exitcode(status), "output": output.read_text(errors="replace")}

    for i, (name, args) in enumerate(cases.items()):
        while len(running) >= jobs:
            reap()
        output = out_dir / f"case{i}.txt"
        sys.stdout.flush()
        sys.stderr.flush()
        running[start_one(args, output)] = (name, output)
    while running:
        reap()
    Path(results_file).write_text(json.dumps({name: results[name] for name in cases}, indent=1))


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    main(*sys.argv[1:])
