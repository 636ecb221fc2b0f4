import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal, init_to_sample
from torch.distributions import constraints

from pyro_evidence import elbo_evidence, select_hyperparameters
from pyro_evidence.datasets import diabetes
from pyro_evidence.models import linear_regression
from pyro_evidence.objectives.elbo import guide_loc_scale, standard_normal_particles

from ..common import assert_close, linear_gaussian_log_evidence


def closed_form_elbo(X, y, alpha, beta, loc, scale):
    """ELBO of q = N(loc, diag scale²) for w ~ N(0, α⁻¹I), y ~ N(Xw, β⁻¹I): log Z − KL(q ‖ p(w|y))."""
    d = X.shape[1]
    precision = alpha * torch.eye(d, dtype=torch.float64) + beta * X.T @ X
    mean = torch.linalg.solve(precision, beta * X.T @ y)
    kl = 0.5 * (
        (precision.diagonal() * scale**2).sum()
        + (mean - loc) @ precision @ (mean - loc)
        - d
        - torch.logdet(precision)
        - 2 * scale.log().sum()
    )
    return linear_gaussian_log_evidence(X, y, alpha, beta) - kl


def optimal_mean_field_elbo(X, y, alpha, beta):
    """log Z − ½(Σᵢ log Λᵢᵢ − log det Λ), Λ the posterior precision (differentiable in α, β)."""
    alpha, beta = torch.as_tensor(alpha, dtype=torch.float64), torch.as_tensor(beta, dtype=torch.float64)
    n, d = X.shape
    precision = alpha * torch.eye(d, dtype=torch.float64) + beta * X.T @ X
    cov = torch.eye(n, dtype=torch.float64) / beta + X @ X.T / alpha
    log_z = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov).log_prob(y)
    gap = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    return log_z - gap


def set_params(alpha, beta):
    pyro.param("prior_precision", torch.tensor(alpha, dtype=torch.float64), constraint=constraints.positive)
    pyro.param("noise_precision", torch.tensor(beta, dtype=torch.float64), constraint=constraints.positive)


@pytest.mark.parametrize("alpha, beta", [(30.0, 2.0), (1.0, 0.5)])
def test_fitted_guide_reaches_the_optimal_mean_field_elbo(alpha, beta):
    X, y = diabetes()
    set_params(alpha, beta)
    r = elbo_evidence(linear_regression, X, y)
    assert r.converged and isinstance(r.guide, AutoDiagonalNormal)
    loc, scale = guide_loc_scale(r.guide)["w"]
    exact = closed_form_elbo(X, y, alpha, beta, loc, scale)
    optimum = optimal_mean_field_elbo(X, y, alpha, beta)
    assert float(optimum - exact) < 0.05
    assert float(optimum - exact) > -1e-9  # a bound cannot pass the optimum
    assert abs(float(r.elbo - exact)) < 3 * float(r.stderr)
    assert 0 < float(r.stderr) < 1.0


def test_seed_makes_it_reproducible():
    X, y = diabetes()
    a = elbo_evidence(linear_regression, X, y, seed=3)
    b = elbo_evidence(linear_regression, X, y, seed=3)
    assert float(a.elbo) == float(b.elbo)
    c = elbo_evidence(linear_regression, X, y, seed=4)
    assert float(a.elbo) != float(c.elbo)


def test_user_supplied_autonormal_and_adam():
    X, y = diabetes()
    set_params(30.0, 2.0)
    guide = AutoNormal(linear_regression)
    r = elbo_evidence(linear_regression, X, y, guide=guide, optimizer="adam", max_iter=1500, lr=0.02)
    assert r.guide is guide
    loc, scale = guide_loc_scale(guide)["w"]
    assert float(optimal_mean_field_elbo(X, y, 30.0, 2.0) - closed_form_elbo(X, y, 30.0, 2.0, loc, scale)) < 0.5


def test_convergence_is_measured_for_both_optimisers():
    from pyro_evidence.objectives.elbo import ElboObjective
    from pyro_evidence import Problem

    X, y = diabetes()
    set_params(30.0, 2.0)
    fitted = elbo_evidence(linear_regression, X, y)
    few = elbo_evidence(linear_regression, X, y, optimizer="adam", max_iter=20, lr=0.01)
    assert fitted.converged and not few.converged  # 20 Adam steps are not a fit, and are not called one
    for r in (fitted, few):  # grad_norm is the gradient of the fixed-particle objective, computed independently
        obj = ElboObjective(Problem(linear_regression, X, y))
        g = torch.func.grad(obj.inner_loss)(r.theta, obj.h_init)
        assert_close(r.grad_norm, g.norm(), rtol=1e-8)
    assert few.grad_norm > 1.0 and fitted.grad_norm < 1e-5


def test_a_seeded_guide_leaves_the_global_random_state_alone():
    X, y = diabetes()
    state = torch.get_rng_state()
    a = elbo_evidence(linear_regression, X, y, guide=AutoNormal(linear_regression, init_loc_fn=init_to_sample), seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    pyro.clear_param_store()
    b = elbo_evidence(linear_regression, X, y, guide=AutoNormal(linear_regression, init_loc_fn=init_to_sample), seed=5)
    assert float(a.elbo) == float(b.elbo)


def test_particles_are_centred_and_whitened():
    eps = standard_normal_particles(64, 10, 0, torch.float64, "cpu")
    assert_close(eps.mean(0), torch.zeros(10, dtype=torch.float64), atol=1e-12)
    assert_close(eps.T @ eps / 64, torch.eye(10, dtype=torch.float64), atol=1e-12)
    eps = standard_normal_particles(4, 10, 0, torch.float64, "cpu")  # fewer than dims: antithetic
    assert_close(eps.mean(0), torch.zeros(10, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("num", [8, 9, 10, 11, 12])
def test_particles_between_the_dimension_and_twice_it(num):
    # 6 to 11 particles in 6 dimensions: the pairs span every direction from 11 on; below, the second
    # moment is singular and whitening, which used to fail in a Cholesky, must not be attempted
    eps = standard_normal_particles(num, 6, 0, torch.float64, "cpu")
    assert eps.shape == (num, 6) and torch.isfinite(eps).all()
    assert_close(eps.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    second = eps.T @ eps / num
    rank = int(torch.linalg.matrix_rank(second))
    assert rank == min(6, (num + 1) // 2)
    if num >= 11:
        assert_close(second, torch.eye(6, dtype=torch.float64), atol=1e-12)


def elbo_at_optimum(X, y, log_h):
    return optimal_mean_field_elbo(X, y, log_h[0].exp(), log_h[1].exp())


def test_elbo_selection_reaches_a_stationary_point():
    X, y = diabetes()
    sel = select_hyperparameters(linear_regression, X, y, objective="elbo", progress=False)
    assert sel.converged
    assert sel.history[-1].objective > sel.history[0].objective
    log_h = torch.stack([sel.hyperparameters["prior_precision"].log(), sel.hyperparameters["noise_precision"].log()])
    grad = torch.func.grad(lambda lh: elbo_at_optimum(X, y, lh))(log_h)
    assert grad.abs().max() < 1e-3
    assert_close(sel.objective, elbo_at_optimum(X, y, log_h), rtol=1e-8)


def test_graves_update_is_monotone_and_reaches_the_fixed_point():
    X, y = diabetes()
    sel = select_hyperparameters(linear_regression, X, y, objective="elbo", method="graves", max_steps=100, progress=False)
    assert sel.converged
    values = [s.objective for s in sel.history]
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(values, values[1:]))
    pyro.clear_param_store()
    ift = select_hyperparameters(linear_regression, X, y, objective="elbo", progress=False)
    for name, value in ift.hyperparameters.items():
        assert_close(sel.hyperparameters[name], value, rtol=1e-4)
    # at the fixed point the prior is Graves' closed form: σ² = D̂w = mean(μ² + σ_q²) (zero prior mean)
    fit = elbo_evidence(linear_regression, X, y)
    loc, scale = guide_loc_scale(fit.guide)["w"]
    assert_close(1 / sel.hyperparameters["prior_precision"], (loc**2 + scale**2).mean(), rtol=1e-4)


def test_graves_needs_the_elbo():
    X, y = diabetes()
    with pytest.raises(ValueError, match="needs objective='elbo'"):
        select_hyperparameters(linear_regression, X, y, method="graves", progress=False)


def test_discrete_latents_are_refused():
    def model(y):
        p = pyro.param("p", torch.tensor(0.3), constraint=constraints.unit_interval)
        k = pyro.sample("k", dist.Poisson(p * 10))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(k, 1.0), obs=y)

    with pytest.raises(TypeError, match="latent site 'k' is discrete"):
        elbo_evidence(model, torch.zeros(5))


def test_bad_options():
    X, y = diabetes()
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        elbo_evidence(linear_regression, X, y, optimizer="sgd")
    with pytest.raises(ValueError, match="num_particles must be >= 2"):
        elbo_evidence(linear_regression, X, y, num_particles=1)
    with pytest.raises(TypeError, match="diagonal Gaussian guide"):
        elbo_evidence(linear_regression, X, y, guide=lambda *a: None)


def test_a_scale_underflowing_to_zero_costs_a_finite_penalty_not_an_error():
    from pyro_evidence import Problem
    from pyro_evidence.objectives.elbo import ElboObjective

    X, y = diabetes(dtype=torch.float32)
    set_params(1.0, 1.0)
    obj = ElboObjective(Problem(linear_regression, X, y), num_particles=4)
    theta = obj.theta_init.clone()
    assert torch.isfinite(obj.inner_loss(theta, obj.h_init))
    theta[obj.dim] = -200.0  # softplus(−200) is 0 in float32: a line search's trial point
    loss = obj.inner_loss(theta, obj.h_init)
    # the scale floors at tiny^¼ = 3.29e-10: the loss is that of q with this scale, finite
    floor = torch.finfo(torch.float32).tiny ** 0.25
    at_floor = theta.clone()
    at_floor[obj.dim] = math.log(math.expm1(floor))  # softplus⁻¹
    assert torch.isfinite(loss)
    assert_close(loss, obj.inner_loss(at_floor, obj.h_init), rtol=1e-6)
    theta[obj.dim] = float("nan")
    assert torch.isnan(obj.inner_loss(theta, obj.h_init))



@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_adam_steps_never_wait_for_the_gpu():
    from pyro_evidence import Problem
    from pyro_evidence.objectives.elbo import ElboObjective, _adam

    X, y = diabetes(device="cuda")
    set_params(30.0, 2.0)
    objective = ElboObjective(Problem(linear_regression, X, y), num_particles=8)
    h, theta0 = objective.h_init, objective.theta_init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a particle drawn on the CPU and copied would stall every step
    try:
        theta = _adam(objective, h, theta0, 20, 0.01, seed=0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert theta.device.type == "cuda" and torch.isfinite(theta).all()
