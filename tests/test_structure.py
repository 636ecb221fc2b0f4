import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyro_evidence import Problem, hypergradient, select_hyperparameters
from pyro_evidence.objectives import LaplaceObjective
from pyro_evidence.structure import (choice, gate, hard, particles, relaxed, relaxed_bernoulli, relaxed_one_hot,
                                     select_structure)

from .common import assert_close

RELEVANT = torch.tensor([2.0, -1.5, 1.0, 0.7, -0.5], dtype=torch.float64)


def gated_regression(X, y=None):
    g = gate("features", X.shape[1])
    alpha = pyro.param("prior_precision", torch.tensor(1.0), constraint=constraints.positive)
    beta = pyro.param("noise_precision", torch.tensor(1.0), constraint=constraints.positive)
    w = pyro.sample("w", dist.Normal(0.0, alpha.rsqrt()).expand([X.shape[1]]).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ (g * w), beta.rsqrt()), obs=y)


def regression(X, y=None):
    alpha = pyro.param("prior_precision", torch.tensor(1.0), constraint=constraints.positive)
    beta = pyro.param("noise_precision", torch.tensor(1.0), constraint=constraints.positive)
    w = pyro.sample("w", dist.Normal(0.0, alpha.rsqrt()).expand([X.shape[1]]).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, beta.rsqrt()), obs=y)


def ard_data(seed, n=100):
    """5 relevant features, then 15 irrelevant ones."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 20, generator=g, dtype=torch.float64)
    y = X[:, :5] @ RELEVANT + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return X, y


def evidence(model, X, y):
    pyro.clear_param_store()
    return float(select_hyperparameters(model, X, y, progress=False).objective)


@pytest.mark.parametrize("seed", range(5))
def test_relaxed_gates_select_the_relevant_features_of_an_ard_regression(seed):
    X, y = ard_data(seed)
    pyro.clear_param_store()
    result = select_structure(gated_regression, X, y, progress=False)
    p = result.probabilities["features"]
    assert bool((p[:5] > 0.5).all())  # the relaxation itself, at its lowest temperature
    assert int((p[5:] < 0.5).sum()) >= 12
    kept = result.structure["features"]
    assert kept[:5].tolist() == [1.0] * 5 and int(kept[5:].sum()) <= 3
    assert float(result.objective) >= evidence(regression, X, y)
    assert float(result.objective) >= evidence(regression, X[:, :5], y) - 1.0
    assert [t for t, _ in result.stages] == [1.0, 0.5, 0.2, 0.1]


def test_the_hard_structure_is_evaluated_exactly():
    # gates 1[ℓ > 0] on the first five features: the evidence is that of the five-feature model, to round-off
    X, y = ard_data(0)
    pyro.clear_param_store()
    pyro.param("features_logits", torch.cat([torch.full((5,), 3.0), torch.full((15,), -3.0)]))
    with hard():
        gated = float(select_hyperparameters(gated_regression, X, y, hyperparameters=["prior_precision", "noise_precision"],
                                             progress=False).objective)
    assert gated == pytest.approx(evidence(regression, X[:, :5], y), abs=1e-8)


def test_the_relaxed_stages_bound_dense_hessians_per_copy(monkeypatch):
    # the ELBO leaves 100+ guide parameters to L-BFGS alone; 8 copies of 10 weights' guides (160) are 8 small problems
    from pyro_evidence.objectives import base

    bounds, minimize = [], base.minimize
    monkeypatch.setattr(base, "minimize", lambda *a, **k: bounds.append(k["newton_max_dim"]) or minimize(*a, **k))
    X, y = ard_data(0, n=40)
    pyro.clear_param_store()
    result = select_structure(gated_regression, X[:, :10], y, objective="elbo", temperatures=(1.0,), max_steps=2,
                              progress=False, objective_options={"max_iter": 50})
    assert set(bounds) == {800, 100} and bounds[0] == 800 and bounds[-1] == 100  # the stage, then the exact structure
    assert len(result.stages) == 1


def test_gradients_through_the_relaxation_match_finite_differences():
    X, y = ard_data(1, n=40)
    X = X[:, :6]
    pyro.clear_param_store()
    pyro.param("features_logits", torch.linspace(-1.0, 1.5, 6))
    with relaxed(0.5, num_particles=2, seed=3):
        obj = LaplaceObjective(Problem(particles(gated_regression, 2), X, y))
        h = obj.problem.h_init.clone()
        m = obj.solve(h)
        hg = hypergradient(obj.inner_loss, obj.validation, m.theta, h, method="ift-exact", hessian=m.hessian)

        def Q(h_):
            return float(obj.validation(obj.solve(h_, m.theta).theta, h_))

        eps = 1e-5
        fd = torch.stack([torch.tensor((Q(h + eps * e) - Q(h - eps * e)) / (2 * eps)) for e in torch.eye(h.numel(), dtype=h.dtype)])
    assert_close(hg.grad, fd.to(hg.grad), rtol=1e-5, atol=1e-7)
    assert float(hg.grad[obj.problem.hypers[0].slice].abs().min()) > 1e-3  # every gate moves the evidence


def test_the_relaxations_are_pyros_concrete_samples_at_the_same_noise():
    logits, tau = torch.tensor([-1.0, 0.3, 2.0], dtype=torch.float64), 0.4
    with torch.random.fork_rng():
        torch.manual_seed(7)
        u = torch.rand(3, dtype=torch.float64)
        torch.manual_seed(7)
        expected = dist.RelaxedBernoulli(torch.tensor(tau, dtype=torch.float64), logits=logits).rsample()
        torch.manual_seed(7)
        expected_one_hot = dist.RelaxedOneHotCategorical(torch.tensor(tau, dtype=torch.float64), logits=logits).rsample()
    assert_close(relaxed_bernoulli(logits, u, tau), expected, rtol=1e-12)
    assert_close(relaxed_one_hot(logits, u, tau), expected_one_hot, rtol=1e-12)


def basis_model(X, y=None):
    c = choice("basis", 3)
    beta = pyro.param("noise_precision", torch.tensor(1.0), constraint=constraints.positive)
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    features = torch.stack([X, X.sin(), X**2], -1)  # three one-feature models
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(features @ (c * w), beta.rsqrt()), obs=y)


def test_a_relaxed_choice_selects_the_basis_that_made_the_data():
    g = torch.Generator().manual_seed(0)
    X = 3 * torch.rand(80, generator=g, dtype=torch.float64) - 1.5
    y = 1.2 * X.sin() + 0.1 * torch.randn(80, generator=g, dtype=torch.float64)
    pyro.clear_param_store()
    result = select_structure(basis_model, X, y, num_particles=4, progress=False)
    assert result.structure["basis"].tolist() == [0.0, 1.0, 0.0]
    assert float(result.probabilities["basis"][1]) > 0.5


def test_gates_outside_a_block_and_bad_structure_input():
    pyro.clear_param_store()
    assert_close(gate("g", 2, init=1.0), torch.sigmoid(torch.ones(2)))
    with hard():
        assert gate("g", 2).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="temperature must be > 0"):
        with relaxed(0.0):
            pass
    with pytest.raises(ValueError, match="choice 'c' needs n >= 2"):
        choice("c", 1)
    X, y = ard_data(0, n=20)
    with pytest.raises(ValueError, match="no gate\\(\\) or choice\\(\\) site"):
        select_structure(regression, X, y, progress=False)
    with pytest.raises(ValueError, match="temperatures must be"):
        select_structure(gated_regression, X, y, temperatures=(1.0, -0.1), progress=False)
    with pytest.raises(ValueError, match="num_particles"):
        select_structure(gated_regression, X, y, num_particles=0, progress=False)
    assert_close(gate("g", 2), torch.sigmoid(torch.ones(2)))  # every block restored what was there


DEGREES = (1, 3, 5)


def degree_choice(x, y=None):
    c = choice("degree", len(DEGREES))
    alpha = pyro.param("prior_precision", torch.tensor(1.0), constraint=constraints.positive)
    beta = pyro.param("noise_precision", torch.tensor(1.0), constraint=constraints.positive)
    mean = 0.0
    for k, degree in enumerate(DEGREES):
        w = pyro.sample(f"w{degree}", dist.Normal(0.0, alpha.rsqrt()).expand([degree + 1]).to_event(1))
        mean = mean + c[k] * (x.unsqueeze(-1) ** torch.arange(degree + 1, dtype=x.dtype) @ w)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(mean, beta.rsqrt()), obs=y)


def test_an_undecided_choice_is_settled_by_the_exact_objective_of_its_alternatives():
    import warnings

    from sklearn.linear_model import BayesianRidge

    from pyro_evidence.datasets import sin_data
    from pyro_evidence.structure import LOGITS, _settle, _switches, _write

    x, y = sin_data(30)
    names = _switches(degree_choice, (x, y), None)
    # the relaxation left it undecided, leaning to the worst alternative (before: argmax read out, undecided == [])
    _write(pyro.get_param_store(), LOGITS.format("degree"), torch.tensor([0.3, 0.0, -0.2], dtype=torch.float64))

    def exact():
        with hard():
            return select_hyperparameters(degree_choice, x, y, hyperparameters=["prior_precision", "noise_precision"],
                                          progress=False)

    best, settled = _settle(names, exact)
    evidence = []  # independent: each degree's type-II maximum (the unused alternatives' weights integrate to 1)
    for degree in DEGREES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            br = BayesianRidge(fit_intercept=False, alpha_1=0.0, alpha_2=0.0, lambda_1=0.0, lambda_2=0.0, tol=1e-12,
                               max_iter=100_000, compute_score=True)
            evidence.append(br.fit((x.unsqueeze(-1) ** torch.arange(degree + 1)).numpy(), y.numpy()).scores_[-1])
    winner = max(range(len(DEGREES)), key=lambda k: evidence[k])
    assert winner != 0
    assert int(pyro.param(LOGITS.format("degree")).argmax()) == winner
    assert_close(best.objective, evidence[winner], rtol=1e-6)
    assert [(name, index) for name, index, _ in settled] == [("degree", 1), ("degree", 2)]
    assert_close(settled[0][2], evidence[1] - evidence[0], rtol=1e-5)
