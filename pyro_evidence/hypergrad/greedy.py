"""
Greedy hypergradients: one look-ahead step of the inner optimiser (Luketina et al. 2016), and
the same with the mixed second derivative by finite differences (DARTS, Liu et al. 2018).

After one inner step ``θ' = θ − η ∇_θ L(θ, h)``, the seed's greedy update follows

.. math::

    \\nabla_h Q(\\theta'(h), h) = \\partial_h Q(\\theta', h)
        - \\eta \\, (\\partial^2_{h\\theta} L(\\theta, h))^{\\top} \\nabla_{\\theta'} Q(\\theta', h),

computed exactly by reverse mode (``greedy``), or with the mixed product replaced by the central
difference ``(∇_h L(θ⁺, h) − ∇_h L(θ⁻, h)) / 2ε``, ``θ± = θ ± ε ∇_{θ'}Q`` (``darts``): first
derivatives only, ``O(|θ| + |h|)``, exact up to ``O(ε²)``.

At an inner optimum ``θ' = θ`` and greedy is T1–T2 with ``H⁻¹ ≈ ηI``; its point is to run inside
the training loop, with no inner convergence at all.
"""

from __future__ import annotations

from torch.func import grad, grad_and_value

from .implicit import Hypergradient, default_step

__all__ = ["greedy", "darts", "GREEDY"]


def greedy(inner_loss, validation, theta, h, *, lr: float | None = None):
    """``∇_h Q(θ − η∇_θL(θ, h), h)`` by reverse mode through the step; ``lr`` = ``η``, default
    ``1/λ_max(H)``."""
    lr = default_step(inner_loss, theta, h) if lr is None else lr

    def look_ahead(h_):
        return validation(theta - lr * grad(inner_loss)(theta, h_), h_)

    g_h, value = grad_and_value(look_ahead)(h)
    partial = grad(validation, argnums=1)(theta, h)
    return Hypergradient(value, g_h, partial, {"lr": lr})


def darts(inner_loss, validation, theta, h, *, lr: float | None = None, eps: float = 1e-2):
    """``greedy`` with the mixed product by a central difference of ``∇_h L`` (Liu et al. 2018);
    ``eps`` is relative: the perturbation is ``eps / ‖∇_{θ'} Q‖`` along ``∇_{θ'} Q``."""
    lr = default_step(inner_loss, theta, h) if lr is None else lr
    ahead = theta - lr * grad(inner_loss)(theta, h)
    (g_theta, g_h), value = grad_and_value(validation, argnums=(0, 1))(ahead, h)
    norm = g_theta.norm()
    if float(norm) == 0:
        return Hypergradient(value, g_h, g_h, {"lr": lr, "eps": 0.0})
    step = eps / norm
    grad_h = grad(inner_loss, argnums=1)
    mixed = (grad_h(theta + step * g_theta, h) - grad_h(theta - step * g_theta, h)) / (2 * step)
    return Hypergradient(value, g_h - lr * mixed, g_h, {"lr": lr, "eps": float(step)})


GREEDY = {"greedy": greedy, "darts": darts}
