"""
Hypergradients by the implicit function theorem.

At a minimiser ``θ*(h)`` of the inner loss ``L(θ, h)`` (Pedregosa 2016; Lorraine et al. 2020),

.. math::

    \\frac{dQ}{dh} = \\frac{\\partial Q}{\\partial h}
        - \\left(\\frac{\\partial^2 L}{\\partial h\\,\\partial \\theta}\\right)^{\\top}
          H^{-1} \\frac{\\partial Q}{\\partial \\theta},
    \\qquad H = \\frac{\\partial^2 L}{\\partial \\theta^2}.

The methods differ only in how they approximate ``H⁻¹ ∂Q/∂θ``. ``ift-exact`` forms ``H`` densely
and solves by Cholesky: exact up to round-off, ``O(d³)``, the reference for every other method.

References:
    F. Pedregosa, *Hyperparameter optimization with approximate gradient*, ICML 2016.
    J. Lorraine, P. Vicol, D. Duvenaud, *Optimizing millions of hyperparameters by implicit
    differentiation*, AISTATS 2020.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import grad_and_value

from .linalg import dense_solve, mixed_vjp, value_grad_hessian

__all__ = ["Hypergradient", "hypergradient", "ift_exact", "METHODS"]


@dataclass
class Hypergradient:
    """``value`` = ``Q(θ, h)``; ``grad`` = the (approximate) total derivative ``dQ/dh``;
    ``partial`` = ``∂Q/∂h``, the part every method shares."""

    value: torch.Tensor
    grad: torch.Tensor
    partial: torch.Tensor


def ift_exact(inner_loss, validation, theta, h, *, jitter: float = 0.0, hessian=None):
    """Implicit hypergradient with a dense Hessian and a Cholesky solve.

    :param hessian: ``∂²L/∂θ²`` at ``(θ, h)`` if the caller has it already (the inner Newton
        solver does), else it is computed here.
    """
    (g_theta, g_h), value = grad_and_value(validation, argnums=(0, 1))(theta, h)
    if theta.numel() == 0:
        return Hypergradient(value, g_h, g_h)
    H = hessian
    if H is None:
        _, _, H = value_grad_hessian(lambda t: inner_loss(t, h), theta)
    v = dense_solve(H, g_theta, jitter)
    return Hypergradient(value, g_h - mixed_vjp(inner_loss, theta, h, v), g_h)


METHODS = {"ift-exact": ift_exact}


def hypergradient(inner_loss, validation, theta, h, method: str = "ift-exact", **options):
    """
    The hypergradient ``dQ/dh`` of a bilevel problem given by plain torch functions.

    :param callable inner_loss: ``L(θ, h)`` → scalar, minimised over ``θ``.
    :param callable validation: ``Q(θ, h)`` → scalar, maximised over ``h``.
    :param torch.Tensor theta: flat inner parameters at (or near) ``argmin_θ L(θ, h)``.
    :param torch.Tensor h: flat hyperparameters.
    :param str method: one of :data:`METHODS`.
    :returns: :class:`Hypergradient`.
    """
    try:
        fn = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; available: {sorted(METHODS)}") from None
    if theta.dim() != 1 or h.dim() != 1:
        raise ValueError(
            f"theta and h must be flat 1-D tensors, got shapes {tuple(theta.shape)} and {tuple(h.shape)}"
        )
    return fn(inner_loss, validation, theta.detach(), h.detach(), **options)
