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

from ..linalg import NotPositiveDefiniteError, cholesky, hessian_and_value, value_grad_hessian
from ..optim import at_point
from ..problem import Problem
from .base import Objective
from .curvature import Curvature, LaplaceCurvature, refuse_symmetric

__all__ = ["LaplaceObjective", "LaplaceEvidence", "laplace_evidence", "laplace_hypergradient", "gaussian_draws"]

_LOG_2PI = math.log(2 * math.pi)


class LaplaceObjective(Objective):
    """``L = −log p(y, θ | h)``, ``Q`` = the Laplace log evidence at ``θ`` with the curvature ``C`` of
    :mod:`~pyro_evidence.objectives.curvature` in place of ``H``.

    :param float jitter: added to the diagonal of ``C`` (reported, never silent).
    :param str hessian: the curvature: ``"exact"``, ``"ggn"``, ``"diag"`` or ``"kron"``.
    :param str logdet: ``"dense"`` or ``"slq"`` (stochastic Lanczos quadrature, matrix-free).
    :param int num_probes: SLQ probes; :param int lanczos_steps: SLQ Lanczos steps; :param int seed: SLQ probes' seed.
    :param str kron_bias: ``"joint"`` (default: a bias is a row of its layer's weight in one Kronecker block) or
        ``"separate"`` (laplace-torch's: a block of its own).
    :param bool refit: ``True`` (default): ``θ`` is the mode at every ``h`` (the inner solve), and the hypergradient
        goes through it. ``False``: the post-hoc setting of laplace-torch's ``optimize_prior_precision`` — ``θ`` held
        at ``at`` (or at the first inner solve's mode) and ``h`` tuned on ``Q(θ, h)``, whose gradient is then the
        partial ``∂Q/∂h`` (exact, through the structured ``log det C``).
    :param at: with ``refit=False``, the network held: flat ``θ``, ``{site: value}`` or a ``torch.nn.Module`` (see
        :meth:`~pyro_evidence.problem.Problem.theta_at`).
    """

    name = "laplace"

    def __init__(self, problem: Problem, *, jitter: float = 0.0, hessian: str = "exact", logdet: str = "dense",
                 num_probes: int = 30, lanczos_steps: int = 40, seed: int = 0, kron_bias: str = "joint",
                 refit: bool = True, at=None, **options):
        super().__init__(problem, **options)
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        if not isinstance(refit, bool):
            raise TypeError(f"refit must be True or False, got {refit!r}")
        if at is not None and refit:
            raise ValueError("at= holds the network fixed: it goes with refit=False (with refit=True every h has its own mode)")
        self.jitter, self.refit, self._holding = jitter, refit, False
        self.held = None if at is None else problem.theta_at(at)
        self.curvature = LaplaceCurvature(problem, hessian, logdet, jitter=jitter, num_probes=num_probes,
                                        lanczos_steps=lanczos_steps, seed=seed, kron_bias=kron_bias)
        self.curvature.setup()  # refuses what the structure cannot handle before any fit

    @property
    def key(self) -> dict:
        """What a saved run must match beyond the problem: the curvature (absent for the default, so runs
        saved before the choice existed still match)."""
        c = self.curvature
        key = {} if (c.structure, c.logdet) == ("exact", "dense") else {"hessian": c.structure, "logdet": c.logdet}
        return key if c.kron_bias == "joint" else {**key, "kron_bias": c.kron_bias}

    def inner_loss(self, theta, h):
        return self.problem.loss(theta, h)

    @property
    def theta_init(self):
        return self.problem.theta_init if self.held is None else self.held

    @property
    def holds_theta(self) -> bool:
        """``refit=False``: ``θ`` does not move with ``h``, so ``dQ/dh = ∂Q/∂h``."""
        return not self.refit

    def solve(self, h, theta0=None):
        if self.refit:
            return super().solve(h, theta0)
        if self.held is None:  # the mode at the first hyperparameters asked for, held from then on
            refuse_symmetric(self.problem, self.problem.theta_init if theta0 is None else theta0, h)
            self.held = super().solve(h, theta0).theta
        if not self._holding:
            self.curvature.hold(self.held, h.detach())
            self._holding = True
        h = h.detach()
        return at_point(lambda t: self.curvature.loss(t, h), self.held, self.tol)  # L by its held parts

    def implicit_curvature(self, m, h):
        """With a structured ``hessian``, that curvature at the mode: implicit solves use it (positive definite, so
        CG never meets negative curvature) and the exact Hessian is never formed."""
        if self.curvature.structure == "exact":
            return None
        if isinstance(m.curvature, Curvature) and m.curvature.theta is m.theta:
            return m.curvature
        with torch.no_grad():
            return self.curvature.curvature(m.theta, h.detach())

    def inner_curvature(self, h):
        """With a structured ``hessian`` (``ggn``, ``diag``, ``kron``) the inner solve steps with that curvature
        (:func:`~pyro_evidence.optim.gauss_newton`), and no dense Hessian of the loss is formed anywhere; the GGN
        above ``newton_max_dim`` latents, or with ``logdet="slq"``, is solved matrix-free by truncated CG."""
        c = self.curvature
        if c.structure == "exact":
            return None
        h = h.detach()
        if c.structure == "ggn" and (c.logdet == "slq" or self.problem.theta_dim > self.newton_max_dim):
            return lambda theta: _TruncatedGGN(c.ggn_operator(theta, h), c.jitter)

        def at(theta):
            with torch.no_grad():
                return c.curvature(theta, h)

        return at

    def weighted_loss(self, theta, h, weights):
        prior, rows = self.problem.terms(theta, h)
        return -(prior + (weights * rows).sum())

    def per_example_loss(self, theta, h):
        """``L`` spread over the rows: ``−log p(y_i | w) − (log p(w | h) + log|J|) / N``."""
        prior, rows = self.problem.terms(theta, h)
        return -rows - prior / rows.shape[-1]

    def validation(self, theta, h):
        c = self.curvature
        if c.structure == "exact" and c.logdet == "dense":  # the value comes with the Hessian
            H, loss = hessian_and_value(self.problem.loss, theta, h)
            half_log_det = cholesky(H, self.jitter).diagonal().log().sum()
            return -loss + 0.5 * theta.shape[-1] * _LOG_2PI - half_log_det
        return -c.loss(theta, h) + 0.5 * theta.shape[-1] * _LOG_2PI - 0.5 * c.log_det(theta, h)

    def validation_probes(self, theta, h):
        """``logdet="slq"``: ``Q`` once per probe, ``(m,)`` — their mean is :meth:`validation`, and the spread of
        any derivative of theirs is the Hutchinson estimator's."""
        d = theta.shape[-1]
        return -self.problem.loss(theta, h) + 0.5 * d * _LOG_2PI - 0.5 * self.curvature.probe_log_dets(theta, h)


class _TruncatedGGN:
    """``C⁻¹ v`` by at most 100 CG iterations on GGN-vector products, to 10⁻⁴: an inexact Gauss–Newton direction
    (the L-BFGS pairs and the line search absorb the rest)."""

    def __init__(self, op, jitter):
        self.op, self.jitter = op, jitter

    def solve(self, v):
        from ..linalg import cg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a truncated direction is inexact by design
            return cg(lambda u: self.op(u.unsqueeze(0))[0] + self.jitter * u, v, tol=1e-4, max_iter=100).x


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
    :ivar hessian: the dense curvature ``C`` in unconstrained ``θ`` (jitter included): the Hessian of
        ``−log p(y, θ | h)`` for ``hessian="exact"``, the GGN for ``"ggn"``; None for the structured and
        matrix-free ones (see ``curvature``).
    :ivar log_det: ``log det C`` (an estimate for ``logdet="slq"``).
    :ivar converged: whether the inner optimiser reached a stationary point.
    :ivar grad_norm: ``‖∇_θ L‖`` at the returned mode.
    :ivar theta: the mode in flat unconstrained coordinates.
    :ivar jitter: what was added to the diagonal of ``H``.
    :ivar jitter_effect: how much that changed ``log_evidence`` (``−½ Σ log(1 + jitter/λᵢ)`` over the eigenvalues
        of ``H``; ``−inf`` where ``H`` was not positive definite, so that the jitter made the value).
    :ivar curvature: the :class:`~pyro_evidence.objectives.curvature.Curvature` (structure, factors, draws).
    :ivar log_evidence_se: the standard error of ``log_evidence`` (``logdet="slq"``; 0 otherwise).
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
    curvature: Curvature | None = field(default=None, repr=False)
    log_evidence_se: float = 0.0
    jitter_effect: float = 0.0

    @property
    def value(self) -> torch.Tensor:
        """The result's main value, ``log_evidence`` (every result calls its main value ``value``)."""
        return self.log_evidence

    def posterior(self):
        """The Laplace posterior ``N(θ̂, C⁻¹)`` over unconstrained ``θ`` (dense or diagonal ``C``)."""
        if self.hessian is not None:
            return dist.MultivariateNormal(self.theta, precision_matrix=self.hessian)
        if self.curvature is not None and self.curvature.structure == "diag":
            return dist.Normal(self.theta, self.curvature.diagonal.rsqrt()).to_event(1)
        raise ValueError(
            f"the {self.curvature.structure!r} curvature has no torch distribution object; draw from it with "
            "result.curvature.sample(n)"
        )

    def sample(self, num_samples: int, seed: int = 0) -> torch.Tensor:
        """``num_samples`` draws ``θ ~ N(θ̂, C⁻¹)``, shape ``(S, d)``, in every structure."""
        if self.hessian is not None:
            return gaussian_draws(self.theta, self.hessian, num_samples, seed)
        return self.theta + self.curvature.sample(num_samples, seed)


def laplace_evidence(
    model,
    *args,
    model_kwargs: dict | None = None,
    theta_init: torch.Tensor | None = None,
    jitter: float = 0.0,
    max_iter: int = 500,
    tol: float | None = None,
    hessian: str = "exact",
    logdet: str = "dense",
    num_probes: int = 30,
    lanczos_steps: int = 40,
    seed: int = 0,
    init_loc_fn=None,
    at=None,
    kron_bias: str = "joint",
) -> LaplaceEvidence:
    """
    Laplace approximation of the log evidence ``log p(y | h)`` of a Pyro model, the
    hyperparameters ``h`` being its ``pyro.param`` values in the param store.

    The mode is found by Newton steps with the dense autograd Hessian (up to 2,000 latents) and by
    L-BFGS (Armijo backtracking) where Newton cannot start or the model is larger; ``log det C``
    comes from the curvature asked for (see :mod:`pyro_evidence.objectives.curvature`). With ``at=`` there is
    no inner solve: the evidence is evaluated at the point given (a network as it was trained), and
    ``grad_norm`` says how far from stationary it is (``converged``: within the inner solver's tolerance).

    :param model: a Pyro model; its positional arguments are the data.
    :param args: the data (tensors sharing their first dimension); the computation follows their
        device and dtype.
    :param dict model_kwargs: keyword arguments for the model.
    :param theta_init: flat unconstrained warm start (e.g. a previous result's ``theta``).
    :param float jitter: add ``jitter·I`` to ``H``; it changes the evidence, by ``jitter_effect`` (reported, with a
        warning), and by an unbounded amount along a flat direction: never a fix for a latent nothing pins down.
    :param int max_iter: L-BFGS iterations at most.
    :param float tol: relative gradient-norm tolerance of the inner optimiser.
    :param str hessian: the curvature ``C``: ``"exact"`` (the dense Hessian, any size memory allows), ``"ggn"``
        (generalised Gauss–Newton ``JᵀΛJ`` plus the prior's Hessian: positive definite from any start), ``"diag"``
        (its diagonal) or ``"kron"`` (Kronecker factors per linear layer, the diagonal elsewhere).
    :param str logdet: ``"dense"`` (Cholesky) or ``"slq"`` (stochastic Lanczos quadrature on ``C``-vector
        products, never forming ``C``; with ``num_probes`` probes, ``lanczos_steps`` steps, ``seed``).
    :param callable init_loc_fn: Pyro's init strategy for the starting point (see
        :class:`~pyro_evidence.problem.Problem`).
    :param at: evaluate at this point instead of solving for the mode: flat unconstrained ``θ``, constrained
        values ``{site: value}`` of every latent, or a ``torch.nn.Module`` whose parameters hold them (see
        :meth:`~pyro_evidence.problem.Problem.theta_at`).
    :param str kron_bias: ``hessian="kron"``'s treatment of a layer's bias: ``"joint"`` (one Kronecker block
        with the weight, homogeneous coordinates) or ``"separate"`` (a block of its own, as laplace-torch).
    :rtype: LaplaceEvidence
    """
    if at is not None and theta_init is not None:
        raise ValueError("give at= (evaluate at this point) or theta_init= (start the inner solve there), not both")
    problem = Problem(model, *args, model_kwargs=model_kwargs, init_loc_fn=init_loc_fn)
    objective = LaplaceObjective(problem, jitter=jitter, max_iter=max_iter, tol=tol, hessian=hessian, logdet=logdet,
                                 num_probes=num_probes, lanczos_steps=lanczos_steps, seed=seed, kron_bias=kron_bias)
    return _laplace_at(objective, problem.h_init, theta_init, at=at)


def _laplace_at(objective, h, theta_init, at=None) -> LaplaceEvidence:
    problem, jitter = objective.problem, objective.jitter
    if at is not None:
        theta = problem.theta_at(at, h)
        refuse_symmetric(problem, theta, h, "the point given (at=)")
        return _evidence(objective, h, objective.evaluate(h, theta))
    refuse_symmetric(problem, problem.theta_init if theta_init is None else torch.as_tensor(theta_init).to(problem.theta_init), h)
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
    return _evidence(objective, h, m)


def _evidence(objective, h, m) -> LaplaceEvidence:
    """The Laplace evidence at the inner point ``m`` (a :class:`~pyro_evidence.optim.Minimum`)."""
    problem, jitter = objective.problem, objective.jitter
    theta = m.theta
    curv = objective.curvature
    jitter_effect = 0.0
    if curv.structure == "exact" and curv.logdet == "dense":
        H = m.hessian
        if H is None:  # the inner solver works without a dense Hessian above newton_max_dim
            _, _, H = value_grad_hessian(lambda t: problem.loss(t, h), theta)
        if jitter:
            jitter_effect = _jitter_effect(H, jitter)
            H = H + jitter * torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
        try:
            pivots = cholesky(H).diagonal()
        except NotPositiveDefiniteError as e:
            raise NotPositiveDefiniteError(f"{e}; {_where_singular(problem, H)}") from None
        log_det = 2 * pivots.log().sum()
        _warn_ill_conditioned(pivots)
        curvature = Curvature("exact", log_det, dense=H, source=curv, theta=theta, h=h)
    elif isinstance(m.curvature, Curvature) and m.curvature.theta is theta:
        curvature = m.curvature  # the inner solve's last curvature is the one at the mode
    else:
        with torch.no_grad():
            curvature = curv.curvature(theta, h)
    d = theta.numel()
    log_evidence = -m.loss + 0.5 * d * _LOG_2PI - 0.5 * curvature.log_det
    if jitter:
        warnings.warn(f"jitter={jitter:g} added to the Hessian changed the log evidence by {jitter_effect:.4g} nats "
                      "(result.jitter_effect)", RuntimeWarning, stacklevel=4)
    return LaplaceEvidence(
        log_evidence=log_evidence.detach(),
        map={k: v.detach() for k, v in problem.latent_values(theta, h).items()},
        hessian=None if curvature.dense is None else curvature.dense.detach(),
        log_det=curvature.log_det.detach(),
        converged=m.converged,
        grad_norm=m.grad_norm,
        theta=theta,
        jitter=jitter,
        problem=problem,
        curvature=curvature,
        log_evidence_se=0.5 * curvature.log_det_se,
        jitter_effect=jitter_effect,
    )


def _warn_ill_conditioned(pivots):
    """In float32, a Hessian whose condition number (at least the squared ratio of its Cholesky pivots) times the
    unit round-off exceeds 10⁻³ leaves ``log det H`` uncertain by about that much per small eigenvalue: say so.
    (Found by the fuzzer: one row at scale 150 and β = 100, κ = 7·10⁶, was 0.02 nats off.)"""
    if pivots.dtype != torch.float32 or not pivots.numel():
        return
    kappa = float((pivots.max() / pivots.min()) ** 2)
    if kappa * torch.finfo(torch.float32).eps > 1e-3:
        warnings.warn(f"float32 with a Hessian of condition number ≥ {kappa:.2g}: round-off may move the log evidence by "
                      f"~{kappa * torch.finfo(torch.float32).eps:.2g} nats; pass float64 data", RuntimeWarning, stacklevel=5)


def _jitter_effect(H, jitter):
    """What ``jitter·I`` does to the log evidence, ``−½ Σ log((λᵢ + jitter)/λᵢ)`` over the eigenvalues of ``H``:
    ``−inf`` where ``H`` has an eigenvalue ``≤ 0`` (no evidence without the jitter: it made the value)."""
    lam = torch.linalg.eigvalsh(H.detach())
    if bool((lam <= 0).any()):
        return -math.inf
    return float(-0.5 * torch.log1p(jitter / lam).sum())


def _where_singular(problem, H, top=3):
    """The latent sites along which ``H`` is not positive definite, named for the error message."""
    lam, vec = torch.linalg.eigh(H.detach())
    bad = lam <= lam.abs().max() * torch.finfo(H.dtype).eps * H.shape[-1]
    if not bool(bad.any()):
        return "no direction stands out"
    weight = (vec[:, bad] ** 2).sum(-1)
    sites = sorted(problem.latents, key=lambda s: -float(weight[s.slice].sum()))[:top]
    named = ", ".join(f"{s.name!r}" for s in sites if float(weight[s.slice].sum()) > 0.01 * float(weight.sum()))
    flat = bool((lam[bad].abs() <= lam.abs().max() * 1e-10).all())
    why = "flat: the log joint does not change along it" if flat else "of negative curvature: not a mode"
    return (f"{int(bad.sum())} direction(s) {why}, carried by latent site(s) {named}; jitter= would not fix it: "
            "along a flat direction it makes the evidence finite by an amount that grows without bound as jitter → 0")


def laplace_hypergradient(
    model,
    *args,
    model_kwargs: dict | None = None,
    hessian: str = "exact",
    logdet: str = "dense",
    method: str = "ift-exact",
    jitter: float = 0.0,
    num_probes: int = 30,
    lanczos_steps: int = 40,
    seed: int = 0,
    max_iter: int = 500,
    init_loc_fn=None,
    kron_bias: str = "joint",
):
    """
    The total derivative ``d log p(y | h)/dh`` of the Laplace evidence in the curvature ``hessian`` at the
    param store's hyperparameters (unconstrained ``h``), through the mode: ``∂Q/∂h − (∂²L/∂h∂θ)ᵀ H⁻¹ ∂Q/∂θ``
    with ``∂Q/∂θ = −½ ∂ log det C/∂θ`` kept. With a structured ``hessian`` (``ggn``, ``diag``, ``kron``) the
    curvature ``C`` stands in for ``H`` in the implicit solve too (positive definite: a network's indefinite
    Hessian away from a mode never enters), and no dense Hessian is formed.

    With ``logdet="slq"`` the result is Hutchinson's estimate and ``info["standard_error"]`` its standard
    error over the probes (``info["per_probe"]``: the ``m`` single-probe hypergradients, each through its own
    solve with ``H``).

    :param str method: ``"ift-exact"`` (dense ``H``) or ``"ift-cg"``.
    :returns: :class:`~pyro_evidence.hypergrad.implicit.Hypergradient`.
    """
    from ..hypergrad.implicit import IMPLICIT

    if method not in ("ift-exact", "ift-cg"):
        raise ValueError(f"method must be 'ift-exact' or 'ift-cg', got {method!r}")
    problem = Problem(model, *args, model_kwargs=model_kwargs, require_hyperparameters=True, init_loc_fn=init_loc_fn)
    objective = LaplaceObjective(problem, jitter=jitter, max_iter=max_iter, hessian=hessian, logdet=logdet,
                                 num_probes=num_probes, lanczos_steps=lanczos_steps, seed=seed, kron_bias=kron_bias)
    h = problem.h_init
    m = objective.solve(h)
    curvature = objective.implicit_curvature(m, h)  # a structure stands in for H; None: H itself
    if curvature is not None:
        opts = {"solve": curvature.solve} if method == "ift-exact" else {"operator": curvature.matvec}
    else:
        opts = {"hessian": m.hessian} if method == "ift-exact" else {}
    hg = IMPLICIT[method](objective.inner_loss, objective.validation, m.theta, h, **opts)
    hg.info["converged_inner"] = m.converged
    if logdet == "slq":
        per_probe = _per_probe(objective, m, h, method, curvature)
        hg.info["per_probe"] = per_probe
        hg.info["standard_error"] = per_probe.std(0) / math.sqrt(per_probe.shape[0])
    return hg


def _per_probe(objective, m, h, method, curvature):
    """The SLQ hypergradient once per probe, ``(m, dh)``, each through its own implicit solve."""
    from ..linalg import cg, dense_solve, hvp_operator, mixed_vjp

    theta, problem = m.theta, objective.problem
    g_theta, g_h = torch.func.jacrev(objective.validation_probes, argnums=(0, 1))(theta, h)  # (m, d), (m, dh)
    if curvature is not None:
        V = torch.stack([curvature.solve(g) if method == "ift-exact" else cg(curvature.matvec, g, tol=1e-10).x
                         for g in g_theta])
    elif method == "ift-exact":
        H = m.hessian if m.hessian is not None else value_grad_hessian(lambda t: problem.loss(t, h), theta)[2]
        V = torch.stack([dense_solve(H, g) for g in g_theta])
    else:
        op = hvp_operator(objective.inner_loss, theta, h)
        V = torch.stack([cg(op, g, tol=1e-10).x for g in g_theta])
    return torch.stack([gh - mixed_vjp(objective.inner_loss, theta, h, v) for gh, v in zip(g_h, V)])
