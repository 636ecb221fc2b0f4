"""The replayed log joint against the model run through Pyro (``Trace.log_prob_sum`` plus the log-Jacobians)."""

import functools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroSample
from torch.distributions import constraints
from torch.func import grad, vmap

from pyro_evidence import Problem
from pyro_evidence.datasets import ard_data, diabetes
from pyro_evidence.models import linear_regression, logistic_regression, mlp_classifier, polynomial_regression
from pyro_evidence.replay import Unreplayable, record

from .common import assert_close


def traced_log_joint(problem, theta, h):
    """The log joint of the model run through Pyro, by Pyro's own sum over the trace."""
    trace, log_jacobian = problem.trace(theta, h)
    return trace.log_prob_sum() + log_jacobian


def masked_model(X, y=None):
    alpha = pyro.param("alpha", torch.tensor(1.0), constraint=constraints.positive)
    w = pyro.sample("w", dist.Normal(0.0, alpha.rsqrt()).expand([X.shape[1]]).to_event(1))
    keep = torch.arange(X.shape[0]) % 3 != 0
    with pyro.plate("data", X.shape[0]), pyro.poutine.mask(mask=keep):
        return pyro.sample("y", dist.Normal(X @ w, 1.0), obs=y)


def positive_latents(X, y=None):
    """A noise scale and per-feature scales as latents: log-Jacobians of exp transforms."""
    rate = pyro.param("rate", torch.tensor(2.0), constraint=constraints.positive)
    sigma = pyro.sample("sigma", dist.Gamma(2.0, rate))
    tau = pyro.sample("tau", dist.HalfNormal(torch.ones(X.shape[1])).to_event(1))
    w = pyro.sample("w", dist.Normal(0.0, tau).to_event(1))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Normal(X @ w, sigma), obs=y)


def hierarchical(X, groups, y=None):
    """One intercept per group: the number of groups is read from the data."""
    k = int(groups.max()) + 1
    s = pyro.param("group_scale", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("groups", k):
        b = pyro.sample("b", dist.Normal(0.0, s))
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Normal(X @ w + b[groups], 0.5), obs=y)


class Regression(PyroModule):
    def __init__(self, d):
        super().__init__()
        self.fc = PyroModule[torch.nn.Linear](d, 1)
        self.fc.weight = PyroSample(lambda m: dist.Normal(0.0, pyro.param("a", torch.tensor(2.0), constraint=constraints.positive).rsqrt()).expand([1, d]).to_event(2))
        self.fc.bias = PyroSample(lambda m: dist.Normal(0.0, 1.0))

    def forward(self, X, y=None):
        mean = self.fc(X).squeeze(-1)  # outside the plate: the weights are not per row
        with pyro.plate("data", X.shape[0]):
            return pyro.sample("y", dist.Normal(mean, 1.0), obs=y)


def cases():
    X, y = diabetes()
    X, y = X[:120, :5], y[:120]
    labels = (y > 0).double()
    groups = torch.arange(120) % 4
    Xa, ya = ard_data(n=60, features=6, relevant=2, seed=0)[:2]
    return {
        "linear": (linear_regression, (X, y)),
        "linear-ard": (functools.partial(linear_regression, ard=True), (Xa, ya)),
        "polynomial": (functools.partial(polynomial_regression, degree=3), (X[:, 0], y)),
        "logistic": (logistic_regression, (X, labels)),
        "mlp": (functools.partial(mlp_classifier, hidden=4, classes=2), (X, labels.long())),
        "masked": (masked_model, (X, y)),
        "positive-latents": (positive_latents, (X, y)),
        "hierarchical": (hierarchical, (X, groups, y)),
        "pyro-module": (Regression(5), (X, y)),
    }


CASES = cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_replay_equals_the_traced_log_joint_and_its_gradients(name):
    model, args = CASES[name]
    pyro.clear_param_store()
    problem = Problem(model, *args)
    assert problem.unreplayable == {}
    g = torch.Generator().manual_seed(0)
    theta = problem.theta_init + 0.3 * torch.randn(problem.theta_dim, dtype=torch.float64, generator=g)
    h = problem.h_init + 0.2 * torch.randn(problem.h_dim, dtype=torch.float64, generator=g)
    truth = traced_log_joint(problem, theta, h)
    assert_close(problem.log_joint(theta, h), truth, rtol=1e-12)
    expected = grad(lambda t, u: traced_log_joint(problem, t, u), argnums=(0, 1))(theta, h)
    for got, want in zip(grad(problem.log_joint, argnums=(0, 1))(theta, h), expected):
        assert_close(got, want, rtol=1e-12, atol=1e-12)
    prior, rows = problem.terms(theta, h)
    assert_close(prior + rows.sum(), truth, rtol=1e-12)
    # under vmap: a batch of θ, each against its own trace
    batch = theta + 0.1 * torch.randn(3, problem.theta_dim, dtype=torch.float64, generator=g)
    assert_close(vmap(problem.log_joint, in_dims=(0, None))(batch, h),
                 torch.stack([traced_log_joint(problem, t, h) for t in batch]), rtol=1e-12)


def test_the_model_runs_once_per_recording():
    calls = []

    def counted(X, y=None):
        calls.append(1)
        return linear_regression(X, y)

    X, y = diabetes()
    problem = Problem(counted, X, y)
    before = len(calls)
    for _ in range(5):
        grad(problem.log_joint)(problem.theta_init, problem.h_init)
        problem.terms(problem.theta_init, problem.h_init)
    assert len(calls) == before
    # on other data the model runs (the recording belongs to the problem's own data)
    problem.log_joint(problem.theta_init, problem.h_init, args=(X[:10], y[:10]))
    assert len(calls) == before + 1


def test_a_branch_on_the_latents_is_detected_and_the_model_is_run_each_time():
    def branching(X, y=None):
        alpha = pyro.param("alpha", torch.tensor(1.0), constraint=constraints.positive)
        w = pyro.sample("w", dist.Normal(0.0, alpha.rsqrt()).expand([X.shape[1]]).to_event(1))
        if w.sum() > 0:  # the structure depends on θ: no recording can stand for both sides
            pyro.factor("push", -w.sum())
        with pyro.plate("data", X.shape[0]):
            return pyro.sample("y", dist.Normal(X @ w, 1.0), obs=y)

    X, y = diabetes()
    X = X[:, :3]
    problem = Problem(branching, X, y)
    assert "reads a value computed from its inputs" in problem.unreplayable["_log_joint"]
    for sign in (1.0, -1.0):
        theta = torch.full((3,), sign, dtype=torch.float64)
        assert_close(problem.log_joint(theta, problem.h_init), traced_log_joint(problem, theta, problem.h_init), rtol=1e-14)


def test_data_with_another_structure_gets_its_own_recording():
    model, (X, groups, y) = CASES["hierarchical"]
    pyro.clear_param_store()
    four = Problem(model, X, groups, y)
    six = Problem(model, X, torch.arange(120) % 6, y)
    assert (four.theta_dim, six.theta_dim) == (4 + 5, 6 + 5)
    for problem in (four, six):
        theta = torch.linspace(-1, 1, problem.theta_dim, dtype=torch.float64)
        assert_close(problem.log_joint(theta, problem.h_init), traced_log_joint(problem, theta, problem.h_init), rtol=1e-12)
    # the same model on other data of the same structure: with_args records it again
    other = four.with_args(X.flip(0), groups, y)
    theta = torch.linspace(-1, 1, other.theta_dim, dtype=torch.float64)
    assert_close(other.log_joint(theta, other.h_init), traced_log_joint(other, theta, other.h_init), rtol=1e-12)
    assert not torch.equal(other.log_joint(theta, other.h_init), four.log_joint(theta, four.h_init))


def test_a_constant_changed_in_place_after_use_is_refused():
    c = torch.ones(3, dtype=torch.float64)

    def fn(theta):
        a = (theta * c).sum()
        c.add_(1.0)  # the replay would see the changed constant in the first product too
        return a + (theta * c).sum()

    with pytest.raises(Unreplayable, match="changes in place a constant"):
        record(fn, torch.zeros(3, dtype=torch.float64))


def test_record_refuses_to_run_inside_a_transform():
    with pytest.raises(RuntimeError, match="outside torch.func transforms"):
        grad(lambda t: record(lambda x: x.sum(), t) and t.sum())(torch.zeros(2))


def test_fixed_params_are_constants_of_the_recording():
    X, y = diabetes()
    pyro.clear_param_store()
    problem = Problem(linear_regression, X, y, hyperparameters=["prior_precision"])
    theta = torch.linspace(-0.5, 0.5, problem.theta_dim, dtype=torch.float64)
    h = torch.tensor([0.3], dtype=torch.float64)
    assert_close(problem.log_joint(theta, h), traced_log_joint(problem, theta, h), rtol=1e-12)
