import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroSample
from torch.distributions import constraints

import pyro_evidence as pe
from pyro_evidence.compare import laplace_rows
from pyro_evidence.objectives.curvature import LaplaceCurvature, slq_logdet
from pyro_evidence.models.linear import linear_regression
from pyro_evidence.models.logistic import logistic_regression
from pyro_evidence.models.mlp import mlp_classifier
from pyro_evidence.problem import Problem
from tests.common import LOG_2PI, assert_close, linear_gaussian_log_evidence

MLP = {"hidden": 4, "classes": 3}


def _data(n=40, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.linspace(-1, 1, d, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    return X, y


def _classes(n=30, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    return X, torch.randint(0, k, (n,), generator=g)


def _mlp_logits(problem, X, h):
    def logits(t):
        v = problem.latent_values(t, h)
        return torch.tanh(X @ v["w1"] + v["b1"]) @ v["w2"] + v["b2"]

    return logits


def _hand_ggn(problem, X, theta, h):
    """``Jᵀ Λ J + diag(prior precisions)`` of the MLP, J by dense autograd, Λ = diag(p) − p pᵀ per row."""
    logits = _mlp_logits(problem, X, h)
    J = torch.autograd.functional.jacobian(logits, theta).reshape(-1, theta.numel())
    p = logits(theta).softmax(-1)
    Lam = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p])
    a = problem.params(h)
    sizes = {s.name: s.numel for s in problem.latents}
    prior = torch.cat([
        a["prior_precision_1"].expand(sizes["w1"] + sizes["b1"]),
        a["prior_precision_2"].expand(sizes["w2"] + sizes["b2"]),
    ])
    return J.T @ Lam @ J + torch.diag(prior)


class Linear1(PyroModule):
    """``y ~ N(x W + b, 1)`` written as ``PyroModule[nn.Linear]`` with ``PyroSample`` priors."""

    def __init__(self, d, out=1):
        super().__init__()
        self.fc = PyroModule[torch.nn.Linear](d, out)
        self.fc.weight = PyroSample(lambda m: dist.Normal(0.0, pyro.param("a", torch.tensor(2.0), constraint=constraints.positive).rsqrt()).expand([out, d]).to_event(2))
        self.fc.bias = PyroSample(lambda m: dist.Normal(0.0, pyro.param("a").rsqrt()).expand([out]).to_event(1))

    def forward(self, X, y=None):
        mean = self.fc(X).squeeze(-1)
        with pyro.plate("data", X.shape[0]):
            return pyro.sample("y", dist.Normal(mean, 0.5), obs=y)


# --- the structures against independent truths ----------------------------------------------------------------


def test_ggn_equals_the_hessian_on_a_linear_gaussian_model():
    X, y = _data()
    pyro.clear_param_store()
    problem = Problem(linear_regression, X, y)
    theta = torch.randn(problem.theta_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    G = LaplaceCurvature(problem, "ggn").dense(theta, problem.h_init)
    H = LaplaceCurvature(problem, "exact").dense(theta, problem.h_init)
    assert_close(G, H, rtol=0, atol=1e-10)
    assert_close(G, X.T @ X + torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-10)  # β = α = 1
    for hessian in ("ggn", "kron"):  # one output: K-FAC is exact too
        r = pe.laplace_evidence(linear_regression, X, y, hessian=hessian)
        assert_close(r.log_evidence, linear_gaussian_log_evidence(X, y, 1.0, 1.0), rtol=1e-10)


def test_ggn_evidence_of_an_mlp_equals_a_hand_built_j_lambda_j():
    X, y = _classes()
    pyro.clear_param_store()
    init = pyro.infer.autoguide.init_to_sample
    with pyro.poutine.seed(rng_seed=0):
        r = pe.laplace_evidence(mlp_classifier, X, y, model_kwargs=MLP, hessian="ggn", init_loc_fn=init)
    problem, h = r.problem, r.problem.h_init
    G = _hand_ggn(problem, X, r.theta, h)
    assert_close(r.hessian, G, rtol=0, atol=1e-8)
    expected = -problem.loss(r.theta, h) + 0.5 * r.theta.numel() * LOG_2PI - 0.5 * torch.logdet(G)
    assert_close(r.log_evidence, expected, rtol=0, atol=1e-8)


def test_diag_equals_the_diagonal_of_the_dense_ggn():
    X, y = _classes()
    pyro.clear_param_store()
    problem = Problem(mlp_classifier, X, y, model_kwargs=MLP)
    theta = 0.5 * torch.randn(problem.theta_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    diag = LaplaceCurvature(problem, "diag").diagonal(theta, problem.h_init)
    assert_close(diag, _hand_ggn(problem, X, theta, problem.h_init).diagonal(), rtol=0, atol=1e-10)


def test_layers_written_as_pyro_modules_are_found():
    X, y = _data(d=4)
    pyro.clear_param_store()
    model = Linear1(4)
    problem = Problem(model, X, y)
    curv = LaplaceCurvature(problem, "kron")
    curv.setup()
    assert [(l.weight, l.bias, l.transposed) for l in curv.layers] == [("fc.weight", "fc.bias", True)]
    theta = torch.randn(problem.theta_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    G = LaplaceCurvature(problem, "ggn").dense(theta, problem.h_init)
    assert_close(LaplaceCurvature(problem, "diag").diagonal(theta, problem.h_init), G.diagonal(), rtol=0, atol=1e-10)
    # one output, a shared precision over weight and bias: K-FAC is exact
    assert_close(curv.curvature(theta, problem.h_init).log_det, torch.logdet(G), rtol=1e-12)


def test_kron_is_the_kronecker_product_of_its_factors_on_one_layer():
    """Softmax regression without bias: ``C = (XᵀX) ⊗ (1/N) Σ_n Λ_n + α I``, built here by hand."""
    X, y = _classes(d=4)

    def softmax_regression(X, y=None):
        a = pyro.param("a", torch.tensor(0.5), constraint=constraints.positive)
        w = pyro.sample("w", dist.Normal(0.0, a.rsqrt()).expand([4, 3]).to_event(2))
        with pyro.plate("data", X.shape[0]):
            return pyro.sample("y", dist.Categorical(logits=X @ w), obs=y)

    pyro.clear_param_store()
    problem = Problem(softmax_regression, X, y)
    theta = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    curv = LaplaceCurvature(problem, "kron").curvature(theta, problem.h_init)
    p = (X @ theta.reshape(4, 3)).softmax(-1)
    B = sum(torch.diag(q) - torch.outer(q, q) for q in p) / X.shape[0]
    A = X.T @ X
    assert_close(curv.blocks[0].A, A, rtol=1e-12)
    assert_close(curv.blocks[0].B, B, rtol=1e-12)
    assert_close(curv.log_det, torch.logdet(torch.kron(A, B) + 0.5 * torch.eye(12, dtype=torch.float64)), rtol=1e-12)
    draws = LaplaceCurvature(problem, "kron")
    draws.setup()
    S = draws.sample(curv, 20000, seed=0)  # draws of N(0, C⁻¹): their covariance, to Monte-Carlo accuracy
    cov = torch.linalg.inv(torch.kron(A, B) + 0.5 * torch.eye(12, dtype=torch.float64))
    assert (S.T @ S / S.shape[0] - cov).abs().max() < 0.05 * cov.diagonal().max()


def test_slq_log_det_lies_within_its_error_bars_at_d_2000():
    d, n = 2000, 300
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    pyro.clear_param_store()
    problem = Problem(linear_regression, X, y)
    theta, h = torch.zeros(d, dtype=torch.float64), problem.h_init
    truth = torch.logdet(X.T @ X + torch.eye(d, dtype=torch.float64))
    model = LaplaceCurvature(problem, "ggn", "slq")
    op = model.ggn_operator(theta, h)
    errors = []
    for seed in range(20):
        est = slq_logdet(op, d, theta, num_probes=30, lanczos_steps=30, seed=seed)
        errors.append(float((est.value - truth) / est.se))
    assert max(abs(e) for e in errors) < 3, errors
    assert 0.3 < torch.tensor(errors).std() < 2.0  # the stated error is the error's actual size, not a blanket


# --- hypergradients through each structure -------------------------------------------------------------------


def _set(name, value):
    pyro.clear_param_store()
    pyro.param(name, torch.as_tensor(value, dtype=torch.float64), constraint=constraints.positive)


def _fd(evidence, h0, eps=1e-4):
    """Central differences of ``evidence`` in the unconstrained (log) hyperparameters."""
    out = []
    for i in range(h0.numel()):
        up, down = h0.clone(), h0.clone()
        up[i] += eps
        down[i] -= eps
        out.append((evidence(up.exp()) - evidence(down.exp())) / (2 * eps))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("hessian", ["exact", "ggn", "diag", "kron"])
def test_logistic_hypergradient_matches_finite_differences(hessian):
    X, y = _data(n=60)
    y = (y > 0).double()

    def evidence(a):
        _set("prior_precision", a)
        return float(pe.laplace_evidence(logistic_regression, X, y, hessian=hessian).log_evidence)

    a0 = torch.tensor(0.7, dtype=torch.float64)
    _set("prior_precision", a0)
    grad = pe.laplace_hypergradient(logistic_regression, X, y, hessian=hessian).grad
    assert_close(grad, _fd(evidence, a0.log().reshape(1)), rtol=1e-5)


@pytest.mark.parametrize("hessian", ["ggn", "diag", "kron"])
def test_per_layer_precisions_of_an_mlp_match_finite_differences(hessian):
    X, y = _classes(n=40)

    def start():
        return {"w1": 0.5 * torch.randn(5, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)}

    init = lambda site: start().get(site["name"], site["fn"].mean)  # noqa: E731

    def evidence(a):
        pyro.clear_param_store()
        pyro.param("prior_precision_1", a[0], constraint=constraints.positive)
        pyro.param("prior_precision_2", a[1], constraint=constraints.positive)
        return float(pe.laplace_evidence(mlp_classifier, X, y, model_kwargs=MLP, hessian=hessian, init_loc_fn=init).log_evidence)

    a0 = torch.tensor([2.0, 1.5], dtype=torch.float64)
    evidence(a0)
    grad = pe.laplace_hypergradient(mlp_classifier, X, y, model_kwargs=MLP, hessian=hessian, init_loc_fn=init).grad
    assert_close(grad, _fd(evidence, a0.log()), rtol=1e-5)


def test_per_weight_precisions_by_diag_match_finite_differences():
    X, y = _data(n=60)
    y = (y > 0).double()

    def evidence(a):
        _set("prior_precision", a)
        return float(pe.laplace_evidence(logistic_regression, X, y, model_kwargs={"ard": True}, hessian="diag").log_evidence)

    a0 = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    _set("prior_precision", a0)
    grad = pe.laplace_hypergradient(logistic_regression, X, y, model_kwargs={"ard": True}, hessian="diag").grad
    assert_close(grad, _fd(evidence, a0.log()), rtol=1e-5)


def test_slq_hypergradient_lies_within_three_standard_errors():
    X, y = _data(n=60, d=8)
    y = (y > 0).double()

    def evidence(a):
        _set("prior_precision", a)
        return float(pe.laplace_evidence(logistic_regression, X, y, hessian="ggn").log_evidence)

    a0 = torch.tensor(0.7, dtype=torch.float64)
    fd = _fd(evidence, a0.log().reshape(1))
    for seed in range(3):
        _set("prior_precision", a0)
        hg = pe.laplace_hypergradient(logistic_regression, X, y, hessian="ggn", logdet="slq", seed=seed, lanczos_steps=8)
        se = hg.info["standard_error"]
        assert_close(hg.info["per_probe"].mean(0), hg.grad, rtol=1e-8)
        assert 0 < float(se) and float((hg.grad - fd).abs()) < 3 * float(se)


# --- from any start, at any size -----------------------------------------------------------------------------


def test_ggn_evidence_of_an_mlp_from_the_prior_mean_neither_raises_nor_warns():
    X, y = _classes()
    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = pe.laplace_evidence(mlp_classifier, X, y, model_kwargs=MLP, hessian="ggn")
    assert math.isfinite(float(r.log_evidence)) and r.converged


def test_structures_refuse_what_they_cannot_represent():
    X, y = _data(n=30)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="one prior precision over each weight matrix"):
        pe.laplace_evidence(linear_regression, X, y, model_kwargs={"ard": True}, hessian="kron")

    def hierarchical(X, y=None):
        s = pyro.param("s", torch.tensor(1.0), constraint=constraints.positive)
        mu = pyro.sample("mu", dist.Normal(0.0, s))
        w = pyro.sample("w", dist.Normal(mu, 1.0).expand([3]).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Normal(X @ w, 1.0), obs=y)

    with pytest.raises(ValueError, match="couples the coordinates of latent site"):
        pe.laplace_evidence(hierarchical, X, y, hessian="diag")
    assert math.isfinite(float(pe.laplace_evidence(hierarchical, X, y, hessian="ggn").log_evidence))

    def gamma_model(X, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Gamma((X @ w).exp(), 1.0), obs=y)

    with pytest.raises(ValueError, match="Gamma law"):
        pe.laplace_evidence(gamma_model, X, y.exp(), hessian="ggn")
    with pytest.raises(ValueError, match="logdet='slq' works on a matrix-free operator"):
        pe.laplace_evidence(linear_regression, X, y, hessian="kron", logdet="slq")
    with pytest.raises(ValueError, match="unknown hessian 'full'"):
        pe.laplace_evidence(linear_regression, X, y, hessian="full")


def test_linearised_predictive_is_the_exact_one_on_a_linear_model():
    X, y = _data()
    pyro.clear_param_store()
    exact = pe.laplace_evidence(linear_regression, X, y)
    ggn = pe.laplace_evidence(linear_regression, X, y, hessian="ggn")
    draws = exact.sample(50, seed=1)
    assert_close(laplace_rows(ggn, draws), laplace_rows(exact, draws), rtol=1e-10)


@pytest.mark.parametrize("hessian", ["ggn", "kron"])
def test_cv_laplace_predictive_in_a_curvature_matches_the_closed_form(hessian):
    """Linear-Gaussian: fold q's posterior (likelihood weighted by k/(k−1), eq. (1)) is Gaussian and its predictive
    ``N(y_i | x_iᵀm_q, 1/β + x_iᵀ S_q x_i)`` closed-form; the draws' estimate must match it to Monte-Carlo error."""
    X, y = _data(n=40)
    k = 4
    pyro.clear_param_store()
    cv = pe.cv_log_predictive(linear_regression, X, y, k=k, predictive="laplace", hessian=hessian, num_samples=20000)
    total = 0.0
    for q in range(k):
        test = torch.as_tensor(cv.folds == q)
        Xtr, ytr = X[~test], y[~test]
        S = torch.linalg.inv(torch.eye(3, dtype=torch.float64) + k / (k - 1) * Xtr.T @ Xtr)  # α = β = 1
        m = k / (k - 1) * S @ Xtr.T @ ytr
        var = 1.0 + ((X[test] @ S) * X[test]).sum(-1)
        total += torch.distributions.Normal(X[test] @ m, var.sqrt()).log_prob(y[test]).sum()
    assert abs(float(cv.value) - float(total)) < 0.05
