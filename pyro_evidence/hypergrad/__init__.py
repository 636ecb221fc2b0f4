"""Hypergradient methods: each approximates ``dQ/dh`` from ``L(θ, h)`` and ``Q(θ, h)`` alone."""

from .api import METHODS, hypergradient
from .implicit import Hypergradient
from ..linalg import NotPositiveDefiniteError, SolveResult, cg, hvp, neumann

__all__ = ["METHODS", "Hypergradient", "hypergradient", "NotPositiveDefiniteError", "SolveResult", "cg", "hvp", "neumann"]
