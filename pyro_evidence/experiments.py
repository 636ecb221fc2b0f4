"""
The seed's experiments (Bakhteev & Strijov, *Comprehensive analysis of gradient-based
hyperparameter optimization algorithms*, Annals of Operations Research 289, 2020): every method
× {CV, ELBO} on the synthetic polynomial design and on MNIST, with the noise experiment of the
seed's last slides.

Protocol (deviations are listed in :data:`DEVIATIONS` and written into every results file):

- Synthetic: m = 40 objects, ``x ~ N(0, 1)``, ``y = x + ε``, ``ε ~ N(0, 1)``; linear regression
  on ``{x⁰, …, x⁹, sin x, cos x}``; ``w ~ N(0, A⁻¹)``, ``A = diag(α)``, one precision per weight;
  test data drawn the same way. MNIST: the real 5,000-image sample (3,000 / 1,000 / 1,000
  train / validation / test, :func:`~pyro_evidence.datasets.mnist`); an MLP with 300 tanh hidden
  units and one prior precision per layer.
- Validation functions: 4-fold CV (seed eq. (1)) and the ELBO of a diagonal Gaussian posterior; on MNIST
  also the Laplace evidence (Kronecker-factored GGN curvature).
- Methods: random search, greedy, DrMAD, HOAG, ``ift-neumann``, ``ift-cg``, ``rmad``, ``truncated``.
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

from __future__ import annotations

import csv
import math
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field

import pyro
import torch
from torch.distributions import constraints

from .util import isolated_params, preserved_rng

__all__ = ["METHODS", "EXPERIMENTS", "DEVIATIONS", "synthetic_design", "run", "run_synthetic", "run_mnist", "write_results"]

METHODS = ["random", "greedy", "drmad", "hoag", "ift-neumann", "ift-cg", "rmad", "truncated"]
MNIST_METHODS = ["random", "greedy", "drmad", "hoag", "ift-cg"]
UNROLLED = {"drmad", "rmad", "truncated"}
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
DEVIATIONS = {
    "synthetic": [
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
        *COMMON_DEVIATIONS,
    ],
    "mnist": [
        "Hyperparameters: one prior precision per layer (W₁ and b₁ share α₁, W₂ and b₂ share α₂); per-parameter "
        "precisions would give random search a 62,110-dimensional box.",
        "Selection uses the 3,000 training images (CV makes its folds inside them, stratified by digit); E is "
        "the accuracy on the 1,000 test images; the 1,000 validation images are not used.",
        "Inner optimiser: each outer iteration continues the inner fit from the previous θ for 20 L-BFGS "
        "iterations (implicit methods, greedy, random search) or 20 steps of momentum SGD (DrMAD; lr 10⁻⁴, "
        "momentum 0.9); the network starts from weights uniform in ±0.05 (seeded), since all-zero weights are a "
        "saddle. The inner fit is therefore not at its optimum; CG (ift-cg, HOAG) runs at most 20 iterations "
        "with damping 1, to relative residual 10⁻³ (ift-cg) or to the tolerance of HOAG's schedule, and stops at "
        "the first direction of negative curvature. Greedy looks one step of size 10⁻⁴ "
        "ahead (the DrMAD step): its default, 1/λ_max of the inner Hessian, does not exist where the network's "
        "Hessian has no positive curvature.",
        "The ELBO uses 4 antithetic whitened particles (the sample-average estimate), not the synthetic design's 64.",
        "The Laplace evidence (a third validation function beside the seed's two) uses the Kronecker-factored GGN "
        "(`hessian=\"kron\"`, per layer; the biases in the layers' homogeneous coordinates): the exact Hessian "
        "of 62,110 or 238,510 weights is out of reach, and away from the inner optimum it is indefinite where the "
        "GGN is not. Its hypergradient keeps the log-determinant's dependence on θ.",
        "Float32 throughout (float64 would double the time and the tests check the methods in float64).",
        "RMAD, truncated and ift-neumann are left out of the MNIST table (`--methods` adds them); it compares random "
        "search, greedy, DrMAD, HOAG and ift-cg.",
        *COMMON_DEVIATIONS,
    ],
}


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


def _linear_ard(X, y=None):
    from .models import linear_regression

    return linear_regression(X, y, ard=True)


def _rmse(X, y, w):
    return float(((X @ w - y) ** 2).mean().sqrt())


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
        from .search import SearchOptions
        from .select import select_hyperparameters

        self.start(seed)
        common = dict(
            objective=objective, hyperparameters=list(self.hyperparameters), progress=False, max_steps=iterations,
            model_kwargs=self.model_kwargs, init_loc_fn=self.init_loc_fn,
            objective_options={"max_iter": self.inner_max_iter, **(self.objective_options.get(objective) or {}),
                               **({"hessian": self.hessian} if objective == "laplace" else {})},
        )
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

    @property
    def deviations(self):
        return DEVIATIONS[self.name]

    def evaluate(self, alpha: dict, seed: int) -> dict:
        """``{"test": E, "perturbed": {σ: E}, "noise": {σ: E}, "collapsed": bool}`` for the selected
        ``alpha``; ``collapsed`` when the fit's test predictions ignore the inputs — the prior
        switched the model off: a classifier that gives one class to at least
        :data:`COLLAPSED_SHARE` of the test set, a regression whose predictions spread less than
        :data:`COLLAPSED_SPREAD` of the targets' standard deviation."""
        raise NotImplementedError


class Synthetic(Setup):
    def __init__(self, device="cpu", fast=False):
        (X, y), self.test, (self.x, _), (self.mean, self.std) = synthetic_design(seed=0)
        self.train = (X, y)
        super().__init__(
            "synthetic", _linear_ard, (X.to(device), y.to(device)), {"prior_precision": 12}, (-2.0, 10.0), (-2.5, 10.5),
            iterations=3 if fast else 50, calibration_iterations=3 if fast else 10, metric="RMSE",
            fixed={"noise_precision": 1.0}, unrolled={"steps": 100, "lr": 1e-3, "momentum": 0.9},
        )

    def evaluate(self, alpha, seed):
        alpha = alpha["prior_precision"].cpu()
        (X, y), (X_test, y_test) = self.train, self.test

        def fit(X):
            return torch.linalg.solve(torch.diag(alpha) + X.T @ X, X.T @ y)

        w = fit(X)
        g = torch.Generator().manual_seed(seed)
        perturbed = {
            sigma: statistics.mean(
                _rmse(X_test, y_test, w + sigma * torch.randn(w.shape, generator=g, dtype=w.dtype)) for _ in range(20)
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


class Mnist(Setup):
    MAP_ITERATIONS = 100

    def __init__(self, device="cpu", fast=False, pool=1):
        from .datasets import mnist
        from .models import mlp_classifier
        from pyro.infer.autoguide import init_to_uniform

        data = mnist(pool=pool, device=device)
        X, y = data["train"]
        if fast:  # the first 300 training images (the split is shuffled)
            X, y = X[:300], y[:300]
        self.test = data["test"]
        super().__init__(
            "mnist", mlp_classifier, (X, y), {"prior_precision_1": (), "prior_precision_2": ()}, (-4.0, 10.0), (-5.0, 11.0),
            iterations=3 if fast else 25, calibration_iterations=2 if fast else 3, metric="accuracy",
            model_kwargs={"hidden": 300}, inner_max_iter=20,
            unrolled={"steps": 20, "lr": 1e-4, "momentum": 0.9},
            cg={"max_iter": 20, "tol": 1e-3, "damping": 1.0},
            greedy={"lr": 1e-4},
            objective_options={"cv": {"k": 4, "stratify": y.cpu()}, "elbo": {"num_particles": 4}},
            init_loc_fn=init_to_uniform(radius=0.05), hessian="kron",
        )
        self.map_iterations = 5 if fast else self.MAP_ITERATIONS
        self.pool = pool

    @property
    def deviations(self):
        side = 28 // self.pool
        if self.pool == 1:
            return DEVIATIONS["mnist"]
        weights = side * side * 300 + 300 + 300 * 10 + 10
        return [
            f"The images are {side} × {side}, average-pooled by {self.pool} (`--pool {self.pool}`: {side * side}-300-10, "
            f"{weights:,} weights), so that the 50 runs fit in about an hour of two CPU cores; `--pool 1` "
            "(784-300-10, 238,510 weights) is the full protocol, a GPU job.",
            *DEVIATIONS["mnist"],
        ]

    def _problem(self, alpha, X):
        from .problem import Problem

        pyro.clear_param_store()
        for name, value in alpha.items():
            pyro.param(name, value, constraint=constraints.positive)
        return Problem(self.model, X, self.args[1], model_kwargs=self.model_kwargs, hyperparameters=list(alpha), init_loc_fn=self.init_loc_fn)

    def _fit(self, alpha, X, seed):
        from .optim import minimize

        pyro.set_rng_seed(seed)
        problem = self._problem(alpha, X)
        h = problem.h_init
        theta = minimize(lambda t: problem.loss(t, h), problem.theta_init, max_iter=self.map_iterations, tol=0.0).theta
        return problem, theta, h

    def _predictions(self, problem, theta, h):
        X_test, y_test = self.test
        return problem.trace(theta, h, args=(X_test, y_test))[0].nodes["logits"]["value"].argmax(-1)

    def _accuracy(self, problem, theta, h):
        return float((self._predictions(problem, theta, h) == self.test[1]).double().mean())

    def evaluate(self, alpha, seed):
        X = self.args[0]
        problem, theta, h = self._fit(alpha, X, seed)
        g = torch.Generator(device=X.device).manual_seed(seed)
        perturbed = {
            sigma: statistics.mean(
                self._accuracy(problem, theta + sigma * torch.randn(theta.shape, generator=g, dtype=theta.dtype, device=theta.device), h)
                for _ in range(5)
            )
            for sigma in PERTURB
        }
        noise = {0.0: self._accuracy(problem, theta, h)}
        for sigma in NOISE[1:]:
            noisy = X + sigma * torch.randn(X.shape, generator=g, dtype=X.dtype, device=X.device)
            noise[sigma] = self._accuracy(*self._fit(alpha, noisy, seed))
        predicted = self._predictions(problem, theta, h)
        top_share = float(torch.bincount(predicted, minlength=10).max()) / predicted.numel()
        return {"test": noise[0.0], "perturbed": perturbed, "noise": noise, "collapsed": top_share >= COLLAPSED_SHARE}


EXPERIMENTS = {"synthetic": Synthetic, "mnist": Mnist}


def calibrate(setup: Setup, method, objective, grid=LR_GRID):
    """The largest hyper learning rate of the seed's ``grid`` whose calibration run (seed 0,
    ``setup.calibration_iterations``) keeps every ``log α`` inside the box and ``Q`` finite,
    found by bisection over the sorted grid."""
    if method == "random":
        return None

    def stays_inside(lr):
        try:
            sel = setup.select(method, objective, 0, setup.calibration_iterations, lr)
        except (FloatingPointError, ValueError, RuntimeError, OverflowError):
            return False
        lo, hi = setup.box
        return len(sel.history) >= min(setup.calibration_iterations, 2) and all(
            math.isfinite(s.objective)
            and all(bool(((v.log() >= lo) & (v.log() <= hi)).all()) for v in s.hyperparameters.values())
            for s in sel.history
        )

    grid = sorted(grid, reverse=True)
    lo, hi = 0, len(grid)  # the answer's index lies in [lo, hi]; len(grid) when none stays inside
    while lo < hi:
        mid = (lo + hi) // 2
        if stays_inside(grid[mid]):
            hi = mid
        else:
            lo = mid + 1
    return grid[min(lo, len(grid) - 1)]


@dataclass
class Run:
    experiment: str
    objective: str
    method: str
    seed: int
    lr: float
    best_q: float
    convergence: int
    test_error: float
    error_perturbed_025: float
    error_perturbed_050: float
    seconds: float
    noise_000: float
    noise_010: float
    noise_025: float
    noise_050: float
    trajectory: tuple = ()  # Q at every iteration (written to the trajectories file)
    failed: str = ""  # the error that ended a failed run
    collapsed: bool = False  # the selected prior switched the model off (Setup.evaluate)


def _convergence(values):
    start, best = values[0], max(values)
    if best <= start:
        return 1
    goal = start + 0.99 * (best - start)
    return next(i + 1 for i, v in enumerate(values) if v >= goal)


def run(setup: Setup, objectives=("cv", "elbo"), methods=METHODS, runs=5, progress=None, fast=False, on_run=None):
    """Every method × validation function × run of ``setup``; returns a list of :class:`Run`.
    ``on_run(results)`` is called after every finished run (the CLI rewrites its files there, so
    an interrupted experiment keeps every finished run)."""
    # the runs seed the RNG and set the param store run by run; the caller gets both back as they were
    devices = [a.device for a in getattr(setup, "args", ()) if isinstance(a, torch.Tensor)]
    with isolated_params(), preserved_rng(devices):
        return _run(setup, objectives, methods, runs, progress, fast, on_run)


def _run(setup, objectives, methods, runs, progress, fast, on_run):
    from tqdm.auto import tqdm

    runs = 1 if fast else runs
    jobs = [(o, m) for o in objectives for m in methods]
    results = []
    bar = tqdm(total=len(jobs) * runs, desc=setup.name, disable=None if progress is None else not progress)
    for objective, method in jobs:
        bar.set_postfix(objective=objective, method=method, stage="calibrating")
        lr = calibrate(setup, method, objective, grid=LR_GRID[::4] if fast else LR_GRID)
        bar.set_postfix(objective=objective, method=method)
        for seed in range(runs):
            start = time.perf_counter()
            lr_ = lr if lr is not None else math.nan
            try:
                sel = setup.select(method, objective, seed, setup.iterations, lr)
                seconds = time.perf_counter() - start
                metrics = setup.evaluate({k: v.detach() for k, v in sel.hyperparameters.items()}, seed)
            except (ValueError, RuntimeError, FloatingPointError) as e:
                # a method that breaks down at some hyperparameters is a result, not the end of the
                # experiment: the run is recorded as failed, with its error, and left out of the means
                warnings.warn(f"{setup.name}, {objective}, {method}, seed {seed} failed: {e}", RuntimeWarning, stacklevel=2)
                nan = math.nan
                results.append(Run(setup.name, objective, method, seed, lr_, nan, 0, nan, nan, nan, time.perf_counter() - start,
                                   nan, nan, nan, nan, (), failed=f"{type(e).__name__}: {e}"[:300]))
            else:
                values = [s.objective for s in sel.history]
                noise = metrics["noise"]
                results.append(
                    Run(setup.name, objective, method, seed, lr_, max(values), _convergence(values),
                        metrics["test"], metrics["perturbed"][0.25], metrics["perturbed"][0.5], seconds,
                        noise[0.0], noise[0.1], noise[0.25], noise[0.5], tuple(values),
                        collapsed=bool(metrics.get("collapsed", False)))
                )
            if on_run is not None:
                on_run(results)
            bar.update(1)
    bar.close()
    return results


def run_synthetic(objectives=("cv", "elbo"), methods=METHODS, runs=5, progress=None, fast=False, device="cpu"):
    """The synthetic design; the selections run on ``device``, the test metrics on the CPU."""
    return run(Synthetic(device, fast), objectives, methods, runs, progress, fast)


def run_mnist(objectives=("cv", "elbo"), methods=MNIST_METHODS, runs=5, progress=None, fast=False, device="cpu", pool=1):
    """MNIST: an MLP with 300 hidden units, per-layer precisions; everything on ``device``.
    ``fast`` takes 300 training images, one run, 3 iterations."""
    return run(Mnist(device, fast, pool), objectives, methods, runs, progress, fast)


def _mean_std(values):
    values = [v for v in values if not math.isnan(v)]  # failed runs
    if not values:
        return "failed"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def write_results(results, directory, command, stem=None, deviations=None):
    """``{stem}.csv`` (one row per run), ``{stem}_trajectories.csv`` (Q at every iteration) and
    ``{stem}.md`` (means ± standard deviations over runs, the noise table, the command, the commit,
    the machine and the ``deviations``, by default the experiment's); ``stem`` defaults to the
    experiment's name."""
    experiment = results[0].experiment
    stem = stem or experiment
    os.makedirs(directory, exist_ok=True)
    csv_path, md_path = os.path.join(directory, f"{stem}.csv"), os.path.join(directory, f"{stem}.md")
    _write_csvs(results, csv_path, os.path.join(directory, f"{stem}_trajectories.csv"))
    lines = _report(results, command, deviations or DEVIATIONS[experiment])
    with open(md_path, "w") as f:
        f.write("\n".join(lines))
    return csv_path, md_path


def _write_csvs(results, path, trajectories):
    fields = [k for k in asdict(results[0]) if k != "trajectory"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in results:
            writer.writerow({k: v for k, v in asdict(r).items() if k in fields})
    with open(trajectories, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["objective", "method", "seed", "iteration", "Q"])
        for r in results:
            writer.writerows([r.objective, r.method, r.seed, i + 1, q] for i, q in enumerate(r.trajectory))


def _commit():
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - outside a checkout
        return "unknown"


def _report(results, command, deviations):
    """The Markdown report's lines: the main table, the noise table, collapsed and failed runs, deviations."""
    import platform

    experiment = results[0].experiment
    metric = "RMSE" if experiment == "synthetic" else "accuracy"
    groups = {}
    for r in results:
        groups.setdefault((r.objective, r.method), []).append(r)
    lines = [
        f"# Experiment: {experiment}",
        "",
        f"Command: `{command}`  ",
        f"Commit: `{_commit()}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical cores, torch {torch.__version__}  ",
        f"Date: {time.strftime('%Y-%m-%d')}",
        "",
        f"| validation | method | hyper lr | best Q | convergence (iteration) | test {metric} | {metric}, w + N(0, 0.25²) | "
        f"{metric}, w + N(0, 0.5²) | seconds per run | collapsed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (objective, method), rs in groups.items():
        finished = [r for r in rs if not r.failed]
        lines.append(
            f"| {objective} | {method} | {rs[0].lr:g} | {_mean_std([r.best_q for r in rs])} | {_mean_std([math.nan if r.failed else float(r.convergence) for r in rs])} | "
            f"{_mean_std([r.test_error for r in rs])} | {_mean_std([r.error_perturbed_025 for r in rs])} | "
            f"{_mean_std([r.error_perturbed_050 for r in rs])} | {_mean_std([r.seconds for r in rs])} | "
            f"{sum(r.collapsed for r in finished)} of {len(finished)} |"
        )
    lines += ["", f"## Noise on the training inputs (test {metric}, the selected hyperparameters kept)", "",
              "| validation | method | σ = 0 | σ = 0.1 | σ = 0.25 | σ = 0.5 |", "|---|---|---|---|---|---|"]
    for (objective, method), rs in groups.items():
        lines.append(
            f"| {objective} | {method} | " + " | ".join(_mean_std([getattr(r, f'noise_{k}') for r in rs]) for k in ("000", "010", "025", "050")) + " |"
        )
    return lines + _exceptions(results, metric) + ["", "## Deviations from the protocol", "", *[f"- {d}" for d in deviations], ""]


def _exceptions(results, metric):
    lines = []
    collapsed = [r for r in results if r.collapsed and not r.failed]
    if collapsed:
        lines += ["", "## Collapsed runs (test predictions that ignore the inputs)", "",
                  "The selected prior switched the model off; these runs are kept in the means above.", ""]
        lines += [f"- {r.objective}, {r.method}, seed {r.seed}: best Q {r.best_q:.3f}, test {metric} {r.test_error:.3f}" for r in collapsed]
    failed = [r for r in results if r.failed]
    if failed:
        lines += ["", "## Failed runs (left out of the means)", ""]
        lines += [f"- {r.objective}, {r.method}, seed {r.seed}: {r.failed}" for r in failed]
    return lines
