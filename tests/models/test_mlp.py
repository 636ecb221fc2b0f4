import pyro
import torch
from torch.distributions import constraints

from pyro_evidence import Problem
from pyro_evidence.models import mlp_classifier
from pyro_evidence.structure import hard

from ..common import assert_close


def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 5, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 3, (30,), generator=g)


def log_joint(theta_seed=1, **kwargs):
    X, y = data()
    problem = Problem(mlp_classifier, X, y, model_kwargs={"hidden": 4, "classes": 3, **kwargs})
    theta = torch.randn(problem.theta_dim, generator=torch.Generator().manual_seed(theta_seed), dtype=torch.float64)
    return problem, theta, -problem.loss(theta, problem.h_init)


def test_unit_ard_with_equal_precisions_is_the_shared_precision_model():
    pyro.clear_param_store()
    _, _, shared = log_joint()
    pyro.clear_param_store()
    pyro.param("prior_precision_2", torch.full((4,), 4.0, dtype=torch.float64), constraint=constraints.positive)
    _, _, ard = log_joint(ard=True)
    assert_close(ard, shared, rtol=1e-12)


def test_unit_ard_gives_each_units_outgoing_weights_their_precision():
    pyro.clear_param_store()
    alpha = torch.tensor([0.5, 2.0, 8.0, 30.0], dtype=torch.float64)
    pyro.param("prior_precision_2", alpha, constraint=constraints.positive)
    problem, theta, _ = log_joint(ard=True)
    w = problem.latent_values(theta, problem.h_init)
    prior = torch.distributions.Normal(0.0, alpha.rsqrt()[:, None]).log_prob(w["w2"]).sum()
    prior_b2 = torch.distributions.Normal(0.0, alpha.mean().rsqrt()).log_prob(w["b2"]).sum()
    pyro.clear_param_store()
    pyro.param("prior_precision_2", alpha, constraint=constraints.positive)
    trace = pyro.poutine.trace(pyro.poutine.condition(mlp_classifier, data=w)).get_trace(*data(), hidden=4, classes=3, ard=True)
    assert_close(trace.nodes["w2"]["fn"].log_prob(w["w2"]).sum(), prior, rtol=1e-12)
    assert_close(trace.nodes["b2"]["fn"].log_prob(w["b2"]).sum(), prior_b2, rtol=1e-12)


def test_hard_gates_switch_units_off():
    # units 1 and 3 off: the logits are those of the network without them
    pyro.clear_param_store()
    pyro.param("units_logits", torch.tensor([3.0, -3.0, 3.0, -3.0], dtype=torch.float64))
    X, y = data()
    with hard():
        problem, theta, _ = log_joint(gated=True)
        w = problem.latent_values(theta, problem.h_init)
        trace = pyro.poutine.trace(pyro.poutine.condition(mlp_classifier, data=w)).get_trace(X, y, hidden=4, classes=3, gated=True)
    keep = torch.tensor([0, 2])
    expected = torch.tanh(X @ w["w1"][:, keep] + w["b1"][keep]) @ w["w2"][keep] + w["b2"]
    assert_close(trace.nodes["logits"]["value"], expected, rtol=1e-12)
