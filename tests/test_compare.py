import warnings

import numpy as np
import pyro
import pytest
import torch
from torch.distributions import constraints

from pyro_evidence import cv_log_predictive, elbo_evidence, laplace_evidence
from pyro_evidence.compare import _arviz, compare_models, to_inference_data
from pyro_evidence.datasets import sin_data
from pyro_evidence.models import linear_regression, polynomial_features, polynomial_regression

pytest.importorskip("arviz")
pytest.importorskip("pandas")


@pytest.fixture
def data():
    x, y = sin_data(n=30)
    return 2 * x - 1, y


def test_rows_agree_with_the_single_objective_functions(data):
    t, y = data
    models = {f"degree {d}": (polynomial_regression, (t, y), {"degree": d}) for d in (1, 3)}
    table = compare_models(models, select=True)
    assert list(table.index) == ["degree 1", "degree 3"]
    assert table["posterior_probability"].sum() == pytest.approx(1.0, abs=1e-12)
    assert table.loc["degree 3", "posterior_probability"] > 0.99
    for d in (1, 3):
        row = table.loc[f"degree {d}"]
        pyro.clear_param_store()
        for name, value in row["hyperparameters"].items():
            pyro.param(name, value.clone(), constraint=constraints.positive)
        kw = {"degree": d}
        assert row["log_evidence"] == pytest.approx(float(laplace_evidence(polynomial_regression, t, y, model_kwargs=kw).log_evidence), rel=1e-10)
        assert row["cv"] == pytest.approx(float(cv_log_predictive(polynomial_regression, t, y, model_kwargs=kw).value), rel=1e-10)
        assert row["elbo"] == pytest.approx(float(elbo_evidence(polynomial_regression, t, y, model_kwargs=kw).elbo), rel=1e-10)
        assert row["pareto_k_max"] < 0.7
    # the shared param names did not leak between models or into the caller's store
    h1 = table.loc["degree 1", "hyperparameters"]["prior_precision"]
    h3 = table.loc["degree 3", "hyperparameters"]["prior_precision"]
    assert float(h1) != float(h3)


def test_models_sharing_data_positionally(data):
    t, y = data
    X = polynomial_features(t, 2)
    table = compare_models({"shared": linear_regression, "ard": (linear_regression, (X, y), {"ard": True})}, X, y, elbo=False)
    assert set(table.columns) >= {"log_evidence", "cv", "elpd_loo", "p_loo", "posterior_probability"}
    assert "elbo" not in table.columns


def test_psis_loo_matches_exact_loo_by_refitting():
    """Small linear-Gaussian case: az.loo on the exported draws against exact LOO (refit N times)."""
    x, y = sin_data(n=40, seed=3)
    X = polynomial_features(2 * x - 1, 3)
    alpha, beta = 1.0, 8.0
    pyro.param("prior_precision", torch.tensor(alpha, dtype=torch.float64), constraint=constraints.positive)
    pyro.param("noise_precision", torch.tensor(beta, dtype=torch.float64), constraint=constraints.positive)
    idata = to_inference_data(linear_regression, X, y, num_samples=4000, seed=0)
    az = _arviz()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(idata, pointwise=True)
    exact = 0.0
    for i in range(40):
        keep = torch.arange(40) != i
        precision = alpha * torch.eye(4, dtype=torch.float64) + beta * X[keep].T @ X[keep]
        cov = torch.linalg.inv(precision)
        mean = beta * cov @ X[keep].T @ y[keep]
        var = 1 / beta + X[i] @ cov @ X[i]
        exact += float(torch.distributions.Normal(X[i] @ mean, var.sqrt()).log_prob(y[i]))
    assert abs(float(loo.elpd_loo) - exact) < 0.5
    assert float(np.max(loo.pareto_k.values)) < 0.7
    assert set(idata.groups()) >= {"posterior", "log_likelihood", "observed_data"}
    assert idata.posterior["w"].shape == (1, 4000, 4)


def test_models_whose_data_differ_are_refused(data):
    t, y = data
    with pytest.raises(ValueError, match="do not explain the same observed data"):
        compare_models({"a": (polynomial_regression, (t, y)), "b": (polynomial_regression, (t, y + 1))}, elbo=False)
    with pytest.raises(TypeError, match="non-empty dict"):
        compare_models({}, t, y)
    with pytest.raises(TypeError, match="model 'a'"):
        compare_models({"a": 3}, t, y)


def initialised_at(value):
    def model(t, y=None):
        alpha = pyro.param("prior_precision", torch.tensor(value), constraint=constraints.positive)
        X = polynomial_features(t, 2)
        w = pyro.sample("w", pyro.distributions.Normal(0.0, alpha.rsqrt()).expand([3]).to_event(1))
        with pyro.plate("data", t.shape[0]):
            pyro.sample("y", pyro.distributions.Normal(X @ w, 0.3), obs=y)

    return model


def test_the_order_of_the_models_does_not_change_their_rows(data):
    t, y = data
    pyro.param("unrelated", torch.tensor(3.0))  # the caller's store, to be left as it is
    a, b = initialised_at(0.5), initialised_at(20.0)  # one param name, different starting values
    forward = compare_models({"a": a, "b": b}, t, y, elbo=False)
    backward = compare_models({"b": b, "a": a}, t, y, elbo=False)
    for name in ("a", "b"):
        assert forward.loc[name, "log_evidence"] == backward.loc[name, "log_evidence"]
        assert forward.loc[name, "cv"] == backward.loc[name, "cv"]
    assert float(forward.loc["a", "hyperparameters"]["prior_precision"]) == pytest.approx(0.5)
    assert float(forward.loc["b", "hyperparameters"]["prior_precision"]) == pytest.approx(20.0)
    assert set(pyro.get_param_store().keys()) == {"unrelated"}


def masked_regression(t, y=None, keep=None):
    alpha = pyro.param("prior_precision", torch.tensor(1.0), constraint=constraints.positive)
    beta = pyro.param("noise_precision", torch.tensor(4.0), constraint=constraints.positive)
    X = polynomial_features(t, 3)
    w = pyro.sample("w", pyro.distributions.Normal(0.0, alpha.rsqrt()).expand([4]).to_event(1))
    with pyro.plate("data", t.shape[0]), pyro.poutine.mask(mask=True if keep is None else keep):
        pyro.sample("y", pyro.distributions.Normal(X @ w, beta.rsqrt()), obs=y)


def test_masked_rows_are_left_out_of_the_log_likelihood(data):
    t, y = data
    keep = torch.arange(30) % 3 != 0
    masked = to_inference_data(masked_regression, t, y, model_kwargs={"keep": keep}, num_samples=200)
    pyro.clear_param_store()
    subset = to_inference_data(masked_regression, t[keep], y[keep], num_samples=200)
    ll = masked.log_likelihood["y"].values
    assert ll.shape == (1, 200, 20)
    np.testing.assert_allclose(ll, subset.log_likelihood["y"].values, rtol=1e-12)  # the same posterior, the kept rows
    np.testing.assert_array_equal(masked.observed_data["y"].values, y[keep].numpy())
    pyro.clear_param_store()
    table = compare_models({"masked": (masked_regression, (t, y), {"keep": keep})}, elbo=False, num_samples=200)
    assert np.isfinite(table.loc["masked", "pareto_k_max"]) and table.loc["masked", "pareto_k_max"] < 0.7
