import numpy as np
import pyro
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from torch.distributions import constraints

from pyro_evidence import cv_log_predictive, select_hyperparameters
from pyro_evidence.datasets import diabetes, standardize
from pyro_evidence.models import linear_regression, logistic_regression
from pyro_evidence.objectives.cv import HoldoutObjective, kfold
from pyro_evidence.problem import Problem

from ..common import assert_close

ALPHA, BETA = 3.0, 2.0


def set_params(**values):
    for name, value in values.items():
        pyro.param(name, torch.as_tensor(value, dtype=torch.float64), constraint=constraints.positive)


def by_hand(X, y, folds, k, alpha=ALPHA, beta=BETA):
    """Closed-form MAP of each fold with the k/(k−1) weighting, Gaussian held-out density."""
    per_fold = []
    s = k / (k - 1)
    for q in range(k):
        test = torch.as_tensor(folds == q)
        Xt, yt = X[~test], y[~test]
        precision = alpha * torch.eye(X.shape[1], dtype=torch.float64) + s * beta * Xt.T @ Xt
        w = torch.linalg.solve(precision, s * beta * Xt.T @ yt)
        per_fold.append(torch.distributions.Normal(X[test] @ w, beta**-0.5).log_prob(y[test]).sum())
    per_fold = torch.stack(per_fold)
    return per_fold.sum(), per_fold


@pytest.mark.parametrize("k", [2, 4, 10])
def test_shuffled_folds_match_the_closed_form(k):
    X, y = diabetes()
    set_params(prior_precision=ALPHA, noise_precision=BETA)
    r = cv_log_predictive(linear_regression, X, y, k=k, seed=1)
    assert sorted(np.bincount(r.folds).tolist()) == sorted(np.bincount(kfold(442, k, seed=1)).tolist())
    value, per_fold = by_hand(X, y, r.folds, k)
    assert_close(r.value, value, rtol=1e-8)
    assert_close(r.per_fold, per_fold, rtol=1e-8)
    assert r.params["w"].shape == (k, 10)
    assert_close(r.pointwise.sum(), r.value, rtol=1e-12)


def test_stratified_folds_match_the_closed_form():
    X, y = diabetes()
    labels = (X[:, 1] > 0).long()  # the sex column: two classes
    set_params(prior_precision=ALPHA, noise_precision=BETA)
    r = cv_log_predictive(linear_regression, X, y, k=4, stratify=labels)
    for q in range(4):  # each fold keeps the class balance
        share = labels[torch.as_tensor(r.folds == q)].double().mean()
        assert abs(float(share) - float(labels.double().mean())) < 0.02
    value, _ = by_hand(X, y, r.folds, 4)
    assert_close(r.value, value, rtol=1e-8)


def test_stratified_folds_of_a_classification_model_match_scikit_learn():
    X, y = load_breast_cancer(return_X_y=True)
    X, y = standardize(torch.as_tensor(X[:, :6])), torch.as_tensor(y, dtype=torch.float64)
    alpha, k = 2.0, 4
    set_params(prior_precision=alpha)
    r = cv_log_predictive(logistic_regression, X, y, k=k, stratify=y.long())
    expected = 0.0
    for q in range(k):
        test = r.folds == q
        # sklearn minimises ½‖w‖² + C Σ log-loss; eq. (1) weights the log-likelihood by k/(k−1)
        clf = LogisticRegression(C=k / (k - 1) / alpha, fit_intercept=False, tol=1e-12, max_iter=10_000)
        clf.fit(X[~test].numpy(), y[~test].numpy())
        logp = clf.predict_log_proba(X[test].numpy())
        expected += logp[np.arange(test.sum()), y[test].long().numpy()].sum()
    assert_close(r.value, expected, rtol=1e-8)


def test_vectorized_folds_equal_a_per_fold_loop():
    X, y = diabetes()
    set_params(prior_precision=ALPHA, noise_precision=BETA)
    batched = cv_log_predictive(linear_regression, X, y, k=4)
    loop = cv_log_predictive(linear_regression, X, y, k=4, vectorize_folds=False)
    assert_close(batched.value, loop.value, rtol=1e-10)
    assert_close(batched.theta, loop.theta, rtol=1e-10, atol=1e-13)


def test_laplace_predictive_is_the_gaussian_predictive():
    X, y = diabetes()
    set_params(prior_precision=ALPHA, noise_precision=BETA)
    r = cv_log_predictive(linear_regression, X, y, k=4, predictive="laplace", num_samples=4000)
    k, s = 4, 4 / 3
    exact = 0.0
    for q in range(k):
        test = torch.as_tensor(r.folds == q)
        Xt, yt = X[~test], y[~test]
        precision = ALPHA * torch.eye(10, dtype=torch.float64) + s * BETA * Xt.T @ Xt
        w = torch.linalg.solve(precision, s * BETA * Xt.T @ yt)
        var = 1 / BETA + (X[test] @ torch.linalg.inv(precision) * X[test]).sum(-1)
        exact += torch.distributions.Normal(X[test] @ w, var.sqrt()).log_prob(y[test]).sum()
    assert abs(float(r.value - exact)) < 0.05
    assert float(r.value) < float(cv_log_predictive(linear_regression, X, y, k=4).value) + 1.0


def test_cv_and_holdout_selection():
    X, y = diabetes()
    sel = select_hyperparameters(linear_regression, X, y, objective="cv", progress=False)
    assert sel.converged and sel.history[-1].objective > sel.history[0].objective
    # the selection is a stationary point of the closed-form CV value
    folds = kfold(442, 4)
    log_h = torch.stack([v.log() for v in sel.hyperparameters.values()])

    def cv_at(lh):
        a, b = lh.exp()
        total = 0.0
        for q in range(4):
            test = torch.as_tensor(folds == q)
            Xt, yt = X[~test], y[~test]
            precision = a * torch.eye(10, dtype=torch.float64) + 4 / 3 * b * Xt.T @ Xt
            w = torch.linalg.solve(precision, 4 / 3 * b * Xt.T @ yt)
            total = total + torch.distributions.Normal(X[test] @ w, b.rsqrt()).log_prob(y[test]).sum()
        return total

    assert torch.func.grad(cv_at)(log_h).abs().max() < 1e-5
    assert_close(sel.objective, cv_at(log_h), rtol=1e-10)

    pyro.clear_param_store()
    held = select_hyperparameters(
        linear_regression, X[:300], y[:300], objective="holdout", objective_options={"validation": (X[300:], y[300:])}, progress=False
    )
    assert held.history[-1].objective >= held.history[0].objective


def test_holdout_split_by_fraction_or_data():
    X, y = diabetes()
    p = Problem(linear_regression, X, y)
    frac = HoldoutObjective(p, validation=0.25, seed=0)
    assert int(frac.test.sum()) == 110 and int(frac.train.sum()) == 332
    data = HoldoutObjective(Problem(linear_regression, X[:400], y[:400]), validation=(X[400:], y[400:]))
    assert data.problem.num_data == 442 and int(data.test.sum()) == 42


@pytest.mark.parametrize("k", [1, 443, 2.5])
def test_bad_k(k):
    X, y = diabetes()
    with pytest.raises(ValueError, match="k must be an int with 2 <= k <= N = 442"):
        cv_log_predictive(linear_regression, X, y, k=k)


def test_bad_stratify_and_fraction_and_predictive():
    X, y = diabetes()
    with pytest.raises(ValueError, match="stratify has 10 labels, the data have N = 442 rows"):
        cv_log_predictive(linear_regression, X, y, stratify=torch.zeros(10))
    for fraction in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"hold-out fraction must lie in \(0, 1\)"):
            HoldoutObjective(Problem(linear_regression, X, y), validation=fraction)
    with pytest.raises(ValueError, match="validation= has 1 data arguments"):
        HoldoutObjective(Problem(linear_regression, X, y), validation=(X,))
    with pytest.raises(ValueError, match="unknown predictive"):
        cv_log_predictive(linear_regression, X, y, predictive="exact")
