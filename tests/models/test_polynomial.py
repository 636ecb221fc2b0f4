import numpy as np
import pytest
import torch

from pyro_evidence.models import polynomial_features

from ..common import assert_close


def test_legendre_features_match_numpy():
    x = torch.linspace(-1, 1, 17, dtype=torch.float64)
    expected = np.polynomial.legendre.legvander(x.numpy(), 9)
    assert_close(polynomial_features(x, 9), torch.as_tensor(expected), rtol=1e-12, atol=1e-14)


def test_monomial_features_and_bad_input():
    x = torch.tensor([2.0, 3.0], dtype=torch.float64)
    assert_close(polynomial_features(x, 2, basis="monomial"), [[1.0, 2.0, 4.0], [1.0, 3.0, 9.0]])
    assert polynomial_features(x, 0).shape == (2, 1)
    with pytest.raises(ValueError, match="degree must be a non-negative int"):
        polynomial_features(x, -1)
    with pytest.raises(ValueError, match="unknown basis 'chebyshev'"):
        polynomial_features(x, 2, basis="chebyshev")
