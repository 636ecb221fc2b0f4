"""Objectives: each a pair ``L(θ, h)``, ``Q(θ, h)`` over a :class:`~pyro_evidence.problem.Problem`."""

from .base import Objective
from .cv import CrossValidation, CrossValidationObjective, HoldoutObjective, cv_log_predictive
from .elbo import ElboEvidence, ElboObjective, elbo_evidence
from .curvature import Curvature
from .laplace import LaplaceEvidence, LaplaceObjective, laplace_evidence, laplace_hypergradient
from .spec import CV, OBJECTIVES, Elbo, Holdout, Laplace, ObjectiveSpec, as_objective

__all__ = [
    "OBJECTIVES",
    "CV",
    "Elbo",
    "Holdout",
    "Laplace",
    "ObjectiveSpec",
    "as_objective",
    "CrossValidation",
    "CrossValidationObjective",
    "HoldoutObjective",
    "cv_log_predictive",
    "Objective",
    "ElboEvidence",
    "ElboObjective",
    "LaplaceEvidence",
    "LaplaceObjective",
    "elbo_evidence",
    "laplace_evidence",
    "laplace_hypergradient",
    "Curvature",
]
