"""
The evidence as a chain of predictions (seed, "Evidence vs CV").

.. math::

    \\log p(D \\mid f) = \\log p(D_1 \\mid f) + \\log p(D_2 \\mid D_1, f) + \\cdots
        + \\log p(D_n \\mid D_1, \\ldots, D_{n-1}, f).

Leave-one-out keeps only (the average of) the last kind of term, ``log p(D_n | D_{−n})``;
k-fold CV keeps terms conditioned on ``(k−1)/k`` of the data. The evidence sums all of them,
including the early predictions made from little data, which is how it charges a model for its
full complexity.

For Bayesian linear regression every term is Gaussian and the posterior is updated one
observation at a time (rank-one updates, Bishop 2006, §3.3):
``p(y_i | D_<i) = N(y_i | x_iᵀ m, β⁻¹ + x_iᵀ S x_i)``, ``m, S`` the posterior after ``D_<i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SequentialPredictive", "sequential_log_predictive"]


@dataclass
class SequentialPredictive:
    """``terms[j] = log p(y_{order[j]} | earlier rows)``; ``total`` = their sum = the log evidence."""

    terms: torch.Tensor
    total: torch.Tensor
    order: torch.Tensor


def sequential_log_predictive(X, y, prior_precision, noise_precision, order=None) -> SequentialPredictive:
    """
    ``Σᵢ log p(yᵢ | D_<ᵢ)`` for ``w ~ N(0, A⁻¹)``, ``y ~ N(X w, β⁻¹ I)``, the rows taken in
    ``order`` (default: as given). Equal to the log evidence in any order.

    :param prior_precision: ``α`` (scalar, shared) or a vector of per-feature precisions.
    :param noise_precision: ``β``.
    """
    X = torch.as_tensor(X)
    y = torch.as_tensor(y, dtype=X.dtype, device=X.device)
    n, d = X.shape
    if y.shape != (n,):
        raise ValueError(f"y must have shape ({n},), got {tuple(y.shape)}")
    alpha = torch.as_tensor(prior_precision, dtype=X.dtype, device=X.device).expand(d)
    beta = torch.as_tensor(noise_precision, dtype=X.dtype, device=X.device)
    order = torch.arange(n, device=X.device) if order is None else torch.as_tensor(order, device=X.device)
    if sorted(order.tolist()) != list(range(n)):
        raise ValueError("order must be a permutation of the rows")
    mean = torch.zeros(d, dtype=X.dtype, device=X.device)
    cov = torch.diag(1 / alpha)
    terms = []
    for i in order.tolist():
        x = X[i]
        Sx = cov @ x
        var = 1 / beta + x @ Sx
        resid = y[i] - x @ mean
        terms.append(torch.distributions.Normal(x @ mean, var.sqrt()).log_prob(y[i]))
        gain = Sx / var
        mean = mean + gain * resid
        cov = cov - torch.outer(gain, Sx)
    terms = torch.stack(terms)
    return SequentialPredictive(terms, terms.sum(), order)
