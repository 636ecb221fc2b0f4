"""Runs an experiment: the hyper learning rate calibrated per method, then every method × validation function × seed."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch

from ..util import isolated_params, preserved_rng
from . import mnist, synthetic
from .mnist import Mnist
from .setup import LR_GRID, METHODS, MNIST_METHODS, UNCALIBRATED, Setup
from .synthetic import Synthetic

EXPERIMENTS = {"synthetic": Synthetic, "mnist": Mnist}
DEVIATIONS = {"synthetic": synthetic.DEVIATIONS, "mnist": mnist.DEVIATIONS}


def calibrate(setup: Setup, method, objective, grid=LR_GRID):
    """The largest hyper learning rate of the seed's ``grid`` whose calibration run (seed 0,
    ``setup.calibration_iterations``) keeps every ``log α`` inside the box and ``Q`` finite,
    found by bisection over the sorted grid."""
    if method in UNCALIBRATED:
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
    test: float  # the experiment's metric (Setup.metric: RMSE, accuracy) on the test set
    test_perturbed_025: float  # the same with the weights perturbed by N(0, σ²), σ = 0.25
    test_perturbed_050: float
    seconds: float
    noise_000: float
    noise_010: float
    noise_025: float
    noise_050: float
    trajectory: tuple = ()  # Q at every iteration (written to the trajectories file)
    failed: str = ""  # the error that ended a failed run
    collapsed: bool = False  # the selected prior switched the model off (Setup.evaluate)
    metric: str = ""  # what test and the noise columns hold


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
                                   nan, nan, nan, nan, (), failed=f"{type(e).__name__}: {e}"[:300], metric=setup.metric))
            else:
                values = [s.objective for s in sel.history]
                noise = metrics["noise"]
                results.append(
                    Run(setup.name, objective, method, seed, lr_, max(values), _convergence(values),
                        metrics["test"], metrics["perturbed"][0.25], metrics["perturbed"][0.5], seconds,
                        noise[0.0], noise[0.1], noise[0.25], noise[0.5], tuple(values),
                        collapsed=bool(metrics.get("collapsed", False)), metric=setup.metric)
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
