"""
Hypergradients through a hypernetwork that approximates the best response (seed, the table's last
gradient row; Lorraine & Duvenaud 2018; self-tuning networks, MacKay et al. 2019).

A network ``θ_φ(h)`` is trained so that ``θ_φ(h') ≈ θ*(h') = argmin_θ L(θ, h')`` for ``h'`` near the
current ``h``, and the hypergradient is the derivative of ``Q`` through it,

.. math::

    \\frac{dQ}{dh} = \\frac{\\partial Q}{\\partial h} + \\frac{\\partial Q}{\\partial \\theta}
        \\frac{\\partial \\theta_\\phi}{\\partial h}, \\qquad
    \\phi = \\arg\\min_\\phi \\; \\mathbb{E}_{\\varepsilon \\sim \\mathcal N(0, \\sigma^2 I)}
        L(\\theta_\\phi(h + \\varepsilon), h + \\varepsilon).

The network is affine, ``θ_φ(h') = θ_c + U (h' − h_c)`` (Lorraine & Duvenaud's linear hypernetwork;
``U`` is ``|θ| × |h|``), trained on a fixed set of antithetic draws ``±ε_k`` and the centre ``h_c``:
with ``W = [θ_c | U]`` and ``ẽ_k = (1, ε_k)`` the training loss is ``mean_k L(W ẽ_k, h_c + ε_k)``, whose
Hessian is ``mean_k ∇²L_k ⊗ ẽ_k ẽ_kᵀ`` — built from the draws' ``|θ| × |θ|`` inner Hessians, so modified
Newton (:func:`~pyro_evidence.optim.newton`) trains it in a few steps where the ``|θ|(|h| + 1)``
parameters fit a dense matrix (:data:`NEWTON_MAX_DIM`), L-BFGS beyond. Where the best response is affine over the sampled
range the trained ``U`` is ``dθ*/dh`` and the hypergradient equals the implicit one; elsewhere it is
the best affine fit to the best response over ``h_c ± σ``, a smoothed ``dθ*/dh``.

The trained network is returned in ``info["hypernet"]``; handed back with ``num_steps=0`` it gives
hypergradients at other ``h`` without training: within ``h_c ± reach·σ`` (the trained range) from
the same network, outside it with ``info["stale"] = True`` and a :class:`StaleHypernetwork` warning.
``info["residual"]`` is the best-response approximation error at ``h``, ``‖∇_θ L(θ_φ(h), h)‖``
(0 where ``θ_φ(h)`` is a stationary point of the inner loss), ``info["train_residual"]`` its root mean
square over the training draws.

References:
    J. Lorraine, D. Duvenaud, *Stochastic hyperparameter optimization through hypernetworks*, 2018.
    M. MacKay, P. Vicol, J. Lorraine, D. Duvenaud, R. Grosse, *Self-tuning networks: bilevel optimization
    of hyperparameters using structured best-response functions*, ICLR 2019.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.func import grad, grad_and_value

from ..linalg import value_grad_hessian
from ..optim import minimize, newton
from .implicit import Hypergradient

__all__ = ["Hypernet", "StaleHypernetwork", "hypernetwork", "HYPERNETWORK"]


NEWTON_MAX_DIM = 2000  # of the network's parameters |θ|(|h| + 1): above, L-BFGS without a dense Hessian


class StaleHypernetwork(UserWarning):
    """A hypergradient was asked of a hypernetwork at ``h`` outside the range it was trained on."""


@dataclass
class Hypernet:
    """The affine best-response approximation ``θ(h') = theta + U (h' − centre)``, trained for
    ``|h' − centre| ≤ reach · scale`` (each coordinate)."""

    theta: torch.Tensor
    U: torch.Tensor
    centre: torch.Tensor
    scale: float
    reach: float

    def __call__(self, h):
        return self.theta + self.U @ (h - self.centre)

    def covers(self, h) -> bool:
        return bool(((h - self.centre).abs() <= self.reach * self.scale).all())


def _draws(h, num_draws, scale, seed):
    """The centre and ``num_draws`` antithetic offsets ``±ε_k``, ``ε_k ~ N(0, scale² I)``: the pairs make
    the sample mean of ``ε`` zero, so the centre's fit does not lean on the draws."""
    generator = torch.Generator().manual_seed(seed)
    half = max(1, num_draws // 2)
    eps = scale * torch.randn(half, h.numel(), generator=generator, dtype=h.dtype).to(h.device)
    return torch.cat([h.new_zeros(1, h.numel()), eps, -eps])


def _draw_derivatives(inner_loss, h, offsets):
    """``vgh(z)`` of the training loss ``mean_k L(W ẽ_k, h + ε_k)`` over ``z = vec W``, ``W = [θ_c | U]``, ``ẽ_k =
    (1, ε_k)``, from each draw's own value, gradient ``g_k`` and Hessian ``H_k``: ``∇_W = mean_k g_k ẽ_kᵀ`` and
    ``∇²_W = mean_k H_k ⊗ ẽ_k ẽ_kᵀ``. The draws' Hessians are ``|θ| × |θ|``: forming them costs ``K|θ|`` backward
    passes through one inner loss each, where autograd's Hessian of the averaged loss would cost ``|θ|(|h| + 1)``
    passes through all ``K`` of them."""
    E = torch.cat([offsets.new_ones(offsets.shape[0], 1), offsets], 1)

    def vgh(z):
        W = z[0].reshape(-1, E.shape[1])
        f, g, H = map(torch.stack, zip(*(value_grad_hessian(lambda t, e=e: inner_loss(t, h + e), W @ ee) for e, ee in zip(offsets, E))))
        n = W.numel()
        g = torch.einsum("ki,ka->ia", g, E) / len(E)
        H = torch.einsum("kij,ka,kb->iajb", H, E, E).reshape(n, n) / len(E)
        return f.mean()[None], g.reshape(1, n), H[None]

    return vgh


def _train(inner_loss, start, h, scale, num_draws, num_steps, seed, reach):
    d, m = start.theta.numel(), h.numel()
    offsets = _draws(h, num_draws, scale, seed)
    tol = torch.finfo(h.dtype).eps ** 0.5

    def loss(z):
        W = z.reshape(d, m + 1)
        return sum(inner_loss(W[:, 0] + W[:, 1:] @ e, h + e) for e in offsets) / offsets.shape[0]

    z, converged, iterations = torch.cat([start(h)[:, None], start.U], 1).reshape(-1), False, 0
    if z.numel() <= NEWTON_MAX_DIM:  # modified Newton: τ = 0, plain Newton, where the Hessian is positive definite
        fit = newton(_draw_derivatives(inner_loss, h, offsets), z[None], max_steps=num_steps, modified=True)
        z, iterations = fit.theta[0], fit.steps
        converged = float(fit.g.norm()) <= tol * max(1.0, abs(float(fit.f[0])))
    if not converged:  # too large for a dense Hessian, or Newton stalled (round-off at extreme h)
        fit = minimize(loss, z, max_iter=num_steps, tol=tol, newton_max_dim=0)
        z, converged, iterations = fit.theta, fit.converged, iterations + fit.lbfgs_iterations
    W = z.reshape(d, m + 1)
    net = Hypernet(W[:, 0], W[:, 1:], h.clone(), scale, reach)
    residual = torch.stack([grad(inner_loss)(net(h + e), h + e).norm() for e in offsets])
    return net, iterations, converged, float(residual.pow(2).mean().sqrt())


def hypernetwork(inner_loss, validation, theta, h, *, hypernet: Hypernet | None = None, scale: float = 0.1,
                 num_draws: int | None = None, num_steps: int = 100, reach: float = 2.0, seed: int = 0) -> Hypergradient:
    """
    ``dQ/dh`` through an affine hypernetwork trained around ``h`` (module docstring).

    :param theta: the start of the network's offset where no ``hypernet`` is given (its ``U`` starts at 0).
    :param Hypernet hypernet: a network from an earlier call (``info["hypernet"]``), the training's warm start;
        with ``num_steps=0`` it is used as it is.
    :param float scale: ``σ``, the standard deviation of the training draws around ``h`` (unconstrained units).
    :param int num_draws: training draws besides the centre (default ``2·max(|h|, 2)``, antithetic pairs).
    :param int num_steps: the training budget (iterations of the minimiser); 0 reuses ``hypernet``.
    :param float reach: the trained range, ``h_c ± reach·σ``.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if num_steps < 0 or (num_steps == 0 and hypernet is None):
        raise ValueError(f"num_steps must be > 0 without a trained hypernet= (got {num_steps})")
    info = {}
    if num_steps > 0:
        start = hypernet if hypernet is not None else Hypernet(theta, theta.new_zeros(theta.numel(), h.numel()), h, scale, reach)
        num_draws = 2 * max(h.numel(), 2) if num_draws is None else num_draws
        hypernet, iterations, converged, info["train_residual"] = _train(inner_loss, start, h, scale, num_draws, num_steps, seed, reach)
        info.update(iterations=iterations, converged=converged, num_draws=num_draws)
    stale = not hypernet.covers(h)
    if stale:
        warnings.warn(f"the hypernetwork was trained for h within ±{hypernet.reach * hypernet.scale:.3g} of its centre; h is "
                      f"{float((h - hypernet.centre).abs().max()):.3g} away: its best response is stale (train it here: num_steps > 0)",
                      StaleHypernetwork, stacklevel=3)
    theta_h = hypernet(h)
    (g_theta, g_h), value = grad_and_value(validation, argnums=(0, 1))(theta_h, h)
    residual = float(grad(inner_loss)(theta_h, h).norm())
    return Hypergradient(value, g_h + hypernet.U.T @ g_theta, g_h,
                         {**info, "theta": theta_h, "hypernet": hypernet, "stale": stale, "residual": residual})


HYPERNETWORK = {"hypernetwork": hypernetwork}
