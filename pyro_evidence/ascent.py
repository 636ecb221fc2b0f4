"""
Outer loops: ascent on ``Q(θ*(h), h)`` in unconstrained ``h``.

Each takes ``evaluate(h, **options)`` — the inner solve warm-started from the last ``θ*`` and a
hypergradient, recorded in a :class:`~pyro_evidence.checkpoint.Progress` — and moves ``h``:

- :func:`ascend`: L-BFGS with a strong-Wolfe line search (backing off from trial points where the
  inner problem fails), Adam, or plain gradient ascent, checkpointing as it goes;
- :func:`hoag`: Pedregosa's adaptive step with rejection and a shrinking CG tolerance;
- :func:`coordinate_ascent`: Graves' alternation of the fit of ``q`` and the prior's closed-form update.

The last two are methods of their own, entries of :data:`OUTER_LOOPS` (:class:`OuterLoop`) that say what
the selection must hand them; the selection names none of them.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.distributions import constraints
from torch.func import grad

from .checkpoint import Best, Progress, Saver, Step
from .optim import minimize

__all__ = ["BOUND", "NonFinite", "OUTER_LOOPS", "OuterLoop", "SCHEDULES", "ascend", "at_bounds", "coordinate_ascent", "hoag",
           "lbfgs_step", "outer_optimizer", "probe_points"]


class NonFinite(Exception):
    """An outer evaluation failed (a non-finite ``Q`` or ``dQ/dh``, an inner Hessian that is not positive
    definite) after a good point was recorded; ``step`` is the evaluation's number."""

    def __init__(self, step, reason):
        super().__init__(step, reason)
        self.step, self.reason = step, reason


def outer_optimizer(name, h, lr, tol):
    """The torch optimiser of an outer loop on ``h`` (which it minimises: the loops hand it ``−Q``)."""
    if name == "lbfgs":
        return torch.optim.LBFGS(
            [h], lr=1.0 if lr is None else lr, max_iter=1, max_eval=25, tolerance_grad=tol,
            tolerance_change=0.0, history_size=20, line_search_fn="strong_wolfe",
        )
    if name == "adam":
        return torch.optim.Adam([h], lr=0.05 if lr is None else lr)
    return torch.optim.SGD([h], lr=0.05 if lr is None else lr)  # h ← h + lr · dQ/dh


def lbfgs_step(outer, closure, h, retries=4, shrink=0.1):
    """One L-BFGS iteration that backs off from trial points where the inner problem fails.

    The strong-Wolfe line search has no use for a point where ``Q`` cannot be evaluated (the
    inner Hessian is not positive definite there, say), so such a trial ends the step: the
    optimiser's state and ``h`` are restored and the iteration is repeated from a step ``shrink``
    times shorter, up to ``retries`` times, before the failure ends the selection.
    """
    saved = copy.deepcopy(outer.state_dict())
    start = h.detach().clone()
    lr = outer.param_groups[0]["lr"]
    try:
        for attempt in range(retries + 1):
            try:
                return outer.step(closure)
            except NonFinite:
                if attempt == retries:
                    raise
                with torch.no_grad():
                    h.copy_(start)
                outer.load_state_dict(copy.deepcopy(saved))
                outer.param_groups[0]["lr"] = lr * shrink ** (attempt + 1)
    finally:
        outer.param_groups[0]["lr"] = lr


def ascend(optimizer, evaluate, h, lr, tol, max_steps, progress: Progress, saver: Saver):
    """Ascent on ``Q`` one outer iteration at a time until ``max |dQ/dh| ≤ tol``, L-BFGS stalls, or
    ``max_steps`` evaluations are recorded; checkpoints through ``saver`` (and resumes from it)."""
    outer = outer_optimizer(optimizer, h, lr, tol)
    done = saver.restore(h, outer, progress)

    def closure():
        hg = evaluate(h.detach())
        h.grad = -hg.grad
        return -hg.value.detach()

    lbfgs, fresh = optimizer == "lbfgs", False
    while len(progress.history) < max_steps:
        before = h.detach().clone()
        if lbfgs:
            lbfgs_step(outer, closure, h)
        else:
            closure()
        done += 1
        saver.save(h, outer, progress, done)
        if progress.cache is not None and float(progress.cache[1].grad.abs().max()) <= tol:
            evaluate(h.detach())  # the converged point itself, for the record
            break
        if not lbfgs:
            outer.step()
        elif torch.equal(before, h.detach()):
            if fresh:
                break  # L-BFGS stalled twice in a row: the line search finds no rise of Q along its direction
            # a curvature history gathered far away can point the line search nowhere: forget it once
            outer, fresh = outer_optimizer(optimizer, h, lr, tol), True
        else:
            fresh = False
    saver.save(h, outer, progress, done, final=True)


SCHEDULES = {
    "exponential": lambda k: 0.1 * 0.9**k,
    "quadratic": lambda k: 0.1 / (k + 1) ** 2,
    "cubic": lambda k: 0.1 / (k + 1) ** 3,
}


def hoag(evaluate, h, max_steps, tol, schedule, lr):
    """
    HOAG (Pedregosa 2016, Algorithm 1), written for ascent on ``Q``: at outer step ``k`` the
    linear system ``H v = ∂Q/∂θ`` is solved by CG to the tolerance ``ε_k`` of the schedule,
    warm-started from the previous ``v``; the step ``h ← h + p_k / L`` is accepted when ``Q`` does
    not fall by more than ``ε_k·(1 + ‖p_k‖)`` — then ``L ← 0.9 L`` — and rejected otherwise, or
    where the inner problem fails there — then ``L ← 2 L`` and ``h`` stays.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown HOAG schedule {schedule!r}; use one of {sorted(SCHEDULES)}")
    eps = SCHEDULES[schedule]
    lipschitz = 1.0 / (0.05 if lr is None else lr)
    hg = evaluate(h, tol=eps(0))
    v = hg.info.get("v")
    for k in range(1, max_steps):
        if float(hg.grad.abs().max()) <= tol:
            return
        candidate = h + hg.grad / lipschitz
        try:
            new = evaluate(candidate, tol=eps(k), x0=v)
        except NonFinite:
            new = None
        if new is not None and float(new.value) >= float(hg.value) - eps(k) * (1 + float(hg.grad.norm())):
            h, hg, v = candidate, new, new.info.get("v")
            lipschitz *= 0.9
        else:
            lipschitz *= 2.0


def coordinate_ascent(obj, h, progress: Progress, max_steps, tol, start, on_step):
    """Graves (2011): alternate the fit of q (``θ ← argmin_θ L``) with the prior update
    ``h ← argmax_h Q(θ, h)``. Neither half lowers ``Q``; stops at the fixed point. ``on_step(Q, step=…)``
    is told each step's objective and move (the progress bar)."""
    problem = obj.problem
    theta = obj.theta_init
    for _ in range(max_steps):
        theta = obj.solve(h, theta).theta
        m = minimize(lambda h_: -obj.validation(theta, h_), h)
        h_new, value = m.theta, -m.loss
        gmax = float(grad(obj.validation, argnums=1)(theta, h_new).abs().max())
        moved = float((h_new - h).abs().max())
        h = h_new
        hp = {k: v.detach().clone() for k, v in problem.params(h).items()}
        progress.history.append(Step(float(value), hp, gmax, time.perf_counter() - start))
        progress.best = Best(float(value), h.clone(), theta, value.detach(), gmax)  # Q never falls
        on_step(float(value), step=moved)
        if moved <= tol:
            progress.fixed_point = True
            break
    else:
        progress.fixed_point = False
    progress.theta = theta


BOUND = math.log(1e6)
"""``|h_j| > BOUND`` (unconstrained): the constrained value lies within a factor 10⁻⁶ of an edge of its support
(a precision above 10⁶ or below 10⁻⁶ from a start at 1; a unit-interval value within 10⁻⁶ of 0 or 1)."""


def at_bounds(problem, h):
    """``(h_dim,)`` booleans: the coordinates of ``h`` that ran out towards an edge of their support.

    There ``Q`` is flat in unconstrained ``h`` whether or not the edge is a maximum: the gradient in
    ``u = log α`` of a precision is ``−γ ∂Q/∂γ`` in ``γ = 1/α``, so at ``α = 10¹³`` it is ``~10⁻¹²`` even where
    lowering ``α`` would raise ``Q`` (Tipping & Faul 2003: the weight is relevant when ``q² > s``). The
    derivative in ``γ`` is lost to round-off there, so stationarity at such a point is judged by probes along the
    coordinate (:func:`probe_points`), not by the gradient.
    """
    at = torch.zeros(problem.h_dim, dtype=torch.bool, device=h.device)
    for site in problem.hypers:
        if site.constraint is not constraints.real:  # an identity transform has no edge to run to
            at[site.slice] = h[site.slice].abs() > BOUND
    return at


def probe_points(problem, h, j, step=2.0):
    """Unconstrained values of coordinate ``j`` (at a bound) at which to look for a higher ``Q``: from its start
    (0, a precision of 1, where the start is itself beyond the bound) towards the bound it ran to, ``step`` apart
    (a factor ``e²`` in a positive value), inside the bound."""
    start = float(problem.h_init[j])
    u, sign, points = (start if abs(start) <= BOUND else 0.0), (1.0 if float(h[j]) > 0 else -1.0), []
    while abs(u) <= BOUND:
        points.append(u)
        u += sign * step
    return points


@dataclass(frozen=True)
class OuterLoop:
    """
    A selection method that is an outer loop of its own, not a hypergradient handed to L-BFGS, Adam or
    SGD: ``run(evaluate, obj, h, progress, max_steps, tol, lr, **own)``, the hypergradient method its
    evaluations compute (None: it needs none), its own options and those it passes to that method, and
    the one objective it serves where it serves only one.
    """

    run: Callable
    description: str
    hypergradient: str | None = None
    own: frozenset = frozenset()
    passed: frozenset = frozenset()
    objective: str | None = None
    takes_lr: bool = True


def _hoag(evaluate, obj, h, progress, max_steps, tol, lr, schedule="quadratic"):
    hoag(evaluate, h, max_steps, tol, schedule, lr)


def _graves(evaluate, obj, h, progress, max_steps, tol, lr):
    coordinate_ascent(obj, h, progress, max_steps, tol, evaluate.start, evaluate.show)


OUTER_LOOPS = {
    # HOAG's step is a CG solve to its schedule's tolerance, warm-started by the loop (x0)
    "hoag": OuterLoop(_hoag, "HOAG's adaptive step", "ift-cg", frozenset({"schedule"}),
                      frozenset({"max_iter", "damping", "mode"})),
    "graves": OuterLoop(_graves, "Graves' closed-form update", objective="elbo", takes_lr=False),
}
