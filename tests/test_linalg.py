import math
import warnings

import pytest
import torch

from pyro_evidence.linalg import (
    NotPositiveDefiniteError,
    cg,
    cholesky,
    dense_solve,
    hessian,
    hessian_and_value,
    hvp,
    mixed_vjp,
    neumann,
    value_grad_hessian,
)

from pyro_evidence import linalg

from .common import HostReads, assert_close


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


def spd(d, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    eig = torch.logspace(0, math.log10(cond), d, dtype=torch.float64)
    return (Q * eig) @ Q.T, torch.randn(d, dtype=torch.float64, generator=g)


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
def test_cg_matches_a_dense_solve_to_its_tolerance(cond):
    A, b = spd(40, cond)
    r = cg(lambda v: A @ v, b, tol=1e-10)
    assert r.converged and r.residual <= 1e-10 and r.iterations <= 10 * 40
    assert float((b - A @ r.x).norm() / b.norm()) <= 2e-10  # the true residual, not the recursive one
    exact = torch.linalg.solve(A, b)
    assert float((r.x - exact).norm() / exact.norm()) <= cond * 1e-10


def test_cg_at_condition_1e8_converges_or_warns():
    A, b = spd(40, 1e8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = cg(lambda v: A @ v, b, tol=1e-10)
    assert r.converged and r.iterations <= 400 or any("did not converge" in str(w.message) for w in caught)


def test_cg_warns_when_it_runs_out_of_iterations():
    A, b = spd(40, 1e6)
    with pytest.warns(RuntimeWarning, match=r"did not converge in 5 iterations: relative residual"):
        r = cg(lambda v: A @ v, b, tol=1e-12, max_iter=5)
    assert not r.converged and torch.isfinite(r.x).all()


def test_cg_on_an_indefinite_matrix_warns_and_stays_finite():
    A, b = spd(20, 1e2)
    A = A - 5 * torch.eye(20, dtype=torch.float64)  # some eigenvalues now negative
    with pytest.warns(RuntimeWarning, match="non-positive curvature"):
        r = cg(lambda v: A @ v, b, damping=1.0)
    assert torch.isfinite(r.x).all()
    with pytest.raises(ValueError, match="damping must be >= 0"):
        cg(lambda v: A @ v, b, damping=-1.0)


def test_cg_warm_start_and_zero_rhs():
    A, b = spd(30, 1e3)
    cold = cg(lambda v: A @ v, b, tol=1e-10)
    warm = cg(lambda v: A @ v, b, cold.x + 1e-6, tol=1e-10)
    assert warm.iterations < cold.iterations
    assert cg(lambda v: A @ v, torch.zeros(30, dtype=torch.float64)).x.abs().max() == 0


def never_stop(device):
    return lambda flag: False


@pytest.mark.parametrize("case", ["converges", "runs out", "indefinite"])
def test_cg_iterations_past_the_stop_change_nothing(case, monkeypatch):
    # on a GPU the loop learns that it may stop an iteration late; those iterations must be no-ops
    A, b = spd(30, 1e3)
    if case == "indefinite":
        A = A - 5 * torch.eye(30, dtype=torch.float64)
    max_iter = 8 if case == "runs out" else 200
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        prompt = cg(lambda v: A @ v, b, tol=1e-10, max_iter=max_iter)
        monkeypatch.setattr(linalg, "StopCheck", never_stop)
        late = cg(lambda v: A @ v, b, tol=1e-10, max_iter=max_iter)
    assert torch.equal(late.x, prompt.x)
    assert (late.iterations, late.residual, late.converged) == (prompt.iterations, prompt.residual, prompt.converged)
    assert prompt.converged == (case == "converges")


def test_cg_and_neumann_read_nothing_per_iteration(device):
    A, b = spd(40, 1e4)
    A, b = A.to(device), b.to(device)
    with HostReads() as reads:
        r = cg(lambda v: A @ v, b, tol=1e-10)
    assert r.converged and r.iterations > 20
    assert_close(r.x, torch.linalg.solve(A, b), rtol=1e-7)
    # the CPU reads the stop flag once an iteration; a GPU not even that (it is read without a stall)
    per_iteration = 1 if device.type == "cpu" else 0
    assert reads.count <= per_iteration * (r.iterations + 1) + 4
    with HostReads() as reads:
        neumann(lambda v: A @ v, b, alpha=1e-4, terms=30)
    assert reads.count <= 1


def test_neumann_residual_falls_with_every_term():
    A, b = spd(30, 1e2)
    lam = float(torch.linalg.eigvalsh(A).max())
    r = neumann(lambda v: A @ v, b, alpha=1 / lam, terms=40)
    assert len(r.residuals) == 41
    assert all(b_ < a for a, b_ in zip(r.residuals, r.residuals[1:]))
    with pytest.raises(ValueError, match="alpha must be > 0"):
        neumann(lambda v: A @ v, b, alpha=0.0, terms=3)


def test_neumann_reports_convergence_as_measured():
    A = torch.diag(torch.tensor([1.0, 0.5], dtype=torch.float64))
    b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # (I − A)^j b = (0, 0.5^j): the residual after term j is 0.5^(j+1)/√2
    short = neumann(lambda v: A @ v, b, alpha=1.0, terms=5)
    assert_close(short.residual, 0.5**6 / 2**0.5, rtol=1e-14)
    assert not short.converged
    long = neumann(lambda v: A @ v, b, alpha=1.0, terms=30, tol=1e-9)
    assert long.converged and long.residual <= 1e-9
    assert_close(long.x, torch.linalg.solve(A, b), rtol=1e-9)


def test_hvp_modes_agree_with_the_dense_hessian():
    theta = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    h = torch.tensor([0.3, 2.0], dtype=torch.float64)
    v = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    expected = hessian(quartic, theta, h) @ v
    for mode in ("reverse-over-reverse", "forward-over-reverse"):
        assert_close(hvp(quartic, theta, v, h, mode=mode), expected, rtol=1e-14)
