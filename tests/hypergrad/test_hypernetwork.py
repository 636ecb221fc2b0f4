import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_evidence import Problem, hypergradient, select_hyperparameters
from pyro_evidence.hypergrad import hypernetwork as hn
from pyro_evidence.hypergrad.hypernetwork import StaleHypernetwork
from pyro_evidence.objectives import HoldoutObjective

from ..common import assert_close


def shifted_prior(X, y=None):
    """Linear-Gaussian with a learnt prior mean: ``θ*(h) = (βXᵀX + αI)⁻¹(βXᵀy + α m(h))`` is affine in the
    mean ``m = (h, h, 0, …)``, everywhere."""
    mean = pyro.param("prior_mean", torch.tensor([0.0, 0.0]))
    loc = torch.cat([mean, mean.new_zeros(X.shape[1] - 2)])
    w = pyro.sample("w", dist.Normal(loc, 0.5).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, 1.0), obs=y)


@pytest.fixture
def holdout():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 5, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.5, -0.5, 0.3, 0.0, 0.8], dtype=torch.float64) + torch.randn(60, generator=g, dtype=torch.float64)
    pyro.clear_param_store()
    obj = HoldoutObjective(Problem(shifted_prior, X, y), validation=0.3)
    h = torch.tensor([0.4, -0.2], dtype=torch.float64)
    return obj, h


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def exact(obj, h):
    m = obj.solve(h)
    return hypergradient(obj.inner_loss, obj.validation, m.theta, h, method="ift-exact", hessian=m.hessian).grad


def test_an_affine_best_response_gives_the_implicit_hypergradient_over_the_trained_range(holdout):
    obj, h = holdout
    hg = hypergradient(obj.inner_loss, obj.validation, obj.theta_init, h, method="hypernetwork", scale=0.5)
    assert_close(hg.grad, exact(obj, h), rtol=1e-6)
    assert hg.info["residual"] < 1e-8 and not hg.info["stale"] and hg.info["converged"]
    net = hg.info["hypernet"]
    for shift in ([0.9, 0.0], [-0.6, 0.7], [0.0, -1.0]):  # within ±2σ = ±1 of the centre, no training
        h_ = h + torch.tensor(shift, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            other = hypergradient(obj.inner_loss, obj.validation, obj.theta_init, h_, method="hypernetwork", hypernet=net, num_steps=0)
        assert cosine(other.grad, exact(obj, h_)) >= 0.99
        assert not other.info["stale"] and other.info["residual"] < 1e-8


def test_outside_its_range_the_hypernetwork_says_it_is_stale(holdout):
    obj, h = holdout
    net = hypergradient(obj.inner_loss, obj.validation, obj.theta_init, h, method="hypernetwork", scale=0.1).info["hypernet"]
    far = h + torch.tensor([0.5, 0.0], dtype=torch.float64)
    with pytest.warns(StaleHypernetwork, match="stale"):
        hg = hypergradient(obj.inner_loss, obj.validation, obj.theta_init, far, method="hypernetwork", hypernet=net, num_steps=0)
    assert hg.info["stale"]
    retrained = hypergradient(obj.inner_loss, obj.validation, obj.theta_init, far, method="hypernetwork", hypernet=net)
    assert not retrained.info["stale"] and retrained.info["hypernet"].covers(far)


def test_a_curved_best_response_is_fitted_where_it_was_trained():
    # ridge shrinkage θ*(h) = 1/(1 + e^h): not affine, but a narrow range makes the fit its tangent
    L = lambda t, h: 0.5 * ((t - 1) ** 2).sum() + 0.5 * h.exp().sum() * (t**2).sum()  # noqa: E731
    Q = lambda t, h: -0.5 * ((t - 1) ** 2).sum()  # noqa: E731
    h = torch.zeros(1, dtype=torch.float64)
    theta = torch.full((3,), 0.5, dtype=torch.float64)
    hg = hypergradient(L, Q, theta, h, method="hypernetwork", scale=1e-3)
    assert_close(hg.grad, torch.tensor([-0.375], dtype=torch.float64), rtol=1e-4)
    wide = hypergradient(L, Q, theta, h, method="hypernetwork", scale=1.0)
    assert abs(float(wide.grad) + 0.375) > 1e-3  # the smoothed slope of a curved best response
    assert wide.info["train_residual"] > 1e-3 > hg.info["train_residual"]


def test_select_with_the_hypernetwork_reaches_the_implicit_selection(holdout):
    obj, _ = holdout
    X, y = obj.problem.args
    pyro.clear_param_store()
    ref = select_hyperparameters(shifted_prior, X, y, objective="holdout", method="ift-exact", progress=False)
    pyro.clear_param_store()
    sel = select_hyperparameters(shifted_prior, X, y, objective="holdout", method="hypernetwork", optimizer="lbfgs", progress=False,
                                 method_options={"scale": 0.3})
    assert_close(sel.hyperparameters["prior_mean"], ref.hyperparameters["prior_mean"], atol=1e-5)


def test_the_training_derivatives_assembled_from_the_draws_equal_autograd():
    # a non-quadratic inner loss, so that every draw has its own Hessian
    L = lambda t, h: (t.pow(4) / 4).sum() + (h.exp()[:, None] * (t - h.sum()) ** 2).sum() / 2  # noqa: E731
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, generator=g, dtype=torch.float64)
    offsets = hn._draws(h, 4, 0.3, seed=0)
    z = torch.randn(1, 3 * 3, generator=g, dtype=torch.float64)

    def loss(z):
        W = z.reshape(3, 3)
        return sum(L(W[:, 0] + W[:, 1:] @ e, h + e) for e in offsets) / len(offsets)

    f, grad_, hess = hn._draw_derivatives(L, h, offsets)(z)
    assert_close(f[0], loss(z[0]), rtol=1e-12)
    assert_close(grad_[0], torch.func.grad(loss)(z[0]), rtol=1e-12)
    assert_close(hess[0], torch.func.hessian(loss)(z[0]), rtol=1e-12)


def test_newton_and_lbfgs_train_the_same_network(holdout, monkeypatch):
    obj, h = holdout
    # the best response is affine everywhere; a wide range keeps U's curvature (∝ σ²) from leaving L-BFGS ill-conditioned
    newton = hypergradient(obj.inner_loss, obj.validation, obj.theta_init, h, method="hypernetwork", scale=3.0)
    monkeypatch.setattr(hn, "NEWTON_MAX_DIM", 0)  # the path of networks too large for a dense Hessian
    lbfgs = hypergradient(obj.inner_loss, obj.validation, obj.theta_init, h, method="hypernetwork", scale=3.0, num_steps=500)
    # Newton solves the quadratic training loss in a step; L-BFGS approaches it (its gradient stalls near 1e-6)
    assert newton.info["converged"] and newton.info["iterations"] <= 2 < lbfgs.info["iterations"]
    assert_close(lbfgs.info["hypernet"].U, newton.info["hypernet"].U, atol=1e-4)
    assert_close(lbfgs.grad, newton.grad, rtol=1e-3)


def test_bad_hypernetwork_options(holdout):
    obj, h = holdout
    with pytest.raises(ValueError, match="scale must be > 0"):
        hypergradient(obj.inner_loss, obj.validation, obj.theta_init, h, method="hypernetwork", scale=0.0)
    with pytest.raises(ValueError, match="num_steps must be > 0 without a trained hypernet"):
        hypergradient(obj.inner_loss, obj.validation, obj.theta_init, h, method="hypernetwork", num_steps=0)
