"""
Structure selection three ways on ARD regression (5 relevant features, 15 irrelevant; ``ard_data``, 100 rows,
noise 0.5, seeds 0–4): relaxed gates selected by the Laplace evidence (``select_structure``: Concrete gates,
8 noise draws, temperatures 1 → 0.1, then the hard structure), ARD (one prior precision per feature by the
Laplace evidence, ``ift-exact``; a feature is dropped where its precision exceeds 10³, a prior standard deviation
under 0.03), and Graves-ratio pruning (ARD by the ELBO of a diagonal Gaussian posterior with Graves' updates, then
weights with ``λ = exp(−μ²/2σ²) ≥ 10⁻³`` pruned). Every structure is judged the same way: the Laplace evidence
(exact here) of linear regression on the kept features with one prior precision and the noise precision selected
again, and its 10-fold CV log predictive density at those precisions; beside them the wall time of the selection.

The same three on the hidden units of an MLP (``mlp_classifier``, 49 inputs — MNIST pooled to 7 × 7 — 8 tanh
units, 10 classes; 300 training images, a different 300 of the 3,000 per seed; weights started uniformly in
±0.5): gates on the units (``gated=True``, 2 noise draws, ``ift-cg`` hypergradients, at most 20 steps a stage),
ARD on the units (one precision per unit's outgoing weights, ``ard=True``; a unit
dropped where it exceeds 10³), and Graves' ratio (a unit dropped where every outgoing weight is pruned). The
curvature is the Gauss–Newton matrix (the exact Hessian of a network is indefinite away from its optimum).
Each structure is judged by a fresh network with that many units: its Laplace evidence with the two layer
precisions selected again, and its accuracy on the 1,000 test images; the best number of units by that
evidence (all of 1–8 judged) is the reference.

Usage: python benchmarks/bench_structure.py [--seeds 5] [--mlp-seeds 3] [--output FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings

import pyro
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, init_to_uniform

import pyro_evidence as pe
from pyro_evidence.datasets import ard_data, mnist
from pyro_evidence.models import linear_regression, mlp_classifier

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import commit, emit, machine  # noqa: E402

ARD_DROP = 1e3
GRAVES_THRESHOLD = 1e-3


def gates(X, y):
    return pe.select_structure(linear_regression, X, y, model_kwargs={"gated": True}, progress=False).structure["features"] > 0


def ard(X, y):
    sel = pe.select_hyperparameters(linear_regression, X, y, model_kwargs={"ard": True}, progress=False)
    return sel.hyperparameters["prior_precision"] <= ARD_DROP


def graves(X, y):
    pe.select_hyperparameters(linear_regression, X, y, model_kwargs={"ard": True}, objective="elbo", method="graves",
                              max_steps=30, progress=False)
    fit = pe.elbo_evidence(linear_regression, X, y, model_kwargs={"ard": True})
    return pe.prune(linear_regression, fit.guide, threshold=GRAVES_THRESHOLD).keep["w"]


def judge(X, y, kept):
    """The evidence and the 10-fold CV of the kept features' regression (one prior precision)."""
    Xk = X[:, kept]
    pyro.clear_param_store()
    evidence = float(pe.select_hyperparameters(linear_regression, Xk, y, progress=False).objective)
    cv = float(pe.cv_log_predictive(linear_regression, Xk, y, k=10).value)  # at the selected precisions
    return evidence, cv


HIDDEN = 8
N_IMAGES = 300
GGN = {"hessian": "ggn"}
INIT = init_to_uniform(radius=0.5)  # a network's all-zero start is a saddle with zero gradient


def unit_gates(X, y):
    # ift-cg: the exact Hessian of the two-copy relaxed network can be indefinite where the inner solve stops
    result = pe.select_structure(mlp_classifier, X, y, model_kwargs={"hidden": HIDDEN, "gated": True}, num_particles=2,
                                 method="ift-cg", max_steps=20, objective_options=GGN, init_loc_fn=INIT, progress=False)
    return result.structure["units"] > 0


def unit_ard(X, y):
    sel = pe.select_hyperparameters(mlp_classifier, X, y, model_kwargs={"hidden": HIDDEN, "ard": True},
                                    objective_options=GGN, init_loc_fn=INIT, progress=False)
    return sel.hyperparameters["prior_precision_2"] <= ARD_DROP


def unit_graves(X, y):
    kwargs = {"hidden": HIDDEN}
    pe.select_hyperparameters(mlp_classifier, X, y, model_kwargs=kwargs, objective="elbo", method="graves", max_steps=30,
                              init_loc_fn=INIT, progress=False)
    guide = AutoDiagonalNormal(mlp_classifier, init_loc_fn=INIT)
    fit = pe.elbo_evidence(mlp_classifier, X, y, model_kwargs=kwargs, guide=guide)
    return pe.prune(mlp_classifier, fit.guide, threshold=GRAVES_THRESHOLD).keep["w2"].any(-1)


def judge_units(X, y, test, units):
    """The evidence (GGN Laplace, layer precisions selected) and the test accuracy of a network with ``units`` units."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    sel = pe.select_hyperparameters(mlp_classifier, X, y, model_kwargs={"hidden": units}, objective_options=GGN, init_loc_fn=INIT,
                                    progress=False)
    w = sel.problem.latent_values(sel.theta, sel.h)
    X_test, y_test = test
    logits = torch.tanh(X_test @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"]
    return float(sel.objective), float((logits.argmax(-1) == y_test).double().mean())


def mlp_units(seeds):
    """Rows ``{structure: [(units kept, evidence, test accuracy, seconds)]}`` over ``seeds`` training subsets."""
    data = mnist(pool=4, dtype=torch.float64)
    rows = {name: [] for name in ("relaxed gates (evidence)", "ARD on units (evidence)", "Graves ratio (ELBO)",
                                  f"all {HIDDEN} units", "best number of units (evidence)")}
    for seed in range(seeds):
        X, y = (a[N_IMAGES * seed: N_IMAGES * (seed + 1)] for a in data["train"])
        judged = {k: judge_units(X, y, data["test"], k) for k in range(1, HIDDEN + 1)}
        best = max(judged, key=lambda k: judged[k][0])
        for name, select in zip(rows, (unit_gates, unit_ard, unit_graves, None, None)):
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                units = int(select(X, y).sum()) if select is not None else (HIDDEN if name.startswith("all") else best)
            seconds = time.perf_counter() - start if select is not None else float("nan")
            rows[name].append((units, *(judged[units] if units else (float("nan"), float("nan"))), seconds))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--mlp-seeds", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    rows = {name: [] for name in ("relaxed gates (evidence)", "ARD (evidence)", "Graves ratio (ELBO)", "all 20 features", "the 5 relevant")}
    for seed in range(args.seeds):
        X, y, _ = ard_data(n=100, features=20, relevant=5, noise=0.5, seed=seed)
        for name, select in zip(rows, (gates, ard, graves, None, None)):
            pyro.clear_param_store()
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if select is None:
                    kept = torch.arange(20) < (20 if name.startswith("all") else 5)
                else:
                    kept = select(X, y)
            seconds = time.perf_counter() - start if select is not None else float("nan")
            rows[name].append((int(kept[:5].sum()), int(kept[5:].sum()), *judge(X, y, kept), seconds))
    lines = [
        "# Structure selection on ARD regression: relaxed gates, ARD and Graves-ratio pruning",
        "",
        f"Command: `python benchmarks/bench_structure.py --seeds {args.seeds} --mlp-seeds {args.mlp_seeds}`  ",
        f"Commit: `{commit()}`  ",
        f"Machine: {machine(torch.device('cpu'))}  ",
        f"Date: {time.strftime('%Y-%m-%d')}",
        "",
        __doc__.split("\n\n")[0].replace("\n", " "),
        "",
        "| structure | relevant kept (of 5) | irrelevant kept (of 15) | evidence | 10-fold CV log density | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in rows.items():
        cols = list(zip(*runs))
        seconds = "—" if name in ("all 20 features", "the 5 relevant") else f"{statistics.median(cols[4]):.2f}"
        lines.append(f"| {name} | {statistics.mean(cols[0]):.1f} | {statistics.mean(cols[1]):.1f} | {statistics.mean(cols[2]):.3f} | "
                     f"{statistics.mean(cols[3]):.3f} | {seconds} |")
    lines += ["", f"Means over seeds 0–{args.seeds - 1}; seconds: the median of the selection's wall time (the judging refits not "
              "included).", ""]
    if args.mlp_seeds:
        lines += [f"## The hidden units of an MLP ({HIDDEN} units, MNIST at 7 × 7, {N_IMAGES} training images)", "",
                  "| structure | units kept (per seed) | evidence | test accuracy | seconds |", "|---|---|---|---|---|"]
        for name, runs in mlp_units(args.mlp_seeds).items():
            cols = list(zip(*runs))
            seconds = f"{statistics.median(cols[3]):.1f}" if not math.isnan(cols[3][0]) else "—"
            lines.append(f"| {name} | {', '.join(map(str, cols[0]))} | {statistics.mean(cols[1]):.3f} | "
                         f"{statistics.mean(cols[2]):.3f} | {seconds} |")
        lines += ["", f"Means over training subsets 0–{args.mlp_seeds - 1}; the evidence and accuracy of a structure are those of "
                  "a fresh network with as many units (a network's units are exchangeable).", ""]
    emit(lines, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
