"""One entry point for every hypergradient method."""

from __future__ import annotations

from .greedy import GREEDY
from .implicit import IMPLICIT, check_validation
from .unrolled import UNROLLED

__all__ = ["METHODS", "hypergradient"]

METHODS = {**IMPLICIT, **GREEDY, **UNROLLED}


def hypergradient(inner_loss, validation, theta, h, method: str = "ift-exact", **options):
    """
    The hypergradient ``dQ/dh`` of a bilevel problem given by plain torch functions — no Pyro
    needed.

    :param callable inner_loss: ``L(θ, h)`` → scalar, minimised over ``θ``.
    :param callable validation: ``Q(θ, h)`` → scalar, maximised over ``h``.
    :param torch.Tensor theta: flat inner parameters at (or near) ``argmin_θ L(θ, h)``.
    :param torch.Tensor h: flat hyperparameters.
    :param str method: one of :data:`METHODS`; ``options`` go to it (``tol``, ``max_iter``,
        ``damping``, ``x0`` for CG; ``alpha``, ``terms`` for Neumann; ``lr`` for T1–T2, greedy
        and DARTS; ``eps`` for DARTS; ``per_example`` for Larsen; ``hessian``, ``jitter`` for the
        dense solve; ``steps``, ``lr``, ``momentum``, ``step_loss``, ``last`` for the unrolled
        methods, where ``theta`` is the starting point ``θ_0``).
    :returns: :class:`~pyro_evidence.hypergrad.implicit.Hypergradient`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    if theta.dim() != 1 or h.dim() != 1:
        raise ValueError(
            f"theta and h must be flat 1-D tensors, got shapes {tuple(theta.shape)} and {tuple(h.shape)}"
        )
    check_validation(validation, theta, h)
    return METHODS[method](inner_loss, validation, theta.detach(), h.detach(), **options)
