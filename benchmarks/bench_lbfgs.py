"""
The inner L-BFGS (``pyro_evidence.optim.lbfgs``: Armijo backtracking, every decision a mask on the device)
against ``torch.optim.LBFGS`` with its strong-Wolfe line search (what the library used before, and what it
is measured against), same start, same history (20), same tolerance and budget:

- logistic regression with an L2 prior, n = 1,500, d = 2,500 (above ``minimize``'s dense-Hessian limit of
  2,000, so L-BFGS works alone), float64, to ``max |∇L| ≤ 10⁻⁸``;
- the 100-dimensional Rosenbrock function from (−1, …, −1), float64, to ``10⁻⁸``: many rejected trial steps,
  where the ring of pairs (one slot per iteration) costs the most against a chronological history;
- the MNIST MLP of the experiment (3,000 images average-pooled 2 × 2, 196-300-10, 62,110 weights, float32,
  weights uniform in ±0.05), 20 iterations (the experiment's inner budget per outer step) and 100, with the
  test accuracy of the result beside the loss.

Usage: python benchmarks/bench_lbfgs.py [--repeats 5] [--device cpu] [--output FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

import pyro
import torch
import torch.nn.functional as F

from pyro_evidence.datasets import mnist
from pyro_evidence.models import mlp_classifier
from pyro_evidence.optim import lbfgs
from pyro_evidence.problem import Problem

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import commit, emit, machine, median_time  # noqa: E402


def torch_lbfgs(fn, theta, max_iter, tol_grad):
    theta = theta.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25) + 1, tolerance_grad=tol_grad,
                            tolerance_change=0.0, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = fn(theta)
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach(), opt.state[theta].get("n_iter", 0)


def logistic(device):
    g = torch.Generator().manual_seed(0)
    n, d = 1500, 2500
    X = torch.randn(n, d, dtype=torch.float64, generator=g)
    w = torch.randn(d, dtype=torch.float64, generator=g) / d**0.5
    y = (X @ w + 0.3 * torch.randn(n, dtype=torch.float64, generator=g) > 0).double()
    X, y = X.to(device), y.to(device)
    return lambda t: F.binary_cross_entropy_with_logits(X @ t, y, reduction="sum") + 0.5 * (t**2).sum(), torch.zeros(d, dtype=torch.float64, device=device)


def mlp(device):
    from pyro.infer.autoguide import init_to_uniform

    data = mnist(pool=2, device=device)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    problem = Problem(mlp_classifier, *data["train"], model_kwargs={"hidden": 300}, init_loc_fn=init_to_uniform(radius=0.05))
    h = problem.h_init
    X_test, y_test = data["test"]

    def accuracy(theta):
        logits = problem.trace(theta, h, args=(X_test, y_test))[0].nodes["logits"]["value"]
        return float((logits.argmax(-1) == y_test).double().mean())

    return (lambda t: problem.loss(t, h)), problem.theta_init, accuracy


def row(name, fn, theta0, max_iter, tol, repeats, device, accuracy=None):
    cells = []
    for solver in (torch_lbfgs, lbfgs):
        calls = []

        def counted(t):
            calls.append(1)
            return fn(t)

        theta, iterations = solver(counted, theta0, max_iter, tol)
        grad = torch.func.grad(fn)(theta)
        seconds = median_time(lambda: solver(fn, theta0, max_iter, tol), repeats, device)
        extra = f" | {accuracy(theta):.4f}" if accuracy else " | –"
        cells.append((f"{float(fn(theta)):.9g} | {float(grad.abs().max()):.2e} | {iterations} | {len(calls)}{extra}", seconds))
    (old, t_old), (new, t_new) = cells
    return [f"| {name} | torch.optim.LBFGS (strong Wolfe) | {old} | {t_old:.3f} | 1.00 |",
            f"| {name} | `optim.lbfgs` (on-device masks) | {new} | {t_new:.3f} | {t_new / t_old:.2f} |"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    command = "python benchmarks/bench_lbfgs.py " + " ".join(sys.argv[1:])
    lines = ["# Inner L-BFGS: on-device masks against torch.optim.LBFGS", "",
             f"Command: `{command.strip()}`  ", f"Commit: `{commit()}`  ", f"Machine: {machine(device)}", "",
             "Same start, history 20, budget (1.25 evaluations per iteration) and tolerance; seconds are the median of "
             f"{args.repeats} runs after a warm-up.", "",
             "| problem | solver | loss reached | max abs gradient | iterations | evaluations | test accuracy | seconds | time / torch |",
             "|---|---|---|---|---|---|---|---|---|"]
    fn, theta0 = logistic(device)
    lines += row("logistic, d = 2,500, to 1e-8", fn, theta0, 500, 1e-8, args.repeats, device)
    rosenbrock = lambda t: (100 * (t[1:] - t[:-1] ** 2) ** 2 + (1 - t[:-1]) ** 2).sum()  # noqa: E731
    lines += row("Rosenbrock, d = 100, to 1e-8", rosenbrock, torch.full((100,), -1.0, dtype=torch.float64, device=device),
                 2000, 1e-8, args.repeats, device)
    fn, theta0, accuracy = mlp(device)
    for iterations in (20, 100):
        lines += row(f"MNIST MLP 196-300-10, {iterations} iterations", fn, theta0, iterations, 0.0, args.repeats, device, accuracy)
    emit(lines, args.output)


if __name__ == "__main__":
    main()
