"""The house stays as designed: imports only go down (entry scripts -> run / search -> callbacks, datamodules ->
modules), no two files import each other in a circle, ``train.py`` stays thin, and ``pip install`` adds the project's
packages and nothing else to the import namespace. Read from every file's AST (imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = ("train", "eval", "predict", "export", "sweep", "auto")
# a file imports its own package and the floors below it: callbacks and datamodules never import each other; search
# (studies over many runs) may use the run lifecycle; the entry scripts, Hydra's plugin shim and the benchmarks sit on top
FLOOR = {"modules": 1, "datamodules": 2, "callbacks": 2, "run": 3, "search": 4, "hydra_plugins": 5, "bench": 6}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every project Python file that is not a test."""
    files = {name: ROOT / f"{name}.py" for name in ENTRY_SCRIPTS}
    for package in FLOOR:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from pkg import submodule`` names the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a non-module attribute: its nearest module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(path, name, set(files)) for name, path in files.items()}


def floor(name: str) -> int:
    top = name.split(".")[0]
    return FLOOR[top] if top in FLOOR else 5


def test_imports_only_go_down() -> None:
    upward = []
    for name, targets in graph().items():
        for target in targets:
            same_package = name.split(".")[0] == target.split(".")[0]
            if floor(target) >= floor(name) and not same_package:
                upward.append(f"{name} -> {target}")
    assert not upward, f"imports that do not go down: {upward}"


def test_no_import_circle() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            pytest.fail(f"import circle: {' -> '.join(cycle)}")


def test_the_backbone_protocol_imports_nothing_above_it() -> None:
    assert graph()["modules.backbones.base"] <= {"modules.errors", "modules.layer_groups"}


def test_train_py_is_thin_and_exports_nothing() -> None:
    """train.py wires the run (compose -> check -> build -> fit -> test -> report) and has no helper for others: only
    benchmarks (which run ``train.train`` in-process) import it."""
    source = (ROOT / "train.py").read_text()
    assert len(source.splitlines()) <= 150
    functions = [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)]
    assert functions == ["train", "main"], functions
    importers = [name for name, targets in graph().items() if "train" in targets and not name.startswith("bench.")]
    assert not importers, importers


def test_installed_import_names_are_the_projects_packages() -> None:
    """``pip install`` puts the packages on the import path, never the entry scripts (``import eval`` would shadow a
    builtin's name in any project sharing the environment); ``python train.py`` runs them from the checkout."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    assert "py-modules" not in setuptools
    assert sorted(setuptools["packages"]["find"]["include"]) == sorted(
        ["modules*", "datamodules*", "callbacks*", "run*", "search*", "configs", "hydra_plugins*"])
    for package in ("modules", "datamodules", "callbacks", "run", "search"):
        docstring = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
        assert docstring and len(docstring) > 80, f"{package}/__init__.py says what lives there"


def test_a_torch_without_triton_skips_the_kernel_tests_and_benchmark() -> None:
    """A CPU-only torch wheel has no Triton: the kernel tests skip (not a collection error) and the kernel benchmark
    says it skipped; the model code falls back to torch (``modules.kernels`` imports its Triton ops lazily)."""
    import subprocess
    import sys

    script = ("import runpy, sys; sys.modules['triton'] = None\n"  # `import triton` now fails, as on a CPU-only wheel
              "import pytest\n"
              "code = pytest.main(['-q', '-p', 'no:cacheprovider', '-m', '', 'tests/test_kernels.py'])\n"
              "sys.argv = ['bench/kernels.py', '--quick']; runpy.run_path('bench/kernels.py', run_name='__main__')\n"
              "import modules.kernels; assert modules.kernels.resolve_kernels('triton', 'bert') == frozenset()\n"
              "sys.exit(0 if code == 5 else int(code))")  # 5: no test collected (the module skipped)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "1 skipped" in out.stdout and "no Triton (a CPU-only torch build): skipped" in out.stdout, out.stdout[-2000:]
