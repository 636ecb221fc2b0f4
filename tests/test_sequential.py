import math

import pyro
import pytest
import torch
from torch.distributions import constraints

from pyro_evidence import laplace_evidence
from pyro_evidence.datasets import diabetes
from pyro_evidence.models import polynomial_features, polynomial_regression
from pyro_evidence.sequential import sequential_log_predictive

from .common import assert_close, linear_gaussian_log_evidence


@pytest.mark.parametrize("alpha", [2.0, torch.linspace(0.5, 5.0, 10)])
def test_chain_rule_equals_the_evidence_in_any_order(alpha):
    X, y = diabetes()
    exact = linear_gaussian_log_evidence(X, y, alpha, 1.7)
    forward = sequential_log_predictive(X, y, alpha, 1.7)
    assert_close(forward.total, exact, rtol=1e-8)
    for seed in range(3):
        order = torch.randperm(442, generator=torch.Generator().manual_seed(seed))
        shuffled = sequential_log_predictive(X, y, alpha, 1.7, order=order)
        assert_close(shuffled.total, exact, rtol=1e-8)
        assert not torch.allclose(shuffled.terms, forward.terms)
    # the first term is the prior predictive of one observation
    x0 = X[0]
    var = 1 / 1.7 + (x0**2 / torch.as_tensor(alpha, dtype=torch.float64).expand(10)).sum()
    assert_close(forward.terms[0], torch.distributions.Normal(0.0, var.sqrt()).log_prob(y[0]), rtol=1e-12)


def test_bad_order():
    X, y = diabetes()
    with pytest.raises(ValueError, match="permutation"):
        sequential_log_predictive(X[:3], y[:3], 1.0, 1.0, order=[0, 0, 1])


def test_bishop_prml_3_4_evidence_against_degree():
    """Bishop (2006) §3.4, Fig. 3.14: x = linspace(0, 1, 10), y = sin 2πx + N(0, 0.3²),
    α = 5e-3, β = 11.1, monomial features; mean log evidence over 50 noise seeds."""
    x = torch.linspace(0, 1, 10, dtype=torch.float64)
    means = []
    for degree in range(10):
        values = []
        for seed in range(50):
            noise = torch.randn(10, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            y = torch.sin(2 * math.pi * x) + 0.3 * noise
            values.append(float(linear_gaussian_log_evidence(polynomial_features(x, degree, "monomial"), y, 5e-3, 11.1)))
        means.append(sum(values) / len(values))
    assert means[2] < means[1]
    assert means[3] > means[2] + 5
    assert max(means[4:]) < means[3] + 1.5

    # and the library's Laplace evidence is that closed form on these ill-conditioned features
    pyro.param("prior_precision", torch.tensor(5e-3, dtype=torch.float64), constraint=constraints.positive)
    pyro.param("noise_precision", torch.tensor(11.1, dtype=torch.float64), constraint=constraints.positive)
    y = torch.sin(2 * math.pi * x) + 0.3 * torch.randn(10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for degree in (1, 3, 9):
        r = laplace_evidence(polynomial_regression, x, y, model_kwargs={"degree": degree, "basis": "monomial"})
        expected = linear_gaussian_log_evidence(polynomial_features(x, degree, "monomial"), y, 5e-3, 11.1)
        assert_close(r.log_evidence, expected, rtol=1e-8)
