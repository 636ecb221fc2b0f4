"""
Deterministic full-batch minimisation of an inner loss over a flat ``θ``.

Damped Newton steps with the dense Hessian (Armijo backtracking) run until the gradient stops
shrinking (round-off level), so that the Laplace evidence and implicit hypergradients evaluated
there are exact to working precision. Where Newton cannot make progress from the start point —
the Hessian is not positive definite there, or the steps stall — L-BFGS with a strong-Wolfe line
search brings ``θ`` into Newton's basin first, and Newton polishes its result — modified Newton
(``H + τI``, Nocedal & Wright 2006, §3.4) where L-BFGS stopped in a non-convex region.

Newton goes first because the problems solved here are those whose dense Hessian is needed
anyway (for ``log det H``): from a warm start, or on a convex inner loss, it converges in a
handful of steps where L-BFGS takes dozens of model evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from .linalg import value_grad_hessian

__all__ = ["Minimum", "minimize"]


@dataclass
class Minimum:
    """``theta`` = the minimiser; ``hessian`` = the dense Hessian of the loss there (``None``
    for an empty ``θ``)."""

    theta: torch.Tensor
    loss: torch.Tensor
    grad_norm: float
    converged: bool
    lbfgs_iterations: int
    newton_steps: int
    hessian: torch.Tensor | None = None


def _lbfgs(fn, theta, max_iter, tol_grad):
    theta = theta.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=max_iter,
        max_eval=int(max_iter * 1.25) + 1,
        tolerance_grad=tol_grad,
        tolerance_change=0.0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = fn(theta)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                "the inner loss is not finite at the current parameters; the model's log "
                "density is NaN or -inf there (check the support of its distributions)"
            )
        loss.backward()
        return loss

    opt.step(closure)
    iterations = opt.state[theta].get("n_iter", 0)
    return theta.detach(), iterations


def grad_and_value_detached(fn, theta):
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        f = fn(t)
        (g,) = torch.autograd.grad(f, t)
    return f.detach(), g.detach()


def _shifted_cholesky(H):
    """Cholesky factors of ``H + τI`` (a batch ``(k, D, D)``), each ``τ`` the first of ``0, τ₀, 2τ₀, …`` that
    makes it positive definite (Nocedal & Wright 2006, Algorithm 3.3), ``τ₀`` scaled to that ``H``'s diagonal;
    None where no ``τ`` does (a Hessian with NaNs)."""
    factor, info = torch.linalg.cholesky_ex(H)
    if not bool(info.any()):
        return factor
    diag = H.diagonal(dim1=-2, dim2=-1)
    beta = 1e-3 * diag.abs().mean(-1).clamp(min=torch.finfo(H.dtype).tiny ** 0.5)
    tau = torch.where(info > 0, torch.maximum(beta, beta - diag.min(-1).values), torch.zeros_like(beta))
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    for _ in range(64):  # a finite H is positive definite after τ > ‖H‖
        factor, info = torch.linalg.cholesky_ex(H + tau[:, None, None] * eye)
        if not bool(info.any()):
            return factor
        tau = torch.where(info > 0, 2 * tau, tau)
    return None


@dataclass
class NewtonResult:
    """What :func:`newton` reached: per problem ``theta``, ``f``, ``g``, ``H`` (batched), the steps taken, and
    ``stuck`` — whether some problem stopped for want of a descent direction or an acceptable step."""

    theta: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    H: torch.Tensor
    steps: int
    stuck: bool


def _line_search(vgh, state, direction, floor, todo):
    """Armijo backtracking, each problem halving its own step from 1. Returns the accepted ``(θ, f, g, H)``
    (unchanged for problems not in ``todo``) and which problems found a step."""
    theta, f, g, H = state
    slope, gnorm = (g * direction).sum(-1), g.norm(dim=-1)
    t = torch.ones_like(f)
    found, new = ~todo, state
    for _ in range(30):
        cand = theta + t[:, None] * direction
        fc, gc, Hc = vgh(cand)
        # near the mode f changes at round-off level only; the gradient still tells progress
        ok = torch.isfinite(fc) & ((fc <= f + 1e-4 * t * slope) | ((gc.norm(dim=-1) < gnorm) & (fc <= f + floor)))
        take = (ok & ~found).view(-1, 1)
        new = (torch.where(take, cand, new[0]), torch.where(take[:, 0], fc, new[1]), torch.where(take, gc, new[2]),
               torch.where(take[:, :, None], Hc, new[3]))
        found = found | ok
        if bool(found.all()):
            break
        t = torch.where(found, t, t / 2)
    return new, found


def newton(vgh, theta, max_steps=20, modified=False):
    """
    Damped Newton steps (Armijo backtracking) on a batch of independent problems until neither the loss nor
    the gradient norm improves beyond round-off. ``vgh(θ)`` maps ``θ`` of shape ``(k, D)`` to the values,
    gradients and Hessians ``(k,)``, ``(k, D)``, ``(k, D, D)``; each problem has its own Cholesky factor, step
    length and stopping point. Where a Hessian is not positive definite plain Newton has no descent direction
    and stops (``stuck``); with ``modified=True`` it steps along ``−(H + τI)⁻¹ g`` instead, a descent direction
    that also leaves a saddle along its negative curvature.
    """
    state = (theta, *vgh(theta))
    roundoff = 10 * torch.finfo(theta.dtype).eps
    active = torch.ones(theta.shape[0], dtype=torch.bool, device=theta.device)
    steps, stuck = 0, False
    for _ in range(max_steps):
        _, f, g, H = state
        if modified:
            factor = _shifted_cholesky(H)
        else:
            factor, info = torch.linalg.cholesky_ex(H)
            factor = None if bool(info.any()) else factor
        if factor is None:
            stuck = True
            break
        direction = -torch.cholesky_solve(g.unsqueeze(-1), factor).squeeze(-1) * active[:, None]
        floor = roundoff * f.abs().clamp(min=1.0)
        new, found = _line_search(vgh, state, direction, floor, active)
        if not bool(found.all()):
            stuck = True
            break
        new_norm = new[2].norm(dim=-1)
        progress = (new_norm < 0.5 * g.norm(dim=-1)) | (f - new[1] > floor)
        state = new
        steps += 1
        active = active & progress & (new_norm > 100 * floor)  # the rest are at the round-off floor
        if not bool(active.any()):
            break
    return NewtonResult(*state, steps, stuck)


def _newton(fn, theta, max_steps, modified=False):
    """:func:`newton` on one problem: ``(θ, f, g, H, steps)``."""

    def vgh(t):
        f, g, H = value_grad_hessian(fn, t[0])
        return f[None], g[None], H[None]

    r = newton(vgh, theta[None], max_steps, modified)
    return r.theta[0], r.f[0], r.g[0], r.H[0], r.steps


def minimize(
    fn,
    theta0: torch.Tensor,
    *,
    max_iter: int = 500,
    max_newton: int = 20,
    tol: float | None = None,
    newton_max_dim: int = 2000,
) -> Minimum:
    """
    Minimises a scalar pure function ``fn(θ)`` of a flat tensor.

    :param float tol: the gradient-norm bound, relative to ``max(1, |fn|)``, under which the
        result counts as converged; default ``√ε`` of the dtype. Newton steps continue past it
        while they still shrink the gradient, down to round-off.
    :param int newton_max_dim: above this many parameters no dense Hessian is formed and
        L-BFGS works alone (its result then carries ``hessian=None``).
    """
    eps = torch.finfo(theta0.dtype).eps
    tol = eps**0.5 if tol is None else tol
    if theta0.numel() == 0:
        loss = fn(theta0)
        return Minimum(theta0, loss.detach(), 0.0, True, 0, 0, theta0.new_zeros(0, 0))

    theta, iterations = theta0.detach(), 0
    if theta.numel() > newton_max_dim:  # no dense Hessian: L-BFGS alone
        theta, iterations = _lbfgs(fn, theta, max_iter, tol_grad=eps**0.5)
        f, g = grad_and_value_detached(fn, theta)
        converged = float(g.norm()) <= tol * max(1.0, abs(float(f)))
        return Minimum(theta, f, float(g.norm()), converged, iterations, 0, None)
    theta, f, g, H, steps = _newton(fn, theta, max_newton)
    converged = float(g.norm()) <= tol * max(1.0, abs(float(f)))
    if not converged:  # outside Newton's basin (H not positive definite, or no progress)
        theta, iterations = _lbfgs(fn, theta, max_iter, tol_grad=eps**0.5)
        # L-BFGS can stop short in a non-convex region (a plateau, the shoulder of a saddle), where
        # plain Newton would stop too: modified Newton carries θ on to a minimum
        theta, f, g, H, more = _newton(fn, theta, max_newton, modified=True)
        steps += more
        converged = float(g.norm()) <= tol * max(1.0, abs(float(f)))
    gnorm = float(g.norm())
    return Minimum(theta.detach(), f, gnorm, converged, iterations, steps, H)
