"""
``hypergradient(method="ift-cg")`` against hypertorch's ``CG`` (Grazzi et al. 2020) at the same number of
conjugate-gradient iterations K, on the same problem: logistic regression with one L2 precision per
feature (``L = Σ log(1 + e^{−y xᵀw}) + ½ Σ_j e^{h_j} w_j²`` on training rows, ``Q = −`` the same
log-loss on validation rows), ``w`` at the inner optimum; n = 1,000, d = 100 and n = 5,000, d = 1,000;
CPU, float64. Both solve ``H v = ∂Q/∂w`` from zero with K Hessian-vector products (hypertorch on the
fixed-point map ``w − η∇L``, whose Jacobian is ``I − ηH``: the same Krylov iterates), so their
hypergradients agree to round-off; the table reports that agreement and the median times.

hypertorch is not on PyPI: pass a checkout of github.com/prolearner/hypertorch with ``--hypertorch PATH``
(the directory that holds its ``hypergrad`` package).

Usage: python benchmarks/bench_cg.py --hypertorch PATH [--repeats 20] [--K 10] [--output FILE]
"""

from __future__ import annotations

import argparse
import os
import warnings
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from pyro_evidence import hypergradient
from pyro_evidence.optim import minimize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import commit, emit, machine  # noqa: E402


def problem(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, dtype=torch.float64, generator=g) / d**0.5
    X = torch.randn(2 * n, d, dtype=torch.float64, generator=g)
    y = torch.where(torch.rand(2 * n, dtype=torch.float64, generator=g) < torch.sigmoid(X @ w_true), 1.0, -1.0)
    Xt, yt, Xv, yv = X[:n], y[:n], X[n:], y[n:]

    def inner_loss(w, h):
        return F.softplus(-yt * (Xt @ w)).sum() + 0.5 * (h.exp() * w**2).sum()

    def validation(w, h):
        return -F.softplus(-yv * (Xv @ w)).sum()

    h = torch.zeros(d, dtype=torch.float64)
    w = minimize(lambda t: inner_loss(t, h), torch.zeros(d, dtype=torch.float64)).theta
    return inner_loss, validation, w, h


def hypertorch_cg(hg, inner_loss, validation, w, h, K):
    lr = 1e-3  # any step: CG's iterates on ηH do not depend on η

    def fp_map(params, hparams):
        (p,), (u,) = params, hparams
        (g,) = torch.autograd.grad(inner_loss(p, u), p, create_graph=True)
        return [p - lr * g]

    def outer(params, hparams):
        return -validation(params[0], hparams[0])  # hypertorch minimises the outer loss

    hparam = h.clone().requires_grad_(True)
    (grad,) = hg.CG([w], [hparam], K=K, fp_map=fp_map, outer_loss=outer, tol=0.0, set_grad=False)
    return -grad


def side_by_side(first, second, repeats):
    """Medians of ``first`` and ``second`` timed alternately, and the median of their per-pair ratios."""
    first(), second()
    a, b = [], []
    for _ in range(repeats):
        for fn, times in ((first, a), (second, b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hypertorch", required=True, help="directory holding hypertorch's hypergrad package")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--K", type=int, default=10)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, args.hypertorch)
    import hypergrad as hg

    lines = [
        "# ift-cg against hypertorch's CG",
        "",
        f"Command: `python benchmarks/bench_cg.py --hypertorch PATH --repeats {args.repeats} --K {args.K}`  ",
        f"Commit: `{commit()}`  ",
        f"Machine: {machine(torch.device('cpu'))}  ",
        f"Date: {time.strftime('%Y-%m-%d')}",
        "",
        f"Medians of {args.repeats} runs of each, alternated in one process (the ratio is the median of the "
        f"per-pair ratios), float64, K = {args.K} CG iterations each (tolerance 0), from the same inner optimum. *agreement*: the largest difference of the two hypergradients relative to their largest "
        "entry; *cosine*: of each to the exact hypergradient (`ift-exact`).",
        "",
        "| n × d | ift-cg | hypertorch CG | ift-cg / hypertorch | agreement | cosine ift-cg | cosine hypertorch |",
        "|---|---|---|---|---|---|---|",
    ]
    warnings.simplefilter("ignore", RuntimeWarning)  # K iterations with tolerance 0: CG says it stopped short
    for n, d in ((1000, 100), (5000, 1000)):
        L, Q, w, h = problem(n, d)
        ours = lambda: hypergradient(L, Q, w, h, method="ift-cg", max_iter=args.K, tol=0.0).grad  # noqa: E731
        theirs = lambda: hypertorch_cg(hg, L, Q, w, h, args.K)  # noqa: E731
        a, b = ours(), theirs()
        exact = hypergradient(L, Q, w, h, method="ift-exact").grad
        cos = lambda u: float(torch.dot(u, exact) / (u.norm() * exact.norm()))  # noqa: E731
        agreement = float((a - b).abs().max() / b.abs().max())
        t_ours, t_theirs, ratio = side_by_side(ours, theirs, args.repeats)
        lines.append(
            f"| {n:,} × {d:,} | {t_ours * 1e3:.2f} ms | {t_theirs * 1e3:.2f} ms | **{ratio:.2f}×** | "
            f"{agreement:.1e} | {cos(a):.6f} | {cos(b):.6f} |"
        )
    lines.append("")
    emit(lines, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
