import math
import warnings

import pyro
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from torch.distributions import constraints

from pyro_evidence import Problem, hypergradient, laplace_evidence, select_hyperparameters
from pyro_evidence.datasets import standardize
from pyro_evidence.models import logistic_regression
from pyro_evidence.objectives import LaplaceObjective

from ..common import assert_close


def test_ift_exact_on_ridge_with_closed_form_solution():
    L, Q, _, theta, h, exact, _ = ridge()
    hg = hypergradient(L, Q, theta, h, method="ift-exact")
    assert_close(hg.grad, exact, rtol=1e-10)
    assert_close(hg.value, Q(theta, h), rtol=1e-14)
    assert_close(hg.partial, torch.zeros(8, dtype=torch.float64))


def test_hypergradient_checks_its_arguments():
    f = lambda t, h: (t**2).sum()  # noqa: E731
    with pytest.raises(ValueError, match="unknown method 'ift-magic'"):
        hypergradient(f, f, torch.zeros(2), torch.zeros(1), method="ift-magic")
    with pytest.raises(ValueError, match="flat 1-D"):
        hypergradient(f, f, torch.zeros(2, 2), torch.zeros(1))
    with pytest.raises(ValueError, match=r"outer loop.*select_hyperparameters\(method='hoag'\)"):
        hypergradient(f, f, torch.zeros(2), torch.zeros(1), method="hoag")


def test_the_registry_says_what_each_method_needs():
    from pyro_evidence.hypergrad import METHODS

    assert METHODS["ift-exact"].needs == {"hessian"} and METHODS["larsen"].needs == {"per_example"}
    assert METHODS["hypernetwork"].needs == {"hypernet"}
    assert all(METHODS[m].needs == {"trajectory"} for m in ("forward", "rmad", "truncated", "drmad"))
    assert all(not METHODS[m].needs for m in ("ift-cg", "ift-neumann", "t1-t2", "greedy", "darts"))


@pytest.fixture(scope="module")
def cancer():
    X, y = load_breast_cancer(return_X_y=True)
    X = standardize(torch.as_tensor(X[:200, :5]))
    return X, torch.as_tensor(y[:200], dtype=torch.float64)


def test_laplace_hypergradient_matches_finite_differences_on_logistic_regression(cancer):
    """The evidence of a logistic regression has no closed form: its total derivative keeps
    ∂Q/∂θ = −½ ∂ log det H/∂θ, which a central difference of log_evidence(h) checks."""
    X, y = cancer
    alpha = torch.tensor([0.3, 1.0, 3.0, 0.5, 2.0], dtype=torch.float64)
    problem = Problem(logistic_regression, X, y, model_kwargs={"ard": True})
    objective = LaplaceObjective(problem)
    h = alpha.log()
    theta = objective.solve(h).theta
    hg = hypergradient(objective.inner_loss, objective.validation, theta, h)

    def log_evidence(h_):
        pyro.clear_param_store()
        pyro.param("prior_precision", h_.exp(), constraint=constraints.positive)
        return float(laplace_evidence(logistic_regression, X, y, model_kwargs={"ard": True}).log_evidence)

    delta = 1e-4
    fd = torch.stack(
        [
            torch.tensor((log_evidence(h + delta * e) - log_evidence(h - delta * e)) / (2 * delta))
            for e in torch.eye(5, dtype=torch.float64)
        ]
    )
    assert_close(hg.grad, fd, rtol=1e-5)
    # and the log-det term matters: without it the gradient is visibly different
    assert (hg.grad - hg.partial).abs().max() > 1e-3
    assert (hg.partial - fd).abs().max() > 1e-3 * fd.abs().max()


# --- the whole family on ridge regression with a closed-form θ*(h) -----------------------


def ridge():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 8, dtype=torch.float64, generator=g)
    y = X @ torch.randn(8, dtype=torch.float64, generator=g) + 0.5 * torch.randn(60, dtype=torch.float64, generator=g)
    Xv = torch.randn(40, 8, dtype=torch.float64, generator=g)
    yv = Xv @ torch.ones(8, dtype=torch.float64)

    def per_example(theta, h):
        return 0.5 * (X @ theta - y) ** 2 + 0.5 * (h.exp() * theta**2).sum() / 60

    def inner_loss(theta, h):
        return per_example(theta, h).sum()

    def validation(theta, h):
        return -0.5 * ((Xv @ theta - yv) ** 2).sum()

    def theta_star(h):
        return torch.linalg.solve(X.T @ X + torch.diag(h.exp()), X.T @ y)

    h = torch.linspace(-1, 3, 8, dtype=torch.float64)
    exact = torch.func.grad(lambda h_: validation(theta_star(h_), h_))(h)
    return inner_loss, validation, per_example, theta_star(h), h, exact, X


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_ift_cg_reaches_the_exact_hypergradient_within_d_iterations():
    L, Q, _, theta, h, exact, _ = ridge()
    hg = hypergradient(L, Q, theta, h, method="ift-cg", tol=1e-12)
    assert hg.info["iterations"] <= 8
    assert_close(hg.grad, exact, rtol=1e-8)
    assert_close(hypergradient(L, Q, theta, h, method="ift-exact").grad, exact, rtol=1e-10)


def test_ift_cg_on_one_autograd_graph_equals_the_functional_products():
    """Outside transforms ift-cg runs on one retained autograd graph; inside, on torch.func's products:
    the same K iterates, so the same hypergradient to round-off, at any K."""
    from pyro_evidence.hypergrad.implicit import ift_cg

    L, Q, _, theta, h, _, _ = ridge()
    for k in (2, 5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # k < d: CG stops short, as asked
            graph = ift_cg(L, Q, theta, h, max_iter=k, tol=0.0)
            functional = ift_cg(L, Q, theta, h, max_iter=k, tol=0.0, mode="forward-over-reverse")
        assert graph.info["iterations"] == functional.info["iterations"] == k
        assert_close(graph.grad, functional.grad, rtol=1e-12)
        assert_close(graph.info["v"], functional.info["v"], rtol=1e-12)
        assert graph.info["residual"] == pytest.approx(functional.info["residual"], rel=1e-8)


def test_a_validation_that_is_not_a_scalar_is_named():
    L, _, _, theta, h, _, _ = ridge()
    with pytest.raises(ValueError, match="must return a scalar tensor"):
        hypergradient(L, lambda t, h_: t * 2.0, theta, h, method="ift-cg")


def test_ift_neumann_converges_term_by_term():
    L, Q, _, theta, h, exact, X = ridge()
    lam = float(torch.linalg.eigvalsh(X.T @ X + torch.diag(h.exp())).max())
    hg = hypergradient(L, Q, theta, h, method="ift-neumann", alpha=1 / lam, terms=20)
    residuals = hg.info["residuals"]
    assert all(b < a for a, b in zip(residuals, residuals[1:]))
    assert rel(hg.grad, exact) < 1e-3  # at 20 terms, α = 1/λ_max (condition number ≈ 3 here)
    assert rel(hypergradient(L, Q, theta, h, method="ift-neumann", alpha=1 / lam, terms=5).grad, exact) > 1e-3
    default = hypergradient(L, Q, theta, h, method="ift-neumann", terms=20)  # α by power iteration
    assert rel(default.grad, exact) < 1e-3


def test_t1_t2_and_larsen_are_biased_but_finite():
    L, Q, per_example, theta, h, exact, _ = ridge()
    t1t2 = hypergradient(L, Q, theta, h, method="t1-t2")
    lars = hypergradient(L, Q, theta, h, method="larsen", per_example=per_example)
    for hg in (t1t2, lars):
        assert torch.isfinite(hg.grad).all()
        assert rel(hg.grad, exact) > 1e-3  # they approximate H⁻¹; the bias is documented
    with pytest.raises(ValueError, match="per_example="):
        hypergradient(L, Q, theta, h, method="larsen")


def test_validation_that_depends_on_nothing_is_refused():
    L, _, _, theta, h, _, _ = ridge()
    with pytest.raises(ValueError, match="depends on neither theta nor h"):
        hypergradient(L, lambda t, h_: torch.tensor(1.0, dtype=torch.float64), theta, h)


def test_darts_agrees_with_greedy_to_second_order(cancer):
    """On the ELBO of a logistic regression: ∇_h L is not quadratic in θ = [μ, ρ] (the KL has
    softplus(ρ)²), so the central difference has a genuine O(ε²) error."""
    from pyro_evidence.objectives import ElboObjective

    X, y = cancer
    problem = Problem(logistic_regression, X, y, model_kwargs={"ard": True})
    objective = ElboObjective(problem, num_particles=16)
    h = torch.tensor([0.3, -0.5, 1.0, 0.2, -1.0], dtype=torch.float64)
    theta = objective.theta_init + 0.3
    L = objective.inner_loss

    def Q(t, h_):  # the validation ELBO of the first 50 rows
        prior, rows = objective._particle_split(t, h_, objective.eps)
        return rows[:, :50].mean(0).sum()

    g = hypergradient(L, Q, theta, h, method="greedy", lr=1e-2).grad
    errors = [rel(hypergradient(L, Q, theta, h, method="darts", lr=1e-2, eps=eps).grad, g) for eps in (0.4, 0.2)]
    assert 3.0 < errors[0] / errors[1] < 5.0  # halving ε quarters the error
    assert errors[1] < 1e-3


@pytest.mark.parametrize("objective", ["laplace", "elbo", "cv"])
@pytest.mark.parametrize("method", ["ift-exact", "ift-cg", "ift-neumann", "t1-t2", "larsen", "greedy", "darts", "hoag"])
def test_every_method_improves_every_objective(cancer, objective, method):
    X, y = cancer
    sel = select_hyperparameters(
        logistic_regression, X, y, objective=objective, method=method, max_steps=6, progress=False, lr=0.2
    )
    first = sel.history[0].objective
    assert float(sel.objective) > first


def test_hoag_reaches_the_same_optimum_as_ift_exact():
    from pyro_evidence.datasets import diabetes
    from pyro_evidence.models import linear_regression

    X, y = diabetes()
    exact = select_hyperparameters(linear_regression, X, y, progress=False)
    pyro.clear_param_store()
    hoag = select_hyperparameters(linear_regression, X, y, method="hoag", max_steps=1000, tol=1e-7, lr=0.5, progress=False)
    for name, value in exact.hyperparameters.items():
        assert_close(hoag.hyperparameters[name], value, rtol=1e-3)


def test_non_finite_hypergradient_stops_with_the_last_good_h():
    from pyro_evidence.datasets import diabetes
    from pyro_evidence.models import linear_regression

    def fragile(X, y=None):
        alpha = pyro.param("prior_precision", torch.tensor(1.0), constraint=constraints.positive)
        pyro.factor("cliff", torch.where(alpha > 5.0, torch.nan, 0.0))
        return linear_regression(X, y)

    X, y = diabetes()
    with pytest.warns(RuntimeWarning, match="not finite at outer step"):
        sel = select_hyperparameters(fragile, X, y, optimizer="adam", lr=0.3, max_steps=50, progress=False)
    assert not sel.converged
    assert float(sel.hyperparameters["prior_precision"]) <= 5.0
    assert all(math.isfinite(s.objective) for s in sel.history)
