"""What every experiment shares: the protocol's constants and :class:`Setup`, one data set's model, data and budget."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import pyro
import torch
from torch.distributions import constraints

METHODS = ["random", "greedy", "drmad", "hoag", "ift-neumann", "ift-cg", "rmad", "truncated", "hypernetwork", "relaxed"]
MNIST_METHODS = ["random", "greedy", "drmad", "hoag", "ift-cg"]
UNROLLED = {"drmad", "rmad", "truncated"}
UNCALIBRATED = {"random", "relaxed"}  # no hyper learning rate: a search, and select_structure's L-BFGS stages
RELAXED_STAGES = (1.0, 0.5, 0.2, 0.1)  # with the hard structure's selection, five stages share the budget
LR_GRID = sorted({r * 10.0**s for s in range(-6, 2) for r in (1, 25, 50, 75)}, reverse=True)
NOISE = (0.0, 0.1, 0.25, 0.5)
COLLAPSED_SHARE = 0.9  # a classifier giving one class to this share of the test set ignores its inputs
COLLAPSED_SPREAD = 0.05  # so does a regression whose predictions vary this little against the targets
PERTURB = (0.25, 0.5)
COMMON_DEVIATIONS = [
    "Hyper learning rates are calibrated on one short run per method and validation function (seed 0; 10 "
    "iterations for the synthetic design, 3 for MNIST) and then used for all runs; the grid is searched by "
    "bisection (largest rate first), which assumes that a rate that stays in the box makes every smaller one "
    "stay too. HOAG's own adaptive step starts from the calibrated rate.",
    "E is measured on the MAP weights refitted on the whole training set at the selected hyperparameters, "
    "for both validation functions.",
]


@dataclass
class Setup:
    """What one experiment fixes: the model and its data, the hyperparameters and their initial
    range and box, the inner optimisers, and :meth:`evaluate` (the metrics of a selection)."""

    name: str
    model: object
    args: tuple
    hyperparameters: dict  # name -> shape of log α drawn from U(init)
    init: tuple
    box: tuple
    iterations: int
    calibration_iterations: int
    metric: str  # "RMSE" or "accuracy"
    model_kwargs: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)  # params held at a value, not selected
    inner_max_iter: int = 500
    unrolled: dict = field(default_factory=dict)
    cg: dict = field(default_factory=dict)
    greedy: dict = field(default_factory=dict)
    objective_options: dict = field(default_factory=dict)
    init_loc_fn: object = None
    hessian: str = "exact"  # the curvature of the Laplace evidence
    gated: dict = field(default_factory=dict)  # the model_kwargs that add structure gates (method "relaxed")
    switches: dict = field(default_factory=dict)  # gate -> the prior precisions of the weights it switches

    def start(self, seed):
        """Writes the run's initial hyperparameters, ``log α ~ U(init)``, to the param store."""
        g = torch.Generator().manual_seed(10_000 + seed)
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        dtype, device = self.args[0].dtype, self.args[0].device
        lo, hi = self.init
        for name, shape in self.hyperparameters.items():
            log_alpha = lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)
            pyro.param(name, log_alpha.exp().to(dtype=dtype, device=device), constraint=constraints.positive)
        for name, value in self.fixed.items():
            pyro.param(name, torch.tensor(value, dtype=dtype, device=device), constraint=constraints.positive)

    def select(self, method, objective, seed, iterations, lr):
        from ..search import SearchOptions
        from ..select import select_hyperparameters

        self.start(seed)
        common = dict(
            objective=objective, hyperparameters=list(self.hyperparameters), progress=False, max_steps=iterations,
            model_kwargs=self.model_kwargs, init_loc_fn=self.init_loc_fn,
            objective_options={"max_iter": self.inner_max_iter, **(self.objective_options.get(objective) or {}),
                               **({"hessian": self.hessian} if objective == "laplace" else {})},
        )
        if method == "relaxed":
            return self._relaxed(iterations, common)
        if method == "random":
            bounds = {name: (math.exp(self.init[0]), math.exp(self.init[1])) for name in self.hyperparameters}
            search = SearchOptions(n_trials=iterations, seed=seed, bounds=bounds)
            return select_hyperparameters(self.model, *self.args, method="random", search=search, **common)
        options = dict(self.unrolled) if method in UNROLLED else {}
        if method == "truncated":
            options["last"] = 20
        if method == "ift-neumann":
            options["terms"] = 20
        if method in ("ift-cg", "hoag"):
            options.update(self.cg)
            if method == "hoag":  # HOAG's schedule sets CG's tolerance
                options.pop("tol", None)
        if method == "greedy":
            options.update(self.greedy)
        optimizer = None if method == "hoag" else "sgd"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return select_hyperparameters(self.model, *self.args, method=method, optimizer=optimizer, lr=lr, tol=0.0, method_options=options, **common)

    def _relaxed(self, iterations, common):
        """The structure and the precisions by :func:`~pyro_evidence.structure.select_structure` (``ift-cg``
        hypergradients, its L-BFGS stages, ``iterations`` shared by the temperatures and the hard structure); a
        feature switched off is returned as an infinite prior precision, the same model."""
        from ..structure import select_structure

        if not self.gated:
            raise ValueError(f"the {self.name} experiment's model has no structure gates: method 'relaxed' does not apply")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = select_structure(
                self.model, *self.args, method="ift-cg", temperatures=RELAXED_STAGES,
                **{**common, "max_steps": max(1, iterations // (len(RELAXED_STAGES) + 1)), "model_kwargs": {**self.model_kwargs, **self.gated}},
            )
        selection = result.selection
        for gate, name in self.switches.items():
            on = result.structure[gate].to(torch.bool)
            selection.hyperparameters[name] = selection.hyperparameters[name].masked_fill(~on, math.inf)
        return selection

    @property
    def deviations(self) -> list:
        """Where this experiment departs from the seed's protocol, and why (written into every report)."""
        raise NotImplementedError

    def evaluate(self, alpha: dict, seed: int) -> dict:
        """``{"test": E, "perturbed": {σ: E}, "noise": {σ: E}, "collapsed": bool}`` for the selected
        ``alpha``; ``collapsed`` when the fit's test predictions ignore the inputs — the prior
        switched the model off: a classifier that gives one class to at least
        :data:`COLLAPSED_SHARE` of the test set, a regression whose predictions spread less than
        :data:`COLLAPSED_SPREAD` of the targets' standard deviation."""
        raise NotImplementedError
