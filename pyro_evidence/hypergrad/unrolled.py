"""
Hypergradients through the inner optimiser's trajectory (seed, "Gradient methods").

The inner optimiser is ``η`` steps of momentum SGD (Maclaurin et al. 2015),

.. math::

    v_{t+1} = \\gamma v_t - (1 - \\gamma) \\nabla_\\theta L_t(\\theta_t, h), \\qquad
    \\theta_{t+1} = \\theta_t + \\alpha v_{t+1},

``L_t`` the loss of step ``t`` (a minibatch's, its likelihood scaled by ``N/B``), and
``Q(θ_η, h)`` is differentiated with respect to ``h`` and to the metaparameters ``α``
(learning rate) and ``γ`` (momentum):

``forward``
    forward mode (Franceschi et al. 2017): tangents ``dθ/dh_j`` carried along the trajectory, one per
    hyperparameter (batched by ``vmap``); cost linear in ``|h|``, memory independent of ``η``.
``rmad``
    reverse mode (Maclaurin et al. 2015) without storing the trajectory: the forward pass runs in
    fixed-point arithmetic (``θ, v`` as integers in units of ``2⁻⁴⁰``), so the reverse pass recomputes
    ``θ_{t−1}, v_{t−1}`` from ``θ_t, v_t`` exactly; the bits that the multiplication by ``γ``
    destroys are kept in an information buffer of 16 bits per parameter and step. A plain float
    reversal would amplify round-off by about ``γ^{−η}``.
``truncated``
    the same reverse pass stopped after the last ``L`` steps (Shaban et al. 2019).
``drmad``
    the reverse pass on the linear path ``θ_t = θ_0 + (t/η)(θ_η − θ_0)`` with constant velocity
    (Fu et al. 2016): no buffer, no exact reversal; its error is what the linearity assumption costs.

``γ`` is quantised to a multiple of ``2⁻¹⁶`` (the exact reversal needs it; all four methods use the
same value, reported as ``momentum``). Every method returns ``θ_η`` in ``info["theta"]`` and
``dQ/dα``, ``dQ/dγ`` in ``info["lr_grad"]``, ``info["momentum_grad"]``.

References:
    D. Maclaurin, D. Duvenaud, R. Adams, *Gradient-based hyperparameter optimization through
    reversible learning*, ICML 2015.
    L. Franceschi, M. Donini, P. Frasconi, M. Pontil, *Forward and reverse gradient-based
    hyperparameter optimization*, ICML 2017.
    A. Shaban, C.-A. Cheng, N. Hatch, B. Boots, *Truncated back-propagation for bilevel
    optimization*, AISTATS 2019.
    J. Fu, H. Luo, J. Feng, K. H. Low, T.-S. Chua, *DrMAD: distilling reverse-mode automatic
    differentiation for optimizing hyperparameters of deep neural networks*, IJCAI 2016.
"""

from __future__ import annotations

import torch
from torch.func import grad, grad_and_value, jvp, vjp, vmap

from .implicit import Hypergradient

__all__ = ["forward", "rmad", "truncated", "drmad", "UNROLLED", "quantize_momentum"]

_RADIX = 2.0**40  # fixed-point unit of θ and v
_GAMMA_BITS = 16
_GAMMA_DEN = 2**_GAMMA_BITS


def quantize_momentum(momentum: float) -> float:
    """``γ`` rounded to a multiple of ``2⁻¹⁶`` in ``(0, 1)``."""
    if not 0 < momentum < 1:
        raise ValueError(f"momentum must lie in (0, 1), got {momentum}")
    return max(1, min(_GAMMA_DEN - 1, round(momentum * _GAMMA_DEN))) / _GAMMA_DEN


def _check(num_steps, lr):
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")


def _losses(inner_loss, step_loss):
    """``step_loss(θ, h, t)`` if given (minibatches), else the full-batch loss at every step."""
    return step_loss if step_loss is not None else (lambda theta, h, t: inner_loss(theta, h))


def _sgd_float(loss, theta, h, lr, gamma, num_steps):
    v = torch.zeros_like(theta)
    for t in range(num_steps):
        v = gamma * v - (1 - gamma) * grad(loss)(theta, h, t)
        theta = theta + lr * v
    return theta, v


def forward(inner_loss, validation, theta, h, *, num_steps: int = 100, lr: float = 0.1, momentum: float = 0.9, step_loss=None):
    """Forward-mode hypergradient through ``num_steps`` of momentum SGD from ``theta``."""
    _check(num_steps, lr)
    gamma = quantize_momentum(momentum)
    loss = _losses(inner_loss, step_loss)
    p = h.numel()
    # tangent directions: one per hyperparameter, then α and γ
    dh = torch.cat([torch.eye(p, dtype=h.dtype, device=h.device), torch.zeros(2, p, dtype=h.dtype, device=h.device)])
    dlr = torch.zeros(p + 2, dtype=h.dtype, device=h.device)
    dlr[p] = 1
    dgamma = torch.zeros(p + 2, dtype=h.dtype, device=h.device)
    dgamma[p + 1] = 1

    def step(theta, v, h, lr_, gamma_, t):
        v = gamma_ * v - (1 - gamma_) * grad(loss)(theta, h, t)
        return theta + lr_ * v, v

    lr_t = torch.tensor(lr, dtype=h.dtype, device=h.device)
    gamma_t = torch.tensor(gamma, dtype=h.dtype, device=h.device)
    v = torch.zeros_like(theta)
    Z_theta = torch.zeros(p + 2, theta.numel(), dtype=theta.dtype, device=theta.device)
    Z_v = torch.zeros_like(Z_theta)
    for t in range(num_steps):
        def tangent(zt, zv, zh, zl, zg):
            return jvp(lambda a, b, c, d, e: step(a, b, c, d, e, t), (theta, v, h, lr_t, gamma_t), (zt, zv, zh, zl, zg))

        (new_theta, new_v), (Z_theta, Z_v) = vmap(tangent)(Z_theta, Z_v, dh, dlr, dgamma)
        theta, v = new_theta[0], new_v[0]
    (g_theta, g_h), value = grad_and_value(validation, argnums=(0, 1))(theta, h)
    total = Z_theta @ g_theta
    return Hypergradient(
        value,
        total[:p] + g_h,
        g_h,
        {"theta": theta, "lr_grad": total[p], "momentum_grad": total[p + 1], "momentum": gamma, "num_steps": num_steps},
    )


def _to_fixed(x):
    if float(x.abs().max()) * _RADIX >= 2.0**62:
        raise OverflowError("a parameter left the fixed-point range (|θ|, |v| < 2²²); lower lr or num_steps")
    return torch.round(x * _RADIX).to(torch.int64)


def _from_fixed(x, like):
    return (x.to(torch.float64) / _RADIX).to(like.dtype)


def _reverse(loss, validation, theta_T, h, lr, gamma, path, first):
    """Maclaurin et al.'s Algorithm 2, from the last step back to step ``first``, along ``path``: where
    each step's ``θ_t`` and velocities come from (the exact reversal for ``rmad``, the straight line for
    ``drmad``). Returns ``Q``, ``dQ/dh``, ``∂Q/∂h``, ``dQ/dα`` and ``dQ/dγ``."""
    (d_theta, d_h), value = grad_and_value(validation, argnums=(0, 1))(theta_T, h)
    partial = d_h
    d_v = torch.zeros_like(d_theta)
    d_lr = torch.zeros((), dtype=h.dtype, device=h.device)
    d_gamma = torch.zeros((), dtype=h.dtype, device=h.device)
    for t in reversed(range(first, path.num_steps)):
        d_lr = d_lr + torch.dot(d_theta, path.velocity())  # θ_{t+1} = θ_t + α v_{t+1}
        d_v = d_v + lr * d_theta
        g, vjp_fn = vjp(lambda a, b: grad(loss)(a, b, t), path.position(t), h)
        # v_{t+1} = γ v_t − (1−γ) g_t
        d_gamma = d_gamma + torch.dot(d_v, path.previous_velocity(t, g) + g)
        d_theta_hvp, d_h_mixed = vjp_fn(d_v)
        d_theta = d_theta - (1 - gamma) * d_theta_hvp
        d_h = d_h - (1 - gamma) * d_h_mixed
        d_v = gamma * d_v
    return value, d_h, partial, d_lr, d_gamma


class _ExactPath:
    """The fixed-point trajectory walked backwards exactly: ``θ_t`` and ``v_t`` recomputed from ``θ_{t+1}``,
    ``v_{t+1}`` and the bits the multiplication by ``γ`` dropped (``buffer``)."""

    def __init__(self, theta_i, v_i, buffer, lr, gamma, like):
        self.theta_i, self.v_i, self.buffer, self.lr, self.gamma, self.like = theta_i, v_i, buffer, lr, gamma, like
        self.num_steps = buffer.shape[0]

    def velocity(self):
        return _from_fixed(self.v_i, self.like)

    def position(self, t):
        # θ_t = θ_{t+1} − α v_{t+1}, exactly as the forward pass rounded it
        self.theta_i = self.theta_i - torch.round(self.lr * self.v_i.to(torch.float64)).to(torch.int64)
        return _from_fixed(self.theta_i, self.like)

    def previous_velocity(self, t, g):
        # undo the gradient term, then the multiplication by γ
        gamma_v = self.v_i + torch.round((1 - self.gamma) * g.to(torch.float64) * _RADIX).to(torch.int64)
        product = gamma_v * _GAMMA_DEN + self.buffer[t].to(torch.int64) + 2**15
        self.v_i = torch.div(product, round(self.gamma * _GAMMA_DEN), rounding_mode="floor")
        return _from_fixed(self.v_i, self.like)


class _LinearPath:
    """DrMAD's stand-in for the trajectory: ``θ_t = θ_0 + (t/η)(θ_η − θ_0)`` at the constant velocity
    ``(θ_η − θ_0)/(η α)``."""

    def __init__(self, theta0, theta_T, num_steps, lr):
        self.theta0, self.delta, self.num_steps = theta0, theta_T - theta0, num_steps
        self.v = self.delta / (num_steps * lr)

    def velocity(self):
        return self.v

    def position(self, t):
        return self.theta0 + (t / self.num_steps) * self.delta

    def previous_velocity(self, t, g):
        return self.v


def _forward_fixed(loss, theta, h, lr, gamma, num_steps):
    """The forward pass in fixed point, keeping 16 bits per parameter and step."""
    p_num = round(gamma * _GAMMA_DEN)
    theta_i, v_i = _to_fixed(theta), torch.zeros(theta.shape, dtype=torch.int64, device=theta.device)
    buffer = torch.empty(num_steps, theta.numel(), dtype=torch.int16, device=theta.device)
    for t in range(num_steps):
        g = grad(loss)(_from_fixed(theta_i, h), h, t)
        product = v_i * p_num
        buffer[t] = (torch.remainder(product, _GAMMA_DEN) - 2**15).to(torch.int16)
        v_i = torch.div(product, _GAMMA_DEN, rounding_mode="floor")
        v_i = v_i - torch.round((1 - gamma) * g.to(torch.float64) * _RADIX).to(torch.int64)
        theta_i = theta_i + torch.round(lr * v_i.to(torch.float64)).to(torch.int64)
        if float(theta_i.abs().max()) >= 2.0**62 / 4:
            raise OverflowError("a parameter left the fixed-point range (|θ| < 2²⁰); lower lr or num_steps")
    return theta_i, v_i, buffer


def rmad(inner_loss, validation, theta, h, *, num_steps: int = 100, lr: float = 0.1, momentum: float = 0.9, step_loss=None, last: int | None = None):
    """Reverse mode through ``num_steps`` of momentum SGD, the trajectory recomputed backwards
    exactly (fixed point plus an information buffer) instead of stored; ``last`` = ``L`` stops
    the reverse pass after the last ``L`` steps (``truncated``)."""
    _check(num_steps, lr)
    gamma = quantize_momentum(momentum)
    loss = _losses(inner_loss, step_loss)
    keep = num_steps if last is None else last
    if not 1 <= keep <= num_steps:
        raise ValueError(f"last must lie in [1, num_steps = {num_steps}], got {last}")
    theta_i, v_i, buffer = _forward_fixed(loss, theta, h, lr, gamma, num_steps)
    theta_T = _from_fixed(theta_i, h)
    path = _ExactPath(theta_i, v_i, buffer, lr, gamma, h)
    value, d_h, partial, d_lr, d_gamma = _reverse(loss, validation, theta_T, h, lr, gamma, path, num_steps - keep)
    info = {"theta": theta_T, "lr_grad": d_lr, "momentum_grad": d_gamma, "momentum": gamma, "num_steps": num_steps,
            "buffer_bytes": buffer.numel() * 2}
    if keep == num_steps:  # the reversal must land on θ_0 exactly
        info["reversal_error"] = float((path.theta_i - _to_fixed(theta)).abs().max())
    return Hypergradient(value, d_h, partial, info)


def truncated(inner_loss, validation, theta, h, *, num_steps: int = 100, lr: float = 0.1, momentum: float = 0.9, step_loss=None, last: int = 10):
    """Reverse mode through the last ``last`` of ``num_steps`` momentum-SGD steps only."""
    return rmad(inner_loss, validation, theta, h, num_steps=num_steps, lr=lr, momentum=momentum, step_loss=step_loss, last=last)


def drmad(inner_loss, validation, theta, h, *, num_steps: int = 100, lr: float = 0.1, momentum: float = 0.9, step_loss=None):
    """The reverse pass on the linear path from ``θ_0`` to ``θ_η`` (Fu et al. 2016)."""
    _check(num_steps, lr)
    gamma = quantize_momentum(momentum)
    loss = _losses(inner_loss, step_loss)
    theta_T, _ = _sgd_float(loss, theta, h, lr, gamma, num_steps)
    path = _LinearPath(theta, theta_T, num_steps, lr)
    value, d_h, partial, d_lr, d_gamma = _reverse(loss, validation, theta_T, h, lr, gamma, path, 0)
    info = {"theta": theta_T, "lr_grad": d_lr, "momentum_grad": d_gamma, "momentum": gamma, "num_steps": num_steps}
    return Hypergradient(value, d_h, partial, info)


UNROLLED = {"forward": forward, "rmad": rmad, "truncated": truncated, "drmad": drmad}
