import pytest
import torch

from pyro_evidence.hypergrad.linalg import (
    NotPositiveDefiniteError,
    cholesky,
    dense_solve,
    hessian,
    hessian_and_value,
    mixed_vjp,
    value_grad_hessian,
)

from ..common import assert_close


def quartic(theta, h):
    return (h[0] * theta**4).sum() + theta[0] * theta[1] * h[1] + (theta**2).sum()


def test_hessian_modes_agree_with_closed_form():
    theta = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    h = torch.tensor([0.3, 2.0], dtype=torch.float64)
    expected = torch.diag(12 * h[0] * theta**2 + 2)
    expected[0, 1] = expected[1, 0] = h[1]
    for mode in ("reverse-over-reverse", "forward-over-reverse"):
        assert_close(hessian(quartic, theta, h, mode=mode), expected, rtol=1e-14)
    with pytest.raises(ValueError, match="unknown Hessian mode"):
        hessian(quartic, theta, h, mode="finite")


def test_dense_solve_and_mixed_vjp_against_dense_algebra():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, dtype=torch.float64, generator=g)
    H = A @ A.T + torch.eye(6, dtype=torch.float64)
    v = torch.randn(6, dtype=torch.float64, generator=g)
    assert_close(dense_solve(H, v), torch.linalg.solve(H, v), rtol=1e-12)
    assert_close(dense_solve(H, v, jitter=0.5), torch.linalg.solve(H + 0.5 * torch.eye(6, dtype=torch.float64), v), rtol=1e-12)

    theta = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    h = torch.tensor([0.3, 2.0], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    # ∂²L/∂h∂θ written out: row k = ∂(∇_θ L)/∂h_k
    mixed = torch.stack([4 * theta**3, torch.tensor([theta[1], theta[0], 0.0], dtype=torch.float64)])
    assert_close(mixed_vjp(quartic, theta, h, w), mixed @ w, rtol=1e-14)


def test_cholesky_refuses_indefinite_matrices():
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)
    with pytest.raises(NotPositiveDefiniteError, match="pivot 2 of 2"):
        cholesky(H)
    assert_close(cholesky(H, jitter=2.0) @ cholesky(H, jitter=2.0).T, H + 2 * torch.eye(2, dtype=torch.float64))


def test_hessian_and_value_in_one_pass():
    theta = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    h = torch.tensor([0.3, 2.0], dtype=torch.float64)
    H, value = hessian_and_value(quartic, theta, h)
    assert_close(value, quartic(theta, h), rtol=1e-15)
    assert_close(H, hessian(quartic, theta, h), rtol=1e-14)
    f, g, H2 = value_grad_hessian(lambda t: quartic(t, h), theta)
    assert_close(H2, H, rtol=1e-14)
    assert_close(g, torch.func.grad(quartic)(theta, h), rtol=1e-14)
