"""The shape of the code, kept by tests: model code holds no parallelism, functions stay
short, tools stay thin shells over the library, DeepSpeed internals stay in one adapter."""

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


def test_deepspeed_internals_are_touched_in_one_adapter_only():
    touching = [str(path.relative_to(REPO)) for path in sorted(LIBRARY.rglob("*.py"))
                if any(name.startswith("deepspeed.") for name in _imports(path))
                or "._config" in path.read_text()]
    assert touching == ["l3train/trainer/deepspeed_adapter.py"]
