"""
The Laplace evidence at the scale of real models.

1. ``--mlp``: the MNIST sample's one-hidden-layer MLP (``mlp_classifier``, 3,000 training images) at 14 × 14 and
   28 × 28 inputs with 5–300 hidden units (10³ … 2.4·10⁵ weights). One MAP per size (L-BFGS, shared by every
   row), then for each curvature the wall time (median of ``--repeats``) and the peak memory (a fresh process per
   row, its maximum resident set) of the evidence at that MAP, and of its partial derivatives ``∂Q/∂θ, ∂Q/∂h``
   (what an implicit hypergradient adds to the evidence besides its ``H⁻¹`` solve). Beside each, laplace-torch
   (if importable) at the same MAP, the same prior precisions and the same structure: its
   ``fit`` + ``log_marginal_likelihood``, and the relative difference of the two evidences.
2. ``--selection``: per-layer precisions of a bias-free MLP (MNIST pooled to 7 × 7, 20 hidden units, 1,180 weights;
   without biases laplace-torch's K-FAC is the same structure as ours) selected from ``α = (1, 1)`` by
   ``select_hyperparameters(objective_options={"hessian": "kron"})`` (the MAP refitted at every step, ``∂ log det C/∂θ`` kept) and by
   laplace-torch's ``optimize_prior_precision`` (layerwise, marglik, the MAP at the start held fixed), both judged by
   the same estimator: the K-FAC Laplace evidence at the selected precisions, its MAP refitted.
3. ``--growth``: linear and logistic regression, ``N = 2,000``, ``d = 10 … 4,000``: ``laplace_evidence`` (exact
   Hessian), one selection step (the inner solve and the ``ift-exact`` hypergradient) and ``elbo_evidence``, with
   exponents fitted to ``d ≥ 100`` on a log-log scale.

Usage: python benchmarks/bench_laplace_scale.py [--mlp] [--selection] [--growth] [--repeats 3] [--output FILE]
(laplace-torch: ``pip install --no-deps --target DIR laplace-torch==0.3 backpack-for-pytorch curvlinops-for-pytorch
asdfghjkl einops einconv unfoldNd linear_operator torchmetrics lightning-utilities`` and ``PYTHONPATH=DIR``.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import zlib

import pyro
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import commit, emit, machine  # noqa: E402

import pyro_evidence as pe  # noqa: E402
from pyro_evidence.datasets import mnist  # noqa: E402
from pyro_evidence.models.linear import linear_regression  # noqa: E402
from pyro_evidence.models.logistic import logistic_regression  # noqa: E402
from pyro_evidence.models.mlp import mlp_classifier  # noqa: E402
from pyro_evidence.objectives.laplace import LaplaceObjective  # noqa: E402
from pyro_evidence.optim import minimize  # noqa: E402
from pyro_evidence.problem import Problem  # noqa: E402

SIZES = [(2, 5), (2, 50), (2, 300), (1, 50), (1, 300)]  # (pool, hidden): 1,045 … 238,510 weights
STRUCTURES = [("exact", "dense"), ("ggn", "dense"), ("diag", "dense"), ("kron", "dense"), ("ggn", "slq")]
DENSE_LIMIT = 12_000  # dense d × d curvatures above this many weights are left out (memory and hours on a CPU)
SLQ_LIMIT = 15_000  # on a CPU, SLQ's 30 probes × 40 Lanczos steps above this many weights take tens of minutes
THEIR_DIAG_LIMIT = 2_000  # laplace-torch's diag (BackPACK's exact diagonal GGN): 39 s and 21 GB at 1,045 weights


def _median(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _problem(pool, hidden, dtype, device):
    X, y = mnist(pool=pool, dtype=dtype, device=device)["train"]
    pyro.clear_param_store()
    kwargs = {"hidden": hidden, "classes": 10}
    return Problem(mlp_classifier, X, y, model_kwargs=kwargs, init_loc_fn=_init), X, y, kwargs


def _init(site):
    g = torch.Generator().manual_seed(zlib.crc32(site["name"].encode()))  # str hashes differ between processes
    return 0.05 * torch.randn(site["fn"].shape(), generator=g, dtype=torch.float64).to(site["fn"].mean)


def fit_map(pool, hidden, path, dtype, device, max_iter):
    problem, *_ = _problem(pool, hidden, dtype, device)
    h = problem.h_init
    start = time.perf_counter()
    m = minimize(lambda t: problem.loss(t, h), problem.theta_init, max_iter=max_iter, newton_max_dim=0)
    torch.save({"theta": m.theta.cpu(), "seconds": time.perf_counter() - start, "grad_norm": m.grad_norm}, path)


def one_row(pool, hidden, structure, logdet, library, path, repeats, dtype, device):
    """Runs in a fresh process: the evidence (and its partials) at the saved MAP; prints JSON."""
    problem, X, y, kwargs = _problem(pool, hidden, dtype, device)
    theta = torch.load(path)["theta"].to(dtype=dtype, device=device)
    h = problem.h_init
    out = {"d": problem.theta_dim}
    big_dense = logdet == "dense" and structure in ("exact", "ggn") and problem.theta_dim > 2000
    repeats = 1 if big_dense else repeats  # minutes per evaluation on a CPU
    if library == "pyro-evidence":
        obj = LaplaceObjective(problem, hessian=structure, logdet=logdet)
        sec, value = _median(lambda: obj.validation(theta, h).detach(), repeats)
        out.update(seconds=sec, value=float(value))
        if not big_dense:  # third derivatives through a dense d × d curvature: not a route at that size
            grad = torch.func.grad(obj.validation, argnums=(0, 1))
            sec, _ = _median(lambda: grad(theta, h), repeats)
            out["grad_seconds"] = sec
    else:
        out.update(_laplace_torch(problem, X, y, kwargs, theta, h, structure, repeats))
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("ROW " + json.dumps(out))


def _laplace_torch(problem, X, y, kwargs, theta, h, structure, repeats):
    from laplace import Laplace

    values = problem.latent_values(theta, h)
    alpha = problem.params(h)
    d_in, hidden = values["w1"].shape
    net = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)).to(X)
    with torch.no_grad():
        net[0].weight.copy_(values["w1"].T)
        net[0].bias.copy_(values["b1"])
        net[2].weight.copy_(values["w2"].T)
        net[2].bias.copy_(values["b2"])
    a1, a2 = float(alpha["prior_precision_1"]), float(alpha["prior_precision_2"])
    prior = torch.tensor([a1, a1, a2, a2], dtype=X.dtype, device=X.device)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=len(y))

    def run():
        kind = "full" if structure == "ggn" else structure
        la = Laplace(net, "classification", subset_of_weights="all", hessian_structure=kind, prior_precision=prior)
        la.fit(loader, progress_bar=False) if "progress_bar" in la.fit.__code__.co_varnames else la.fit(loader)
        return la.log_marginal_likelihood().detach()

    sec, value = _median(run, repeats)
    return {"seconds": sec, "value": float(value)}


def mlp_table(args, lines):
    dtype, device = torch.float64, torch.device(args.device)
    import importlib.util

    libraries = ["pyro-evidence"] + (["laplace-torch"] if importlib.util.find_spec("laplace") else [])
    lines += [
        "### The MNIST MLP: evidence at one MAP per size",
        "",
        f"`python benchmarks/bench_laplace_scale.py --mlp --repeats {args.repeats}` · commit `{commit()}` · "
        f"{machine(device)} · float64, 3,000 training images · median of {args.repeats} · peak = the row's process' "
        "maximum resident set (the data and the library included) · ∂Q = the partials `∂Q/∂θ, ∂Q/∂h` of the evidence "
        "(not timed for dense curvatures above 2,000 weights, which are timed once) · "
        f"left out: dense curvatures above {DENSE_LIMIT:,} weights, SLQ above {SLQ_LIMIT:,} on a CPU, laplace-torch's "
        f"diag above {THEIR_DIAG_LIMIT:,} · rel. difference: against laplace-torch's log marginal likelihood",
        "",
        "| inputs × hidden | weights | structure | pyro-evidence s | ∂Q s | peak MB | laplace-torch s | peak MB | "
        "log evidence | rel. difference |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    tmp = tempfile.mkdtemp()
    maps = []
    for pool, hidden in SIZES:
        path = os.path.join(tmp, f"map-{pool}-{hidden}.pt")
        fit_map(pool, hidden, path, dtype, device, args.map_iter)
        inputs = (28 // pool) ** 2
        saved = torch.load(path)
        maps.append(f"{inputs} × {hidden}: {saved['seconds']:.0f} s, gradient norm {saved['grad_norm']:.3g}")
        for structure, logdet in STRUCTURES:
            rows = {}
            for library in libraries:
                if library == "laplace-torch" and (logdet == "slq" or structure == "exact"):
                    continue
                cmd = [sys.executable, __file__, "--one", str(pool), str(hidden), structure, logdet, library, path,
                       "--repeats", str(args.repeats), "--device", args.device]
                d = inputs * hidden + hidden + hidden * 10 + 10
                if structure in ("exact", "ggn") and logdet == "dense" and d > DENSE_LIMIT:
                    continue
                if logdet == "slq" and d > SLQ_LIMIT and args.device == "cpu":
                    continue
                if library == "laplace-torch" and structure == "diag" and d > THEIR_DIAG_LIMIT:
                    continue
                res = subprocess.run(cmd, capture_output=True, text=True)
                line = [ln for ln in res.stdout.splitlines() if ln.startswith("ROW ")]
                if not line:
                    why = (res.stderr.strip().splitlines() or [""])[-1]
                    why = "not positive definite at this MAP" if "NotPositiveDefiniteError" in why else why[:80]
                    rows[library] = {"error": why or ("killed: out of memory" if res.returncode == -9 else f"exit {res.returncode}")}
                    continue
                rows[library] = json.loads(line[0][4:])
            ours, theirs = rows.get("pyro-evidence"), rows.get("laplace-torch")
            if not ours:
                continue
            name = structure if logdet == "dense" else f"{structure} + slq"
            t = f"{theirs['seconds']:.3g} | {theirs['peak_mb']:.0f}" if theirs and "seconds" in theirs else (
                f"{theirs['error']} |" if theirs else "— | —")
            diff = f"{abs(ours['value'] - theirs['value']) / abs(theirs['value']):.1e}" if theirs and "value" in theirs else "—"
            if "error" in ours:
                lines.append(f"| {inputs} × {hidden} | {d:,} | {name} | {ours['error']} | | | {t} | | {diff} |")
                continue
            grad = f"{ours['grad_seconds']:.3g}" if "grad_seconds" in ours else "—"
            lines.append(
                f"| {inputs} × {hidden} | {ours['d']:,} | {name} | {ours['seconds']:.3g} | {grad} | "
                f"{ours['peak_mb']:.0f} | {t} | {ours['value']:.2f} | {diff} |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        f"Each MAP: {args.map_iter} L-BFGS iterations from small random weights, the same for both libraries ("
        + "; ".join(maps) + "). That is short of a mode, which is how networks are trained: there the exact Hessian "
        "is indefinite (its rows report the Cholesky failure) while the GGN family stays positive definite. kron's "
        "relative difference: laplace-torch factors each bias separately, this library appends it to the layer's "
        "inputs (K-FAC's homogeneous coordinates), so the two structures differ where there are biases; on bias-free "
        "networks they agree to round-off (`--selection` below; `tests/objectives/test_curvature.py` checks K-FAC "
        "against the Kronecker product of its factors built by hand).",
        "",
    ]


def mlp_no_bias(X, y=None, hidden=20, classes=10):
    """``logits = tanh(X W₁) W₂``, ``W_l ~ N(0, α_l⁻¹)``: the MLP without biases."""
    from torch.distributions import constraints

    a1 = pyro.param("prior_precision_1", torch.tensor(1.0), constraint=constraints.positive)
    a2 = pyro.param("prior_precision_2", torch.tensor(1.0), constraint=constraints.positive)
    w1 = pyro.sample("w1", pyro.distributions.Normal(0.0, a1.rsqrt()).expand([X.shape[-1], hidden]).to_event(2))
    w2 = pyro.sample("w2", pyro.distributions.Normal(0.0, a2.rsqrt()).expand([hidden, classes]).to_event(2))
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", pyro.distributions.Categorical(logits=torch.tanh(X @ w1) @ w2), obs=y)


def _kron_evidence(X, y, alpha, theta_init=None):
    from torch.distributions import constraints

    pyro.clear_param_store()
    for i, a in enumerate(alpha, 1):
        pyro.param(f"prior_precision_{i}", torch.tensor(float(a), dtype=X.dtype), constraint=constraints.positive)
    return pe.laplace_evidence(mlp_no_bias, X, y, hessian="kron", init_loc_fn=_init, max_iter=2000, theta_init=theta_init)


def _test_metrics(r, X, y):
    """Accuracy and mean log-likelihood of the held-out images under the plug-in MAP of evidence ``r``."""
    values = r.problem.latent_values(r.theta, r.problem.h_init)
    logp = torch.log_softmax(torch.tanh(X @ values["w1"]) @ values["w2"], -1)
    return float((logp.argmax(-1) == y).double().mean()), float(logp.gather(-1, y[:, None]).mean())


def selection_table(args, lines):
    from laplace import Laplace

    device = torch.device(args.device)
    data = mnist(pool=4, dtype=torch.float64, device=device)
    (X, y), (X_test, y_test) = data["train"], data["test"]
    start = time.perf_counter()
    r0 = _kron_evidence(X, y, (1.0, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sel = pe.select_hyperparameters(mlp_no_bias, X, y, method="ift-exact", init_loc_fn=_init, max_steps=40,
                                        objective_options={"hessian": "kron", "max_iter": 2000}, progress=False, tol=1e-4)
    ours_seconds = time.perf_counter() - start
    ours = [float(sel.hyperparameters[f"prior_precision_{i}"]) for i in (1, 2)]

    values = r0.problem.latent_values(r0.theta, r0.problem.h_init)
    net = torch.nn.Sequential(torch.nn.Linear(49, 20, bias=False), torch.nn.Tanh(), torch.nn.Linear(20, 10, bias=False))
    net = net.to(X)
    with torch.no_grad():
        net[0].weight.copy_(values["w1"].T)
        net[2].weight.copy_(values["w2"].T)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=len(y))
    start = time.perf_counter()
    la = Laplace(net, "classification", subset_of_weights="all", hessian_structure="kron",
                 prior_precision=torch.ones(2, dtype=X.dtype, device=X.device))
    la.fit(loader)
    fixed_map_start = float(la.log_marginal_likelihood())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.optimize_prior_precision(pred_type="glm", method="marglik", n_steps=100, lr=0.1, init_prior_prec=1.0,
                                    prior_structure="layerwise")
    theirs_seconds = time.perf_counter() - start + 0.0
    theirs = [float(a) for a in la.prior_precision]
    fixed_map_theirs = float(la.log_marginal_likelihood())
    with torch.no_grad():
        probs = la(X_test, pred_type="glm", link_approx="probit")
    their_glm = (float((probs.argmax(-1) == y_test).double().mean()), float(probs.gather(-1, y_test[:, None]).log().mean()))
    # the same estimator for both: the K-FAC evidence at the mode the inner solver reaches from the start's MAP
    # (a network has many modes; warm-starting from one fixes which)
    e_ours, e_theirs = _kron_evidence(X, y, ours, r0.theta), _kron_evidence(X, y, theirs, r0.theta)
    (a0, l0), (a_ours, l_ours), (a_theirs, l_theirs) = (_test_metrics(r, X_test, y_test) for r in (r0, e_ours, e_theirs))
    lines += [
        "### Selecting per-layer precisions: the same K-FAC evidence, the MAP refitted or held fixed",
        "",
        f"`python benchmarks/bench_laplace_scale.py --selection` · commit `{commit()}` · {machine(device)} · float64 · "
        f"bias-free MLP 49-20-10 (1,180 weights) on the MNIST sample pooled to 7 × 7 ({len(y):,} images), from α = (1, 1); "
        f"test: the sample's {len(y_test):,} held-out images, the plug-in MAP at the refitted mode",
        "",
        "| selection | α₁ | α₂ | K-FAC log evidence there (mode refitted from the start's MAP) | test accuracy | "
        "test log-likelihood per image | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| start | 1 | 1 | {float(r0.log_evidence):.3f} | {a0:.4f} | {l0:.4f} | |",
        f"| pyro-evidence `select_hyperparameters(objective_options={{\"hessian\": \"kron\"}}, tol=1e-4)`, {len(sel.history)} evaluations | {ours[0]:.4g} | "
        f"{ours[1]:.4g} | {float(e_ours.log_evidence):.3f} | {a_ours:.4f} | {l_ours:.4f} | {ours_seconds:.1f} "
        "(including the MAP at the start) |",
        f"| laplace-torch `optimize_prior_precision` (layerwise marglik, 100 Adam steps, the MAP at the start) | "
        f"{theirs[0]:.4g} | {theirs[1]:.4g} | {float(e_theirs.log_evidence):.3f} | {a_theirs:.4f} | {l_theirs:.4f} | "
        f"{theirs_seconds:.1f} (after that MAP) |",
        "",
        f"laplace-torch's own predictive at its selection (its MAP at the start, GLM with the probit link): test accuracy "
        f"{their_glm[0]:.4f}, log-likelihood per image {their_glm[1]:.4f}.",
        "",
        f"laplace-torch's own K-FAC evidence at the start's MAP: {fixed_map_start:.3f} at α = (1, 1) (ours there: "
        f"{float(r0.log_evidence):.3f}) and {fixed_map_theirs:.3f} at its selection, the MAP not refitted; "
        f"pyro-evidence's own objective at its selection (its warm-started path's mode): {float(sel.objective):.3f}. "
        f"Under the same estimator the selection by pyro-evidence is higher by "
        f"{float(e_ours.log_evidence - e_theirs.log_evidence):.3f} nats.",
        "",
    ]


def _fit_exponent(ds, ts):
    pts = [(math.log(d), math.log(t)) for d, t in zip(ds, ts) if d >= 100 and t > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def growth_table(args, lines):
    device = torch.device(args.device)
    dims = [10, 30, 100, 300, 1000, 2000, 4000]
    lines += [
        "### Growth with d (N = 2,000)",
        "",
        f"`python benchmarks/bench_laplace_scale.py --growth --repeats {args.repeats}` · commit `{commit()}` · "
        f"{machine(device)} · float64 · median of {args.repeats} (1 above d = 1,000) · the ELBO up to d = {args.elbo_max}",
        "",
        "| model | d | laplace_evidence s | one selection step s | elbo_evidence s | ELBO / Laplace |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, model in (("linear", linear_regression), ("logistic", logistic_regression)):
        rec = {"lap": [], "step": [], "elbo": [], "d": [], "delbo": []}
        for d in dims:
            g = torch.Generator().manual_seed(d)
            X = torch.randn(2000, d, generator=g, dtype=torch.float64).to(device) / math.sqrt(d)
            w = torch.randn(d, generator=g, dtype=torch.float64).to(device)
            y = X @ w + 0.3 * torch.randn(2000, generator=g, dtype=torch.float64).to(device)
            if name == "logistic":
                y = (y > 0).double()
            reps = args.repeats if d <= 1000 else 1
            pyro.clear_param_store()
            lap, _ = _median(lambda: pe.laplace_evidence(model, X, y), reps)
            step, _ = _median(lambda: pe.laplace_hypergradient(model, X, y), reps)
            elbo = float("nan")
            if d <= args.elbo_max:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    elbo, _ = _median(lambda: pe.elbo_evidence(model, X, y), reps)
                rec["elbo"].append(elbo)
                rec["delbo"].append(d)
            rec["lap"].append(lap)
            rec["step"].append(step)
            rec["d"].append(d)
            ratio = f"{elbo / lap:.2g}" if math.isfinite(elbo) else "—"
            e = f"{elbo:.3g}" if math.isfinite(elbo) else "—"
            lines.append(f"| {name} | {d:,} | {lap:.3g} | {step:.3g} | {e} | {ratio} |")
            print(lines[-1], flush=True)
        lines.append(
            f"| {name}: fitted exponent (d ≥ 100) | | {_fit_exponent(rec['d'], rec['lap']):.2f} | "
            f"{_fit_exponent(rec['d'], rec['step']):.2f} | {_fit_exponent(rec['delbo'], rec['elbo']):.2f} | |"
        )
    lines.append("")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--mlp", action="store_true")
    p.add_argument("--selection", action="store_true")
    p.add_argument("--growth", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--map-iter", type=int, default=300, help="L-BFGS iterations of each MAP")
    p.add_argument("--elbo-max", type=int, default=1000)
    p.add_argument("--output")
    p.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        pool, hidden, structure, logdet, library, path = args.one
        return one_row(int(pool), int(hidden), structure, logdet, library, path, args.repeats, torch.float64,
                       torch.device(args.device))
    lines = []
    if args.mlp:
        mlp_table(args, lines)
    if args.selection:
        selection_table(args, lines)
    if args.growth:
        growth_table(args, lines)
    emit(lines, args.output)


if __name__ == "__main__":
    main()
