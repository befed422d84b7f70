"""The shape of the code, kept by tests: the packages import one another without cycles,
model code holds no parallelism, functions stay short, tools stay thin shells over the
library, DeepSpeed internals stay in two modules (the live engine's adapter, its files' reader)."""

from __future__ import annotations

import ast

import pytest
from training_harness import REPO

LIBRARY = REPO / "l3train"


def _imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((LIBRARY / "model").glob("*.py")), ids=lambda p: p.name)
def test_model_code_holds_no_parallelism(path):
    forbidden = [name for name in _imports(path)
                 if name.startswith(("l3train.parallel", "l3train.trainer", "torch.distributed", "megatron", "deepspeed"))]
    assert not forbidden, f"{path.name} imports {forbidden}"


def test_no_library_function_is_longer_than_70_lines():
    long = []
    for path in sorted(LIBRARY.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 70:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long


@pytest.mark.parametrize("path", sorted((REPO / "tools").glob("*.py")), ids=lambda p: p.name)
def test_tools_are_thin_shells_over_the_library(path):
    assert len(path.read_text().splitlines()) <= 130
    assert any(name.startswith("l3train") for name in _imports(path))


def test_deepspeed_internals_are_touched_in_two_modules_only():
    """The trainer's adapter (a live engine) and l3train.checkpoint's reader of DeepSpeed's files."""
    touching = [str(path.relative_to(REPO)) for path in sorted(LIBRARY.rglob("*.py"))
                if any(name.startswith("deepspeed.") for name in _imports(path))
                or "._config" in path.read_text()]
    assert touching == ["l3train/checkpoint/deepspeed_files.py", "l3train/trainer/deepspeed_adapter.py"]


def _unit(module: str) -> str:
    """The folder or top module of l3train that `module` belongs to (l3train.checkpoint, l3train.errors)."""
    return ".".join(module.split(".")[:2])


def _import_graph() -> dict[str, dict[str, str]]:
    """unit -> {imported unit: a module of the first that imports it}, over every import (also
    those inside functions, which run too)."""
    graph: dict[str, dict[str, str]] = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for name in _imports(path):
            if name.startswith("l3train.") and _unit(name) != _unit(module):
                graph.setdefault(_unit(module), {}).setdefault(_unit(name), module)
    return graph


def test_the_packages_import_one_another_without_cycles():
    """Lower layers never import higher ones: the graph of l3train's folders and top modules is
    acyclic (a cycle means some layer reaches up; the message names the modules doing it)."""
    graph, state, cycles = _import_graph(), {}, []

    def visit(unit: str, path: list[str]) -> None:
        state[unit] = "open"
        for target in sorted(graph.get(unit, {})):
            if state.get(target) == "open":
                loop = path[path.index(target):] + [unit, target]
                cycles.append(" -> ".join(f"{a} ({graph[a][b]})" for a, b in zip(loop, loop[1:])))
            elif target not in state:
                visit(target, path + [unit])
        state[unit] = "done"

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [])
    assert not cycles, "\n".join(cycles)
