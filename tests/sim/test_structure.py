"""The simulator's package structure: no import cycles, nothing from the benchmarks' lab, and
no torch until a calibration measures something."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SIM = Path(__file__).resolve().parents[2] / "tessera" / "sim"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, absolute names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative to tessera.sim
                base = "tessera.sim" + (f".{node.module}" if node.module else "")
                found.update([base] if node.module else
                             [f"{base}.{alias.name}" for alias in node.names])
            elif node.module:
                found.add(node.module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in SIM.glob("*.py")}
    return {name: {imp.split(".")[2] for imp in _imports(path)
                   if imp.startswith("tessera.sim.") and imp.split(".")[2] in modules} - {name}
            for name, path in modules.items()}


def test_no_import_cycles_in_the_simulator() -> None:
    graph = _graph()
    assert "planner" in graph["cli"]  # the check sees imports made inside functions
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError(f"import cycle: {' -> '.join([*path[path.index(name):], name])}")
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_the_simulator_does_not_import_the_benchmarks_lab() -> None:
    for path in SIM.glob("*.py"):
        assert not any(imp.split(".")[0] == "benchmarks" for imp in _imports(path)), path.name


@pytest.mark.processes
def test_importing_the_simulator_loads_no_torch() -> None:
    modules = sorted(f"tessera.sim.{p.stem}" for p in SIM.glob("*.py") if p.stem != "__main__")
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=SIM.parents[1])
