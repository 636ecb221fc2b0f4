import pytest
import torch

from pyro_evidence.hypergrad.greedy import greedy


def test_default_step_needs_positive_curvature():
    from pyro_evidence.linalg import NotPositiveDefiniteError

    theta, h = torch.ones(3, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)

    def concave(t, h):
        return -(t**2).sum() + h.sum() * t.sum()

    with pytest.raises(NotPositiveDefiniteError, match="no positive curvature"):
        greedy(concave, lambda t, h: (t**2).sum(), theta, h)
