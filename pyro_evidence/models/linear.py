"""Bayesian linear regression with a shared or per-feature (ARD) prior precision."""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from ..structure import gate


def linear_regression(X, y=None, ard: bool = False, precision_rate: float = 0.0, gated: bool = False):
    """
    ``w ~ N(0, A⁻¹)``, ``y | X, w ~ N(X w, β⁻¹ I)``.

    Hyperparameters: ``prior_precision`` (``A = α I``, or ``diag(α)`` with one precision per
    feature when ``ard=True``) and ``noise_precision`` (``β``). The evidence is the closed form
    ``N(y | 0, β⁻¹ I + X A⁻¹ Xᵀ)`` (Bishop 2006, eq. 3.86).

    ``precision_rate = r > 0`` adds ``−r·Σα`` to the log joint (``pyro.factor``): an exponential
    hyperprior on the prior precision, the ``lambda_2`` term of scikit-learn's ``BayesianRidge``.
    When the data carry no evidence for a weight, the type-II optimum of its precision is
    infinite; the hyperprior makes it finite (MAP-II) at a negligible cost elsewhere.

    ``gated=True`` switches each feature by a :func:`~pyro_evidence.structure.gate` (``y ~ N(X (g ⊙ w), β⁻¹ I)``,
    hyperparameter ``features_logits``): the structure for :func:`~pyro_evidence.structure.select_structure`.
    """
    d = X.shape[-1]
    alpha = pyro.param(
        "prior_precision",
        lambda: torch.ones(d) if ard else torch.tensor(1.0),
        constraint=constraints.positive,
    )
    beta = pyro.param("noise_precision", torch.tensor(1.0), constraint=constraints.positive)
    if precision_rate:
        pyro.factor("prior_precision_hyperprior", -precision_rate * alpha.sum())
    w = pyro.sample("w", dist.Normal(0.0, alpha.rsqrt()).expand([d]).to_event(1))
    if gated:
        w = gate("features", d) * w
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Normal(X @ w, beta.rsqrt()), obs=y)
