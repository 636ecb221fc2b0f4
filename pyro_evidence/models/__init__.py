"""Reference Pyro models whose priors take their hyperparameters from ``pyro.param``."""

from .linear import linear_regression
from .logistic import logistic_regression
from .mlp import mlp_classifier
from .polynomial import polynomial_features, polynomial_regression

__all__ = [
    "linear_regression",
    "logistic_regression",
    "mlp_classifier",
    "polynomial_features",
    "polynomial_regression",
]
