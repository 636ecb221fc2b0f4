"""
The evidence lower bound with a diagonal Gaussian posterior (Graves 2011; seed, "ELBO").

With ``q(z) = N(μ_q, diag σ_q²)`` over the model's latents ``z`` in unconstrained space and
``w = T(z)`` the constrained latents,

.. math::

    \\log p(y \\mid h) \\ge \\mathrm{ELBO}(q, h)
        = \\mathbb{E}_q\\left[\\log p(y \\mid w) + \\log p(w \\mid h) + \\log|\\det J_T(z)|\\right]
          + \\mathbb{H}[q].

Wherever a latent site is real-valued and Pyro knows ``KL(q_site ‖ p_site)`` in closed form
(a Gaussian prior ``N(μ, A⁻¹)``: ``½(tr(A A_q⁻¹) + (μ − μ_q)ᵀ A (μ − μ_q) − u + ln|A⁻¹| − ln|A_q⁻¹|)``),
the site's prior term and entropy are replaced by ``−KL`` (``TraceMeanField_ELBO`` semantics); the
rest is a Monte-Carlo average over reparameterised particles ``z = μ_q + σ_q ⊙ ε``.

The particles are drawn in a batch by ``torch.func.vmap`` over the functional log joint, so
models written for one draw (``X @ w``) need no change. The inner fit uses a sample average
approximation: one fixed set of particles, antithetic (``±ε``, so their mean is exactly zero) and,
where there are more particles than latents, whitened to an exactly identity second moment — for a
linear-Gaussian model the estimate is then exact, so a deterministic optimiser reaches the optimal
mean-field ``q`` itself. The reported ELBO is re-estimated on fresh independent particles, with its
Monte-Carlo standard error.

As a bilevel objective (seed: ``L = −Q``) ``θ = [μ_q, softplus⁻¹(σ_q)]`` and
``L(θ, h) = −Q(θ, h) = −ELBO``; at the inner optimum ``∂Q/∂θ = 0``, so every implicit
hypergradient reduces to ``∂Q/∂h``.

Reference: A. Graves, *Practical variational inference for neural networks*, NeurIPS 2011.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.infer.autoguide.utils import deep_setattr
from torch.distributions import constraints, kl_divergence
from torch.func import vmap

from ..compat import autodiagonal_latents, autonormal_loc_scale, setup_prototype
from ..problem import Problem, split_by_row
from ..util import seeded
from .base import Objective

__all__ = ["ElboObjective", "ElboEvidence", "elbo_evidence", "standard_normal_particles"]

_HALF_LOG_2PI_E = 0.5 * (1.0 + math.log(2 * math.pi))


def softplus_inv(x):
    """``softplus⁻¹(x) = x + log(−expm1(−x))`` for ``x > 0``."""
    return x + torch.log(-torch.expm1(-x))


def standard_normal_particles(num: int, dim: int, seed: int, dtype, device):
    """
    ``num`` draws of ``N(0, I_dim)`` with exactly zero mean (antithetic pairs) and, when
    ``num ≥ 2·dim − 1`` (enough pairs to span every direction), exactly identity second moment
    ``(1/num) Σ ε εᵀ = I`` (whitened). Drawn on the CPU in float64, so that every device gets the
    same particles.
    """
    if num < 2:
        raise ValueError(f"num_particles must be >= 2, got {num}")
    g = torch.Generator().manual_seed(seed)
    return _antithetic(torch.randn((num + 1) // 2, dim, generator=g, dtype=torch.float64), num).to(dtype=dtype, device=device)


def _antithetic(half, num):
    """``num`` particles from the draws ``half``: the pairs ``±ε``, centred, whitened where they span."""
    eps = torch.cat([half, -half])[:num]
    eps = eps - eps.mean(0)
    dim = eps.shape[1]
    if (num + 1) // 2 >= dim > 0:
        factor, _ = torch.linalg.cholesky_ex(eps.T @ eps / num)  # _ex: no check, which would stall a GPU
        eps = torch.linalg.solve_triangular(factor, eps.T, upper=False).T
    return eps


class ElboObjective(Objective):
    """``Q(θ, h) = ELBO`` of ``q = N(μ_q, diag softplus(ρ)²)``, ``θ = [μ_q, ρ]``; ``L = −Q``.

    :param int num_particles: particles of the sample average approximation (fixed per objective).
    :param int seed: seed of those particles.
    :param float init_scale: initial ``σ_q``.
    """

    name = "elbo"
    # A dense Hessian of the particle-averaged ELBO costs 2d gradient passes per particle: above 100 guide
    # parameters Newton's polish costs more than the whole first-order fit, so L-BFGS works alone.
    newton_max_dim = 100

    def __init__(self, problem: Problem, *, num_particles: int = 64, seed: int = 0, init_scale: float = 0.1, **options):
        super().__init__(problem, **options)
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        self.dim = problem.theta_dim
        self.num_particles, self.seed = num_particles, seed
        self.eps = standard_normal_particles(num_particles, self.dim, seed, problem.dtype, problem.device)
        self._theta_init = torch.cat(
            [problem.theta_init, softplus_inv(torch.full_like(problem.theta_init, init_scale))]
        )
        self.analytic = self._analytic_sites()

    @property
    def theta_init(self):
        return self._theta_init

    def _analytic_sites(self) -> frozenset:
        """Latent sites whose KL(q ‖ prior) Pyro has in closed form (real support, known pair)."""
        trace, _ = self.problem.trace(self.problem.theta_init, self.problem.h_init)
        names = set()
        for site in self.problem.latents:
            fn = trace.nodes[site.name]["fn"]
            if not _is_real(fn.support) or site.free is not None:  # a closed-form KL would count held elements
                continue
            q = dist.Normal(torch.zeros(site.shape, dtype=self.problem.dtype, device=self.problem.device), 1.0)
            q = q.to_event(fn.event_dim) if fn.event_dim else q
            try:
                kl_divergence(q, fn)
            except NotImplementedError:
                continue
            names.add(site.name)
        return frozenset(names)

    def loc_scale(self, theta):
        # floored at tiny^¼ (1e-10 in float32), whose square still has room below it: a line
        # search's trial point far out on the raw scale then costs a finite, huge loss and is
        # rejected, where a scale of 0 would give inf and then NaN
        return theta[..., : self.dim], F.softplus(theta[..., self.dim :]).clamp_min(torch.finfo(theta.dtype).tiny ** 0.25)

    def _particle_split(self, theta, h, eps):
        """Per particle, ``(prior, rows)``: ``log p(w) + log|J|`` with ``−KL`` standing in for the
        analytic sites, and the per-row log-likelihood (observed sites in a plate of size N)."""
        loc, scale = self.loc_scale(theta)
        problem = self.problem
        n = problem.num_data

        def kl(name, site):
            if name not in self.analytic:
                return None
            s, fn = problem.latent_by_name[name], site["fn"]
            # values from the optimiser, not the user: a NaN gives a NaN loss (handled as non-finite
            # by the callers), not an exception from argument validation
            q = dist.Normal(loc[s.slice].reshape(s.shape), scale[s.slice].reshape(s.shape), validate_args=False)
            q = q.to_event(fn.event_dim) if fn.event_dim else q
            return -(kl_divergence(q, fn) * site["scale"]).sum()

        def one(e):
            trace, log_jacobian = problem.trace(loc + scale * e, h)
            prior, rows = split_by_row(trace, log_jacobian, n, override=kl)
            return prior, torch.zeros(n, dtype=theta.dtype, device=theta.device) if rows is None else rows

        return vmap(one)(eps)

    def _particle_terms(self, theta, h, eps):
        prior, rows = self._particle_split(theta, h, eps)
        return prior + rows.sum(-1)

    def per_example_loss(self, theta, h):
        """``L`` spread over the rows: ``−E_q[log p(y_i | w)] − (E_q[log p(w)] + H[q]) / N``."""
        prior, rows = self._particle_split(theta, h, self.eps)
        return -rows.mean(0) - (prior.mean() + self._entropy(theta)) / rows.shape[-1]

    def _entropy(self, theta):
        """Entropy of q over the sites without a closed-form KL."""
        _, scale = self.loc_scale(theta)
        total = theta.new_zeros(())
        for s in self.problem.latents:
            if s.name not in self.analytic:
                total = total + scale[s.slice].log().sum() + s.numel * _HALF_LOG_2PI_E
        return total

    def validation(self, theta, h):
        return self._particle_terms(theta, h, self.eps).mean() + self._entropy(theta)

    def inner_loss(self, theta, h):
        return -self.validation(theta, h)

    def estimate(self, theta, h, num_particles: int = 1000, seed: int = 1):
        """Unbiased ELBO estimate on fresh i.i.d. particles and its Monte-Carlo standard error."""
        g = torch.Generator().manual_seed(seed)
        eps = torch.randn(num_particles, self.dim, generator=g, dtype=torch.float64)
        eps = eps.to(dtype=self.problem.dtype, device=self.problem.device)
        with torch.no_grad():
            values = self._particle_terms(theta, h, eps)
            entropy = self._entropy(theta)
        return values.mean() + entropy, values.std() / math.sqrt(num_particles)


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real or type(support) is type(constraints.real)


# --- Pyro guides ↔ θ ---------------------------------------------------------------------


def _check_guide(guide):
    if not isinstance(guide, (AutoDiagonalNormal, AutoNormal)):
        raise TypeError(
            f"guide must be a diagonal Gaussian guide (AutoDiagonalNormal or AutoNormal), got "
            f"{type(guide).__name__}"
        )


def guide_loc_scale(guide) -> dict:
    """``{site: (μ_q, σ_q)}`` of a diagonal Gaussian guide, in each site's unconstrained shape."""
    _check_guide(guide)
    if guide.prototype_trace is None:
        raise ValueError("the guide has not been run yet: call it once or fit it first")
    if isinstance(guide, AutoDiagonalNormal):
        loc = dict((site["name"], v) for site, v in autodiagonal_latents(guide, guide.loc))
        scale = dict((site["name"], v) for site, v in autodiagonal_latents(guide, guide.scale))
        return {name: (loc[name].detach(), scale[name].detach()) for name in loc}
    out = {}
    for name, _ in guide.prototype_trace.iter_stochastic_nodes():
        loc, scale = autonormal_loc_scale(guide, name)
        out[name] = (loc.detach(), scale.detach())
    return out


def _setup_guide(guide, problem: Problem):
    from ..problem import Discover

    if guide.prototype_trace is None:
        # cast params to the data's dtype and device inside the model itself, for the prototype's run
        setup_prototype(guide, Discover(problem.dtype, problem.device), *problem.args, **problem.model_kwargs)


def _set_guide(guide, problem: Problem, loc, scale):
    """Writes flat ``loc``, ``scale`` (problem layout) into a guide, building its prototype. The elements held out
    of ``θ`` (:class:`~pyro_evidence.problem.LatentSite`'s ``free``) get their held value and a scale of 1: nothing
    reads them."""
    _setup_guide(guide, problem)
    with torch.no_grad():
        locs = {s.name: s.unflatten(loc.detach()) for s in problem.latents}
        scales = {s.name: s.unflatten(scale.detach(), fill=1.0) for s in problem.latents}
        if isinstance(guide, AutoDiagonalNormal):
            guide.loc = torch.nn.Parameter(torch.cat([v.reshape(-1) for v in locs.values()]))
            guide.scale = pyro.nn.PyroParam(torch.cat([v.reshape(-1) for v in scales.values()]), guide.scale_constraint)
        else:
            for s in problem.latents:
                deep_setattr(guide.locs, s.name, torch.nn.Parameter(locs[s.name].clone()))
                deep_setattr(guide.scales, s.name, pyro.nn.PyroParam(scales[s.name].clone(), guide.scale_constraint))
    return guide


def _theta_from_guide(guide, problem: Problem):
    ls = guide_loc_scale(guide)
    missing = [s.name for s in problem.latents if s.name not in ls]
    if missing:
        raise ValueError(f"the guide has no parameters for latent site {missing[0]!r}")
    loc = torch.cat([s.flatten(ls[s.name][0]) for s in problem.latents])
    scale = torch.cat([s.flatten(ls[s.name][1]) for s in problem.latents])
    kw = {"dtype": problem.dtype, "device": problem.device}
    return torch.cat([loc.to(**kw), softplus_inv(scale.to(**kw))])


@dataclass
class ElboEvidence:
    """
    Result of :func:`elbo_evidence`.

    :ivar elbo: Monte-Carlo estimate of the ELBO at the fitted guide (fresh i.i.d. particles).
    :ivar stderr: its Monte-Carlo standard error.
    :ivar guide: the fitted Pyro guide (``AutoDiagonalNormal`` unless one was given).
    :ivar num_steps: optimiser iterations.
    :ivar converged: whether the gradient of the fixed-particle ELBO at the fit is below the
        inner solver's tolerance (measured for both optimisers; ``adam``, whose particles change
        every step, rarely gets there).
    :ivar theta: ``[μ_q, softplus⁻¹(σ_q)]``, flat, in the problem's layout.
    :ivar grad_norm: ``‖∇_θ ELBO‖`` on the fixed particles at the fit.
    """

    elbo: torch.Tensor
    stderr: torch.Tensor
    guide: object
    num_steps: int
    converged: bool
    theta: torch.Tensor
    objective: ElboObjective | None = field(default=None, repr=False)
    grad_norm: float = math.nan

    @property
    def value(self) -> torch.Tensor:
        """The result's main value, ``elbo`` (every result calls its main value ``value``)."""
        return self.elbo


def elbo_evidence(
    model,
    *args,
    guide=None,
    model_kwargs: dict | None = None,
    num_particles: int = 64,
    num_eval_particles: int = 1000,
    seed: int = 0,
    optimizer: str = "lbfgs",
    max_iter: int = 1000,
    lr: float = 0.01,
    init_scale: float = 0.1,
) -> ElboEvidence:
    """
    Fits a diagonal Gaussian guide to a Pyro model by maximising the ELBO, the hyperparameters
    being the model's ``pyro.param`` values in the param store.

    :param guide: an ``AutoDiagonalNormal`` or ``AutoNormal`` of the model, fitted or not (its
        values are the starting point); a new ``AutoDiagonalNormal`` when ``None``.
    :param int num_particles: particles per ELBO evaluation during the fit.
    :param int num_eval_particles: fresh particles for the reported estimate and its error.
    :param int seed: seeds every random draw, so results are reproducible.
    :param str optimizer: ``"lbfgs"`` — deterministic, on one fixed antithetic (whitened) set of
        particles, Newton-polished where ``θ`` is small; or ``"adam"`` — stochastic, fresh
        particles every step, ``max_iter`` steps of size ``lr`` (for large models).
    :rtype: ElboEvidence
    """
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"unknown optimizer {optimizer!r}; use 'lbfgs' or 'adam'")
    problem = Problem(model, *args, model_kwargs=model_kwargs)
    objective = ElboObjective(
        problem, num_particles=num_particles, seed=seed, init_scale=init_scale, max_iter=max_iter
    )
    h = problem.h_init
    theta0 = None
    if guide is not None:  # start from the guide's own initialisation or fit
        _check_guide(guide)
        with seeded(seed, devices=[problem.device]):  # the guide's init may draw from the prior
            _setup_guide(guide, problem)
        theta0 = _theta_from_guide(guide, problem)
    if optimizer == "lbfgs":
        m = objective.solve(h, theta0)
        theta, steps, converged = m.theta, m.lbfgs_iterations + m.newton_steps, m.converged
        if not converged:
            warnings.warn(
                f"the ELBO optimiser stopped with gradient norm {m.grad_norm:.3g}; raise max_iter=",
                RuntimeWarning,
                stacklevel=2,
            )
    else:
        theta = _adam(objective, h, objective.theta_init if theta0 is None else theta0, max_iter, lr, seed)
        steps, converged = max_iter, None
    grad_norm, stationary = _stationarity(objective, theta, h)
    converged = stationary if converged is None else converged
    value, stderr = objective.estimate(theta, h, num_eval_particles, seed + 1)
    loc, scale = objective.loc_scale(theta)
    guide = _set_guide(guide if guide is not None else AutoDiagonalNormal(model), problem, loc, scale)
    return ElboEvidence(value, stderr, guide, steps, converged, theta, objective, grad_norm)


def _stationarity(objective: ElboObjective, theta, h):
    """``‖∇_θ ELBO‖`` on the objective's fixed particles and whether it is below the inner
    solver's tolerance (``tol·max(1, |ELBO|)``, ``tol`` default ``√ε``) — the same test the
    deterministic fit passes."""
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        loss = objective.inner_loss(t, h)
        (g,) = torch.autograd.grad(loss, t)
    tol = objective.tol if objective.tol is not None else torch.finfo(theta.dtype).eps ** 0.5
    norm = float(g.norm())
    return norm, norm <= tol * max(1.0, abs(float(loss.detach())))


def _adam(objective: ElboObjective, h, theta0, steps, lr, seed):
    """Stochastic maximisation of the ELBO, fresh antithetic particles every step (drawn on θ's device, so a
    seed gives the same fit on every run of one device, not across devices)."""
    theta = theta0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    problem, num = objective.problem, objective.num_particles
    # drawn where θ lives: a draw on the CPU and its copy would stall a GPU at every step
    g = torch.Generator(device=problem.device).manual_seed(seed + 1000)
    for _ in range(steps):
        half = torch.randn((num + 1) // 2, objective.dim, generator=g, dtype=problem.dtype, device=problem.device)
        eps = _antithetic(half, num)
        opt.zero_grad()
        loss = -(objective._particle_terms(theta, h, eps).mean() + objective._entropy(theta))
        loss.backward()
        opt.step()
    return theta.detach()
