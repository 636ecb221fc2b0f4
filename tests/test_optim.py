import torch

from pyro_evidence.optim import minimize

from .common import assert_close


def rosenbrock(theta):
    return (100 * (theta[1:] - theta[:-1] ** 2) ** 2 + (1 - theta[:-1]) ** 2).sum()


def test_minimize_reaches_round_off_on_rosenbrock():
    m = minimize(rosenbrock, torch.tensor([-1.2, 1.0, 0.5], dtype=torch.float64))
    assert m.converged
    assert m.grad_norm < 1e-10
    assert m.newton_steps >= 1
    assert_close(m.theta, torch.ones(3, dtype=torch.float64), rtol=1e-10)


def test_newton_goes_first_on_a_convex_loss():
    quadratic = lambda t: ((t - torch.arange(5.0, dtype=torch.float64)) ** 2).sum()  # noqa: E731
    m = minimize(quadratic, torch.zeros(5, dtype=torch.float64) + 0.1)
    assert m.lbfgs_iterations == 0 and m.converged
    assert_close(m.theta, torch.arange(5.0, dtype=torch.float64), rtol=1e-14, atol=1e-14)


def test_lbfgs_takes_over_where_the_hessian_is_indefinite():
    # Rosenbrock's Hessian is indefinite at (0, 1): Newton has no descent direction there
    m = minimize(rosenbrock, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert m.lbfgs_iterations > 0 and m.converged
    assert_close(m.theta, torch.ones(2, dtype=torch.float64), rtol=1e-10)


def test_empty_theta():
    m = minimize(lambda t: t.sum() + 3.0, torch.zeros(0, dtype=torch.float64))
    assert m.converged and float(m.loss) == 3.0


def test_modified_newton_finishes_where_lbfgs_stopped_in_a_concave_region():
    # a double well in x: one L-BFGS iteration from x = 0.05 ends at x ≈ 0.2, where ∂²f/∂x² < 0
    def well(t):
        return (t[0] ** 2 - 1) ** 2 + t[1] ** 2 + 0.5 * t[0] * t[1] ** 2

    m = minimize(well, torch.tensor([0.05, 0.3], dtype=torch.float64), max_iter=1)
    assert m.lbfgs_iterations == 1 and m.newton_steps > 0 and m.converged
    assert_close(m.theta, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-10)
    assert bool(torch.linalg.eigvalsh(m.hessian).min() > 0)
