"""
The cost of Pyro in the hot loop: the gradient of the MNIST MLP's log joint (``torch.func.grad`` with
respect to the weights and the per-layer precisions) through ``Problem.log_joint`` — the model traced once
and replayed (:mod:`pyro_evidence.replay`) — against the same model run through Pyro at every call
(``Problem.trace`` and the sum over the trace, what ``Problem`` did before) and against the same log joint
written by hand in bare torch; 3,000 training images, float64, 10³ to 2.4·10⁵ weights.

Usage: python benchmarks/bench_replay.py [--repeats 30] [--device cpu] [--sizes 4x20,2x50,1x300] [--output FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import pyro
import torch
from torch.func import grad

from pyro_evidence.datasets import mnist
from pyro_evidence.models import mlp_classifier
from pyro_evidence.problem import Problem
from pyro_evidence.replay import record

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import commit, emit, machine, median_time  # noqa: E402


def bare_log_joint(X, y, hidden, classes=10):
    """The MLP's log joint by hand: Gaussian priors with precisions ``exp(h)``, categorical likelihood."""
    d = X.shape[1]
    shapes = [(d, hidden), (hidden,), (hidden, classes), (classes,)]
    sizes = [math.prod(s) for s in shapes]

    def log_joint(theta, h):
        a1, a2 = h.exp()
        w1, b1, w2, b2 = (t.view(s) for t, s in zip(theta.split(sizes), shapes))
        lp = 0.0
        for w, a in ((w1, a1), (b1, a1), (w2, a2), (b2, a2)):
            lp = lp + 0.5 * w.numel() * (a.log() - math.log(2 * math.pi)) - 0.5 * a * (w**2).sum()
        logits = torch.tanh(X @ w1 + b1) @ w2 + b2
        return lp + logits.log_softmax(-1).gather(1, y[:, None]).sum()

    return log_joint


def traced_log_joint(problem):
    """The log joint by running the model through Pyro at every call."""

    def log_joint(theta, h):
        with pyro.validation_enabled(False):
            trace, log_jacobian = problem.trace(theta, h)
            return trace.log_prob_sum() + log_jacobian

    return log_joint


def row(pool, hidden, repeats, device):
    X, y = mnist(pool=pool, dtype=torch.float64, device=device)["train"]
    pyro.clear_param_store()
    problem = Problem(mlp_classifier, X, y, model_kwargs={"hidden": hidden})
    g = torch.Generator().manual_seed(0)
    theta = problem.theta_init + 0.05 * torch.randn(problem.theta_dim, dtype=torch.float64, generator=g).to(device)
    h = problem.h_init
    functions = {"replay": problem.log_joint, "pyro": traced_log_joint(problem), "bare": bare_log_joint(X, y, hidden)}
    values = {k: float(f(theta, h)) for k, f in functions.items()}
    spread = max(values.values()) - min(values.values())
    assert spread <= 1e-9 * abs(values["bare"]), values  # the same function three ways
    times = {k: median_time(lambda f=f: grad(f, argnums=(0, 1))(theta, h), repeats, device) for k, f in functions.items()}
    size = f"{28 // pool}² → {hidden} → 10"
    return (
        f"| {size} | {problem.theta_dim:,} | {len(record(problem.log_joint, theta, h))} | "
        f"{times['pyro'] * 1e3:.2f} ms | {times['replay'] * 1e3:.2f} ms | {times['bare'] * 1e3:.2f} ms | "
        f"{times['pyro'] / times['bare']:.2f}× | **{times['replay'] / times['bare']:.2f}×** | {spread:.1e} |"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="4x20,2x50,1x300", help="pool x hidden, comma-separated")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    lines = [
        "# Pyro in the hot loop: the replayed log joint",
        "",
        f"Command: `python benchmarks/bench_replay.py --repeats {args.repeats} --device {args.device} --sizes {args.sizes}`  ",
        f"Commit: `{commit()}`  ",
        f"Machine: {machine(device)}  ",
        f"Date: {time.strftime('%Y-%m-%d')}",
        "",
        "Medians of repeated runs in one process, float64, 3,000 MNIST training images. Each column is one "
        "`torch.func.grad` of the MLP's log joint with respect to (weights, log precisions): *Pyro at every call* "
        "runs the model through Pyro's handlers and sums the trace (`Trace.log_prob_sum`); *replay* is "
        "`Problem.log_joint`, the model recorded once as its ATen operations; *bare torch* is the same log joint "
        "written by hand. *steps*: operations in the recording; *spread*: the largest difference between the "
        "three values of the log joint.",
        "",
        "| MLP | weights | steps | Pyro at every call | replay | bare torch | Pyro / bare | replay / bare | spread |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size in args.sizes.split(","):
        pool, hidden = (int(x) for x in size.split("x"))
        lines.append(row(pool, hidden, args.repeats, device))
    lines.append("")
    emit(lines, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
