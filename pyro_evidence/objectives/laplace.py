"""
The Laplace approximation of the evidence (MacKay 1992; Bishop 2006, §4.4).

With ``θ`` the latents in unconstrained space and ``ŵ = argmax_θ log p(y, θ | h)``,

.. math::

    \\log p(y \\mid h) \\approx \\log p(y, \\hat\\theta \\mid h) + \\frac{d}{2}\\log 2\\pi
        - \\frac{1}{2}\\log\\det H(\\hat\\theta, h),
    \\qquad H = -\\nabla^2_\\theta \\log p(y, \\theta \\mid h),

where the log joint includes the log-Jacobian of each latent's transform. It is exact when the
posterior of ``θ`` is Gaussian (a linear-Gaussian model).

As a bilevel objective ``L(θ, h) = −log p(y, θ | h)`` and ``Q(θ, h)`` is the right-hand side
above at ``θ``. ``Q`` depends on ``θ`` through ``H``, so the exact hypergradient keeps
``∂Q/∂θ = −½ ∂ log det H/∂θ`` (third derivatives); MacKay's fixed-point updates drop it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import pyro.distributions as dist
import torch

from ..hypergrad.linalg import cholesky, hessian_and_value, value_grad_hessian
from ..problem import Problem
from .base import Objective

__all__ = ["LaplaceObjective", "LaplaceEvidence", "laplace_evidence", "gaussian_draws"]

_LOG_2PI = math.log(2 * math.pi)


class LaplaceObjective(Objective):
    """``L = −log p(y, θ | h)``, ``Q`` = the Laplace log evidence at ``θ``.

    :param float jitter: added to the diagonal of ``H`` (reported, never silent).
    """

    name = "laplace"

    def __init__(self, problem: Problem, *, jitter: float = 0.0, **options):
        super().__init__(problem, **options)
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.jitter = jitter

    def inner_loss(self, theta, h):
        return self.problem.loss(theta, h)

    def weighted_loss(self, theta, h, weights):
        prior, rows = self.problem.terms(theta, h)
        return -(prior + (weights * rows).sum())

    def per_example_loss(self, theta, h):
        """``L`` spread over the rows: ``−log p(y_i | w) − (log p(w | h) + log|J|) / N``."""
        prior, rows = self.problem.terms(theta, h)
        return -rows - prior / rows.shape[-1]

    def validation(self, theta, h):
        H, loss = hessian_and_value(self.problem.loss, theta, h)
        half_log_det = cholesky(H, self.jitter).diagonal().log().sum()
        return -loss + 0.5 * theta.shape[-1] * _LOG_2PI - half_log_det


def gaussian_draws(mean, precision, num_samples: int, seed: int = 0):
    """``num_samples`` draws of ``N(mean, precision⁻¹)`` (batched over leading dimensions):
    ``mean + L⁻ᵀ ε`` with ``precision = L Lᵀ``. Shape ``(…, num_samples, d)``."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(*mean.shape[:-1], num_samples, mean.shape[-1], generator=g, dtype=torch.float64).to(mean)
    factor = torch.linalg.cholesky(precision)
    return mean.unsqueeze(-2) + torch.linalg.solve_triangular(factor.mT, eps.mT, upper=True).mT


@dataclass
class LaplaceEvidence:
    """
    Result of :func:`laplace_evidence`.

    :ivar log_evidence: the Laplace approximation of ``log p(y | h)`` (0-dim tensor).
    :ivar map: constrained latent values at the mode, ``{site: tensor}``.
    :ivar hessian: ``H``, the Hessian of ``−log p(y, θ | h)`` in unconstrained ``θ``
        (jitter included).
    :ivar log_det: ``log det H``.
    :ivar converged: whether the inner optimiser reached a stationary point.
    :ivar grad_norm: ``‖∇_θ L‖`` at the returned mode.
    :ivar theta: the mode in flat unconstrained coordinates.
    :ivar jitter: what was added to the diagonal of ``H``.
    """

    log_evidence: torch.Tensor
    map: dict
    hessian: torch.Tensor
    log_det: torch.Tensor
    converged: bool
    grad_norm: float
    theta: torch.Tensor
    jitter: float = 0.0
    problem: Problem | None = field(default=None, repr=False)

    def posterior(self) -> dist.MultivariateNormal:
        """The Laplace posterior ``N(θ̂, H⁻¹)`` over unconstrained ``θ``."""
        return dist.MultivariateNormal(self.theta, precision_matrix=self.hessian)


def laplace_evidence(
    model,
    *args,
    model_kwargs: dict | None = None,
    theta_init: torch.Tensor | None = None,
    jitter: float = 0.0,
    max_iter: int = 500,
    tol: float | None = None,
) -> LaplaceEvidence:
    """
    Laplace approximation of the log evidence ``log p(y | h)`` of a Pyro model, the
    hyperparameters ``h`` being its ``pyro.param`` values in the param store.

    The mode is found by L-BFGS (strong-Wolfe line search) and polished by Newton steps with
    the dense autograd Hessian until the gradient is at round-off level; ``log det H`` comes from
    its Cholesky factor.

    :param model: a Pyro model; its positional arguments are the data.
    :param args: the data (tensors sharing their first dimension); the computation follows their
        device and dtype.
    :param dict model_kwargs: keyword arguments for the model.
    :param theta_init: flat unconstrained warm start (e.g. a previous result's ``theta``).
    :param float jitter: add ``jitter·I`` to ``H`` when it is not positive definite.
    :param int max_iter: L-BFGS iterations at most.
    :param float tol: relative gradient-norm tolerance of the inner optimiser.
    :rtype: LaplaceEvidence
    """
    problem = Problem(model, *args, model_kwargs=model_kwargs)
    return _laplace_at(problem, problem.h_init, theta_init, jitter, max_iter, tol)


def _laplace_at(problem, h, theta_init, jitter, max_iter, tol) -> LaplaceEvidence:
    objective = LaplaceObjective(problem, jitter=jitter, max_iter=max_iter, tol=tol)
    if theta_init is not None:
        theta_init = torch.as_tensor(theta_init, dtype=problem.dtype, device=problem.device)
        if theta_init.shape != problem.theta_init.shape:
            raise ValueError(
                f"theta_init has shape {tuple(theta_init.shape)}, the model's flat latents have "
                f"shape {tuple(problem.theta_init.shape)}"
            )
    m = objective.solve(h, theta_init)
    if not m.converged:
        warnings.warn(
            f"the inner optimiser stopped with gradient norm {m.grad_norm:.3g}, not at a "
            "stationary point; the Laplace evidence may be off (raise max_iter=)",
            RuntimeWarning,
            stacklevel=3,
        )
    theta, H = m.theta, m.hessian
    if H is None:  # the inner solver works without a dense Hessian above newton_max_dim
        _, _, H = value_grad_hessian(lambda t: problem.loss(t, h), theta)
    if jitter:
        H = H + jitter * torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    factor = cholesky(H)
    log_det = 2 * factor.diagonal().log().sum()
    d = theta.numel()
    log_evidence = -m.loss + 0.5 * d * _LOG_2PI - 0.5 * log_det
    return LaplaceEvidence(
        log_evidence=log_evidence.detach(),
        map={k: v.detach() for k, v in problem.latent_values(theta, h).items()},
        hessian=H.detach(),
        log_det=log_det.detach(),
        converged=m.converged,
        grad_norm=m.grad_norm,
        theta=theta,
        jitter=jitter,
        problem=problem,
    )
