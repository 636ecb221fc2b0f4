import pyro
import pytest

import pyro_evidence as pe
from pyro_evidence import Checkpoint, select_hyperparameters
from pyro_evidence.datasets import diabetes
from pyro_evidence.models import linear_regression
from pyro_evidence.objectives import OBJECTIVES, as_objective
from pyro_evidence.objectives.cv import CrossValidationObjective

from ..common import assert_close, linear_gaussian_log_evidence


def data():
    X, y = diabetes()
    return X[:, :4], y


@pytest.mark.parametrize(
    "spec, name, options",
    [
        (pe.Laplace(hessian="ggn"), "laplace", {"hessian": "ggn"}),
        (pe.CV(k=3, seed=1), "cv", {"k": 3, "seed": 1}),
        (pe.Holdout(validation=0.25, max_iter=200), "holdout", {"validation": 0.25, "max_iter": 200}),
    ],
)
def test_an_objective_value_is_the_same_selection_as_its_name_and_options(spec, name, options):
    X, y = data()
    by_value = select_hyperparameters(linear_regression, X, y, objective=spec, method="ift-cg", max_steps=4, progress=False)
    pyro.clear_param_store()
    by_name = select_hyperparameters(linear_regression, X, y, objective=name, objective_options=options, method="ift-cg",
                                     max_steps=4, progress=False)
    assert by_value.objective_name == by_name.objective_name == name
    assert [s.objective for s in by_value.history] == [s.objective for s in by_name.history]
    assert_close(by_value.h, by_name.h, rtol=0, atol=0)


def test_the_laplace_value_selects_the_closed_form_optimum():
    X, y = data()
    sel = select_hyperparameters(linear_regression, X, y, objective=pe.Laplace(), progress=False)
    hp = sel.hyperparameters
    assert sel.converged
    assert_close(sel.objective, linear_gaussian_log_evidence(X, y, hp["prior_precision"], hp["noise_precision"]), rtol=1e-10)


def test_a_value_binds_to_its_objective_class_with_its_options():
    X, y = data()
    obj = pe.CV(k=5, seed=2).bind(pe.Problem(linear_regression, X, y))
    assert isinstance(obj, CrossValidationObjective) and obj.k == 5
    assert sorted(OBJECTIVES) == ["cv", "elbo", "holdout", "laplace"]
    assert as_objective("cv", {"k": 5}) == pe.CV(k=5) != pe.CV(k=4)
    assert repr(pe.Laplace(hessian="kron", jitter=1e-6)) == "Laplace(hessian='kron', jitter=1e-06)"


def test_newton_max_dim_chooses_the_inner_solver():
    X, y = data()  # 4 weights: 8 guide parameters
    problem = pe.Problem(linear_regression, X, y)
    newton, lbfgs = (pe.Elbo(newton_max_dim=n, max_iter=2000).bind(problem) for n in (8, 7))
    a, b = (obj.solve(obj.h_init) for obj in (newton, lbfgs))
    assert a.newton_steps > 0 and a.lbfgs_iterations == 0 and a.hessian is not None
    assert b.newton_steps == 0 and b.lbfgs_iterations > 0 and b.hessian is None
    assert_close(b.theta, a.theta, atol=1e-4)
    assert "newton_max_dim" in pe.Laplace.accepted() and pe.CV(newton_max_dim=0).options == {"newton_max_dim": 0}
    with pytest.raises(ValueError, match="newton_max_dim must be a count ≥ 0 of inner parameters, got -1"):
        pe.Elbo(newton_max_dim=-1).bind(problem)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: pe.Elbo(jitter=1e-6), ValueError, r"Elbo\(\) keyword 'jitter' is not an option of objective 'elbo'; its options are"),
        (lambda: pe.CV(max_iter=0), ValueError, r"CV\(\) keyword 'max_iter' must be a positive int, got 0"),
        (lambda: as_objective(pe.CV(), {"k": 3}), ValueError, "carries its options; pass objective_options= only with"),
        (lambda: as_objective("evidence"), ValueError, r"unknown objective 'evidence'; available: \['cv', 'elbo'"),
        (lambda: as_objective(pe.laplace_evidence), TypeError, "objective= takes a name .* got function"),
    ],
)
def test_a_bad_objective_is_refused_where_it_is_made(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_deprecated_flat_option_joins_the_value_or_is_refused():
    X, y = data()
    with pytest.warns(FutureWarning, match="jitter="):
        sel = select_hyperparameters(linear_regression, X, y, objective=pe.Laplace(hessian="ggn"), jitter=0.0,
                                     max_steps=2, progress=False)
    assert sel.objective_name == "laplace"
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="jitter= is an option of objective='laplace'"):
        select_hyperparameters(linear_regression, X, y, objective=pe.Elbo(), jitter=1e-6)


def test_a_checkpoint_written_by_name_resumes_by_value(tmp_path):
    X, y = data()
    path = str(tmp_path / "run.pt")
    options = dict(optimizer="adam", lr=0.1, tol=1e-12, progress=False)
    first = select_hyperparameters(linear_regression, X, y, objective="cv", objective_options={"k": 3}, max_steps=3,
                                   checkpoint=Checkpoint(path), **options)
    pyro.clear_param_store()
    resumed = select_hyperparameters(linear_regression, X, y, objective=pe.CV(k=3), max_steps=5,
                                     checkpoint=Checkpoint(path, resume=True), **options)
    assert [s.objective for s in resumed.history[:3]] == [s.objective for s in first.history]
    assert len(resumed.history) == 5
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="objective_options"):
        select_hyperparameters(linear_regression, X, y, objective=pe.CV(k=4), max_steps=5,
                               checkpoint=Checkpoint(path, resume=True), **options)
