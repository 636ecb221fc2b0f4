import warnings

import pyro
import pytest
import torch
from sklearn.linear_model import BayesianRidge

from pyro_evidence import Selection, laplace_evidence, select_hyperparameters
from pyro_evidence.datasets import diabetes
from pyro_evidence.models import linear_regression, polynomial_regression

from .common import assert_close, linear_gaussian_log_evidence


@pytest.fixture(scope="module")
def bayesian_ridge():
    X, y = diabetes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        br = BayesianRidge(
            fit_intercept=False,
            alpha_1=0.0,
            alpha_2=0.0,
            lambda_1=0.0,
            lambda_2=0.0,
            tol=1e-12,
            max_iter=100_000,
            compute_score=True,
        ).fit(X.numpy(), y.numpy())
    return br


def test_reaches_bayesian_ridge_optimum(bayesian_ridge):
    X, y = diabetes()
    sel = select_hyperparameters(linear_regression, X, y, progress=False)
    assert isinstance(sel, Selection) and sel.converged
    # scikit-learn calls the noise precision alpha_ and the weight precision lambda_
    assert_close(sel.hyperparameters["prior_precision"], bayesian_ridge.lambda_, rtol=1e-4)
    assert_close(sel.hyperparameters["noise_precision"], bayesian_ridge.alpha_, rtol=1e-4)
    assert_close(sel.objective, bayesian_ridge.scores_[-1], rtol=1e-8)
    # the objective is the exact evidence at the selected values
    hp = sel.hyperparameters
    assert_close(sel.objective, linear_gaussian_log_evidence(X, y, hp["prior_precision"], hp["noise_precision"]), rtol=1e-10)
    # written back to the param store, in the dtype the store had
    assert pyro.param("prior_precision").dtype == torch.float32
    assert_close(pyro.param("prior_precision").detach(), hp["prior_precision"], rtol=1e-6)
    # history: one step per outer evaluation, the best of which is the selection
    assert len(sel.history) >= 2
    assert max(s.objective for s in sel.history) == pytest.approx(float(sel.objective), rel=1e-14)
    assert sel.history[0].seconds <= sel.history[-1].seconds
    assert set(sel.history[0].hyperparameters) == {"prior_precision", "noise_precision"}


def test_adam_ascent_reaches_the_same_optimum(bayesian_ridge):
    X, y = diabetes()
    sel = select_hyperparameters(linear_regression, X, y, optimizer="adam", lr=0.1, max_steps=400, tol=1e-5, progress=False)
    assert sel.converged
    assert_close(sel.hyperparameters["prior_precision"], bayesian_ridge.lambda_, rtol=1e-3)
    assert_close(sel.objective, bayesian_ridge.scores_[-1], rtol=1e-9)


def test_named_subset_keeps_the_rest_fixed():
    X, y = diabetes()
    pyro.param("prior_precision", torch.tensor(5.0), constraint=torch.distributions.constraints.positive)
    sel = select_hyperparameters(linear_regression, X, y, hyperparameters=["noise_precision"], progress=False)
    assert list(sel.hyperparameters) == ["noise_precision"]
    beta = sel.hyperparameters["noise_precision"]
    # the 1-D optimum: the closed-form evidence is flat there
    f = lambda b: float(linear_gaussian_log_evidence(X, y, 5.0, b))  # noqa: E731
    d = 1e-4 * float(beta)
    assert abs(f(beta + d) - f(beta - d)) / (2 * d) < 1e-5
    assert_close(pyro.param("prior_precision").detach(), 5.0)


def test_selection_follows_the_evidence_per_degree():
    x = torch.linspace(-1, 1, 30, dtype=torch.float64)
    y = x**3 - 0.5 * x + 0.1 * torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    values = {}
    for degree in (1, 3, 6):
        pyro.clear_param_store()
        sel = select_hyperparameters(polynomial_regression, x, y, model_kwargs={"degree": degree}, progress=False)
        check = laplace_evidence(polynomial_regression, x, y, model_kwargs={"degree": degree})
        assert_close(sel.objective, check.log_evidence, rtol=1e-10)
        values[degree] = float(sel.objective)
    assert values[3] > values[1] and values[3] > values[6]


def test_progress_bar_is_shown_when_asked(capsys):
    X, y = diabetes()
    select_hyperparameters(linear_regression, X[:50], y[:50], progress=True, max_steps=3)
    assert "select (laplace, ift-exact)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"objective": "evidence"}, "unknown objective 'evidence'"),
        ({"method": "magic"}, "unknown method 'magic'"),
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
        ({"max_steps": 0}, "max_steps must be >= 1"),
        ({"hyperparameters": ["noise"]}, "unknown hyperparameter 'noise'"),
    ],
)
def test_bad_options(kwargs, message):
    X, y = diabetes()
    with pytest.raises(ValueError, match=message):
        select_hyperparameters(linear_regression, X, y, progress=False, **kwargs)


def test_interrupt_returns_the_best_so_far():
    X, y = diabetes()
    calls = {"n": 0}

    def impatient(X, y=None):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return linear_regression(X, y)

    with pytest.warns(RuntimeWarning, match="interrupted"):
        sel = select_hyperparameters(impatient, X, y, progress=False)
    assert not sel.converged and 1 <= len(sel.history)
    best = max(sel.history, key=lambda s: s.objective)
    assert float(sel.objective) == pytest.approx(best.objective, rel=1e-14)
    assert_close(pyro.param("noise_precision").detach(), best.hyperparameters["noise_precision"], rtol=1e-6)
