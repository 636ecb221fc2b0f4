"""The ``pyro-evidence`` command line."""

from __future__ import annotations

import argparse
import sys
import time

import pyro
import torch

__all__ = ["main", "demo"]


def demo(
    n: int = 30,
    noise: float = 0.3,
    seed: int = 0,
    max_degree: int = 9,
    precision_rate: float = 1e-3,
    output: str | None = "pyro_evidence_demo.png",
    device: str = "cpu",
    progress: bool | None = None,
    out=sys.stdout,
):
    """
    Polynomial regression on ``y = sin 2πx + ε`` (``x ∈ [0, 1]``, Legendre features of
    ``2x − 1``): for each degree, select the prior and noise precisions by maximising the
    Laplace evidence (exact for this model), print a table and draw a plot.

    A weak exponential hyperprior on the prior precision (``precision_rate``) keeps the
    selection finite where the data carry no evidence for a weight (degree 0 here: the sine has
    mean zero on ``[0, 1]``); the table's log evidence is evaluated without it.

    :returns: a list of rows ``{degree, log_evidence, prior_precision, noise_precision}``.
    """
    from . import datasets, laplace_evidence, select_hyperparameters
    from .models import polynomial_regression

    from tqdm.auto import tqdm

    x, y = datasets.sin_data(n=n, noise=noise, seed=seed, device=device)
    t = 2 * x - 1
    rows, fits = [], []
    start = time.perf_counter()
    for degree in tqdm(range(max_degree + 1), desc="degrees", disable=None if progress is None else not progress):
        pyro.clear_param_store()
        kwargs = {"degree": degree, "precision_rate": precision_rate}
        sel = select_hyperparameters(
            polynomial_regression, t, y, model_kwargs=kwargs, progress=False
        )
        ev = laplace_evidence(polynomial_regression, t, y, model_kwargs={"degree": degree})
        rows.append(
            {
                "degree": degree,
                "log_evidence": float(ev.log_evidence),
                "prior_precision": float(sel.hyperparameters["prior_precision"]),
                "noise_precision": float(sel.hyperparameters["noise_precision"]),
                "converged": sel.converged,
            }
        )
        fits.append(ev)
    seconds = time.perf_counter() - start

    best = max(rows, key=lambda r: r["log_evidence"])
    print(
        f"Polynomial regression on sin(2πx) + N(0, {noise}²), N = {n}, Legendre features; "
        "precisions selected by Laplace evidence",
        file=out,
    )
    print(f"{'degree':>6}  {'log evidence':>12}  {'prior precision α':>17}  {'noise precision β':>17}", file=out)
    for r in rows:
        mark = "  ← best" if r is best else ""
        flag = "" if r["converged"] else "  (not converged)"
        print(
            f"{r['degree']:>6}  {r['log_evidence']:>12.4f}  {r['prior_precision']:>17.6g}  "
            f"{r['noise_precision']:>17.6g}{mark}{flag}",
            file=out,
        )
    print(f"selected degree {best['degree']} in {seconds:.1f} s on {x.device}", file=out)

    if output:
        try:
            import matplotlib

            matplotlib.use("Agg")
        except ImportError:
            print("matplotlib is not installed: no plot written", file=out)
            return rows
        _plot(rows, fits, x, y, best["degree"], output)
        print(f"plot written to {output}", file=out)
    return rows


def _plot(rows, fits, x, y, best_degree, output):
    import math

    import matplotlib.pyplot as plt

    from .models import polynomial_features

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4))
    ax0.plot([r["degree"] for r in rows], [r["log_evidence"] for r in rows], "o-")
    ax0.axvline(best_degree, color="grey", ls=":")
    ax0.set_xlabel("degree")
    ax0.set_ylabel("log evidence")
    ax0.set_title("Laplace evidence (exact here) per degree")

    grid = torch.linspace(0, 1, 200, dtype=x.dtype, device=x.device)
    ax1.plot(x.cpu(), y.cpu(), "k.", label="data")
    ax1.plot(grid.cpu(), torch.sin(2 * math.pi * grid).cpu(), "g--", label="sin 2πx")
    for degree in sorted({1, 3, best_degree, len(rows) - 1}):
        ev = fits[degree]
        phi = polynomial_features(2 * grid - 1, degree)
        mean = phi @ ev.theta
        std = (phi @ torch.cholesky_solve(phi.T, torch.linalg.cholesky(ev.hessian))).diagonal().sqrt()
        line = ax1.plot(grid.cpu(), mean.cpu(), label=f"degree {degree}")[0]
        if degree == best_degree:
            ax1.fill_between(
                grid.cpu(), (mean - 2 * std).cpu(), (mean + 2 * std).cpu(), color=line.get_color(), alpha=0.2
            )
    ax1.set_ylim(-2, 2)
    ax1.set_xlabel("x")
    ax1.legend(fontsize=8)
    ax1.set_title("posterior mean (±2σ of the mean for the best degree)")
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="pyro-evidence", description="Evidence-based model selection for Pyro models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="select polynomial degree and precisions by Laplace evidence")
    p.add_argument("--n", type=int, default=30, help="number of observations (default 30)")
    p.add_argument("--noise", type=float, default=0.3, help="noise standard deviation (0.3)")
    p.add_argument("--seed", type=int, default=0, help="data seed (0)")
    p.add_argument("--max-degree", type=int, default=9, help="largest degree tried (9)")
    p.add_argument("--output", default="pyro_evidence_demo.png", help="PNG path ('' for none)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (cpu)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available on this machine")
        demo(
            n=args.n,
            noise=args.noise,
            seed=args.seed,
            max_degree=args.max_degree,
            output=args.output or None,
            device=args.device,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
