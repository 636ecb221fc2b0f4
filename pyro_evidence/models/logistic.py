"""Bayesian logistic regression with a shared or per-feature (ARD) prior precision."""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints


def logistic_regression(X, y=None, ard: bool = False):
    """
    ``w ~ N(0, A⁻¹)``, ``y | X, w ~ Bernoulli(σ(X w))``; hyperparameter ``prior_precision``.

    Its evidence has no closed form, which makes it the test case for the log-det term of the
    Laplace hypergradient.
    """
    d = X.shape[-1]
    alpha = pyro.param(
        "prior_precision",
        lambda: torch.ones(d) if ard else torch.tensor(1.0),
        constraint=constraints.positive,
    )
    w = pyro.sample("w", dist.Normal(0.0, alpha.rsqrt()).expand([d]).to_event(1))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)
