"""
Linear algebra on flat tensors for hypergradients: Hessians and a dense Cholesky solve.

Every implicit hypergradient needs ``H⁻¹ v`` with ``H = ∂²L/∂θ²``; this module holds the pieces
that do not depend on which approximation of ``H⁻¹`` a method uses.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.func import grad_and_value, hessian as _hessian, jacrev

from .util import StopCheck

__all__ = [
    "NotPositiveDefiniteError",
    "hessian",
    "hessian_and_value",
    "value_grad_hessian",
    "cholesky",
    "dense_solve",
    "mixed_vjp",
    "hvp",
    "hvp_operator",
    "cg",
    "neumann",
    "power_iteration",
    "SolveResult",
]


CHUNK = 256  # Hessian columns per batched backward pass


class NotPositiveDefiniteError(ValueError):
    """The Hessian of the inner loss is not positive definite where it must be."""


def hessian(fn, theta, *args, mode: str = "reverse-over-reverse"):
    """
    Dense Hessian ``∂²fn/∂θ²`` of a scalar function, by ``torch.func``.

    :param str mode: ``"reverse-over-reverse"`` (``jacrev(jacrev)``; measured 3× faster than the
        alternative through a Pyro trace on CPU, 2.4× as a GPU Hessian-vector product) or
        ``"forward-over-reverse"`` (``jacfwd(jacrev)``).
    """
    if mode == "forward-over-reverse":
        return _hessian(fn)(theta, *args)
    if mode == "reverse-over-reverse":
        return jacrev(jacrev(fn))(theta, *args)
    raise ValueError(f"unknown Hessian mode {mode!r}; use 'forward-over-reverse' or 'reverse-over-reverse'")


def hessian_and_value(fn, theta, *args, chunk_size: int | None = 256):
    """``(∂²fn/∂θ², fn(θ, *args))`` by ``torch.func`` reverse-over-reverse, the value taken from
    the same forward pass (pure: differentiable again, usable under transforms). The Hessian's
    columns are built ``chunk_size`` Hessian-vector products at a time: ``d`` backward passes in all,
    with memory for ``chunk_size`` of them, never ``d``."""
    return jacrev(grad_and_value(fn), has_aux=True, chunk_size=chunk_size)(theta, *args)


def value_grad_hessian(fn, theta):
    """
    ``fn(θ)``, ``∇fn(θ)`` and the dense ``∇²fn(θ)`` by one forward pass, one backward pass and one
    batched backward pass of plain autograd, all detached.

    For use outside ``torch.func`` transforms (Newton steps, the evidence's ``log det H``): it
    costs about half of :func:`hessian` through a Pyro trace, which pays ``torch.func``'s
    per-operation dispatch twice.
    """
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        f = fn(t)
        (g,) = torch.autograd.grad(f, t, create_graph=True)
        d = t.numel()
        eye = torch.eye(d, dtype=t.dtype, device=t.device)
        if not g.requires_grad:  # fn is linear in θ
            return f.detach(), g.detach(), torch.zeros_like(eye)
        # CHUNK columns at a time: memory for CHUNK backward passes, not d of them
        H = torch.cat([
            torch.autograd.grad(g, t, eye[i : i + CHUNK], is_grads_batched=True, retain_graph=True)[0]
            for i in range(0, d, CHUNK)
        ]) if d else eye
    return f.detach(), g.detach(), H.detach()


def cholesky(H, jitter: float = 0.0, what: str = "Hessian of the inner loss"):
    """
    Cholesky factor of ``H + jitter·I``; raises :class:`NotPositiveDefiniteError` when it does
    not exist, saying why that happens and what to do.
    """
    if jitter:
        H = H + jitter * torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    factor, info = torch.linalg.cholesky_ex(H)
    if bool(info.any()):
        raise NotPositiveDefiniteError(
            f"the {what} is not positive definite (Cholesky failed at pivot {int(info.max())} of "
            f"{H.shape[-1]}): either the optimiser did not reach a mode, or the posterior is flat "
            "in some direction (a latent that neither the prior nor the data pin down: give it a proper prior, or "
            "leave it out of the model)"
        )
    return factor


def dense_solve(H, v, jitter: float = 0.0):
    """``(H + jitter·I)⁻¹ v`` by Cholesky — the exact reference every other solver is tested
    against."""
    factor = cholesky(H, jitter)
    return torch.cholesky_solve(v.unsqueeze(-1), factor).squeeze(-1)


def mixed_vjp(inner_loss, theta, h, v):
    """``(∂²L/∂h∂θ)ᵀ v = ∂/∂h ⟨∇_θ L(θ, h), v⟩`` — a double backward pass, no dense mixed matrix.

    Plain autograd (about half the cost of ``torch.func`` through a Pyro trace): call it outside
    ``torch.func`` transforms."""
    with torch.enable_grad():
        h_ = h.detach().requires_grad_(True)
        t = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(inner_loss(t, h_), t, create_graph=True)
        (out,) = torch.autograd.grad(torch.dot(g, v), h_, allow_unused=True)
    return torch.zeros_like(h) if out is None else out.detach()


# --- iterative solvers on a matrix-vector product ---------------------------------------


def hvp_operator(fn, theta, *args, mode: str = "reverse-over-reverse"):
    """
    ``v ↦ ∇²fn(θ) v`` with the linearisation done once: each product then costs one backward
    pass (``"reverse-over-reverse"``, the default) or one forward-mode pass over the gradient
    (``"forward-over-reverse"``).
    """
    grad_fn = torch.func.grad(fn)
    if mode == "reverse-over-reverse":
        _, vjp_fn = torch.func.vjp(lambda t: grad_fn(t, *args), theta)
        return lambda v: vjp_fn(v)[0]  # H is symmetric, so vᵀH = (Hv)ᵀ
    if mode == "forward-over-reverse":
        return lambda v: torch.func.jvp(lambda t: grad_fn(t, *args), (theta,), (v,))[1]
    raise ValueError(f"unknown Hessian mode {mode!r}; use 'reverse-over-reverse' or 'forward-over-reverse'")


def hvp(fn, theta, v, *args, mode: str = "reverse-over-reverse"):
    """One Hessian-vector product ``∇²fn(θ) v``."""
    return hvp_operator(fn, theta, *args, mode=mode)(v)


@dataclass
class SolveResult:
    """``x`` ≈ the solution; ``iterations``; ``residual`` = ``‖b − A x‖ / ‖b‖`` (for Neumann, one
    per term in ``residuals``); ``converged``."""

    x: torch.Tensor
    iterations: int
    residual: float
    converged: bool
    residuals: list | None = None


def cg(matvec, b, x0=None, *, tol: float = 1e-10, max_iter: int | None = None, damping: float = 0.0) -> SolveResult:
    """
    Conjugate gradient on ``(A + damping·I) x = b`` for a symmetric positive definite ``A`` given
    as ``matvec``; stops when the relative residual ``‖b − (A + damping·I)x‖ / ‖b‖ ≤ tol``.

    Warns (``RuntimeWarning``, with the residual reached) when ``max_iter`` (default ``10·d``)
    runs out, and when it meets a direction of non-positive curvature (``A + damping·I`` not
    positive definite): it then returns the last iterate, which is finite.

    The iteration never reads a value to the host: convergence and curvature are masks on the
    device, and the loop asks whether to go on through :class:`~pyro_evidence.util.StopCheck`.

    :param x0: warm start.
    """
    if b.dim() != 1:
        raise ValueError(f"cg solves for a flat right-hand side, got shape {tuple(b.shape)}")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    d = b.numel()
    max_iter = 10 * d if max_iter is None else max_iter
    op = (lambda v: matvec(v) + damping * v) if damping else matvec
    b_norm = b.norm()
    if float(b_norm) == 0.0:
        return SolveResult(torch.zeros_like(b), 0, 0.0, True)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - op(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = torch.dot(r, r)
    bound = (tol * b_norm) ** 2  # ‖r‖/‖b‖ ≤ tol, without a square root per iteration
    active = rs > bound  # neither converged nor stopped by a direction of non-positive curvature
    updates = torch.zeros((), dtype=torch.long, device=b.device)
    stop = StopCheck(b.device)
    for _ in range(max_iter):
        if stop(~active):
            break
        Ap = op(p)
        curvature = torch.dot(p, Ap)
        go = active & (curvature > 0)
        step = torch.where(go, rs / curvature, 0.0)  # 0: x and r stay as they are, bit for bit
        x = x + step * p
        r = r - step * Ap
        rs_new = torch.dot(r, r)
        p = torch.where(go, r + (rs_new / rs) * p, p)
        rs = torch.where(go, rs_new, rs)
        updates = updates + go
        active = go & (rs > bound)
    # the recurrence's residual: the true one would cost one more product
    residual, iterations = float(rs.sqrt() / b_norm), int(updates)
    curved = not bool(active | (rs <= bound))  # it stopped, and not for having converged
    if curved:
        _warn(f"cg met non-positive curvature at iteration {iterations + 1} (the matrix is not positive definite"
              f"{'' if damping else '; pass damping='}); returning the last iterate, relative residual {residual:.3g}")
    elif residual > tol:
        _warn(f"cg did not converge in {max_iter} iterations: relative residual {residual:.3g} > tol {tol:g}")
    return SolveResult(x, iterations, residual, residual <= tol and not curved)


def _warn(message):
    warnings.warn(message, RuntimeWarning, stacklevel=3)  # at the caller of cg


def neumann(matvec, b, *, alpha: float, terms: int, tol: float = 1e-6) -> SolveResult:
    """
    ``A⁻¹ b ≈ α Σ_{j=0}^{terms} (I − αA)^j b`` (Lorraine et al. 2020), which converges when
    ``0 < α < 2/λ_max(A)``. ``residuals[j]`` is the relative residual after term ``j``; it costs
    nothing extra, since ``b − A x_j = (I − αA)^{j+1} b`` is the next power the series needs.
    ``terms + 1`` products with ``A`` in all; ``converged`` says whether the last relative
    residual is at most ``tol`` (the series is never cut short: its length is the method).
    """
    if not alpha > 0:
        raise ValueError(f"the Neumann scale alpha must be > 0, got {alpha}")
    if terms < 0:
        raise ValueError(f"terms must be >= 0, got {terms}")
    b_norm = b.norm().clamp(min=torch.finfo(b.dtype).tiny)
    p = b.clone()  # (I − αA)^j b
    x = alpha * p
    norms = []
    for j in range(terms + 1):
        p = p - alpha * matvec(p)
        norms.append(p.norm())  # read once, after the series: a read per term would stall a GPU
        if j < terms:
            x = x + alpha * p
    residuals = (torch.stack(norms) / b_norm).tolist()
    return SolveResult(x, terms, residuals[-1], residuals[-1] <= tol, residuals)


def power_iteration(matvec, dim: int, like, iterations: int = 20, seed: int = 0) -> float:
    """An estimate of ``λ_max`` of a symmetric positive semi-definite operator (0 for the zero operator)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, generator=g, dtype=torch.float64).to(like)
    v = v / v.norm()
    value = torch.zeros((), dtype=v.dtype, device=v.device)
    for _ in range(iterations):
        w = matvec(v)
        norm = w.norm()
        value = torch.where(norm > 0, torch.dot(v, w), 0.0)  # w = 0: v lies in the null space and stays there
        v = torch.where(norm > 0, w / norm, v)
    return float(value)
