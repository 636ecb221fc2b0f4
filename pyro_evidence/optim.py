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
from .hypergrad.linalg import value_grad_hessian

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
    iterations = opt.state[opt._params[0]].get("n_iter", 0)
    return theta.detach(), iterations


def grad_and_value_detached(fn, theta):
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        f = fn(t)
        (g,) = torch.autograd.grad(f, t)
    return f.detach(), g.detach()


def _shifted_cholesky(H):
    """Cholesky factor of ``H + τI`` for the smallest ``τ`` of the sequence ``0, τ₀, 2τ₀, …`` that
    makes it positive definite (Nocedal & Wright 2006, Algorithm 3.3), ``τ₀`` scaled to ``H``'s diagonal."""
    factor, info = torch.linalg.cholesky_ex(H)
    if not bool(info):
        return factor
    diag = H.diagonal()
    beta = 1e-3 * float(diag.abs().mean().clamp(min=torch.finfo(H.dtype).tiny ** 0.5))
    tau = max(beta, beta - float(diag.min()))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(64):  # a finite H is positive definite after τ > ‖H‖; NaNs never are
        factor, info = torch.linalg.cholesky_ex(H + tau * eye)
        if not bool(info):
            return factor
        tau *= 2.0
    return None


def _newton(fn, theta, max_steps, modified=False):
    """Damped Newton steps (Armijo backtracking) until neither the loss nor the gradient norm
    improves beyond round-off. Returns ``(theta, f, g, H, steps)``, ``H`` the Hessian at the
    returned ``theta``. Where ``H`` is not positive definite, plain Newton stops; with
    ``modified=True`` it steps along ``−(H + τI)⁻¹ g`` instead, a descent direction that also
    leaves a saddle along its negative curvature."""
    f, g, H = value_grad_hessian(fn, theta)
    gnorm = g.norm()
    roundoff = 10 * torch.finfo(theta.dtype).eps
    steps = 0
    for _ in range(max_steps):
        if modified:
            factor = _shifted_cholesky(H)
        else:
            factor, info = torch.linalg.cholesky_ex(H)
            factor = None if bool(info) else factor  # not in a convex region: no descent direction
        if factor is None:
            break
        direction = -torch.cholesky_solve(g.unsqueeze(-1), factor).squeeze(-1)
        slope = torch.dot(g, direction)
        floor = roundoff * f.abs().clamp(min=1.0)
        t, accepted = 1.0, False
        for _ in range(30):
            candidate = theta + t * direction
            f_new, g_new, H_new = value_grad_hessian(fn, candidate)
            new_norm = g_new.norm()
            # Near the mode f changes at round-off level only; the gradient still tells progress.
            if torch.isfinite(f_new) and (
                f_new <= f + 1e-4 * t * slope or (new_norm < gnorm and f_new <= f + floor)
            ):
                accepted = True
                break
            t *= 0.5
        if not accepted:
            break
        progress = bool(new_norm < 0.5 * gnorm) or bool(f - f_new > floor)
        theta, f, g, H, gnorm = candidate, f_new, g_new, H_new, new_norm
        steps += 1
        if not progress or bool(gnorm <= 100 * floor):  # at the round-off floor
            break
    return theta, f, g, H, steps


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
