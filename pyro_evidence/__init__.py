"""pyro-evidence: evidence-based model selection and hyperparameter optimisation for Pyro."""

from .hypergrad import Hypergradient, NotPositiveDefiniteError, hypergradient
from .objectives import (
    CV,
    CrossValidation,
    Elbo,
    Holdout,
    Laplace,
    Curvature,
    ElboEvidence,
    LaplaceEvidence,
    cv_log_predictive,
    elbo_evidence,
    laplace_evidence,
    laplace_hypergradient,
)
from .compare import compare_models, to_inference_data
from .problem import Problem
from .pruning import graves_ratio, prune
from .sequential import sequential_log_predictive
from .checkpoint import Checkpoint
from .search import SearchOptions
from .select import Selection, Step, select_hyperparameters
from .structure import StructureSelection, choice, gate, select_structure
from .online import OnlineSelection, train_with_evidence

__version__ = "0.1.0"

__all__ = [
    "CV",
    "Checkpoint",
    "Elbo",
    "Holdout",
    "Laplace",
    "CrossValidation",
    "ElboEvidence",
    "Hypergradient",
    "LaplaceEvidence",
    "NotPositiveDefiniteError",
    "Problem",
    "SearchOptions",
    "Selection",
    "Step",
    "StructureSelection",
    "OnlineSelection",
    "train_with_evidence",
    "choice",
    "gate",
    "select_structure",
    "compare_models",
    "cv_log_predictive",
    "elbo_evidence",
    "graves_ratio",
    "hypergradient",
    "laplace_evidence",
    "laplace_hypergradient",
    "Curvature",
    "prune",
    "select_hyperparameters",
    "sequential_log_predictive",
    "to_inference_data",
]
