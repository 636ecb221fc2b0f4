"""Polynomial regression: Bayesian linear regression on Legendre or monomial features of x."""

import torch

from .linear import linear_regression


def polynomial_features(x, degree: int, basis: str = "legendre"):
    """
    Features ``[φ_0(x), …, φ_degree(x)]`` of a 1-D input, shape ``(N, degree + 1)``.

    ``basis="legendre"``: Legendre polynomials ``P_k(x)`` by Bonnet's recursion
    ``(k+1) P_{k+1} = (2k+1) x P_k − k P_{k−1}``; they are orthogonal on ``[−1, 1]``, so map the
    inputs there first (the demo uses ``2x − 1`` for ``x ∈ [0, 1]``). ``basis="monomial"``:
    ``x^k``, numerically ill-conditioned beyond a few degrees.
    """
    if not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree must be a non-negative int, got {degree!r}")
    x = x.reshape(-1)
    if basis == "monomial":
        return torch.stack([x**k for k in range(degree + 1)], dim=-1)
    if basis != "legendre":
        raise ValueError(f"unknown basis {basis!r}; use 'legendre' or 'monomial'")
    features = [torch.ones_like(x)]
    if degree >= 1:
        features.append(x)
    for k in range(1, degree):
        features.append(((2 * k + 1) * x * features[k] - k * features[k - 1]) / (k + 1))
    return torch.stack(features, dim=-1)


def polynomial_regression(
    x, y=None, degree: int = 3, basis: str = "legendre", ard: bool = False, precision_rate: float = 0.0
):
    """
    :func:`~pyro_evidence.models.linear_regression` on :func:`polynomial_features` of ``x``,
    with a shared prior precision over the ``degree + 1`` weights (one per weight if ``ard``).
    Pass ``degree`` and ``basis`` in ``model_kwargs=``; ``precision_rate`` as in
    :func:`~pyro_evidence.models.linear_regression`.
    """
    features = polynomial_features(x, degree, basis)
    return linear_regression(features, y, ard=ard, precision_rate=precision_rate)
