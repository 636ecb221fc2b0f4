"""
Hypergradients by the implicit function theorem.

At a minimiser ``θ*(h)`` of the inner loss ``L(θ, h)`` (Pedregosa 2016; Lorraine et al. 2020),

.. math::

    \\frac{dQ}{dh} = \\frac{\\partial Q}{\\partial h}
        - \\left(\\frac{\\partial^2 L}{\\partial h\\,\\partial \\theta}\\right)^{\\top}
          H^{-1} \\frac{\\partial Q}{\\partial \\theta},
    \\qquad H = \\frac{\\partial^2 L}{\\partial \\theta^2}.

The methods differ only in how they approximate ``v = H⁻¹ ∂Q/∂θ``:

=============== ================================================ =====================================
method          ``v``                                            what it drops
=============== ================================================ =====================================
``ift-exact``   dense ``H``, Cholesky                            nothing (round-off); ``O(d³)``
``ift-cg``      conjugate gradient on ``Hv = ∂Q/∂θ``             the residual at its tolerance
``ift-neumann`` ``α Σ_{j≤i} (I − αH)^j ∂Q/∂θ``                   the series' tail ``(I − αH)^{i+1}``
``t1-t2``       ``η ∂Q/∂θ`` (``H⁻¹ ≈ ηI``)                         all curvature but one step's
``larsen``      ``(JᵀJ + δI)⁻¹ ∂Q/∂θ``, ``J`` the per-example      the second-order terms of ``H``
                gradients (Gauss–Newton / outer product)
``hoag``        CG to a tolerance that shrinks over the outer    early accuracy (Pedregosa 2016); an
                iterations, warm-started                         outer loop: ``select_hyperparameters``
=============== ================================================ =====================================

With ``objective="elbo"``, ``L = −Q``: at the inner optimum ``∂Q/∂θ = 0`` and every method
returns ``∂Q/∂h``. With ``objective="laplace"``, ``∂Q/∂θ = −½ ∂ log det H/∂θ`` is what MacKay-style
updates drop; these methods keep it.

References:
    F. Pedregosa, *Hyperparameter optimization with approximate gradient*, ICML 2016.
    J. Lorraine, P. Vicol, D. Duvenaud, *Optimizing millions of hyperparameters by implicit
    differentiation*, AISTATS 2020.
    J. Larsen, L. K. Hansen, C. Svarer, M. Ohlsson, *Design and regularization of neural
    networks: the optimal use of a validation set*, IEEE NNSP 1996.
    J. Luketina, M. Berglund, K. Greff, T. Raiko, *Scalable gradient-based tuning of continuous
    regularization hyperparameters*, ICML 2016 (T1–T2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.func import grad_and_value, jacrev

from ..compat import in_transform
from ..linalg import NotPositiveDefiniteError, cg, dense_solve, hvp_operator, mixed_vjp, neumann, power_iteration, value_grad_hessian

__all__ = ["Hypergradient", "check_validation", "IMPLICIT", "ift_exact", "ift_cg", "ift_neumann", "t1_t2", "larsen"]


@dataclass
class Hypergradient:
    """``value`` = ``Q(θ, h)``; ``grad`` = the (approximate) total derivative ``dQ/dh``;
    ``partial`` = ``∂Q/∂h``, the part every method shares; ``info``: the method's diagnostics
    (iterations, residual, the solution ``v`` for warm starts, the step size it used)."""

    value: torch.Tensor
    grad: torch.Tensor
    partial: torch.Tensor
    info: dict = field(default_factory=dict)


def _partials(validation, theta, h):
    (g_theta, g_h), value = grad_and_value(validation, argnums=(0, 1))(theta, h)
    return value, g_theta, g_h


def partial_hypergradient(validation, theta, h) -> Hypergradient:
    """``dQ/dh = ∂Q/∂h`` where ``θ`` does not depend on ``h`` (held fixed)."""
    g_h, value = grad_and_value(validation, argnums=1)(theta, h)  # θ a constant: nothing differentiates in it
    return Hypergradient(value.detach(), g_h.detach(), g_h.detach(), {"held": True})


def _finish(inner_loss, theta, h, value, g_h, v, **info):
    return Hypergradient(value, g_h - mixed_vjp(inner_loss, theta, h, v), g_h, {"v": v, **info})


def default_step(inner_loss, theta, h, operator=None) -> float:
    """``1/λ_max(H)`` by power iteration: the largest step for which ``ηI`` and the Neumann series
    are sensible approximations of ``H⁻¹`` (of ``C⁻¹`` with ``operator=``, ``v ↦ Cv``)."""
    lam = power_iteration(operator or hvp_operator(inner_loss, theta, h), theta.numel(), theta)
    if not lam > 0:
        raise NotPositiveDefiniteError("the inner Hessian has no positive curvature here; give lr=/alpha= explicitly")
    return 1.0 / lam


def ift_exact(inner_loss, validation, theta, h, *, jitter: float = 0.0, hessian=None, solve=None):
    """Dense Hessian and a Cholesky solve.

    :param hessian: ``∂²L/∂θ²`` at ``(θ, h)`` if the caller has it already (the inner Newton
        solver does), else it is computed here.
    :param solve: ``v ↦ C⁻¹v`` for a positive definite stand-in ``C`` of the Hessian (a structured Laplace
        curvature, :meth:`~pyro_evidence.objectives.curvature.Curvature.solve`): used in place of ``H⁻¹``, and no
        Hessian is formed.
    """
    value, g_theta, g_h = _partials(validation, theta, h)
    if theta.numel() == 0:
        return Hypergradient(value, g_h, g_h)
    if solve is not None:
        return _finish(inner_loss, theta, h, value, g_h, solve(g_theta))
    H = hessian
    if H is None:
        _, _, H = value_grad_hessian(lambda t: inner_loss(t, h), theta)
    return _finish(inner_loss, theta, h, value, g_h, dense_solve(H, g_theta, jitter))


def ift_cg(inner_loss, validation, theta, h, *, tol: float = 1e-10, max_iter: int | None = None, damping: float = 0.0, x0=None, mode: str = "reverse-over-reverse", operator=None):
    """Conjugate gradient on ``(H + damping·I) v = ∂Q/∂θ`` with Hessian-vector products only
    (one linearisation, then one backward pass per iteration); with ``operator=`` (``v ↦ Cv``, a positive
    definite stand-in for ``H`` such as a structured Laplace curvature) on ``C v = ∂Q/∂θ`` instead.

    Outside ``torch.func`` transforms the products run on one autograd graph of ``∇_θ L`` built once, and
    the mixed product ``(∂²L/∂h∂θ) v`` comes from the same graph: no forward pass is repeated (the result is
    then detached); inside a transform, ``torch.func`` builds the same products functionally."""
    if operator is None and mode == "reverse-over-reverse" and not in_transform():
        fast = _ift_cg_on_one_graph(inner_loss, validation, theta, h, tol, max_iter, damping, x0)
        if fast is not None:
            return fast
    value, g_theta, g_h = _partials(validation, theta, h)
    op = operator or hvp_operator(inner_loss, theta, h, mode=mode)
    r = cg(op, g_theta, x0, tol=tol, max_iter=max_iter, damping=damping)
    return _finish(inner_loss, theta, h, value, g_h, r.x, iterations=r.iterations, residual=r.residual, converged=r.converged)


def _ift_cg_on_one_graph(inner_loss, validation, theta, h, tol, max_iter, damping, x0):
    """:func:`ift_cg` by plain autograd on one retained graph; None where ``L`` is linear in ``θ`` (no graph)."""
    with torch.enable_grad():
        t, u = theta.detach().requires_grad_(True), h.detach().requires_grad_(True)
        value = validation(t, u)
        g_theta, g_h = (x if x is not None else torch.zeros_like(y)
                        for x, y in zip(torch.autograd.grad(value, (t, u), allow_unused=True), (t, u)))
        (g,) = torch.autograd.grad(inner_loss(t, u), t, create_graph=True)
        if not g.requires_grad:
            return None
        r = cg(lambda v: torch.autograd.grad(g, t, v, retain_graph=True)[0], g_theta, x0, tol=tol, max_iter=max_iter,
               damping=damping)
        (mixed,) = torch.autograd.grad(g, u, r.x, allow_unused=True)
    grad_h = g_h if mixed is None else g_h - mixed
    info = {"v": r.x.detach(), "iterations": r.iterations, "residual": r.residual, "converged": r.converged}
    return Hypergradient(value.detach(), grad_h.detach(), g_h.detach(), info)


def ift_neumann(inner_loss, validation, theta, h, *, alpha: float | None = None, terms: int = 50, operator=None):
    """``H⁻¹ ≈ α Σ_{j≤terms} (I − αH)^j`` (Lorraine et al. 2020); ``alpha`` defaults to
    ``1/λ_max(H)``; ``operator=`` (``v ↦ Cv``) puts a positive definite stand-in ``C`` in place of ``H``."""
    value, g_theta, g_h = _partials(validation, theta, h)
    op = operator or hvp_operator(inner_loss, theta, h)
    alpha = default_step(inner_loss, theta, h, op) if alpha is None else alpha
    r = neumann(op, g_theta, alpha=alpha, terms=terms)
    return _finish(inner_loss, theta, h, value, g_h, r.x, alpha=alpha, residuals=r.residuals, residual=r.residual, converged=r.converged)


def t1_t2(inner_loss, validation, theta, h, *, lr: float | None = None, operator=None):
    """``H⁻¹ ≈ ηI``, ``η`` the inner step size (Luketina et al. 2016); default ``1/λ_max(H)`` (of ``C`` with
    ``operator=``)."""
    value, g_theta, g_h = _partials(validation, theta, h)
    lr = default_step(inner_loss, theta, h, operator) if lr is None else lr
    return _finish(inner_loss, theta, h, value, g_h, lr * g_theta, lr=lr)


def larsen(inner_loss, validation, theta, h, *, per_example=None, damping: float = 1e-3):
    """``H ≈ JᵀJ``, ``J`` the Jacobian of the per-example losses (Larsen et al. 1996), solved
    densely with ``damping · mean(diag JᵀJ) · I`` added (``JᵀJ`` has rank at most ``N``).

    :param per_example: ``(θ, h) → (N,)`` per-example losses that sum to ``L``.
    :param float damping: relative to the mean diagonal of ``JᵀJ``.
    """
    if per_example is None:
        raise ValueError("method 'larsen' needs per_example=: a function (theta, h) -> per-example losses")
    value, g_theta, g_h = _partials(validation, theta, h)
    J = jacrev(per_example)(theta, h)
    G = J.T @ J
    shift = damping * float(G.diagonal().mean())
    return _finish(inner_loss, theta, h, value, g_h, dense_solve(G, g_theta, shift), damping=shift)


def check_validation(validation, theta, h):
    """Raises if ``Q`` depends on neither ``θ`` nor ``h`` (then it cannot select anything)."""
    with torch.enable_grad():
        t, h_ = theta.detach().requires_grad_(True), h.detach().requires_grad_(True)
        out = validation(t, h_)
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        raise ValueError("the validation function must return a scalar tensor")
    if not out.requires_grad:
        raise ValueError("the validation function depends on neither theta nor h: there is nothing to select")


IMPLICIT = {"ift-exact": ift_exact, "ift-cg": ift_cg, "ift-neumann": ift_neumann, "t1-t2": t1_t2, "larsen": larsen}
