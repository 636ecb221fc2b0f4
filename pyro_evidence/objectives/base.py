"""The contract between objectives and hypergradient methods: ``L(θ, h)`` and ``Q(θ, h)``."""

from __future__ import annotations

import numpy as np
import torch

from ..optim import Minimum, at_point, minimize
from ..problem import Problem

__all__ = ["Objective"]


class Objective:
    """
    A bilevel problem over a :class:`~pyro_evidence.problem.Problem`:
    ``θ*(h) = argmin_θ L(θ, h)`` and ``h* = argmax_h Q(θ*(h), h)``.

    Subclasses define :meth:`inner_loss` and :meth:`validation` as pure functions of flat
    tensors; a hypergradient method sees nothing else, so any method serves any objective.
    """

    name: str = ""
    newton_max_dim: int = 2000  # the inner solver forms dense Hessians (Newton) up to this many parameters

    def __init__(self, problem: Problem, *, max_iter: int = 500, tol: float | None = None, newton_max_dim: int | None = None):
        self.problem = problem
        self.max_iter, self.tol = max_iter, tol
        if newton_max_dim is not None:
            if isinstance(newton_max_dim, bool) or not isinstance(newton_max_dim, int) or newton_max_dim < 0:
                raise ValueError(f"newton_max_dim must be a count ≥ 0 of inner parameters, got {newton_max_dim!r}")
            self.newton_max_dim = newton_max_dim

    @property
    def theta_init(self) -> torch.Tensor:
        return self.problem.theta_init

    @property
    def h_init(self) -> torch.Tensor:
        return self.problem.h_init

    def inner_loss(self, theta, h):
        raise NotImplementedError

    def validation(self, theta, h):
        raise NotImplementedError

    def weighted_loss(self, theta, h, weights):
        """``L`` with the row log-likelihoods multiplied by ``weights`` (shape ``(N,)``)."""
        raise NotImplementedError(f"objective {self.name!r} has no per-row weighted loss (minibatches)")

    def step_loss(self, batch_size: int, seed: int = 0):
        """``(θ, h, t) ↦ L`` on minibatch ``t``: ``batch_size`` rows drawn without replacement
        (seeded by ``seed`` and ``t``), their log-likelihood scaled by ``N / batch_size`` so
        that each step's loss is an unbiased estimate of the full one."""
        n = self.problem.num_data
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size must lie in [1, N = {n}], got {batch_size}")

        def loss(theta, h, t):
            # numpy draws the rows: no torch random op may run under a torch.func transform
            rows = np.random.default_rng([seed, t]).permutation(n)[:batch_size]
            weights = np.zeros(n)
            weights[rows] = n / batch_size
            weights = torch.as_tensor(weights, dtype=self.problem.dtype, device=self.problem.device)
            return self.weighted_loss(theta, h, weights)

        return loss

    def solve(self, h, theta0=None) -> Minimum:
        """The inner minimiser ``θ*(h)``, warm-started from ``theta0``."""
        theta0 = self.theta_init if theta0 is None else theta0
        h = h.detach()
        return minimize(
            lambda theta: self.inner_loss(theta, h), theta0, max_iter=self.max_iter, tol=self.tol,
            newton_max_dim=self.newton_max_dim, curvature=self.inner_curvature(h),
        )

    holds_theta = False  # True where θ does not move with h (post-hoc tuning): dQ/dh is then ∂Q/∂h

    def implicit_curvature(self, m, h):
        """The positive definite curvature that stands in for the inner Hessian in implicit hypergradients at the
        inner point ``m`` (its ``solve`` and ``matvec``), or None: the Hessian itself."""
        return None

    def inner_curvature(self, h):
        """``θ ↦`` the positive definite curvature the inner solve steps with (its ``solve``), or None: the
        Hessian itself (Newton, L-BFGS)."""
        return None

    def evaluate(self, h, theta) -> Minimum:
        """The inner problem at ``θ`` as given, with no solve: its loss and gradient norm, ``converged`` where
        that is within the inner solver's tolerance."""
        h = h.detach()
        return at_point(lambda t: self.inner_loss(t, h), theta, self.tol)
