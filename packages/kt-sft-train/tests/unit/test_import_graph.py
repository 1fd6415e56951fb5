"""The import graph of the installed kt_sft_train (DESIGN.md §4.2, ADR 0303): no circle, no upward import,
and the library never imports the app/ wing. Read with ast from the package's files (function-local
imports included), plus a fresh process that imports the whole library and must not load app/."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import kt_sft_train

PACKAGE = "kt_sft_train"
ROOT = Path(kt_sft_train.__file__).resolve().parent
APP = f"{PACKAGE}.app"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The kt_sft_train modules that `name` imports (a package counts as its __init__)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base = ".".join(base_parts[: len(base_parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            # `from pkg import submodule` imports the submodule; `from pkg import name` the package.
            targets = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in known]
            targets = targets or [source]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import kt_sft_train.x.y` names a module or its package
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def test_the_walker_sees_the_imports_it_must_see() -> None:
    edges = graph()
    assert f"{PACKAGE}.experts" in edges[f"{PACKAGE}.peft.takeover"]
    assert f"{PACKAGE}.versions" in edges[f"{APP}.cli"]
    assert f"{PACKAGE}.adapters" in edges[f"{APP}.cli"]  # a function-local import
    assert f"{PACKAGE}.peft.layout" in edges[f"{PACKAGE}.adapters"]


def test_no_import_circle() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_no_upward_import_and_the_library_never_imports_app() -> None:
    problems = []
    for name, targets in graph().items():
        for target in targets:
            if name.startswith(target + "."):
                problems.append(f"{name} imports its enclosing package {target}")
            inside_app = name == APP or name.startswith(APP + ".")
            if not inside_app and (target == APP or target.startswith(APP + ".")):
                problems.append(f"library module {name} imports {target}")
    assert not problems, problems


def test_importing_the_whole_library_loads_no_app_module() -> None:
    library = [name for name in modules() if not (name == APP or name.startswith(APP + "."))]
    code = textwrap.dedent(
        f"""
        import importlib, sys
        for name in {library!r}:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m == "{APP}" or m.startswith("{APP}."))
        assert not loaded, loaded
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
