"""The ``pyro-evidence`` command line."""

from __future__ import annotations

import argparse
import functools
import sys
import time

import pyro
import torch

from .util import isolated_params

__all__ = ["main", "demo", "select"]


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
    from . import datasets, models
    from .placement import choose_device

    if device == "auto":
        model = functools.partial(models.polynomial_regression, degree=max_degree)
        device = choose_device(model, *datasets.sin_data(n=n, noise=noise, seed=seed))
    x, y = datasets.sin_data(n=n, noise=noise, seed=seed, device=device)
    t = 2 * x - 1
    with isolated_params():  # every degree on an empty store; the caller's store left as it was
        rows, fits, seconds = _demo_fits(t, y, max_degree, precision_rate, progress)
    _report(rows, fits, x, y, noise, n, seconds, output, out)
    return rows


def _demo_fits(t, y, max_degree, precision_rate, progress):
    from . import laplace_evidence, select_hyperparameters
    from .models import polynomial_regression

    from tqdm.auto import tqdm

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
    return rows, fits, time.perf_counter() - start


def _report(rows, fits, x, y, noise, n, seconds, output, out):
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
            return
        _plot(rows, fits, x, y, best["degree"], output)
        print(f"plot written to {output}", file=out)


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


def _diabetes(device):
    from . import datasets

    return datasets.diabetes(device=device)


def _cancer(device):
    from sklearn.datasets import load_breast_cancer

    from . import datasets

    X, y = load_breast_cancer(return_X_y=True)
    return datasets.standardize(torch.as_tensor(X)).to(device), torch.as_tensor(y, dtype=torch.float64, device=device)


def _sin(device):
    from . import datasets

    x, y = datasets.sin_data(device=device)
    return 2 * x - 1, y


def _cases():
    """``{name: (description, model, data loader)}`` of the reference cases ``select`` runs."""
    from functools import partial

    from . import models

    return {
        "linear-diabetes": ("Bayesian linear regression on scikit-learn's diabetes data", models.linear_regression, _diabetes),
        "ard-diabetes": ("ARD linear regression (one precision per feature) on diabetes", partial(models.linear_regression, ard=True), _diabetes),
        "logistic-cancer": ("logistic regression on scikit-learn's breast cancer data", models.logistic_regression, _cancer),
        "polynomial-sin": ("degree-5 Legendre regression on the demo's sin(2πx) data", partial(models.polynomial_regression, degree=5), _sin),
    }


def select(argv_args, out=sys.stdout):
    """``pyro-evidence select``: one selection on a reference model and built-in data."""
    from . import Checkpoint, SearchOptions, select_hyperparameters
    from .search import SEARCH_METHODS

    description, model, load = _cases()[argv_args.case]
    auto = argv_args.device == "auto"
    args = load("cpu" if auto else argv_args.device)
    a = argv_args
    search, checkpoint = None, None
    if a.method in SEARCH_METHODS:  # the search's options only where a search runs, as the library asks
        beats = {k: v for k, v in (("heartbeat_interval", a.heartbeat_interval), ("grace_period", a.grace_period)) if v is not None}
        search = SearchOptions(n_trials=a.n_trials, storage=a.storage, study_name=a.study_name, seed=a.seed, **beats)
    elif any(v is not None for v in (a.n_trials, a.storage, a.study_name, a.heartbeat_interval, a.grace_period)):
        raise ValueError("--n-trials, --storage, --study-name, --heartbeat-interval and --grace-period are options of the "
                         "black-box search (--method grid | random | gp)")
    if a.checkpoint is not None:
        checkpoint = Checkpoint(a.checkpoint, resume=a.resume, overwrite=a.overwrite)
    elif a.resume:
        raise ValueError("--resume needs --checkpoint (the file to resume from)")
    start = time.perf_counter()
    with isolated_params(clear=True):
        sel = select_hyperparameters(model, *args, objective=a.objective, method=a.method, max_steps=a.max_steps,
                                     search=search, checkpoint=checkpoint, progress=None if a.progress else False,
                                     device="auto" if auto else None)
    seconds = time.perf_counter() - start
    print(f"{description}: objective={argv_args.objective}, method={argv_args.method}", file=out)
    print(f"{'hyperparameter':>20}  value", file=out)
    for name, value in sel.hyperparameters.items():
        shown = f"{float(value):.6g}" if value.numel() == 1 else "[" + ", ".join(f"{float(v):.4g}" for v in value.reshape(-1)) + "]"
        print(f"{name:>20}  {shown}", file=out)
    print(f"{'objective':>20}  {float(sel.objective):.6f}", file=out)
    print(f"{'evaluations':>20}  {len(sel.history)}", file=out)
    print(f"{'converged':>20}  {sel.converged}", file=out)
    print(f"{'seconds':>20}  {seconds:.2f} on {sel.problem.device}", file=out)
    return sel


def _parser():
    from .hypergrad import METHODS
    from .objectives import OBJECTIVES
    from .search import SEARCH_METHODS

    parser = argparse.ArgumentParser(prog="pyro-evidence", description="Evidence-based model selection for Pyro models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="select polynomial degree and precisions by Laplace evidence")
    p.add_argument("--n", type=int, default=30, help="number of observations (default 30)")
    p.add_argument("--noise", type=float, default=0.3, help="noise standard deviation (0.3)")
    p.add_argument("--seed", type=int, default=0, help="data seed (0)")
    p.add_argument("--max-degree", type=int, default=9, help="largest degree tried (9)")
    p.add_argument("--output", default="pyro_evidence_demo.png", help="PNG path ('' for none)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda, or auto: the faster for the problem (cpu)")
    q = sub.add_parser("select", help="select hyperparameters of a reference model on built-in data")
    q.add_argument("--case", choices=list(_cases()), default="linear-diabetes", help="model and data (linear-diabetes)")
    q.add_argument("--objective", choices=sorted(OBJECTIVES), default="laplace", help="the validation function (laplace)")
    methods = sorted(METHODS) + ["graves", "hoag"] + list(SEARCH_METHODS)
    q.add_argument("--method", choices=methods, default="ift-exact", metavar="METHOD",
                   help=f"a hypergradient method, an outer loop or a search: {', '.join(methods)} (ift-exact)")
    q.add_argument("--max-steps", type=int, default=100, help="outer evaluations at most (100)")
    q.add_argument("--n-trials", type=int, default=None, help="black-box search: the study's trials in all")
    q.add_argument("--storage", default=None, help="Optuna storage URL or journal file path (search)")
    q.add_argument("--study-name", default=None, help="the study's name in the storage")
    q.add_argument("--heartbeat-interval", type=int, default=None,
                   help="RDB storage: seconds between heartbeats of a running trial (10)")
    q.add_argument("--grace-period", type=int, default=None,
                   help="RDB storage: seconds without a heartbeat after which a trial is run again (2 x the interval)")
    q.add_argument("--checkpoint", default=None, help="checkpoint file (gradient methods)")
    q.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --checkpoint with a new run")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="cpu", help="torch device, e.g. cuda, or auto: the faster for the problem (cpu)")
    q.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    e = sub.add_parser("experiment", help="the seed's experiments: the synthetic polynomial design or MNIST")
    e.add_argument("name", choices=["synthetic", "mnist"], help="which experiment")
    e.add_argument("--objective", choices=["cv", "elbo", "laplace"], action="append",
                   help="validation function (cv and elbo by default; laplace: the evidence with K-FAC curvature, mnist)")
    e.add_argument("--methods", nargs="+", default=None, help="methods (synthetic: all eight; mnist: random greedy drmad hoag ift-cg)")
    e.add_argument("--runs", type=int, default=5, help="runs per method and validation function (5)")
    e.add_argument("--iterations", type=int, default=None, help="hyperparameter iterations (synthetic 50, mnist 25)")
    e.add_argument("--pool", type=int, choices=(1, 2, 4, 7, 14, 28), default=1,
                   help="mnist: average-pool the 28 × 28 images by this factor (1)")
    e.add_argument("--fast", action="store_true", help="one run, 3 iterations (mnist: 300 training images), for CI")
    e.add_argument("--output-dir", default="experiment_results", help="where the CSV and Markdown go")
    e.add_argument("--device", default="cpu", help="torch device of the selections, e.g. cuda, or auto (cpu)")
    return parser


def _setup(args, device):
    from .experiments import EXPERIMENTS, Mnist

    return Mnist(device, args.fast, args.pool) if args.name == "mnist" else EXPERIMENTS[args.name](device, args.fast)


def _experiment(args, parser, argv):
    from .experiments import METHODS, MNIST_METHODS, run, write_results
    from .placement import choose_device

    methods = args.methods or (MNIST_METHODS if args.name == "mnist" else METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; the experiment's methods are {METHODS}")
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    setup = _setup(args, "cpu" if args.device == "auto" else args.device)
    if args.device == "auto":  # the faster device for the experiment's model on its data
        device = choose_device(setup.model, *setup.args, model_kwargs=setup.model_kwargs)
        setup = _setup(args, device) if device.type != "cpu" else setup
    if args.iterations is not None and not args.fast:
        if args.iterations < 1:
            parser.error(f"--iterations must be >= 1, got {args.iterations}")
        setup.iterations = args.iterations
    command = "pyro-evidence " + " ".join(argv if argv is not None else sys.argv[1:])

    def save(results):  # after every run: an interrupted experiment keeps what it finished
        return write_results(results, args.output_dir, command, deviations=setup.deviations)

    results = run(setup, tuple(args.objective or ("cv", "elbo")), methods, args.runs, fast=args.fast, on_run=save)
    csv_path, md_path = save(results)
    print(open(md_path).read())
    print(f"written: {csv_path}, {md_path}")
    return 0


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.command == "experiment":
        return _experiment(args, parser, argv)
    if args.command == "select":
        try:
            select(args)
        except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
            parser.error(str(e))
        return 0
    demo(n=args.n, noise=args.noise, seed=args.seed, max_degree=args.max_degree, output=args.output or None,
         device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
