"""Objectives: each a pair ``L(θ, h)``, ``Q(θ, h)`` over a :class:`~pyro_evidence.problem.Problem`."""

from .base import Objective
from .elbo import ElboEvidence, ElboObjective, elbo_evidence
from .laplace import LaplaceEvidence, LaplaceObjective, laplace_evidence

OBJECTIVES = {LaplaceObjective.name: LaplaceObjective, ElboObjective.name: ElboObjective}

__all__ = [
    "OBJECTIVES",
    "Objective",
    "ElboEvidence",
    "ElboObjective",
    "LaplaceEvidence",
    "LaplaceObjective",
    "elbo_evidence",
    "laplace_evidence",
]
