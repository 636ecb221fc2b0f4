"""A one-hidden-layer Bayesian neural network classifier with per-layer prior precisions."""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from ..structure import gate


def mlp_classifier(X, y=None, hidden: int = 100, classes: int = 10, ard: bool = False, gated: bool = False):
    """
    ``logits = tanh(X W₁ + b₁) W₂ + b₂``, ``y ~ Categorical(logits)``, with
    ``W₁, b₁ ~ N(0, α₁⁻¹)`` and ``W₂, b₂ ~ N(0, α₂⁻¹)``: one prior precision per layer
    (hyperparameters ``prior_precision_1``, ``prior_precision_2``), initialised at the fan-in of
    each layer (``d`` and ``hidden``), so a prior draw has unit-scale pre-activations. The logits are
    recorded as the deterministic site ``"logits"``.

    The hidden units as a structure: ``ard=True`` gives each unit's outgoing weights (a row of ``W₂``) its own
    precision (``prior_precision_2`` of shape ``(hidden,)``; ``b₂`` takes their mean), so the evidence can switch
    a unit off by sending its precision to infinity; ``gated=True`` multiplies the units by a
    :func:`~pyro_evidence.structure.gate` (``tanh(X W₁ + b₁) ⊙ g``, hyperparameter ``units_logits``).
    """
    d = X.shape[-1]
    alpha1 = pyro.param("prior_precision_1", lambda: torch.tensor(float(d)), constraint=constraints.positive)
    alpha2 = pyro.param("prior_precision_2", lambda: torch.full((hidden,) if ard else (), float(hidden)), constraint=constraints.positive)
    s1, s2 = alpha1.rsqrt(), alpha2.rsqrt()
    w1 = pyro.sample("w1", dist.Normal(0.0, s1).expand([d, hidden]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, s1).expand([hidden]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, s2[..., None] if ard else s2).expand([hidden, classes]).to_event(2))
    b2 = pyro.sample("b2", dist.Normal(0.0, alpha2.mean().rsqrt()).expand([classes]).to_event(1))
    units = torch.tanh(X @ w1 + b1)
    if gated:
        units = units * gate("units", hidden)
    logits = pyro.deterministic("logits", units @ w2 + b2)
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Categorical(logits=logits), obs=y)
