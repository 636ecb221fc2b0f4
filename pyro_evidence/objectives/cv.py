"""
k-fold cross-validation and hold-out validation as bilevel objectives (seed, "Cross-validation").

Split the data ``D = D₁ ⊔ … ⊔ D_k``; fold ``q`` has its own latents ``w_q`` fitted on ``D ∖ D_q``.
With ``θ = [w₁ … w_k]``, the seed's eq. (1) and validation function are

.. math::

    L(\\theta, h) = -\\frac{1}{k}\\sum_{q=1}^k \\left(\\frac{k}{k-1}
        \\log p(y \\setminus y_q \\mid X \\setminus X_q, w_q) + \\log p(w_q \\mid h)\\right),
    \\qquad
    Q(\\theta, h) = \\sum_{q=1}^k \\log p(y_q \\mid X_q, w_q),

only the observed sites' log-likelihood weighted by ``k/(k−1)`` (so each fold's likelihood
counts as much as the full data's), the prior term unweighted, and ``Q`` the held-out log
predictive density summed over every observation — the scale of ArviZ's ``elpd``.

Every fold sees all ``N`` rows with a 0/1 weight per row, so the ``k`` inner problems share one
shape and run under ``torch.func.vmap`` as one batched optimisation. Hold-out validation is the
same with one fold: ``L = −log p(y_train, w | h)``, ``Q = log p(y_val | X_val, ŵ)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import grad_and_value, jacrev, vmap

from ..optim import Minimum, minimize, newton
from ..problem import Problem
from .base import Objective

__all__ = ["CrossValidationObjective", "HoldoutObjective", "CrossValidation", "cv_log_predictive", "kfold"]


def kfold(n: int, k: int, stratify=None, seed: int = 0) -> np.ndarray:
    """The fold index of each of ``n`` rows: scikit-learn ``KFold(shuffle=True)``, or
    ``StratifiedKFold`` on the class labels ``stratify``."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if not isinstance(k, int) or k < 2 or k > n:
        raise ValueError(f"k must be an int with 2 <= k <= N = {n}, got {k!r}")
    folds = np.empty(n, dtype=np.int64)
    if stratify is None:
        splits = KFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(n))
    else:
        labels = np.asarray(stratify.cpu() if isinstance(stratify, torch.Tensor) else stratify).reshape(-1)
        if labels.shape[0] != n:
            raise ValueError(f"stratify has {labels.shape[0]} labels, the data have N = {n} rows")
        splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(n), labels)
    for q, (_, test) in enumerate(splits):
        folds[test] = q
    return folds


class _MaskedObjective(Objective):
    """Folds as 0/1 row weights: ``train`` and ``test`` of shape ``(k, N)``; ``θ`` stacks the
    ``k`` folds' latents."""

    def __init__(self, problem: Problem, train, test, train_scale: float, **options):
        super().__init__(problem, **options)
        self.train, self.test = train, test
        self.k = train.shape[0]
        self.train_scale = train_scale
        self._theta_init = problem.theta_init.repeat(self.k)

    @property
    def theta_init(self):
        return self._theta_init

    def fold_terms(self, theta, h):
        """``(prior, rows)`` of every fold, shapes ``(k,)`` and ``(k, N)``, by vmap."""
        return vmap(lambda t: self.problem.terms(t, h))(theta.reshape(self.k, -1))

    def inner_loss(self, theta, h):
        prior, rows = self.fold_terms(theta, h)
        return -(prior + self.train_scale * (self.train * rows).sum(-1)).sum() / self.k

    def validation(self, theta, h):
        _, rows = self.fold_terms(theta, h)
        return (self.test * rows).sum()

    def weighted_loss(self, theta, h, weights):
        prior, rows = self.fold_terms(theta, h)
        return -(prior + self.train_scale * (self.train * weights * rows).sum(-1)).sum() / self.k

    def per_example_loss(self, theta, h):
        """``L`` spread over (fold, row) pairs, flattened."""
        prior, rows = self.fold_terms(theta, h)
        n = rows.shape[-1]
        return (-(self.train_scale * self.train * rows + prior[:, None] / n) / self.k).reshape(-1)

    def solve(self, h, theta0=None):
        """Newton on all folds at once: the inner Hessian is block-diagonal, so each fold gets its
        own ``D × D`` Hessian, Cholesky factor and step length, all batched over folds; L-BFGS on
        the stacked latents where that cannot proceed."""
        theta0 = self.theta_init if theta0 is None else theta0
        d = self.problem.theta_dim
        if d == 0 or d > 2000:
            return super().solve(h, theta0)
        r = newton(self._fold_vgh(h.detach()), theta0.detach().reshape(self.k, d))
        if r.stuck:
            return super().solve(h, theta0)
        tol = torch.finfo(r.f.dtype).eps ** 0.5 if self.tol is None else self.tol
        converged = bool((r.g.norm(dim=-1) <= tol * r.f.abs().clamp(min=1.0)).all())
        return Minimum(r.theta.reshape(-1), r.f.sum(), float(r.g.reshape(-1).norm()), converged, 0, r.steps,
                       torch.block_diag(*r.H))

    def _fold_vgh(self, h):
        scale, problem = self.train_scale, self.problem

        def loss(w, train):
            prior, rows = problem.terms(w, h)
            return -(prior + scale * (train * rows).sum())

        def grad_aux(w, train):
            g, v = grad_and_value(loss)(w, train)
            return g, (g, v)

        batched = vmap(jacrev(grad_aux, has_aux=True))
        k = self.k

        def vgh(theta):
            H, (g, v) = batched(theta, self.train)
            return v / k, g / k, H / k  # the objective is the mean over folds

        return vgh

    def fold_loss(self, q, h):
        """``L_q(w, h)`` of fold ``q`` alone, for a per-fold loop."""
        train = self.train[q]

        def loss(w):
            prior, rows = self.problem.terms(w, h)
            return -(prior + self.train_scale * (train * rows).sum())

        return loss


class CrossValidationObjective(_MaskedObjective):
    """The seed's eq. (1) over ``k`` folds. ``folds`` holds the fold index of every row.

    :param int k: number of folds, ``2 ≤ k ≤ N``.
    :param stratify: class labels for ``StratifiedKFold`` (length ``N``), or None for ``KFold``.
    :param int seed: the shuffle's seed.
    """

    name = "cv"

    def __init__(self, problem: Problem, *, k: int = 4, stratify=None, seed: int = 0, **options):
        n = problem.num_data
        self.folds = kfold(n, k, stratify, seed)
        folds = torch.as_tensor(self.folds, device=problem.device)
        test = (folds[None, :] == torch.arange(k, device=problem.device)[:, None]).to(problem.dtype)
        super().__init__(problem, 1 - test, test, k / (k - 1), **options)


class HoldoutObjective(_MaskedObjective):
    """Hold-out validation: ``validation=`` either a tuple of validation data (same positional
    structure as the training data) or a fraction in ``(0, 1)`` of the rows, drawn with ``seed``."""

    name = "holdout"

    def __init__(self, problem: Problem, *, validation=0.25, seed: int = 0, **options):
        n_train = problem.num_data
        if isinstance(validation, tuple):
            if len(validation) != len(problem.args):
                raise ValueError(
                    f"validation= has {len(validation)} data arguments, the model takes {len(problem.args)}"
                )
            val, _, _ = _prepare(validation, problem)
            joined = tuple(
                None if a is None else torch.cat([a, b]) for a, b in zip(problem.args, val)
            )
            problem = problem.with_args(*joined)
            is_val = torch.zeros(problem.num_data, dtype=problem.dtype, device=problem.device)
            is_val[n_train:] = 1
        else:
            fraction = float(validation)
            if not 0 < fraction < 1:
                raise ValueError(f"the hold-out fraction must lie in (0, 1), got {validation}")
            g = torch.Generator().manual_seed(seed)
            n_val = max(1, int(round(fraction * n_train)))
            if n_val >= n_train:
                raise ValueError(f"a hold-out fraction of {fraction} leaves no training rows")
            is_val = torch.zeros(n_train, dtype=problem.dtype)
            is_val[torch.randperm(n_train, generator=g)[:n_val]] = 1
            is_val = is_val.to(problem.device)
        super().__init__(problem, (1 - is_val)[None], is_val[None], 1.0, **options)


def _prepare(args, problem):
    from ..problem import prepare_data

    return prepare_data(args, problem.dtype, problem.device)


@dataclass
class CrossValidation:
    """
    Result of :func:`cv_log_predictive`.

    :ivar value: ``Σ_q log p(y_q | X_q, w_q)``, the held-out log predictive density summed over
        all observations (ArviZ's ``elpd`` scale).
    :ivar per_fold: its ``k`` terms.
    :ivar folds: the fold index of every row.
    :ivar params: the per-fold latents, constrained, ``{site: tensor of shape (k, …)}``.
    :ivar theta: the folds' flat unconstrained latents, shape ``(k, D)``.
    :ivar pointwise: the held-out log predictive density of every row.
    """

    value: torch.Tensor
    per_fold: torch.Tensor
    folds: np.ndarray
    params: dict
    theta: torch.Tensor
    pointwise: torch.Tensor
    objective: CrossValidationObjective | None = field(default=None, repr=False)


def _fit_folds(objective, h, vectorize, max_iter):
    """Each fold's ``ŵ_q`` (shape ``(k, D)``) and its Hessian ``H_q`` (``(k, D, D)``; None above the dense limit),
    all folds in one batched solve or one after another."""
    problem, k = objective.problem, objective.k
    if not vectorize:
        fits = [minimize(objective.fold_loss(q, h), problem.theta_init, max_iter=max_iter) for q in range(k)]
        blocks = torch.stack([f.hessian for f in fits]) if all(f.hessian is not None for f in fits) else None
        return torch.stack([f.theta for f in fits]), blocks
    m = objective.solve(h)
    if m.hessian is None:
        return m.theta.reshape(k, -1), None
    d = problem.theta_dim  # the solve's Hessian is of the folds' mean: block q times k is H_q
    return m.theta.reshape(k, -1), torch.stack([m.hessian[q * d : (q + 1) * d, q * d : (q + 1) * d] for q in range(k)]) * k


def cv_log_predictive(
    model,
    *args,
    k: int = 4,
    stratify=None,
    seed: int = 0,
    predictive: str = "map",
    num_samples: int = 1000,
    vectorize_folds: bool = True,
    model_kwargs: dict | None = None,
    max_iter: int = 500,
    hessian: str = "exact",
) -> CrossValidation:
    """
    k-fold cross-validated log predictive density of a Pyro model (seed, eq. (1)), at the
    hyperparameters in the param store.

    :param int k: folds, ``2 ≤ k ≤ N``; splits by ``KFold(shuffle=True, random_state=seed)``, or
        ``StratifiedKFold`` when ``stratify=`` gives class labels.
    :param str predictive: ``"map"`` — plug-in density ``p(y_i | ŵ_q)``; ``"laplace"`` — the
        Laplace posterior predictive ``∫ p(y_i | w) N(w | ŵ_q, H_q⁻¹) dw``, by ``num_samples``
        draws (``H_q`` the Hessian of fold ``q``'s eq. (1) term).
    :param str hessian: ``predictive="laplace"``: ``"exact"`` (draws through the model itself, dense ``H_q``) or a
        curvature of :mod:`~pyro_evidence.objectives.curvature` (``"ggn"``, ``"diag"``, ``"kron"``): draws from
        ``N(0, C_q⁻¹)`` pushed through the model linearised at ``ŵ_q`` (the GLM predictive), at any size.
    :param bool vectorize_folds: train the ``k`` folds as one vmapped optimisation (default) or
        one after another in a Python loop (the same result; for comparison).
    :rtype: CrossValidation
    """
    if predictive not in ("map", "laplace"):
        raise ValueError(f"unknown predictive {predictive!r}; use 'map' or 'laplace'")
    problem = Problem(model, *args, model_kwargs=model_kwargs)
    objective = CrossValidationObjective(problem, k=k, stratify=stratify, seed=seed, max_iter=max_iter)
    h = problem.h_init
    theta, blocks = _fit_folds(objective, h, vectorize_folds, max_iter)
    _, rows = objective.fold_terms(theta.reshape(-1), h)
    if predictive == "laplace" and hessian != "exact":
        rows = _linearised_rows(problem, objective, theta, h, hessian, num_samples, seed)
    elif predictive == "laplace":
        if blocks is None:
            raise ValueError("predictive='laplace' with hessian='exact' needs the dense Hessian of each fold (a small "
                             "model); pass hessian='ggn', 'kron' or 'diag' for a large one")
        rows = _laplace_rows(problem, theta, blocks, h, num_samples, seed)
    per_row = (objective.test * rows).sum(0)
    per_fold = (objective.test * rows).sum(-1)
    params = {}
    for q in range(k):
        for name, value in problem.latent_values(theta[q], h).items():
            params.setdefault(name, []).append(value.detach())
    params = {name: torch.stack(v) for name, v in params.items()}
    return CrossValidation(per_fold.sum().detach(), per_fold.detach(), objective.folds, params, theta, per_row.detach(), objective)


def _linearised_rows(problem, objective, theta, h, hessian, num_samples, seed):
    """``log (1/S) Σ_s p(y_i | η(ŵ_q) + J δ_s)``, ``δ_s ~ N(0, C_q⁻¹)`` with ``C_q`` fold ``q``'s curvature (its
    training rows' likelihood weighted by ``k/(k−1)``, as in eq. (1)), for every fold and row."""
    from pyro.poutine.messenger import Messenger

    from .curvature import LaplaceCurvature

    class _ScaleObserved(Messenger):
        def _pyro_sample(self, msg):
            if msg["is_observed"]:
                msg["scale"] = msg["scale"] * objective.train_scale

    def scaled(*args, **kwargs):
        with _ScaleObserved():
            return problem.model(*args, **kwargs)

    full = LaplaceCurvature(problem, "ggn")  # the linearised model on all rows, found once for every fold
    out = []
    for q in range(theta.shape[0]):
        train = objective.train[q].bool()
        fold = Problem(scaled, *[None if a is None else a[train] for a in problem.args], model_kwargs=problem.model_kwargs)
        model = LaplaceCurvature(fold, hessian)
        deltas = model.sample(model.curvature(theta[q], h), num_samples, seed)
        out.append(full.linearised_rows(theta[q], h, deltas))  # (S, N): every row, the test ones used
    rows = torch.stack(out)
    return torch.logsumexp(rows, dim=1) - math.log(num_samples)


def _laplace_rows(problem, theta, blocks, h, num_samples, seed):
    """``log (1/S) Σ_s p(y_i | w_s)``, ``w_s ~ N(ŵ_q, H_q⁻¹)``, for every fold and row."""
    from .laplace import gaussian_draws

    draws = gaussian_draws(theta, blocks, num_samples, seed)  # (k, S, D)
    rows = vmap(vmap(lambda t: problem.terms(t, h)[1]))(draws)  # (k, S, N)
    return torch.logsumexp(rows, dim=1) - math.log(num_samples)
