import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import integrate
from torch.distributions import constraints

from pyro_evidence import NotPositiveDefiniteError, laplace_evidence
from pyro_evidence.datasets import diabetes
from pyro_evidence.models import linear_regression

from ..common import LOG_2PI, assert_close, linear_gaussian_log_evidence, linear_gaussian_posterior


def set_params(**values):
    for name, value in values.items():
        pyro.param(name, torch.as_tensor(value, dtype=torch.float64), constraint=constraints.positive)


@pytest.mark.parametrize(
    "alpha, beta",
    [
        (0.1, 1.0),
        (1.0, 2.0),
        (30.0, 2.02),
        (torch.linspace(0.1, 10.0, 10), 1.5),
        (torch.logspace(-2, 3, 10), 0.5),
    ],
    ids=["shared-0.1", "shared-1", "shared-30", "ard-linear", "ard-log"],
)
def test_linear_gaussian_evidence_is_exact(alpha, beta):
    X, y = diabetes()
    set_params(prior_precision=alpha, noise_precision=beta)
    ard = isinstance(alpha, torch.Tensor)
    r = laplace_evidence(linear_regression, X, y, model_kwargs={"ard": ard})
    assert r.converged
    assert r.grad_norm < 1e-9
    assert_close(r.log_evidence, linear_gaussian_log_evidence(X, y, alpha, beta), rtol=1e-8)
    mean, cov = linear_gaussian_posterior(X, y, alpha, beta)
    assert_close(r.map["w"], mean, rtol=1e-8, atol=1e-10)
    posterior = r.posterior()
    assert_close(posterior.mean, mean, rtol=1e-8, atol=1e-10)
    assert_close(posterior.covariance_matrix, cov, rtol=1e-8, atol=1e-12)
    assert_close(r.log_det, torch.logdet(torch.linalg.inv(cov)), rtol=1e-10)


def test_warm_start_and_its_shape_check():
    X, y = diabetes()
    first = laplace_evidence(linear_regression, X, y)
    again = laplace_evidence(linear_regression, X, y, theta_init=first.theta)
    assert_close(again.log_evidence, first.log_evidence, rtol=1e-12)
    with pytest.raises(ValueError, match=r"theta_init has shape \(3,\)"):
        laplace_evidence(linear_regression, X, y, theta_init=torch.zeros(3))


# A positive latent scale σ with an Exponential(rate) prior; the data put its posterior near 10,
# so the log-Jacobian of σ = exp(s) (≈ log 10 nats) would show if it were missing.
def scale_model(y):
    rate = pyro.param("rate", torch.tensor(0.05), constraint=constraints.positive)
    sigma = pyro.sample("sigma", dist.Exponential(rate))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(0.0, sigma), obs=y)


def log_joint_in_log_space(s, y, rate):
    """f(s) = log Exp(e^s | rate) + s + Σ log N(y | 0, e^{2s}), written out by hand."""
    n, S = len(y), float((y**2).sum())
    return math.log(rate) - rate * math.exp(s) + s - n * s - 0.5 * S * math.exp(-2 * s) - 0.5 * n * LOG_2PI


def hand_laplace(y, rate):
    n, S = len(y), float((y**2).sum())
    s = math.log(math.sqrt(S / n))
    for _ in range(100):  # Newton on f'(s) = −rate e^s + 1 − n + S e^{−2s}
        d1 = -rate * math.exp(s) + 1 - n + S * math.exp(-2 * s)
        d2 = -rate * math.exp(s) - 2 * S * math.exp(-2 * s)
        s -= d1 / d2
    d2 = -rate * math.exp(s) - 2 * S * math.exp(-2 * s)
    return log_joint_in_log_space(s, y, rate) + 0.5 * LOG_2PI - 0.5 * math.log(-d2), s, -d2


@pytest.mark.parametrize("n", [20, 400])
def test_positive_latent_includes_log_jacobian(n):
    y = 10.0 * torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    r = laplace_evidence(scale_model, y)
    rate = float(pyro.param("rate").detach())
    expected, s_hat, curvature = hand_laplace(y, rate)
    assert 5 < math.exp(s_hat) < 20
    assert_close(r.log_evidence, expected, rtol=1e-8)
    assert_close(r.map["sigma"], math.exp(s_hat), rtol=1e-8)
    assert_close(r.hessian, [[curvature]], rtol=1e-8)

    if n == 400:  # large enough for Laplace to be accurate: compare with 1-D quadrature
        width = 12 / math.sqrt(curvature)
        f_hat = log_joint_in_log_space(s_hat, y, rate)
        integral, _ = integrate.quad(
            lambda s: math.exp(log_joint_in_log_space(s, y, rate) - f_hat),
            s_hat - width,
            s_hat + width,
            epsabs=0,
            epsrel=1e-12,
        )
        exact = f_hat + math.log(integral)
        assert abs(math.expm1(float(r.log_evidence) - exact)) < 0.01


# --- a Hessian that is not positive definite ---------------------------------------------


def flat_model(y):
    noise = pyro.param("noise", torch.tensor(1.0), constraint=constraints.positive)
    w = pyro.sample("w", dist.ImproperUniform(constraints.real, (), (2,)))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(w[0], noise), obs=y)  # nothing identifies w[1]


def test_singular_hessian_names_the_flat_site_and_jitter_reports_that_it_made_the_value():
    y = torch.randn(10, dtype=torch.float64)
    with pytest.raises(NotPositiveDefiniteError, match="1 direction.* flat.*latent site.*'w'.*jitter= would not fix it"):
        laplace_evidence(flat_model, y)
    with pytest.warns(RuntimeWarning, match="jitter=1e-06 added to the Hessian changed the log evidence by -inf"):
        r = laplace_evidence(flat_model, y, jitter=1e-6)
    assert r.jitter == 1e-6 and r.jitter_effect == -math.inf
    assert torch.isfinite(r.log_evidence)
    assert_close(torch.linalg.eigvalsh(r.hessian).min(), 1e-6, rtol=1e-6)


def test_jitter_effect_is_the_change_of_the_log_evidence():
    X, y = diabetes()
    exact = laplace_evidence(linear_regression, X, y)
    with pytest.warns(RuntimeWarning, match="changed the log evidence"):
        r = laplace_evidence(linear_regression, X, y, jitter=1e-3)
    assert r.jitter_effect < 0
    assert_close(r.log_evidence - exact.log_evidence, r.jitter_effect, rtol=1e-8)


def test_negative_jitter_is_refused():
    X, y = diabetes()
    with pytest.raises(ValueError, match="jitter must be >= 0"):
        laplace_evidence(linear_regression, X, y, jitter=-1.0)


def test_more_than_two_thousand_latents():
    # above the inner solver's dense-Newton size the mode comes from L-BFGS; the evidence still
    # needs (and gets) the dense Hessian there
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 2050, generator=g, dtype=torch.float64) / 10
    y = X[:, 0] + torch.randn(60, generator=g, dtype=torch.float64)
    set_params(prior_precision=2.0, noise_precision=1.5)
    r = laplace_evidence(linear_regression, X, y)
    assert r.converged and r.hessian.shape == (2050, 2050)
    assert_close(r.log_evidence, linear_gaussian_log_evidence(X, y, 2.0, 1.5), rtol=1e-9)


def noisy_regression(X, y=None):
    # the noise scale is a positive latent: at its unfitted start the posterior is not log-concave
    alpha = pyro.param("prior_precision", torch.tensor(1.0), constraint=constraints.positive)
    w = pyro.sample("w", dist.Normal(0.0, alpha.rsqrt()).expand([X.shape[1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.Gamma(2.0, 1.0))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, sigma), obs=y)


def test_selection_does_not_need_a_positive_definite_hessian_at_the_unfitted_start():
    from pyro_evidence import Problem, select_hyperparameters

    X, y = diabetes()
    p = Problem(noisy_regression, X, y)
    H = torch.func.hessian(p.loss)(p.theta_init, p.h_init)
    assert torch.linalg.eigvalsh(H).min() < 0  # the start the selection used to refuse
    pyro.clear_param_store()
    sel = select_hyperparameters(noisy_regression, X, y, progress=False)
    assert sel.converged and sel.grad_norm <= 1e-6

    def evidence(log_alpha):
        pyro.clear_param_store()
        pyro.param("prior_precision", torch.tensor(math.exp(log_alpha), dtype=torch.float64), constraint=constraints.positive)
        return float(laplace_evidence(noisy_regression, X, y).log_evidence)

    a, eps = math.log(float(sel.hyperparameters["prior_precision"])), 1e-4
    assert abs(evidence(a + eps) - evidence(a - eps)) / (2 * eps) < 1e-4  # a stationary point of the evidence
    assert_close(evidence(a), sel.objective, rtol=1e-10)


# --- Pyro's imputation idiom (obs_mask) ---------------------------------------------------------------------


def imputing_regression(X, y=None, mask=None):
    alpha = pyro.param("prior_precision", torch.tensor(3.0), constraint=constraints.positive)
    beta = pyro.param("noise_precision", torch.tensor(2.0), constraint=constraints.positive)
    w = pyro.sample("w", dist.Normal(0.0, alpha.rsqrt()).expand([X.shape[1]]).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, beta.rsqrt()), obs=y, obs_mask=mask)


def test_obs_mask_holds_the_observed_coordinates_of_the_imputed_latent_out_of_theta():
    X, y = diabetes()
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[::7] = False
    garbage = torch.where(mask, y, torch.full_like(y, 1e6))  # the missing values are never read
    r = laplace_evidence(imputing_regression, X, garbage, model_kwargs={"mask": mask})
    # the missing rows integrate out exactly: the evidence of the model without them (before: NotPositiveDefinite,
    # and with the advised jitter=1e-6 a log evidence of +2,392 where it is -402)
    assert_close(r.log_evidence, linear_gaussian_log_evidence(X[mask], y[mask], 3.0, 2.0), rtol=1e-10)
    assert r.problem.held == {"y_unobserved": int(mask.sum())}
    assert r.theta.numel() == X.shape[1] + int((~mask).sum())
    # the imputed values are the posterior predictive means X w of their rows
    assert_close(r.map["y_unobserved"][~mask], X[~mask] @ r.map["w"], rtol=1e-8)


def test_masked_elements_something_reads_stay_in_theta():
    def model(y):
        noise = pyro.param("noise", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("pair", 2), pyro.poutine.mask(mask=torch.tensor([True, False])):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))  # z[1]'s prior is masked …
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(z.sum(), noise), obs=y)  # … but the data read it

    y = torch.randn(10, dtype=torch.float64)
    r = laplace_evidence(model, y)  # z[0] + z[1] is identified by the data, z[0] by its prior: both are in θ
    assert r.problem.held == {} and r.theta.numel() == 2
    # Gaussian in θ, so the Laplace evidence is exact: ∫ N(z0 | 0, 1) Π N(y_i | z0 + z1, 1) dz0 dz1 = ∫ Π N(y_i | s, 1) ds
    n, ybar = y.numel(), float(y.mean())
    exact = -0.5 * (n - 1) * math.log(2 * math.pi) - 0.5 * math.log(n) - 0.5 * float(((y - ybar) ** 2).sum())
    assert_close(r.log_evidence, exact, rtol=1e-10)


def test_integer_counts_give_the_evidence_of_float_counts():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 3, generator=g, dtype=torch.float64)
    y = torch.poisson(torch.exp(X @ torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64) + 2.0), generator=g)

    def model(X, y=None):
        a = pyro.param("a", torch.tensor(1.0), constraint=constraints.positive)
        w = pyro.sample("w", dist.Normal(0.0, a.rsqrt()).expand([X.shape[1]]).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Poisson((X @ w + 2.0).exp()), obs=y)

    as_float = laplace_evidence(model, X, y).log_evidence
    as_int = laplace_evidence(model, X, y.long()).log_evidence  # lgamma(1 + y) was taken in float32: 2.9e-5 off
    assert float(as_int) == float(as_float)


# --- at=: the evidence at a given point, no inner solve -------------------------------------------------------


def test_at_evaluates_the_evidence_at_the_point_given_without_a_solve():
    """Off the mode: ``−L(w) + d/2 log 2π − ½ log det(βXᵀX + αI)`` and ``‖∇L(w)‖ = ‖βXᵀ(Xw − y) + αw‖``."""
    X, y = diabetes()
    set_params(prior_precision=2.0, noise_precision=0.5)
    w = torch.linspace(-3, 3, X.shape[1], dtype=torch.float64)
    r = laplace_evidence(linear_regression, X, y, at=w)
    H = 0.5 * X.T @ X + 2.0 * torch.eye(X.shape[1], dtype=torch.float64)
    half, two = (torch.tensor(v, dtype=torch.float64) for v in (0.5, 2.0))  # python floats would make float32 laws
    loss = -(torch.distributions.Normal(X @ w, half.rsqrt()).log_prob(y).sum()
             + torch.distributions.Normal(0.0, two.rsqrt()).log_prob(w).sum())
    assert_close(r.log_evidence, -loss + 0.5 * w.numel() * LOG_2PI - 0.5 * torch.logdet(H), rtol=1e-12)
    assert_close(r.grad_norm, (0.5 * X.T @ (X @ w - y) + 2.0 * w).norm(), rtol=1e-10)
    assert not r.converged and torch.equal(r.theta, w)
    # at the mode, as {site: value}: the solved evidence, converged
    solved = laplace_evidence(linear_regression, X, y)
    there = laplace_evidence(linear_regression, X, y, at=solved.map)
    assert_close(there.log_evidence, solved.log_evidence, rtol=1e-12)
    assert there.converged and there.grad_norm < 1e-9


def test_at_takes_a_trained_module_and_names_what_does_not_fit():
    X, y = diabetes()
    d = X.shape[1]

    def model(X, y=None):
        a = pyro.param("a", torch.tensor(1.0, dtype=torch.float64), constraint=constraints.positive)
        w = pyro.sample("fc.weight", dist.Normal(0.0, a.rsqrt()).expand([1, d]).to_event(2))
        b = pyro.sample("fc.bias", dist.Normal(0.0, a.rsqrt()).expand([1]).to_event(1))
        with pyro.plate("data", X.shape[0]):
            return pyro.sample("y", dist.Normal((X @ w.T + b).squeeze(-1), 50.0), obs=y)

    pyro.clear_param_store()
    net = torch.nn.Sequential()
    net.fc = torch.nn.Linear(d, 1).double()
    by_module = laplace_evidence(model, X, y, at=net)
    by_dict = laplace_evidence(model, X, y, at={"fc.weight": net.fc.weight, "fc.bias": net.fc.bias})
    assert_close(by_module.log_evidence, by_dict.log_evidence, rtol=0, atol=0)
    assert_close(by_module.map["fc.weight"], net.fc.weight.detach(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"missing \['fc.bias'\]"):
        laplace_evidence(model, X, y, at={"fc.weight": net.fc.weight})
    with pytest.raises(ValueError, match=r"at\['fc.bias'\] has shape \(2,\)"):
        laplace_evidence(model, X, y, at={"fc.weight": net.fc.weight, "fc.bias": torch.zeros(2)})
    net.extra = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match=r"matching no site: \['extra.bias', 'extra.weight'\]"):
        laplace_evidence(model, X, y, at=net)
    with pytest.raises(ValueError, match="not both"):
        laplace_evidence(model, X, y, at=by_dict.theta, theta_init=by_dict.theta)
    with pytest.raises(ValueError, match=r"at= has shape \(3,\)"):
        laplace_evidence(model, X, y, at=torch.zeros(3))
