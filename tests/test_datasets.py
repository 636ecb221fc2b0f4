import math

import torch

from pyro_evidence.datasets import diabetes, sin_data

from .common import assert_close


def test_sin_data_is_reproducible_and_as_specified():
    x, y = sin_data(n=30, noise=0.3, seed=0)
    x2, y2 = sin_data(n=30, noise=0.3, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == y.shape == (30,) and x.dtype == torch.float64
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and bool((x[1:] >= x[:-1]).all())
    residual = y - torch.sin(2 * math.pi * x)
    assert 0.15 < float(residual.std()) < 0.45
    assert not torch.equal(sin_data(seed=1)[1], y)


def test_diabetes_is_standardised():
    X, y = diabetes()
    assert X.shape == (442, 10) and y.shape == (442,)
    assert_close(X.mean(0), torch.zeros(10, dtype=torch.float64), atol=1e-12)
    assert_close(X.std(0, unbiased=False), torch.ones(10, dtype=torch.float64), rtol=1e-12)
    assert_close(y.std(unbiased=False), 1.0, rtol=1e-12)
