"""Small built-in data sets; nothing is downloaded."""

from __future__ import annotations

import math

import torch

__all__ = ["sin_data", "diabetes", "standardize"]


def sin_data(n: int = 30, noise: float = 0.3, seed: int = 0, dtype=torch.float64, device=None):
    """
    ``x ~ U[0, 1]``, ``y = sin(2πx) + ε``, ``ε ~ N(0, noise²)`` (Bishop 2006, §1.1).

    :returns: ``(x, y)``, both of shape ``(n,)``, sorted by ``x``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g, dtype=torch.float64).sort().values
    y = torch.sin(2 * math.pi * x) + noise * torch.randn(n, generator=g, dtype=torch.float64)
    return x.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device)


def standardize(t: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit (population) standard deviation along dim 0."""
    return (t - t.mean(0)) / t.std(0, unbiased=False)


def diabetes(dtype=torch.float64, device=None):
    """scikit-learn's diabetes data (442 × 10), features and target standardised.

    :returns: ``(X, y)``.
    """
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    return standardize(X).to(dtype=dtype, device=device), standardize(y).to(dtype=dtype, device=device)
