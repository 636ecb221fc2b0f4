"""The package's shape: short functions, no private names across modules, a base layer that imports nothing above."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "pyro_evidence"
MODULES = sorted(PACKAGE.rglob("*.py"))
BASE = {"linalg", "optim", "compat", "util", "replay"}  # imported from above by objectives, hypergrad and the selection


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


def test_every_result_calls_its_main_value_value():
    import torch

    import pyro_evidence as pe
    from pyro_evidence.datasets import diabetes
    from pyro_evidence.models import linear_regression

    X, y = diabetes()
    X = X[:, :3]
    ev = pe.laplace_evidence(linear_regression, X, y)
    elbo = pe.elbo_evidence(linear_regression, X, y, num_particles=8)
    cv = pe.cv_log_predictive(linear_regression, X, y, k=3)
    sel = pe.select_hyperparameters(linear_regression, X, y, max_steps=2, progress=False)
    f = lambda t, h: ((t - h) ** 2).sum()  # noqa: E731
    hg = pe.hypergradient(f, lambda t, h: -f(t, h), torch.zeros(2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    for result, named in ((ev, ev.log_evidence), (elbo, elbo.elbo), (sel, sel.objective), (cv, cv.per_fold.sum()),
                          (hg, hg.value)):
        assert torch.equal(torch.as_tensor(result.value), torch.as_tensor(named)), type(result).__name__


def test_ci_runs_the_readme_test_command():
    """The README opens with its two commands; ``.ci/run`` runs the second as written there."""
    root = PACKAGE.parent
    readme = (root / "README.md").read_text().splitlines()
    block = readme[readme.index("```bash") + 1:]
    block = block[: block.index("```")]
    assert block[0] == "# install and run the demo" and block[1].endswith("pyro-evidence demo")
    assert block[2] == "# install and run the whole test suite" and len(block) == 4
    ci = (root / ".ci" / "run").read_text().rstrip().splitlines()
    assert ci[-1] == block[3] and block[3].endswith("python -m pytest")


@pytest.mark.parametrize("path", [p for p in MODULES if p.name != "compat.py"], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_private_attributes_of_other_libraries_are_reached_only_through_compat(path):
    """``x._name`` on anything but ``self``/``cls`` must name something the module itself defines."""
    tree = _tree(path)
    own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    reached = {(ast.unparse(n.value), n.attr) for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
               and ast.unparse(n.value) not in ("self", "cls") and n.attr not in own}
    assert not reached, f"{path.name} reaches {sorted(reached)}: move it to compat.py"
