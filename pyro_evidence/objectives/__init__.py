"""Objectives: each a pair ``L(θ, h)``, ``Q(θ, h)`` over a :class:`~pyro_evidence.problem.Problem`."""

from .base import Objective
from .laplace import LaplaceEvidence, LaplaceObjective, laplace_evidence

OBJECTIVES = {LaplaceObjective.name: LaplaceObjective}

__all__ = ["OBJECTIVES", "Objective", "LaplaceObjective", "LaplaceEvidence", "laplace_evidence"]
