"""The package's shape: short functions, no private names across modules, a base layer that imports nothing above."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "pyro_evidence"
MODULES = sorted(PACKAGE.rglob("*.py"))
BASE = {"linalg", "optim", "compat", "util"}  # imported from above by objectives, hypergrad and the selection


def _tree(path):
    return ast.parse(path.read_text(), filename=str(path))


def _relative_imports(path):
    """``(module, names)`` of every ``from .x import …`` in ``path``, the module resolved inside the package."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = parts[: len(parts) - node.level]
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            yield target, [a.name for a in node.names]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_is_longer_than_60_lines(path):
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(_tree(path))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, f"{path.name}: {long}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_is_imported_from_another_module(path):
    private = [(m, n) for m, names in _relative_imports(path) for n in names if n.startswith("_")]
    assert not private, f"{path.name} imports {private}"


@pytest.mark.parametrize("name", sorted(BASE))
def test_the_base_layer_imports_only_the_base_layer(name):
    targets = {m for m, _ in _relative_imports(PACKAGE / f"{name}.py")}
    assert targets <= BASE, f"{name}.py imports {sorted(targets - BASE)}"
