"""
Linear algebra on flat tensors for hypergradients: Hessians and a dense Cholesky solve.

Every implicit hypergradient needs ``H⁻¹ v`` with ``H = ∂²L/∂θ²``; this module holds the pieces
that do not depend on which approximation of ``H⁻¹`` a method uses.
"""

from __future__ import annotations

import torch
from torch.func import grad_and_value, hessian as _hessian, jacrev

__all__ = [
    "NotPositiveDefiniteError",
    "hessian",
    "hessian_and_value",
    "value_grad_hessian",
    "cholesky",
    "dense_solve",
    "mixed_vjp",
]


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


def hessian_and_value(fn, theta, *args):
    """``(∂²fn/∂θ², fn(θ, *args))`` by ``torch.func`` reverse-over-reverse, the value taken from
    the same forward pass (pure: differentiable again, usable under transforms)."""
    return jacrev(grad_and_value(fn), has_aux=True)(theta, *args)


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
        eye = torch.eye(t.numel(), dtype=t.dtype, device=t.device)
        if g.requires_grad:
            (H,) = torch.autograd.grad(g, t, eye, is_grads_batched=True)
        else:  # fn is linear in θ
            H = torch.zeros_like(eye)
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
            "in some direction (a prior too weak for an unidentified parameter); pass jitter= "
            "(e.g. jitter=1e-6) to add jitter·I to the Hessian"
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
