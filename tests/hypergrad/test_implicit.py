import pyro
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from torch.distributions import constraints

from pyro_evidence import Problem, hypergradient, laplace_evidence
from pyro_evidence.datasets import standardize
from pyro_evidence.models import logistic_regression
from pyro_evidence.objectives import LaplaceObjective

from ..common import assert_close


def test_ift_exact_on_ridge_with_closed_form_solution():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, dtype=torch.float64, generator=g)
    y = X @ torch.randn(6, dtype=torch.float64, generator=g) + 0.3 * torch.randn(40, dtype=torch.float64, generator=g)
    Xv = torch.randn(30, 6, dtype=torch.float64, generator=g)
    yv = Xv @ torch.ones(6, dtype=torch.float64)

    def inner_loss(theta, h):
        return 0.5 * ((X @ theta - y) ** 2).sum() + 0.5 * (h.exp() * theta**2).sum()

    def validation(theta, h):
        return -0.5 * ((Xv @ theta - yv) ** 2).sum()

    def theta_star(h):
        return torch.linalg.solve(X.T @ X + torch.diag(h.exp()), X.T @ y)

    h = torch.linspace(-1, 2, 6, dtype=torch.float64)
    exact = torch.func.grad(lambda h_: validation(theta_star(h_), h_))(h)
    hg = hypergradient(inner_loss, validation, theta_star(h), h, method="ift-exact")
    assert_close(hg.grad, exact, rtol=1e-10)
    assert_close(hg.value, validation(theta_star(h), h), rtol=1e-14)
    assert_close(hg.partial, torch.zeros(6, dtype=torch.float64))


def test_hypergradient_checks_its_arguments():
    f = lambda t, h: (t**2).sum()  # noqa: E731
    with pytest.raises(ValueError, match="unknown method 'ift-magic'"):
        hypergradient(f, f, torch.zeros(2), torch.zeros(1), method="ift-magic")
    with pytest.raises(ValueError, match="flat 1-D"):
        hypergradient(f, f, torch.zeros(2, 2), torch.zeros(1))


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
