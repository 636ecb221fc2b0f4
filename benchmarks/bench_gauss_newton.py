"""
The inner solve with a structured curvature (``optim.gauss_newton``) against the alternatives, from the same start.

1. The MNIST sample's MLP (``mlp_classifier``, 7 × 7 inputs, 10 hidden units, 610 weights, the first 500 training
   images, a start drawn from the prior with seed 0): ``gauss_newton`` with the K-FAC, diagonal and GGN curvature
   (every 30 steps, 20 L-BFGS pairs: the library's defaults), the same with the curvature formed at every step and no
   pairs (plain Gauss–Newton / K-FAC steps), plain L-BFGS (2,000 iterations at most), and Newton with the exact
   Hessian (the default ``hessian="exact"`` route).
2. Logistic regression (N = 2,000, d = 50), whose GGN is its Hessian: ``gauss_newton`` with the GGN against Newton.

Each row: accepted steps, curvatures (or Hessians) formed, the final gradient norm and loss, and the wall time of one
run (1 thread).

Usage: python benchmarks/bench_gauss_newton.py [--output FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import pyro
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import commit, emit, machine  # noqa: E402

from pyro_evidence.datasets import mnist  # noqa: E402
from pyro_evidence.models.logistic import logistic_regression  # noqa: E402
from pyro_evidence.models.mlp import mlp_classifier  # noqa: E402
from pyro_evidence.objectives.laplace import LaplaceObjective  # noqa: E402
from pyro_evidence.optim import gauss_newton, grad_and_value_detached, lbfgs, minimize  # noqa: E402
from pyro_evidence.problem import Problem  # noqa: E402


def _rows(problem, structures, label):
    h, start = problem.h_init, problem.theta_init
    tol = torch.finfo(start.dtype).eps ** 0.5
    rows = []
    for structure in structures:
        obj = LaplaceObjective(problem, hessian=structure)
        fn = lambda t: obj.inner_loss(t, h)  # noqa: E731
        for refresh, history, what in ((30, 20, "every 30 steps, 20 pairs"), (1, 0, "every step, no pairs")):
            formed = [0]
            curvature = obj.inner_curvature(h)

            def counted(t, curvature=curvature):
                formed[0] += 1
                return curvature(t)

            t0 = time.perf_counter()
            theta, f, g, steps, _ = gauss_newton(fn, start, counted, 500, tol, history=history, refresh=refresh)
            rows.append((label, f"gauss_newton, {structure} ({what})", steps, formed[0], float(g.norm()), float(f),
                         time.perf_counter() - t0))
    fn = lambda t: LaplaceObjective(problem).inner_loss(t, h)  # noqa: E731
    t0 = time.perf_counter()
    theta, steps = lbfgs(fn, start, 2000, tol_grad=tol)
    f, g = grad_and_value_detached(fn, theta)
    rows.append((label, "L-BFGS (2,000 at most)", steps, 0, float(g.norm()), float(f), time.perf_counter() - t0))
    t0 = time.perf_counter()
    m = minimize(fn, start)
    rows.append((label, "Newton, exact Hessian (+ L-BFGS where it cannot start)", m.newton_steps + m.lbfgs_iterations,
                 m.newton_steps, m.grad_norm, float(m.loss), time.perf_counter() - t0))
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output")
    args = parser.parse_args()
    torch.set_num_threads(1)
    X, y = mnist(pool=4, dtype=torch.float64)["train"]
    pyro.clear_param_store()
    with pyro.poutine.seed(rng_seed=0):
        mlp = Problem(mlp_classifier, X[:500], y[:500], model_kwargs={"hidden": 10, "classes": 10},
                      init_loc_fn=pyro.infer.autoguide.init_to_sample)
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(2000, 50, generator=g, dtype=torch.float64)
    w = torch.randn(50, generator=g, dtype=torch.float64)
    labels = (torch.rand(2000, generator=g, dtype=torch.float64) < torch.sigmoid(Z @ w)).double()
    pyro.clear_param_store()
    logistic = Problem(logistic_regression, Z, labels)
    rows = _rows(mlp, ("kron", "diag", "ggn"), "MLP, 610 weights") + _rows(logistic, ("ggn",), "logistic, d = 50")
    lines = [
        "# The inner solve with a structured curvature",
        "",
        f"Command: `python benchmarks/bench_gauss_newton.py --output benchmarks/results/gauss_newton.md`  ",
        f"Commit: `{commit()}`  ",
        f"Machine: {machine(torch.device('cpu'))}, 1 thread  ",
        f"Date: {time.strftime('%Y-%m-%d')}",
        "",
        "From the same start; one run each. *curvatures*: structured curvatures (or exact Hessians, for Newton) "
        "formed. Converged means a gradient norm within √ε · max(1, |L|) (about 1.5e-8 · |L|).",
        "",
        "| model | inner solve | steps | curvatures | ‖∇L‖ | L | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} | {e:.2e} | {f:.6f} | {s:.1f} |" for a, b, c, d, e, f, s in rows]
    emit(lines, args.output)


if __name__ == "__main__":
    main()
