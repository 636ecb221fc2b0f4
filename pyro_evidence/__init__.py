"""pyro-evidence: evidence-based model selection and hyperparameter optimisation for Pyro."""

from .hypergrad import Hypergradient, NotPositiveDefiniteError, hypergradient
from .objectives import CrossValidation, ElboEvidence, LaplaceEvidence, cv_log_predictive, elbo_evidence, laplace_evidence
from .problem import Problem
from .select import Selection, Step, select_hyperparameters

__version__ = "0.1.0"

__all__ = [
    "CrossValidation",
    "ElboEvidence",
    "Hypergradient",
    "LaplaceEvidence",
    "NotPositiveDefiniteError",
    "Problem",
    "Selection",
    "Step",
    "cv_log_predictive",
    "elbo_evidence",
    "hypergradient",
    "laplace_evidence",
    "select_hyperparameters",
]
