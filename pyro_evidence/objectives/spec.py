"""
Objectives as values: an objective chosen with its options before there is a problem to bind it to.

``select_hyperparameters(model, X, y, objective=Laplace(hessian="kron"))`` is the same call as
``objective="laplace", objective_options={"hessian": "kron"}``; the string stays as the shorthand.
An unknown option is refused where the value is made, naming it and the options there are.
"""

from __future__ import annotations

import inspect

from ..problem import Problem
from ..util import check_options, check_positive_int
from .base import Objective
from .cv import CrossValidationObjective, HoldoutObjective
from .elbo import ElboObjective
from .laplace import LaplaceObjective

__all__ = ["ObjectiveSpec", "Laplace", "Elbo", "CV", "Holdout", "OBJECTIVES", "as_objective"]


class ObjectiveSpec:
    """
    An objective and its options, bound to a :class:`~pyro_evidence.problem.Problem` by :meth:`bind`.
    Every objective also takes the inner solver's ``max_iter`` (L-BFGS iterations of each inner
    solve, 500), ``tol`` and ``newton_max_dim`` (the most inner parameters for which it forms a dense
    Hessian and takes Newton steps; L-BFGS alone above: 2000, the ELBO's 100).
    """

    objective: type[Objective] = Objective

    def __init__(self, **options):
        self.check(f"{type(self).__name__}() keyword", options)
        self.options = options

    @classmethod
    def check(cls, label: str, options: dict):
        """Refuses an option the objective does not take, or a ``max_iter`` that is not a positive count."""
        check_options(label, options, cls.accepted(), f"objective {cls.objective.name!r}")
        if "max_iter" in options:
            check_positive_int(f"{label} 'max_iter'", options["max_iter"])

    @property
    def name(self) -> str:
        return self.objective.name

    @classmethod
    def accepted(cls) -> set:
        """The option names: the objective's own keywords and the inner solver's (``Objective.__init__``)."""
        own, solver = (
            {p.name for p in inspect.signature(init).parameters.values() if p.kind == p.KEYWORD_ONLY}
            for init in (cls.objective.__init__, Objective.__init__)
        )
        return own | solver

    def bind(self, problem: Problem) -> Objective:
        return self.objective(problem, **self.options)

    def with_defaults(self, **options) -> "ObjectiveSpec":
        """A copy with ``options`` added where this one does not set them."""
        return type(self)(**{**options, **self.options})

    def __eq__(self, other):
        return type(other) is type(self) and other.options == self.options

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"


class Laplace(ObjectiveSpec):
    """The Laplace log evidence (:class:`~pyro_evidence.objectives.laplace.LaplaceObjective`):
    ``hessian`` (``"exact"``, ``"ggn"``, ``"diag"``, ``"kron"``), ``logdet`` (``"dense"``, ``"slq"``),
    ``jitter``, ``num_probes``, ``lanczos_steps``, ``seed``, ``kron_bias`` (``"joint"``, ``"separate"``), ``refit``
    and ``at`` (``refit=False, at=net``: the network held, ``h`` tuned post hoc)."""

    objective = LaplaceObjective


class Elbo(ObjectiveSpec):
    """The ELBO of a diagonal Gaussian posterior (:class:`~pyro_evidence.objectives.elbo.ElboObjective`):
    ``num_particles``, ``seed``, ``init_scale``."""

    objective = ElboObjective


class CV(ObjectiveSpec):
    """k-fold cross-validation (:class:`~pyro_evidence.objectives.cv.CrossValidationObjective`):
    ``k``, ``stratify`` (class labels), ``seed``."""

    objective = CrossValidationObjective


class Holdout(ObjectiveSpec):
    """A hold-out set (:class:`~pyro_evidence.objectives.cv.HoldoutObjective`): ``validation`` (a tuple of
    data arguments, or the fraction of the rows to hold out), ``seed``."""

    objective = HoldoutObjective


OBJECTIVES = {spec.objective.name: spec for spec in (Laplace, Elbo, CV, Holdout)}


def as_objective(objective, options: dict | None = None) -> ObjectiveSpec:
    """The spec of ``objective``: a name of :data:`OBJECTIVES` with ``options``, or a spec (then
    ``options`` must be empty: they belong in the spec)."""
    if isinstance(objective, ObjectiveSpec):
        if options:
            raise ValueError(
                f"objective={objective!r} carries its options; pass objective_options= only with an objective's name"
            )
        return objective
    if isinstance(objective, str):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; available: {sorted(OBJECTIVES)}")
        OBJECTIVES[objective].check("objective_options", options or {})
        return OBJECTIVES[objective](**(options or {}))
    raise TypeError(
        f"objective= takes a name ({', '.join(map(repr, sorted(OBJECTIVES)))}) or an objective such as "
        f"pyro_evidence.Laplace(hessian='kron'), got {type(objective).__name__}"
    )
