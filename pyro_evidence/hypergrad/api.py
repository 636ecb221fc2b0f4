"""One entry point for every hypergradient method, and the registry that says what each needs."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

from .greedy import GREEDY
from .hypernetwork import HYPERNETWORK
from .implicit import IMPLICIT, check_validation
from .unrolled import UNROLLED

__all__ = ["METHODS", "Method", "hypergradient"]


@dataclass(frozen=True)
class Method:
    """
    A hypergradient method ``fn(inner_loss, validation, θ, h, **options)`` and what a caller must hand it
    besides (``needs``):

    - ``"hessian"``: the dense inner Hessian at ``θ`` (``hessian=``, with ``jitter=``), which the inner
      solve has already formed;
    - ``"per_example"``: the per-example inner losses (``per_example=``);
    - ``"hypernet"``: the hypernetwork of its previous call (``hypernet=``), its training's warm start; it
      returns the network's best response at ``h`` in ``info["theta"]`` and the network in ``info["hypernet"]``;
    - ``"trajectory"``: nothing — it runs the inner optimisation itself from ``θ`` (its ``θ_0``) and returns
      the end point in ``info["theta"]``; it takes a minibatch loss as ``step_loss=``.

    ``renamed`` maps an option's earlier name to its name now; :meth:`upgrade` moves it with a ``FutureWarning``.
    """

    fn: Callable
    needs: frozenset = frozenset()
    renamed: dict = field(default_factory=dict)

    def __call__(self, *args, **options):
        return self.fn(*args, **options)

    def upgrade(self, options: dict, stacklevel: int = 3) -> dict:
        """``options`` with the earlier names replaced by the current ones (a ``FutureWarning`` for each)."""
        old = [name for name in self.renamed if name in options]
        if not old:
            return options
        for name in old:
            warnings.warn(f"option {name}= is now {self.renamed[name]}=", FutureWarning, stacklevel=stacklevel)
        return {self.renamed.get(k, k): v for k, v in options.items()}


METHODS = {
    **{name: Method(fn) for name, fn in {**IMPLICIT, **GREEDY}.items()},
    # the trajectory's length is a fixed count, named num_steps like num_particles (it was steps=)
    **{name: Method(fn, frozenset({"trajectory"}), {"steps": "num_steps"}) for name, fn in UNROLLED.items()},
}
METHODS["ift-exact"] = Method(IMPLICIT["ift-exact"], frozenset({"hessian"}))
METHODS["larsen"] = Method(IMPLICIT["larsen"], frozenset({"per_example"}))
METHODS["hypernetwork"] = Method(HYPERNETWORK["hypernetwork"], frozenset({"hypernet"}))


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
        dense solve; ``num_steps``, ``lr``, ``momentum``, ``step_loss``, ``last`` for the unrolled
        methods, where ``theta`` is the starting point ``θ_0``; ``hypernet``, ``scale``, ``num_draws``, ``num_steps``,
        ``reach`` for the hypernetwork, whose trained network comes back in ``info["hypernet"]``). HOAG is an outer loop, not a
        hypergradient: ``select_hyperparameters(method="hoag")``; its inner step is ``"ift-cg"``.
    :returns: :class:`~pyro_evidence.hypergrad.implicit.Hypergradient`.

    Example: ridge shrinkage ``L = ½‖θ − 1‖² + ½ e^h ‖θ‖²``, so ``θ*(h) = 1/(1 + e^h)`` per coordinate, judged by
    ``Q = −½‖θ − 1‖²``; at ``h = 0``, ``dQ/dh = Σ (1 − θ*) dθ*/dh = 3 · ½ · (−¼)``:

    >>> import torch
    >>> from pyro_evidence import hypergradient
    >>> L = lambda t, h: 0.5 * ((t - 1) ** 2).sum() + 0.5 * h.exp().sum() * (t**2).sum()
    >>> Q = lambda t, h: -0.5 * ((t - 1) ** 2).sum()
    >>> theta, h = torch.full((3,), 0.5, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    >>> hypergradient(L, Q, theta, h, method="ift-exact").grad
    tensor([-0.3750], dtype=torch.float64)
    """
    if method == "hoag":
        raise ValueError(
            "'hoag' is an outer loop (CG to a shrinking tolerance, an adaptive step with rejection), not a "
            "hypergradient: use select_hyperparameters(method='hoag'), or method='ift-cg' here"
        )
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    if theta.dim() != 1 or h.dim() != 1:
        raise ValueError(
            f"theta and h must be flat 1-D tensors, got shapes {tuple(theta.shape)} and {tuple(h.shape)}"
        )
    options = METHODS[method].upgrade(options)
    # Q is checked only where the result points at it (an error, or nothing to select): the check is a
    # forward pass of Q, a few per cent of a CG hypergradient
    try:
        hg = METHODS[method](inner_loss, validation, theta.detach(), h.detach(), **options)
    except (RuntimeError, TypeError):
        check_validation(validation, theta, h)
        raise
    if not (bool(hg.grad.any()) or bool(hg.partial.any())):
        check_validation(validation, theta, h)
    return hg
