"""
k-fold cross-validation: the k folds batched under vmap (one optimisation) against a Python
loop over folds, a single fit on all the data, and scikit-learn's ``cross_val_score`` with the
same penalty (``Ridge`` for linear regression on diabetes, ``LogisticRegression`` on breast
cancer), k = 4 and 10.

Usage: python benchmarks/bench_cv.py [--repeats 7] [--device cpu] [--output FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import pyro
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import KFold, cross_val_score
from torch.distributions import constraints

import pyro_evidence as pe
from pyro_evidence.datasets import diabetes, standardize
from pyro_evidence.models import linear_regression, logistic_regression
from pyro_evidence.optim import minimize
from pyro_evidence.problem import Problem

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import commit, emit, machine, median_time  # noqa: E402

ALPHA, BETA = 3.0, 2.0


def set_params(logistic):
    pyro.clear_param_store()
    pyro.param("prior_precision", torch.tensor(ALPHA), constraint=constraints.positive)
    if not logistic:
        pyro.param("noise_precision", torch.tensor(BETA), constraint=constraints.positive)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    Xc, yc = load_breast_cancer(return_X_y=True)
    cases = {
        "linear regression, diabetes (442 × 10)": (linear_regression, *diabetes(device=device), False),
        "logistic regression, breast cancer (569 × 30)": (
            logistic_regression,
            standardize(torch.as_tensor(Xc)).to(device),
            torch.as_tensor(yc, dtype=torch.float64, device=device),
            True,
        ),
    }
    lines = [
        "# k-fold cross-validation benchmark",
        "",
        f"Command: `python benchmarks/bench_cv.py --repeats {args.repeats} --device {args.device}`  ",
        f"Commit: `{commit()}`  ",
        f"Machine: {machine(device)}  ",
        f"Date: {time.strftime('%Y-%m-%d')}",
        "",
        "Medians of repeated runs in one process, float64. *batched*: `cv_log_predictive(k=k)` (the k folds "
        "as one vmapped optimisation, Newton on the stacked latents); *loop*: the same with "
        "`vectorize_folds=False`; *single fit*: one MAP fit on all rows (`minimize` of the model's loss); "
        "scikit-learn: `cross_val_score` with the same penalty per fold (`Ridge(alpha=α/(β·k/(k−1)))`, "
        "`LogisticRegression(C=(k/(k−1))/α)`), which fits the same k MAPs.",
        "",
        "| model | k | batched | loop | single fit | scikit-learn | loop / batched | batched / single fit | batched / scikit-learn |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, (model, X, y, logistic) in cases.items():
        set_params(logistic)
        problem = Problem(model, X, y)
        h = problem.h_init
        single = median_time(lambda: minimize(lambda t: problem.loss(t, h), problem.theta_init), args.repeats, device)
        for k in (4, 10):
            set_params(logistic)
            batched = median_time(lambda: pe.cv_log_predictive(model, X, y, k=k), args.repeats, device)
            loop = median_time(lambda: pe.cv_log_predictive(model, X, y, k=k, vectorize_folds=False), args.repeats, device)
            s = k / (k - 1)
            est = LogisticRegression(C=s / ALPHA, fit_intercept=False, tol=1e-10, max_iter=10_000) if logistic else Ridge(alpha=ALPHA / (BETA * s), fit_intercept=False)
            Xn, yn = X.cpu().numpy(), y.cpu().numpy()
            splitter = KFold(n_splits=k, shuffle=True, random_state=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sk = median_time(lambda: cross_val_score(est, Xn, yn, cv=splitter), args.repeats, torch.device("cpu"))
            lines.append(
                f"| {label} | {k} | {batched * 1e3:.1f} ms | {loop * 1e3:.1f} ms | {single * 1e3:.1f} ms | {sk * 1e3:.1f} ms | "
                f"{loop / batched:.2f}× | {batched / single:.2f}× | {batched / sk:.1f}× |"
            )
    lines.append("")
    emit(lines, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
