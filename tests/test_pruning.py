import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoMultivariateNormal

from pyro_evidence import elbo_evidence, select_hyperparameters
from pyro_evidence.datasets import ard_data, diabetes
from pyro_evidence.models import linear_regression
from pyro_evidence.objectives.elbo import guide_loc_scale
from pyro_evidence.pruning import graves_ratio, magnitude, prune

from .common import assert_close


@pytest.fixture
def fitted():
    X, y = diabetes()
    return X, y, elbo_evidence(linear_regression, X, y).guide


def test_graves_ratio_is_the_density_ratio(fitted):
    _, _, guide = fitted
    loc, scale = guide_loc_scale(guide)["w"]
    q = torch.distributions.Normal(loc, scale)
    expected = (q.log_prob(torch.zeros_like(loc)) - q.log_prob(loc)).exp()
    assert_close(graves_ratio(guide)["w"], expected, rtol=1e-12)
    assert_close(magnitude(guide)["w"], loc.abs())


def test_fraction_prunes_the_most_prunable_first(fitted):
    X, y, guide = fitted
    p = prune(linear_regression, guide, fraction=0.3)
    assert p.pruned == {"w": 3} and p.fraction == pytest.approx(0.3)
    lam = graves_ratio(guide)["w"]
    assert lam[~p.keep["w"]].min() >= lam[p.keep["w"]].max()
    m = prune(linear_regression, guide, fraction=0.3, by="magnitude")
    mu = magnitude(guide)["w"]
    assert mu[~m.keep["w"]].max() <= mu[m.keep["w"]].min()
    assert prune(linear_regression, guide, fraction=0.0).pruned == {"w": 0}


def test_pruned_weights_are_zero_inside_the_model(fitted):
    X, y, guide = fitted
    p = prune(linear_regression, guide, fraction=0.5)
    means = guide.median()
    pred = poutine.trace(poutine.condition(p.model, data=means)).get_trace(X)
    used = pred.nodes["y"]["fn"].loc  # X @ w with the masked w
    expected = X @ (means["w"] * p.keep["w"].double())
    assert_close(used, expected, rtol=1e-12)


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_threshold_outside_unit_interval(fitted, threshold):
    _, _, guide = fitted
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        prune(linear_regression, guide, threshold=threshold)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 2.0])
def test_fraction_outside_range(fitted, fraction):
    _, _, guide = fitted
    with pytest.raises(ValueError, match=r"fraction must lie in \[0, 1\)"):
        prune(linear_regression, guide, fraction=fraction)


def test_other_bad_input(fitted):
    X, y, guide = fitted
    with pytest.raises(ValueError, match="exactly one of"):
        prune(linear_regression, guide)
    with pytest.raises(ValueError, match="unknown pruning criterion"):
        prune(linear_regression, guide, fraction=0.5, by="random")
    with pytest.raises(ValueError, match="unknown site 'v'"):
        prune(linear_regression, guide, fraction=0.5, sites=["v"])
    mvn = AutoMultivariateNormal(linear_regression)
    with pytest.raises(TypeError, match="diagonal Gaussian guide"):
        graves_ratio(mvn)


def test_ard_pruning_removes_irrelevant_features():
    """20 features, the first 5 relevant, n = 100: ELBO-selected ARD precisions (Graves' update),
    then pruning at Graves ratio λ ≥ 1e-3 (|μ|/σ ≤ 3.72)."""
    successes = 0
    for seed in range(5):
        pyro.clear_param_store()
        X, y, _ = ard_data(n=100, features=20, relevant=5, seed=seed)
        select_hyperparameters(
            linear_regression, X, y, model_kwargs={"ard": True}, objective="elbo", method="graves", max_steps=30, progress=False
        )
        guide = elbo_evidence(linear_regression, X, y, model_kwargs={"ard": True}).guide
        keep = prune(linear_regression, guide, threshold=1e-3).keep["w"]
        relevant_kept = bool(keep[:5].all())
        irrelevant_pruned = int((~keep[5:]).sum())
        successes += relevant_kept and irrelevant_pruned >= 0.9 * 15
    assert successes >= 4
