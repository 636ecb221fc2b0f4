import pytest
import torch

from pyro_evidence import optim
from pyro_evidence.linalg import value_grad_hessian
from pyro_evidence.optim import lbfgs, minimize, newton

from .common import HostReads, assert_close


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


def batch_vgh(losses, calls):
    """``vgh`` of a batch of independent losses, each problem evaluated alone (so a batch member's values do not
    depend on the others), counting evaluations."""

    def vgh(theta):
        calls.append(1)
        out = [value_grad_hessian(loss, t) for loss, t in zip(losses, theta)]
        return tuple(torch.stack(parts) for parts in zip(*out))

    return vgh


def well(t):
    return (t[0] ** 2 - 1) ** 2 + t[1] ** 2 + 0.5 * t[0] * t[1] ** 2


STARTS = [  # a long way down Rosenbrock's valley (backtracking), a convex function, a saddle of the double well
    (rosenbrock, [-1.2, 1.0]),
    (lambda t: ((t - 3.0) ** 2).sum() + torch.exp(t[0] - t[1]), [0.5, -0.5]),
    (well, [0.05, 0.3]),
]


def test_newton_problems_of_a_batch_stop_on_their_own():
    losses = [loss for loss, _ in STARTS]
    theta = torch.tensor([start for _, start in STARTS], dtype=torch.float64)
    r = newton(batch_vgh(losses, []), theta, max_steps=50)
    # the double well's Hessian is indefinite at the start: that problem is stuck, the others reach their minima
    assert r.stuck
    assert torch.equal(r.theta[2], theta[2])
    assert_close(r.theta[0], torch.ones(2, dtype=torch.float64), rtol=1e-10)
    assert r.g[1].norm() < 1e-12
    for q, (loss, start) in enumerate(STARTS[:2]):
        alone = newton(batch_vgh([loss], []), torch.tensor([start], dtype=torch.float64), max_steps=50)
        assert torch.equal(alone.theta[0], r.theta[q]) and torch.equal(alone.f[0], r.f[q])


@pytest.mark.parametrize("modified", [False, True])
def test_newton_iterations_past_the_stop_change_nothing(modified, monkeypatch):
    losses = [loss for loss, _ in STARTS]
    theta = torch.tensor([start for _, start in STARTS], dtype=torch.float64)
    prompt = newton(batch_vgh(losses, []), theta, max_steps=40, modified=modified)
    monkeypatch.setattr(optim, "StopCheck", lambda device: lambda flag: False)
    late = newton(batch_vgh(losses, []), theta, max_steps=40, modified=modified)
    for a, b in zip((prompt.theta, prompt.f, prompt.g, prompt.H), (late.theta, late.f, late.g, late.H)):
        assert torch.equal(a, b)
    assert (prompt.steps, prompt.stuck) == (late.steps, late.stuck) == (prompt.steps, not modified)


def test_newton_reads_nothing_per_iteration_but_the_stop(device):
    theta = torch.tensor([[-1.2, 1.0], [2.0, 3.0]], dtype=torch.float64, device=device)
    calls = []
    with HostReads() as reads:
        r = newton(batch_vgh([rosenbrock, rosenbrock], calls), theta, max_steps=50)
    assert not r.stuck and r.steps > 10
    assert_close(r.theta, torch.ones(2, 2, dtype=torch.float64), rtol=1e-10)
    per_iteration = 1 if device.type == "cpu" else 0
    assert reads.count <= per_iteration * len(calls) + 2


def breast_cancer_logistic():
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = torch.tensor((X - X.mean(0)) / X.std(0))
    y = torch.tensor(y, dtype=torch.float64)
    return X, y, lambda w: torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y, reduction="sum") + 0.5 * (w**2).sum()


def test_lbfgs_reaches_scikit_learns_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    X, y, loss = breast_cancer_logistic()
    theta, steps = lbfgs(loss, torch.zeros(30, dtype=torch.float64), max_iter=500, tol_grad=1e-9)
    ref = LogisticRegression(C=1.0, fit_intercept=False, tol=1e-12, max_iter=10_000).fit(X.numpy(), y.numpy())
    assert 0 < steps < 500
    assert torch.func.grad(loss)(theta).abs().max() <= 1e-9
    assert_close(theta, torch.tensor(ref.coef_[0]), rtol=1e-5, atol=1e-7)


def test_lbfgs_backs_off_from_a_trial_point_where_the_loss_is_infinite():
    barrier = lambda t: (50 * (t - 0.95) ** 2 - torch.log1p(-t)).sum()  # noqa: E731 - +inf from t = 1 on
    theta, steps = lbfgs(barrier, torch.zeros(1, dtype=torch.float64), max_iter=100, tol_grad=1e-10)
    lo, hi = 0.0, 1.0 - 1e-15  # the root of 100 (t − 0.95) + 1 / (1 − t), by bisection
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 100 * (mid - 0.95) + 1 / (1 - mid) < 0 else (lo, mid)
    assert_close(theta, torch.tensor([lo], dtype=torch.float64), rtol=1e-10)
    with pytest.raises(FloatingPointError, match="not finite at the current parameters"):
        lbfgs(barrier, torch.full((1,), 2.0, dtype=torch.float64), max_iter=10, tol_grad=1e-10)


def test_lbfgs_iterations_past_the_stop_change_nothing(monkeypatch):
    _, _, loss = breast_cancer_logistic()
    prompt = lbfgs(loss, torch.zeros(30, dtype=torch.float64), max_iter=500, tol_grad=1e-9)
    monkeypatch.setattr(optim, "StopCheck", lambda device: lambda flag: False)
    late = lbfgs(loss, torch.zeros(30, dtype=torch.float64), max_iter=500, tol_grad=1e-9)
    assert torch.equal(prompt[0], late[0]) and prompt[1] == late[1]


def test_lbfgs_reads_nothing_per_iteration_but_the_stop(device):
    X, y, _ = breast_cancer_logistic()
    X, y = X.to(device), y.to(device)
    loss = lambda w: torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y, reduction="sum") + 0.5 * (w**2).sum()  # noqa: E731
    calls = []

    def counted(w):
        calls.append(1)
        return loss(w)

    with HostReads() as reads:
        lbfgs(counted, torch.zeros(30, dtype=torch.float64, device=device), max_iter=500, tol_grad=1e-9)
    per_iteration = 1 if device.type == "cpu" else 0
    assert len(calls) > 20 and reads.count <= per_iteration * len(calls) + 2
