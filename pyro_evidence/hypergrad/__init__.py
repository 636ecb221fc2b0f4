"""Hypergradient methods: each approximates ``dQ/dh`` from ``L(θ, h)`` and ``Q(θ, h)`` alone."""

from .implicit import METHODS, Hypergradient, hypergradient
from .linalg import NotPositiveDefiniteError

__all__ = ["METHODS", "Hypergradient", "hypergradient", "NotPositiveDefiniteError"]
