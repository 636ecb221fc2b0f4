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
from pyro_evidence.objectives.laplace import LaplaceObjective
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


@pytest.mark.parametrize("hessian", ["exact", "ggn"])
def test_logistic_hypergradient_matches_finite_differences(hessian):
    """A canonical GLM's GGN is its Hessian: with either in the implicit solve the hypergradient is exact."""
    X, y = _data(n=60)
    y = (y > 0).double()

    def evidence(a):
        _set("prior_precision", a)
        return float(pe.laplace_evidence(logistic_regression, X, y, hessian=hessian).log_evidence)

    a0 = torch.tensor(0.7, dtype=torch.float64)
    _set("prior_precision", a0)
    grad = pe.laplace_hypergradient(logistic_regression, X, y, hessian=hessian).grad
    assert_close(grad, _fd(evidence, a0.log().reshape(1)), rtol=1e-5)


def _dense(curvature, d):
    """The structured curvature as a dense matrix, column by column of its ``matvec``."""
    return torch.stack([curvature.matvec(e) for e in torch.eye(d, dtype=torch.float64)])


def _with_curvature_for_hessian(result, C, method_options=None):
    """``∂Q/∂h − (∂²L/∂h∂θ)ᵀ C⁻¹ ∂Q/∂θ`` at the result's mode: the implicit formula with ``C`` where ``H`` was."""
    problem, theta, h = result.problem, result.theta, result.problem.h_init
    objective = LaplaceObjective(problem, hessian=result.curvature.structure)
    g_theta, g_h = torch.func.grad(objective.validation, argnums=(0, 1))(theta, h)
    mixed = torch.func.jacrev(torch.func.grad(objective.inner_loss), argnums=1)(theta, h)  # (d, dh)
    return g_h - mixed.T @ torch.linalg.solve(C, g_theta)


def _structured_cases():
    """(label, model, X, y, kwargs, init, store): logistic regression with a shared and a per-weight precision, an
    MLP with per-layer precisions."""
    X, y = _data(n=60)
    Xc, yc = _classes(n=40)
    init = lambda site: {"w1": 0.5 * torch.randn(5, 4, generator=torch.Generator().manual_seed(5),  # noqa: E731
                                                 dtype=torch.float64)}.get(site["name"], site["fn"].mean)
    return [
        ("logistic", logistic_regression, X, (y > 0).double(), {}, None, {"prior_precision": torch.tensor(0.7)}),
        ("logistic-ard", logistic_regression, X, (y > 0).double(), {"ard": True}, None,
         {"prior_precision": torch.tensor([0.5, 1.0, 2.0])}),
        ("mlp", mlp_classifier, Xc, yc, MLP, init, {"prior_precision_1": torch.tensor(2.0), "prior_precision_2": torch.tensor(1.5)}),
    ]


@pytest.mark.parametrize("case, hessian", [(c, s) for c in range(3) for s in ("ggn", "diag", "kron") if (c, s) != (1, "kron")],
                         ids=lambda x: x if isinstance(x, str) else ["logistic", "logistic-ard", "mlp"][x])
@pytest.mark.parametrize("method", ["ift-exact", "ift-cg"])
def test_a_structure_stands_in_for_the_hessian_in_the_implicit_solve(case, hessian, method):
    """With ``hessian`` in ggn/diag/kron the hypergradient is ``∂Q/∂h − (∂²L/∂h∂θ)ᵀ C⁻¹ ∂Q/∂θ``, ``C`` that
    structure (positive definite; a network's Hessian away from its mode is not), built densely here."""
    label, model, X, y, kwargs, init, store = _structured_cases()[case]  # (kron refuses per-weight precisions)

    def reset():
        pyro.clear_param_store()
        for name, value in store.items():
            pyro.param(name, value.double(), constraint=constraints.positive)

    reset()
    r = pe.laplace_evidence(model, X, y, model_kwargs=kwargs, hessian=hessian, init_loc_fn=init)
    C = _dense(r.curvature, r.theta.numel())
    expected = _with_curvature_for_hessian(r, C)
    reset()
    hg = pe.laplace_hypergradient(model, X, y, model_kwargs=kwargs, hessian=hessian, init_loc_fn=init, method=method)
    assert_close(hg.grad, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("hessian, kron_bias", [("ggn", "joint"), ("diag", "joint"), ("kron", "joint"), ("kron", "separate")])
def test_the_structured_log_det_has_the_gradient_of_finite_differences(hessian, kron_bias):
    """``∂ log det C/∂θ`` and ``∂ log det C/∂h`` of each structure (the eigenvalues of the Kronecker factors for
    kron: no surrogate), against central differences along random directions."""
    X, y = _classes(n=40)
    pyro.clear_param_store()
    problem = Problem(mlp_classifier, X, y, model_kwargs=MLP)
    g = torch.Generator().manual_seed(7)
    theta = 0.5 * torch.randn(problem.theta_dim, generator=g, dtype=torch.float64)
    h = problem.h_init + 0.3 * torch.randn(problem.h_dim, generator=g, dtype=torch.float64)
    curv = LaplaceCurvature(problem, hessian, kron_bias=kron_bias)
    d_theta, d_h = torch.func.grad(curv.log_det, argnums=(0, 1))(theta, h)
    u, v, eps = torch.randn(problem.theta_dim, generator=g, dtype=torch.float64), torch.randn(problem.h_dim, generator=g, dtype=torch.float64), 1e-5
    fd_theta = (curv.log_det(theta + eps * u, h) - curv.log_det(theta - eps * u, h)) / (2 * eps)
    fd_h = (curv.log_det(theta, h + eps * v) - curv.log_det(theta, h - eps * v)) / (2 * eps)
    assert_close(d_theta @ u, fd_theta, rtol=1e-6)
    assert_close(d_h @ v, fd_h, rtol=1e-6)


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


def test_an_mlp_at_a_symmetric_start_is_refused_naming_the_layer():
    """From the prior mean (all-zero weights) the hidden units are interchangeable: the gradient vanishes at the
    saddle there and, with a positive definite GGN, the evidence used to come back with ``converged=True``."""
    X, y = _classes()
    pyro.clear_param_store()
    problem = Problem(mlp_classifier, X, y, model_kwargs=MLP)
    g = torch.func.grad(problem.loss)(problem.theta_init, problem.h_init)
    assert float(g[problem.latent_by_name["w1"].slice].abs().max()) == 0 == float(g[problem.latent_by_name["w2"].slice].abs().max())
    for call in (lambda: pe.laplace_evidence(mlp_classifier, X, y, model_kwargs=MLP, hessian="ggn"),
                 lambda: pe.laplace_evidence(mlp_classifier, X, y, model_kwargs=MLP, hessian="kron", at=problem.theta_init),
                 lambda: pe.select_hyperparameters(mlp_classifier, X, y, model_kwargs=MLP, progress=False)):
        with pytest.raises(ValueError, match=r"units of layer 'w1' are identical.*init_to_sample"):
            call()
    with pyro.poutine.seed(rng_seed=0), warnings.catch_warnings():
        warnings.simplefilter("error")
        r = pe.laplace_evidence(mlp_classifier, X, y, model_kwargs=MLP, hessian="ggn",
                                init_loc_fn=pyro.infer.autoguide.init_to_sample)
    assert math.isfinite(float(r.log_evidence)) and r.converged
    assert float(r.theta[problem.latent_by_name["w1"].slice].abs().max()) > 0.1


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


# --- where a layer's bias goes in K-FAC -------------------------------------------------------------------------


def test_kron_with_separate_biases_is_built_from_the_ggn_blocks_of_the_biases():
    """laplace-torch's convention by hand: each layer's weight ``A ⊗ B + αI`` with ``A`` the inputs' (no 1 appended)
    and ``B = G_bb / N``, ``G_bb`` the exact GGN block of the layer's bias (its input is 1); the bias alone
    ``G_bb + αI``. The joint convention appends the 1 to ``A`` instead."""
    X, y = _classes()
    pyro.clear_param_store()
    problem = Problem(mlp_classifier, X, y, model_kwargs=MLP)
    theta = 0.5 * torch.randn(problem.theta_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    h = problem.h_init
    G, v, a = _hand_ggn(problem, X, theta, h), problem.latent_values(theta, h), problem.params(h)
    n, site = X.shape[0], problem.latent_by_name
    layers = [(X, "b1", a["prior_precision_1"]), (torch.tanh(X @ v["w1"] + v["b1"]), "b2", a["prior_precision_2"])]
    separate = joint = 0
    for inputs, bias, alpha in layers:
        Gbb = G[site[bias].slice, site[bias].slice] - alpha * torch.eye(site[bias].numel, dtype=torch.float64)
        lam, mu = torch.linalg.eigvalsh(inputs.T @ inputs), torch.linalg.eigvalsh(Gbb / n)
        separate = separate + (torch.outer(lam, mu) + alpha).log().sum() + torch.logdet(Gbb + alpha * torch.eye(mu.numel()))
        ones = torch.cat([inputs, torch.ones(n, 1, dtype=torch.float64)], 1)
        joint = joint + (torch.outer(torch.linalg.eigvalsh(ones.T @ ones), mu) + alpha).log().sum()
    for convention, expected in (("separate", separate), ("joint", joint)):
        curv = LaplaceCurvature(problem, "kron", kron_bias=convention)
        assert_close(curv.curvature(theta, h).log_det, expected, rtol=1e-12)
    with pytest.raises(ValueError, match="unknown kron_bias 'both'"):
        LaplaceCurvature(problem, "kron", kron_bias="both")


def test_structures_equal_laplace_torchs_where_they_coincide():
    laplace = pytest.importorskip("laplace")
    X, y = _classes(n=50, d=5)
    pyro.clear_param_store()
    problem = Problem(mlp_classifier, X, y, model_kwargs=MLP)
    theta = 0.5 * torch.randn(problem.theta_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    h, (hidden, classes) = problem.h_init, (MLP["hidden"], MLP["classes"])
    v, a = problem.latent_values(theta, h), problem.params(h)
    net = torch.nn.Sequential(torch.nn.Linear(5, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, classes)).double()
    with torch.no_grad():
        for layer, w, b in ((net[0], "w1", "b1"), (net[2], "w2", "b2")):
            layer.weight.copy_(v[w].T)
            layer.bias.copy_(v[b])
    a1, a2 = float(a["prior_precision_1"]), float(a["prior_precision_2"])
    prior = torch.tensor([a1, a1, a2, a2], dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=len(y))
    # laplace-torch's full GGN carries round-off of ~1e-8 relative of its own (ours equals J^T Λ J built by hand
    # to 1e-15, test above); its diagonal and K-FAC agree to the last digits
    for theirs, ours, rtol in (("full", "ggn", 1e-8), ("diag", "diag", 1e-10), ("kron", "kron", 1e-10)):
        la = laplace.Laplace(net, "classification", subset_of_weights="all", hessian_structure=theirs, prior_precision=prior)
        la.fit(loader, progress_bar=False)
        curv = LaplaceCurvature(problem, ours, kron_bias="separate")
        assert_close(curv.curvature(theta, h).log_det, la.log_det_posterior_precision, rtol=rtol)


class _NoSquare(torch.overrides.TorchFunctionMode):
    """Records every torch call that takes or returns a floating matrix with two dimensions of at least ``d`` (the
    data's bytes, hashed for the selection's fingerprint, are no such matrix)."""

    def __init__(self, d):
        super().__init__()
        self.d, self.seen = d, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in (*args, *(kwargs or {}).values(), out):
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2 and min(x.shape[-2:]) >= self.d:
                self.seen.append(getattr(func, "__name__", str(func)))
        return out


@pytest.mark.filterwarnings("ignore:the selection ended:RuntimeWarning")  # three steps: not to convergence
@pytest.mark.parametrize("hessian", ["diag", "kron"])
def test_a_structure_forms_no_dense_matrix_anywhere(hessian, monkeypatch):
    """Evidence, hypergradients (both implicit methods) and a selection with ``diag``/``kron``: no torch call sees
    a d × d matrix, and neither the Hessian, the dense curvature nor Newton's dense steps are called."""
    import pyro_evidence.hypergrad.implicit as implicit
    import pyro_evidence.objectives.laplace as laplace
    import pyro_evidence.optim as optim

    def refuse(*args, **kwargs):
        raise AssertionError("a dense Hessian was formed")

    for module, name in ((optim, "value_grad_hessian"), (laplace, "value_grad_hessian"), (laplace, "hessian_and_value"),
                         (implicit, "value_grad_hessian"), (optim, "_newton")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(LaplaceCurvature, "dense", refuse)
    X, y = _classes(n=40)
    pyro.clear_param_store()
    init = pyro.infer.autoguide.init_to_sample
    with pyro.poutine.seed(rng_seed=0):
        problem = Problem(mlp_classifier, X, y, model_kwargs=MLP, init_loc_fn=init)
    spy = _NoSquare(problem.theta_dim)
    with spy, pyro.poutine.seed(rng_seed=0):
        r = pe.laplace_evidence(mlp_classifier, X, y, model_kwargs=MLP, hessian=hessian, init_loc_fn=init)
        for method in ("ift-exact", "ift-cg"):
            pe.laplace_hypergradient(mlp_classifier, X, y, model_kwargs=MLP, hessian=hessian, method=method, init_loc_fn=init)
        sel = pe.select_hyperparameters(mlp_classifier, X, y, model_kwargs=MLP, objective=pe.Laplace(hessian=hessian),
                                        method="ift-exact", max_steps=3, progress=False, init_loc_fn=init)
    assert r.converged and len(sel.history) == 3
    assert spy.seen == []


@pytest.mark.parametrize("hessian", ["diag", "kron"])
def test_a_non_finite_curvature_names_its_layer(hessian):
    X, y = _classes()
    pyro.clear_param_store()
    problem = Problem(mlp_classifier, X, y, model_kwargs=MLP)
    theta = 0.5 * torch.randn(problem.theta_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    theta[problem.latent_by_name["w2"].offset] = float("inf")  # the output layer's logits explode
    with pytest.raises(FloatingPointError, match=r"curvature of layer 'w2' is not finite: its output gradients"):
        LaplaceCurvature(problem, hessian).curvature(theta, problem.h_init)


@pytest.mark.parametrize("hessian, kron_bias", [("ggn", "joint"), ("diag", "joint"), ("kron", "joint"), ("kron", "separate")])
def test_at_is_the_selection_objective_at_the_point_given(hessian, kron_bias):
    """``laplace_evidence(..., at=θ)`` is the ``Q(θ, h)`` a selection maximises, at a network that is no mode."""
    X, y = _classes()
    pyro.clear_param_store()
    problem = Problem(mlp_classifier, X, y, model_kwargs=MLP)
    theta = 0.5 * torch.randn(problem.theta_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    r = pe.laplace_evidence(mlp_classifier, X, y, model_kwargs=MLP, hessian=hessian, kron_bias=kron_bias, at=theta)
    objective = LaplaceObjective(problem, hessian=hessian, kron_bias=kron_bias)
    assert_close(r.log_evidence, objective.validation(theta, problem.h_init), rtol=1e-12)
    assert_close(r.grad_norm, torch.func.grad(problem.loss)(theta, problem.h_init).norm(), rtol=1e-12)
    assert not r.converged and torch.equal(r.theta, theta)


@pytest.mark.parametrize("kron_bias", ["joint", "separate"])
def test_post_hoc_tuning_holds_the_network_and_reaches_the_maximum_of_its_evidence(kron_bias, monkeypatch):
    """``Laplace(hessian="kron", refit=False, at=θ)``: ``θ`` never moves, the layers' statistics are computed once
    (a classifier's logits do not move with ``h``), and the selection is the maximum of ``Q(θ, h)`` over ``h`` that
    scipy's L-BFGS-B finds from the same start."""
    import scipy.optimize

    computed, real = [], LaplaceCurvature._layer_stats
    monkeypatch.setattr(LaplaceCurvature, "_layer_stats", lambda self, *a: computed.append(1) or real(self, *a))

    X, y = _classes(n=60)
    pyro.clear_param_store()
    problem = Problem(mlp_classifier, X, y, model_kwargs=MLP)
    theta = 0.5 * torch.randn(problem.theta_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    spec = pe.Laplace(hessian="kron", kron_bias=kron_bias, refit=False, at=theta)
    sel = pe.select_hyperparameters(mlp_classifier, X, y, model_kwargs=MLP, objective=spec, progress=False)
    once = len(computed)
    objective = LaplaceObjective(problem, hessian="kron", kron_bias=kron_bias)

    def negative(z):
        z = torch.tensor(z, dtype=torch.float64, requires_grad=True)
        q = objective.validation(theta, z)
        return -float(q.detach()), -torch.autograd.grad(q, z)[0].numpy()

    best = scipy.optimize.minimize(negative, problem.h_init.numpy(), jac=True, method="L-BFGS-B",
                                   options={"gtol": 1e-12, "ftol": 1e-15})
    assert sel.converged and torch.equal(sel.theta, theta) and len(sel.history) > 3 and once == 1
    assert_close(sel.objective, -best.fun, rtol=1e-10)
    assert_close(sel.h, torch.as_tensor(best.x), rtol=1e-4)
    with pytest.raises(ValueError, match="goes with refit=False"):
        LaplaceObjective(problem, hessian="kron", at=theta)
    # at the held network, L and ‖∇_θ L‖ come from its held parts: those of the model run on all the data
    held = LaplaceObjective(problem, hessian="kron", kron_bias=kron_bias, refit=False, at=theta)
    for h in (problem.h_init, torch.as_tensor(best.x)):
        m = held.solve(h)
        assert_close(m.loss, problem.loss(theta, h), rtol=1e-12)
        assert_close(m.grad_norm, torch.func.grad(problem.loss)(theta, h).norm(), rtol=1e-10)


def test_statistics_are_not_held_where_the_likelihood_moves_with_h():
    """A regression's noise precision is a hyperparameter: its Fisher ``β`` weights the K-FAC factors, so they are
    recomputed at every ``h`` even with ``θ`` held, and ``Q`` is the closed form at that ``θ``."""
    X, y = _data()
    pyro.clear_param_store()
    problem = Problem(linear_regression, X, y)
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    objective = LaplaceObjective(problem, hessian="kron", refit=False, at=theta)
    objective.solve(problem.h_init)
    assert objective.curvature._held is None
    h = torch.tensor([0.4, -0.3], dtype=torch.float64)  # log α, log β
    alpha, beta = h.exp()
    C = beta * X.T @ X + alpha * torch.eye(3, dtype=torch.float64)
    log_joint = (torch.distributions.Normal(X @ theta, beta.rsqrt()).log_prob(y).sum()
                 + torch.distributions.Normal(torch.zeros(3, dtype=torch.float64), alpha.rsqrt()).log_prob(theta).sum())
    assert_close(objective.validation(theta, h), log_joint + 1.5 * LOG_2PI - 0.5 * torch.logdet(C), rtol=1e-12)


def test_the_prior_curvature_runs_on_one_row_only_where_the_prior_does_not_read_the_data():
    """``R`` (priors, Jacobians) is evaluated on the first row alone when that gives the same function; a prior
    scaled by the data keeps all of it, and its diagonal is still the one of the full data."""
    X, y = _data(n=30)

    def scaled(X, y=None):
        a = pyro.param("a", torch.tensor(1.0, dtype=torch.float64), constraint=constraints.positive)
        w = pyro.sample("w", dist.Normal(0.0, (a * X.pow(2).mean(0)).rsqrt()).to_event(1))  # reads every row
        with pyro.plate("data", X.shape[0]):
            return pyro.sample("y", dist.Normal(X @ w, 0.5), obs=y)

    for model, cut in ((linear_regression, True), (scaled, False)):
        pyro.clear_param_store()
        problem = Problem(model, X, y)
        curv = LaplaceCurvature(problem, "diag")
        curv.setup()
        assert (curv._one_row is not None) == cut
        theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
        expected = torch.func.hessian(lambda t: curv.split(t, problem.h_init)[2])(theta).diagonal()  # all the rows
        assert_close(curv.prior_diagonal(theta, problem.h_init), expected, rtol=1e-12)
    assert_close(expected, X.pow(2).mean(0), rtol=1e-12)  # a = 1
