"""
The seed's experiments (Bakhteev & Strijov, *Comprehensive analysis of gradient-based
hyperparameter optimization algorithms*, Annals of Operations Research 289, 2020): every method
× {CV, ELBO} on the synthetic polynomial design and on MNIST, with the noise experiment of the
seed's last slides.

Protocol (deviations are listed in :data:`DEVIATIONS` and written into every results file). The package is
split by data set (:mod:`.synthetic`, :mod:`.mnist`, on :mod:`.setup`), runner (:mod:`.runner`) and report
(:mod:`.report`).

Protocol:

- Synthetic: m = 40 objects, ``x ~ N(0, 1)``, ``y = x + ε``, ``ε ~ N(0, 1)``; linear regression
  on ``{x⁰, …, x⁹, sin x, cos x}``; ``w ~ N(0, A⁻¹)``, ``A = diag(α)``, one precision per weight;
  test data drawn the same way. MNIST: the real 5,000-image sample (3,000 / 1,000 / 1,000
  train / validation / test, :func:`~pyro_evidence.datasets.mnist`); an MLP with 300 tanh hidden
  units and one prior precision per layer.
- Validation functions: 4-fold CV (seed eq. (1)) and the ELBO of a diagonal Gaussian posterior; on MNIST
  also the Laplace evidence (Kronecker-factored GGN curvature).
- Methods: random search, greedy, DrMAD, HOAG, ``ift-neumann``, ``ift-cg``, ``rmad``, ``truncated``; on the
  synthetic design also ``hypernetwork`` and ``relaxed`` (a structure gate per feature, :func:`~pyro_evidence.select_structure`).
- Budget: l = 50 hyperparameter iterations (synthetic), 25 (MNIST), random search as many trials;
  initial ``log α ~ U(−2, 10)`` (synthetic), ``U(−4, 10)`` (MNIST); hyper learning rate from
  ``{r·10^s : s ∈ {−6…1}, r ∈ {1, 25, 50, 75}}``, the largest that keeps ``log α`` inside
  ``[−2.5, 10.5]`` (synthetic) or ``[−5, 11]`` (MNIST) on short calibration runs; 5 runs with
  different seeds.
- Metrics: best Q; convergence (first iteration reaching 99 % of the best improvement); test error
  E (RMSE; accuracy for MNIST) of the MAP weights at the selected hyperparameters, and with the
  weights perturbed by ``N(0, σ²I)``, σ = 0.25, 0.5; wall time; and E after ``N(0, σ²)`` noise is
  added to the training inputs, σ ∈ {0, 0.1, 0.25, 0.5}, the selected hyperparameters kept.
"""

from .mnist import Mnist
from .report import write_results
from .runner import DEVIATIONS, EXPERIMENTS, Run, calibrate, run, run_mnist, run_synthetic
from .setup import COLLAPSED_SHARE, COLLAPSED_SPREAD, LR_GRID, METHODS, MNIST_METHODS, NOISE, PERTURB, Setup
from .synthetic import Synthetic, synthetic_design

__all__ = [
    "COLLAPSED_SHARE", "COLLAPSED_SPREAD", "DEVIATIONS", "EXPERIMENTS", "LR_GRID", "METHODS", "MNIST_METHODS", "NOISE",
    "PERTURB", "Mnist", "Run", "Setup", "Synthetic", "calibrate", "run", "run_mnist", "run_synthetic",
    "synthetic_design", "write_results",
]
