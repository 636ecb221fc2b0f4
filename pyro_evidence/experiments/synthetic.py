"""The seed's synthetic design: polynomial features of ``x ~ N(0, 1)``, ``y = x + ε``, one prior precision per weight."""

from __future__ import annotations

import statistics

import torch

from .setup import COLLAPSED_SPREAD, COMMON_DEVIATIONS, NOISE, PERTURB, Setup

DEVIATIONS = [
        "The columns x¹…x⁹, sin x, cos x are standardised with the training set's mean and deviation (x⁰ is kept "
        "as the constant 1): sin x and cos x are almost in the span of the monomials, so the raw design is "
        "numerically singular.",
        "The noise precision is known (β = 1, the ε of the data) and not selected; the hyperparameters are the 12 "
        "prior precisions.",
        "Inner optimiser: the unrolled methods (DrMAD, RMAD, truncated) differentiate 100 steps of momentum SGD "
        "(lr 10⁻³, momentum 0.9, warm-started from the previous θ); the other methods use the library's inner "
        "solver (Newton to round-off), since the implicit methods assume an inner optimum and the seed's SGD "
        "would only add noise to their comparison.",
        "The ELBO is the library's deterministic sample-average estimate (64 antithetic whitened particles; exact "
        "for this linear-Gaussian model).",
        "hypernetwork: an affine best response trained at every step on 24 antithetic draws (σ = 0.1) around the "
        "current log α, warm-started from the last step's network; the hyper learning rate is calibrated as for the "
        "other gradient methods.",
        "relaxed: a Concrete gate on each of the 12 features beside its prior precision (select_structure: 8 noise "
        "draws, temperatures 1, 0.5, 0.2, 0.1, then the hard structure with the precisions selected again; ift-cg "
        "hypergradients, its default L-BFGS outer loop, so no hyper learning rate), the 50 iterations shared by the "
        "five stages (10 each); gates the relaxation leaves undecided are settled by one more exact selection each, "
        "counted in the time. Best Q, convergence and the trajectory are the hard structure's; a feature switched off "
        "counts as an infinite prior precision (no weight, none to perturb).",
        *COMMON_DEVIATIONS,
    ]


def synthetic_design(m: int = 40, seed: int = 0, dtype=torch.float64):
    """Training and test sets of the seed's design, the test standardised with training statistics.

    :returns: ``((X, y), (X_test, y_test), (x, x_test), (mean, std))``.
    """
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        x = torch.randn(n, generator=g, dtype=torch.float64)
        return x, x + torch.randn(n, generator=g, dtype=torch.float64)

    x, y = draw(m)
    x_test, y_test = draw(m)
    X, X_test = features(x), features(x_test)
    mean, std = X[:, 1:].mean(0), X[:, 1:].std(0, unbiased=False)
    X[:, 1:] = (X[:, 1:] - mean) / std
    X_test[:, 1:] = (X_test[:, 1:] - mean) / std
    return (X.to(dtype), y.to(dtype)), (X_test.to(dtype), y_test.to(dtype)), (x, x_test), (mean, std)


def features(x):
    return torch.stack([x**p for p in range(10)] + [torch.sin(x), torch.cos(x)], dim=-1)


def _linear_ard(X, y=None, gated=False):
    from ..models import linear_regression

    return linear_regression(X, y, ard=True, gated=gated)


def _rmse(X, y, w):
    return float(((X @ w - y) ** 2).mean().sqrt())


class Synthetic(Setup):
    @property
    def deviations(self) -> list:
        return DEVIATIONS

    def __init__(self, device="cpu", fast=False):
        (X, y), self.test, (self.x, _), (self.mean, self.std) = synthetic_design(seed=0)
        self.train = (X, y)
        super().__init__(
            "synthetic", _linear_ard, (X.to(device), y.to(device)), {"prior_precision": 12}, (-2.0, 10.0), (-2.5, 10.5),
            iterations=3 if fast else 50, calibration_iterations=3 if fast else 10, metric="RMSE",
            fixed={"noise_precision": 1.0}, unrolled={"num_steps": 100, "lr": 1e-3, "momentum": 0.9},
            gated={"gated": True}, switches={"features": "prior_precision"},
        )

    def evaluate(self, alpha, seed):
        alpha = alpha["prior_precision"].cpu()
        (X, y), (X_test, y_test) = self.train, self.test

        on = alpha.isfinite()  # a feature switched off by a structure gate has an infinite precision: no weight

        def fit(X):
            w = torch.zeros_like(alpha)
            w[on] = torch.linalg.solve(torch.diag(alpha[on]) + X[:, on].T @ X[:, on], X[:, on].T @ y)
            return w

        w = fit(X)
        g = torch.Generator().manual_seed(seed)
        perturbed = {  # the weights the model has are perturbed
            sigma: statistics.mean(
                _rmse(X_test, y_test, w + on * sigma * torch.randn(w.shape, generator=g, dtype=w.dtype)) for _ in range(20)
            )
            for sigma in PERTURB
        }
        noise = {}
        for sigma in NOISE:
            Xn = features(self.x + sigma * torch.randn(self.x.shape, generator=g, dtype=self.x.dtype))
            Xn[:, 1:] = (Xn[:, 1:] - self.mean) / self.std
            noise[sigma] = _rmse(X_test, y_test, fit(Xn))
        spread = float((X_test @ w).std()) / float(y_test.std())
        return {"test": _rmse(X_test, y_test, w), "perturbed": perturbed, "noise": noise, "collapsed": spread <= COLLAPSED_SPREAD}
