"""
The outer loop: ``h* = argmax_h Q(θ*(h), h)`` with ``θ*(h) = argmin_θ L(θ, h)``.

Each outer evaluation warm-starts the inner solve from the previous ``θ*``, then asks a
hypergradient method for ``dQ/dh``; the outer optimiser (L-BFGS with a strong-Wolfe line search,
or Adam) works in unconstrained ``h``, so positive hyperparameters move on a log scale.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import pickle
import time
import warnings
import zipfile
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from torch.func import grad

from .hypergrad import METHODS
from .hypergrad.implicit import check_validation
from .linalg import NotPositiveDefiniteError
from .hypergrad.unrolled import UNROLLED
from .objectives import OBJECTIVES
from .optim import minimize
from .problem import Problem
from .search import SEARCH_METHODS, SearchInterrupted, history_of, search
from .util import fingerprint, mismatch

__all__ = ["Selection", "Step", "select_hyperparameters"]


@dataclass
class Step:
    """One outer evaluation: ``objective`` = ``Q(θ*(h), h)``, ``hyperparameters`` (constrained),
    ``grad_norm`` = ``max |dQ/dh|`` in unconstrained ``h``, ``seconds`` since the start."""

    objective: float
    hyperparameters: dict
    grad_norm: float
    seconds: float


@dataclass
class Selection:
    """
    Result of :func:`select_hyperparameters`.

    :ivar hyperparameters: the selected values, constrained, ``{name: tensor}`` (also written
        to Pyro's param store).
    :ivar objective: ``Q`` at the selected hyperparameters (the log evidence for
        ``objective="laplace"``).
    :ivar history: a :class:`Step` per outer evaluation.
    :ivar converged: whether ``max |dQ/dh| ≤ tol`` was measured at the selection (for a
        black-box search, by one ``ift-cg`` hypergradient at its best trial, up to 2,000 inner
        parameters; for ``graves``,
        whether the coordinate ascent reached its fixed point); False after an interruption.
    :ivar theta: the inner solution ``θ*(h)`` at the selection (flat, unconstrained).
    :ivar h: the selection in flat unconstrained coordinates.
    :ivar grad_norm: ``max |dQ/dh|`` at the selection (NaN where it could not be computed).
    """

    hyperparameters: dict
    objective: torch.Tensor
    history: list
    converged: bool
    theta: torch.Tensor
    h: torch.Tensor
    objective_name: str = "laplace"
    method: str = "ift-exact"
    problem: Problem | None = field(default=None, repr=False)
    grad_norm: float = math.nan


def _coordinate_ascent(obj, h, state, history, max_steps, tol, start, bar):
    """Graves (2011): alternate the fit of q (``θ ← argmin_θ L``) with the prior update
    ``h ← argmax_h Q(θ, h)``. Neither half lowers ``Q``; stops at the fixed point."""
    problem = obj.problem
    theta = obj.theta_init
    for _ in range(max_steps):
        theta = obj.solve(h, theta).theta
        m = minimize(lambda h_: -obj.validation(theta, h_), h)
        h_new, value = m.theta, -m.loss
        gmax = float(grad(obj.validation, argnums=1)(theta, h_new).abs().max())
        step = float((h_new - h).abs().max())
        h = h_new
        history.append(
            Step(float(value), {k: v.detach().clone() for k, v in problem.params(h).items()}, gmax, time.perf_counter() - start)
        )
        state["best"] = (float(value), h.clone(), theta, value.detach(), gmax)
        bar.update(1)
        bar.set_postfix(Q=f"{float(value):.6g}", step=f"{step:.2g}")
        if step <= tol:
            state["fixed_point"] = True
            break
    state["theta"] = theta


def _check_choice(kind, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; available: {sorted(choices)}")


def select_hyperparameters(
    model,
    *args,
    objective: str = "laplace",
    method: str = "ift-exact",
    hyperparameters=None,
    model_kwargs: dict | None = None,
    optimizer: str | None = None,
    max_steps: int = 100,
    lr: float | None = None,
    tol: float | None = None,
    progress: bool | None = None,
    jitter: float = 0.0,
    hessian: str = "exact",
    inner_max_iter: int = 500,
    objective_options: dict | None = None,
    method_options: dict | None = None,
    n_trials: int | None = None,
    bounds: dict | None = None,
    grid: dict | None = None,
    storage=None,
    study_name: str | None = None,
    seed: int = 0,
    checkpoint: str | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    init_loc_fn=None,
) -> Selection:
    """
    Selects the ``pyro.param`` hyperparameters of a Pyro model by maximising an objective.

    :param model: a Pyro model whose prior takes its hyperparameters from ``pyro.param``.
    :param args: the data: tensors sharing their first dimension, on the device and in the dtype
        the computation should use.
    :param str objective: ``"laplace"`` — the Laplace log evidence; ``"elbo"`` — the ELBO of a
        diagonal Gaussian posterior (``θ`` = its means and unconstrained scales, fitted for each
        ``h``); ``"cv"`` — k-fold cross-validation (seed eq. (1)); ``"holdout"`` — a validation
        set (``objective_options={"validation": (X_val, y_val)}`` or a fraction).
    :param str method: the hypergradient method: ``"ift-exact"`` (dense Hessian, the exact
        total derivative ``∂Q/∂h − (∂²L/∂h∂θ)ᵀ H⁻¹ ∂Q/∂θ``, third derivatives of the Laplace log-det
        included), ``"ift-cg"``, ``"ift-neumann"``, ``"t1-t2"``, ``"larsen"``, ``"greedy"``,
        ``"darts"``, and through the inner trajectory ``"forward"``, ``"rmad"``, ``"truncated"``,
        ``"drmad"`` (momentum SGD from the previous ``θ``; ``method_options`` take ``steps``,
        ``lr``, ``momentum``, ``batch_size``) (see :mod:`pyro_evidence.hypergrad`); ``"hoag"`` — Pedregosa's algorithm: CG to a
        tolerance that shrinks with the outer iterations, warm starts, and an adaptive ascent step
        with rejection; ``"graves"`` (ELBO only) — coordinate ascent alternating the fit of ``q``
        with ``h ← argmax_h ELBO(q, h)``, Graves' closed form for a Gaussian prior.
    :param hyperparameters: names of the param sites to select (default: all of the model's).
    :param dict model_kwargs: keyword arguments for the model.
    :param str optimizer: ``"lbfgs"`` (quasi-Newton with strong-Wolfe line search; the default for
        the exact methods ``ift-exact`` and ``ift-cg``), ``"adam"`` (gradient ascent with step
        ``lr``, default 0.05; the default for the approximate methods, whose gradients a line
        search cannot trust), or ``"sgd"`` (plain gradient ascent ``h ← h + lr·dQ/dh``).
    :param int max_steps: outer evaluations at most.
    :param float tol: stop when ``max |dQ/dh| ≤ tol`` (unconstrained ``h``); default 1e-6 in
        float64, ``10√ε`` in lower precision.
    :param progress: show a tqdm bar; default: only in a terminal.
    :param float jitter: added to the inner Hessian's diagonal where the objective uses it.
    :param str hessian: ``objective="laplace"``: the curvature whose ``log det`` the evidence uses — ``"exact"``,
        ``"ggn"``, ``"diag"`` or ``"kron"`` (see :func:`~pyro_evidence.laplace_evidence`;
        ``objective_options={"logdet": "slq"}`` for the matrix-free route). The hypergradient differentiates the
        evidence of that curvature, its ``θ̂``-dependence included.
    :param int inner_max_iter: L-BFGS iterations of each inner solve at most.
    :param dict objective_options: passed to the objective, e.g. ``{"num_particles": 128}`` for
        the ELBO, ``{"k": 10, "stratify": labels}`` for CV.
    :param dict method_options: passed to the method, e.g. ``{"tol": 1e-8}`` for CG,
        ``{"terms": 100}`` for Neumann, ``{"lr": 1e-3}`` for T1–T2, greedy and DARTS;
        for HOAG ``{"schedule": "exponential" | "quadratic" | "cubic"}``.
    :param int n_trials: black-box search (``method="grid" | "random" | "gp"``, on Optuna): the
        study's completed trials in all, however many processes share it (default ``max_steps``;
        for ``grid`` the whole grid).
    :param dict bounds: ``{name: (low, high)}`` in constrained values; the search box is their
        image in unconstrained space (log scale for positive parameters); default four decades
        either side of the initial value.
    :param dict grid: explicit grid points ``{name: [values]}``; without it a grid of 10 points per
        element is built, for at most 3 elements.
    :param storage: an Optuna storage URL (``sqlite:///study.db``) or a journal file path: the
        study persists there, resumes after a kill and is shared by every process using it.
    :param str study_name: the study's name in the storage; default a name derived from the
        problem's fingerprint. A study made for another model, data, objective or method is refused.
    :param int seed: the samplers' seed.
    :param str checkpoint: gradient-based methods: a file to which ``h``, the outer optimiser's
        state, the warm-start ``θ``, the best ``h`` with its own ``θ``, the history and a
        fingerprint of the problem are written every ``checkpoint_every`` outer steps (write, then
        rename), while a lock beside it (``<checkpoint>.lock``) keeps other processes from writing
        it. ``resume=True`` continues from it (refused for another model, data, objective, method
        or optimizer); an existing checkpoint is replaced only with ``overwrite=True``.
    :param callable init_loc_fn: Pyro's init strategy for the first inner solve's starting point
        (see :class:`~pyro_evidence.problem.Problem`); a neural network needs a random one, e.g.
        ``functools.partial(pyro.infer.autoguide.init_to_uniform, radius=0.05)``.
    :rtype: Selection
    """
    _check_choice("objective", objective, OBJECTIVES)
    _check_choice("method", method, {**METHODS, "graves": None, **dict.fromkeys(SEARCH_METHODS)})
    if method == "graves" and objective != "elbo":
        raise ValueError(
            f"method='graves' is the closed-form prior update of the ELBO; it needs "
            f"objective='elbo', not {objective!r}"
        )
    _check_ignored(method, objective, optimizer=optimizer, lr=lr, jitter=jitter, hessian=hessian, n_trials=n_trials, bounds=bounds,
                   grid=grid, storage=storage, study_name=study_name, checkpoint=checkpoint, resume=resume,
                   overwrite=overwrite)
    if optimizer is None:
        optimizer = "lbfgs" if method in ("ift-exact", "ift-cg") else "adam"
    _check_choice("optimizer", optimizer, ("lbfgs", "adam", "sgd"))
    for name, value in (("max_steps", max_steps), ("checkpoint_every", checkpoint_every), ("inner_max_iter", inner_max_iter)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if n_trials is not None and (not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1):
        raise ValueError(f"n_trials must be a positive int, got {n_trials!r}")
    method_options = dict(method_options or {})
    objective_options = dict(objective_options or {})
    _check_options("objective_options", objective_options, OBJECTIVES[objective], f"objective {objective!r}")
    _check_method_options(method, method_options)
    problem = Problem(
        model,
        *args,
        model_kwargs=model_kwargs,
        hyperparameters=hyperparameters,
        require_hyperparameters=True,
        init_loc_fn=init_loc_fn,
    )
    options = {"max_iter": inner_max_iter, **objective_options}
    if objective == "laplace":
        options.update(jitter=jitter, hessian=hessian)
    obj = OBJECTIVES[objective](problem, **options)
    if tol is None:
        tol = max(1e-6, 10 * torch.finfo(problem.dtype).eps ** 0.5)
    schedule = method_options.pop("schedule", "quadratic") if method == "hoag" else None
    if method == "larsen":
        method_options["per_example"] = obj.per_example_loss
    unrolled = method in UNROLLED
    if unrolled and "batch_size" in method_options:
        method_options["step_loss"] = obj.step_loss(method_options.pop("batch_size"), method_options.pop("seed", 0))

    start = time.perf_counter()
    history: list[Step] = []
    state = {"theta": obj.theta_init, "best": None, "cache": None}
    bar = tqdm(total=max_steps, desc=f"select ({objective}, {method})", disable=None if progress is None else not progress)

    def evaluate(h, **extra):
        cached = state.get("cache")
        if cached is not None and not extra and torch.equal(cached[0], h):
            return cached[1]  # L-BFGS re-evaluates the point its last line search ended on
        try:
            opts = {**method_options, **extra}
            if unrolled:  # the trajectory is the inner solve, warm-started from the last θ_η
                hg = METHODS[method](obj.inner_loss, obj.validation, state["theta"], h.detach(), **opts)
                theta = hg.info["theta"]
            else:
                m = obj.solve(h, state["theta"])
                if not history:  # at the first inner optimum, not at the unfitted start
                    check_validation(obj.validation, m.theta, h.detach())
                if method == "ift-exact":
                    opts.update(jitter=jitter, hessian=m.hessian)
                hg = METHODS[method](obj.inner_loss, obj.validation, m.theta, h.detach(), **opts)
                theta = m.theta
        except (FloatingPointError, NotPositiveDefiniteError) as e:
            if state["best"] is None:  # nothing good to fall back on: the error speaks for itself
                raise
            raise _NonFinite(len(history) + 1, str(e)) from e
        value, gmax = float(hg.value), float(hg.grad.abs().max()) if hg.grad.numel() else 0.0
        if not (math.isfinite(value) and math.isfinite(gmax)):
            raise _NonFinite(len(history) + 1, f"Q = {value}, max |dQ/dh| = {gmax}")
        state["theta"] = theta
        history.append(
            Step(value, {k: v.detach().clone() for k, v in problem.params(h).items()}, gmax, time.perf_counter() - start)
        )
        if state["best"] is None or value >= state["best"][0]:
            state["best"] = (value, h.detach().clone(), theta, hg.value.detach(), gmax)
        bar.update(1)
        bar.set_postfix(Q=f"{value:.6g}", grad=f"{gmax:.2g}")
        state["cache"] = (h.detach().clone(), hg)
        return hg

    if method in SEARCH_METHODS:
        return _black_box(obj, problem, method, n_trials if n_trials is not None else (None if method == "grid" else max_steps),
                          bounds, grid, storage, study_name, seed, bar, start, objective, tol)

    h = obj.h_init.detach().clone().requires_grad_(True)
    stopped = None
    key = fingerprint(problem, objective=objective, method=method, optimizer=optimizer, objective_options=objective_options,
                      **getattr(obj, "key", {}))
    _check_checkpoint_path(checkpoint, resume, overwrite)
    lock = _CheckpointLock(checkpoint) if checkpoint is not None else contextlib.nullcontext()
    try:
        with lock:
            if method == "graves":
                _coordinate_ascent(obj, h.detach(), state, history, max_steps, tol, start, bar)
            elif method == "hoag":
                _hoag(evaluate, h.detach(), state, max_steps, tol, schedule, lr)
            else:
                _outer_loop(optimizer, evaluate, h, lr, tol, max_steps, history, state, problem, checkpoint, checkpoint_every, resume, key)
    except KeyboardInterrupt:
        if state["best"] is None:
            raise
        stopped = "interrupted"
        warnings.warn(
            "selection interrupted; returning the best hyperparameters evaluated so far",
            RuntimeWarning,
            stacklevel=2,
        )
    except _NonFinite as e:
        if state["best"] is None:
            raise FloatingPointError(
                "the objective or its hypergradient is not finite at the initial hyperparameters"
            ) from None
        stopped = "non-finite"
        warnings.warn(
            f"the objective or its hypergradient is not finite at outer step {e.step} ({e.reason}); "
            "stopping with the last good hyperparameters",
            RuntimeWarning,
            stacklevel=2,
        )
    finally:
        bar.close()

    _, h_best, theta_best, value_best, gmax_best = state["best"]
    converged = gmax_best <= tol if method != "graves" else state.get("fixed_point", False)
    problem.write_params(h_best)
    return Selection(
        hyperparameters={k: v.detach() for k, v in problem.params(h_best).items()},
        objective=value_best,
        history=history,
        converged=stopped is None and converged,
        theta=theta_best,
        h=h_best,
        objective_name=objective,
        method=method,
        problem=problem,
        grad_norm=gmax_best,
    )


_SEARCH_ONLY = ("n_trials", "bounds", "grid", "storage", "study_name")


def _check_ignored(method, objective, **given):
    """Refuses an option that the chosen method or objective would silently ignore."""
    search = method in SEARCH_METHODS
    ignored = []
    if not search:
        ignored += [(n, "the black-box search (method='grid' | 'random' | 'gp')") for n in _SEARCH_ONLY if given[n] is not None]
    else:
        ignored += [(n, "the gradient methods") for n in ("optimizer", "lr", "checkpoint") if given[n] is not None]
        ignored += [(n, "the gradient methods") for n in ("resume", "overwrite") if given[n]]
    if method in ("hoag", "graves"):
        why = "HOAG's adaptive step" if method == "hoag" else "Graves' closed-form update"
        ignored += [(n, f"the L-BFGS/Adam/SGD outer loop; {why} has its own loop") for n in ("optimizer", "checkpoint")
                    if given[n] is not None]
        ignored += [(n, "the L-BFGS/Adam/SGD outer loop") for n in ("resume", "overwrite") if given[n]]
    if method == "graves" and given["lr"] is not None:
        ignored.append(("lr", "the gradient steps (Graves' update is an exact maximisation)"))
    if given["jitter"] and objective != "laplace":
        ignored.append(("jitter", "objective='laplace'"))
    if given["hessian"] != "exact" and objective != "laplace":
        ignored.append(("hessian", "objective='laplace'"))
    if given["resume"] and given["checkpoint"] is None and not ignored:
        raise ValueError("resume=True needs checkpoint= (the file to resume from)")
    if ignored:
        name, owner = ignored[0]
        raise ValueError(f"{name}= is an option of {owner}; method={method!r} with objective={objective!r} would ignore it")


def _check_options(label, options, fn, owner, skip=0, extra=()):
    """Refuses keys of ``options`` that ``fn`` (a function or a class) does not take."""
    target = fn.__init__ if isinstance(fn, type) else fn
    params = list(inspect.signature(target).parameters.values())[skip:]
    accepted = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} | set(extra)
    if isinstance(fn, type):  # an objective: its own options and the inner solver's (Objective.__init__)
        accepted |= {"max_iter", "tol"}
        accepted -= {"self", "problem", "jitter", "hessian"}  # select_hyperparameters' own keywords
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"{label} {unknown[0]!r} is not an option of {owner}; its options are {sorted(accepted)}")


def _check_method_options(method, options):
    if method in SEARCH_METHODS or method == "graves":
        if options:
            raise ValueError(f"method_options {sorted(options)[0]!r}: method {method!r} takes no method_options")
        return
    internal = {"hessian", "per_example", "step_loss", "x0"}  # supplied by the selection loop itself
    given = set(options) & internal
    if given:
        raise ValueError(f"method_options {sorted(given)[0]!r} is set by select_hyperparameters itself; leave it out")
    if method == "hoag":  # the schedule sets CG's tolerance, the loop its warm start
        accepted = {"schedule", "max_iter", "damping", "mode"}
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ValueError(
                f"method_options {unknown[0]!r} is not an option of method 'hoag' (its schedule sets CG's tolerance); "
                f"its options are {sorted(accepted)}"
            )
        return
    extra = ("batch_size", "seed") if method in UNROLLED else ()
    _check_options("method_options", options, METHODS[method], f"method {method!r}", skip=4, extra=extra)


def _check_checkpoint_path(path, resume, overwrite):
    if path is None:
        return
    if resume and not os.path.exists(path):
        raise FileNotFoundError(f"resume=True but there is no checkpoint at {path!r}")
    if not resume and os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"checkpoint {path!r} exists: pass resume=True to continue that run, or overwrite=True to start a new one "
            "in its place"
        )
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint {path!r}: the directory {directory!r} does not exist")


class _CheckpointLock:
    """An exclusive lock on ``<path>.lock`` (``flock``; released by the kernel if the process dies),
    so that two processes never write one checkpoint. The lock file is removed on release."""

    def __init__(self, path):
        self.path = f"{path}.lock"
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock on this platform: no lock
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RuntimeError(
                    f"checkpoint {self.path[:-5]!r} is in use: another process is writing it (it holds {self.path!r})"
                ) from None
            try:  # the file may have been removed and re-created by its last holder meanwhile
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return self
            os.close(fd)

    def __exit__(self, *exc):
        if self.fd is not None:
            os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


def _black_box(obj, problem, method, n_trials, bounds, grid, storage, study_name, seed, bar, start, objective, tol):
    """Optuna search; the result is a Selection like the gradient methods'. Ctrl-C returns the best
    completed trial so far (with a warning), as the gradient loops do."""
    if n_trials is not None:
        bar.total = n_trials

    def on_trial(h, value):
        bar.update(1)
        bar.set_postfix(Q=f"{value:.6g}")

    interrupted = False
    try:
        study = search(obj, method, n_trials=n_trials, bounds=bounds, grid=grid, storage=storage, study_name=study_name, seed=seed, on_trial=on_trial)
    except SearchInterrupted as e:
        study, interrupted = e.study, True
    finally:
        bar.close()
    trials = history_of(study, problem)
    if not trials:
        if interrupted:
            raise KeyboardInterrupt
        raise RuntimeError("the search completed no trial")
    if interrupted:
        warnings.warn(
            f"search interrupted; returning the best of the {len(trials)} completed trials", RuntimeWarning, stacklevel=3
        )
    history = [
        Step(value, {k: v.detach().clone() for k, v in problem.params(h).items()}, math.nan, seconds)
        for value, h, seconds, _ in trials
    ]
    value, h_best, _, _ = max(trials, key=lambda t: t[0])
    m = obj.solve(h_best)
    gmax = _stationarity(obj, m.theta, h_best)
    problem.write_params(h_best)
    return Selection(
        hyperparameters={k: v.detach() for k, v in problem.params(h_best).items()},
        objective=obj.validation(m.theta, h_best).detach(),
        history=history,
        converged=not interrupted and gmax <= tol,
        theta=m.theta,
        h=h_best,
        objective_name=objective,
        method=method,
        problem=problem,
        grad_norm=gmax,
    )


def _stationarity(obj, theta, h, max_iter=100, max_dim=2000):
    """``max |dQ/dh|`` at ``h`` by one ``ift-cg`` hypergradient (CG capped at ``max_iter``
    iterations); NaN where it cannot be computed, where CG does not reach its tolerance, and above
    ``max_dim`` inner parameters, where CG would rarely get there in its budget (measured on the
    MNIST MLP: 100 iterations cost as much as the whole search and ended short)."""
    if theta.numel() > max_dim:
        return math.nan
    tol = torch.finfo(theta.dtype).eps ** 0.5
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            hg = METHODS["ift-cg"](obj.inner_loss, obj.validation, theta, h, tol=tol, max_iter=min(max_iter, 10 * theta.numel() + 1))
    except (FloatingPointError, NotPositiveDefiniteError, RuntimeError):
        return math.nan
    if hg.info.get("residual", 0.0) > tol:
        return math.nan
    return float(hg.grad.abs().max())


def _outer_loop(optimizer, evaluate, h, lr, tol, max_steps, history, state, problem, checkpoint, every, resume, key):
    """Ascent on ``Q`` one outer iteration at a time (L-BFGS with a strong-Wolfe line search, or
    Adam), checkpointing every ``every`` iterations and resuming from a checkpoint."""
    if optimizer == "lbfgs":
        outer = torch.optim.LBFGS(
            [h], lr=1.0 if lr is None else lr, max_iter=1, max_eval=25, tolerance_grad=tol,
            tolerance_change=0.0, history_size=20, line_search_fn="strong_wolfe",
        )
    elif optimizer == "adam":
        outer = torch.optim.Adam([h], lr=0.05 if lr is None else lr)
    else:  # plain gradient ascent, h ← h + lr · dQ/dh
        outer = torch.optim.SGD([h], lr=0.05 if lr is None else lr)
    done = 0
    if resume:
        done = load_checkpoint(checkpoint, h, outer, history, state, problem, key)

    def closure():
        hg = evaluate(h.detach())
        h.grad = -hg.grad
        return -hg.value.detach()

    while len(history) < max_steps:
        if optimizer == "lbfgs":
            before = h.detach().clone()
            _lbfgs_step(outer, closure, h)
            stalled = torch.equal(before, h.detach())
        else:
            closure()
            stalled = False
        done += 1
        if checkpoint is not None and done % every == 0:
            save_checkpoint(checkpoint, h, outer, history, state, done, key)
        if state["cache"] is not None and float(state["cache"][1].grad.abs().max()) <= tol:
            evaluate(h.detach())  # the converged point itself, for the record
            break
        if stalled:
            break
        if optimizer != "lbfgs":
            outer.step()
    if checkpoint is not None and history:
        save_checkpoint(checkpoint, h, outer, history, state, done, key)


def _lbfgs_step(outer, closure, h, retries=4, shrink=0.1):
    """One L-BFGS iteration that backs off from trial points where the inner problem fails.

    The strong-Wolfe line search has no use for a point where ``Q`` cannot be evaluated (the
    inner Hessian is not positive definite there, say), so such a trial ends the step: the
    optimiser's state and ``h`` are restored and the iteration is repeated from a step ``shrink``
    times shorter, up to ``retries`` times, before the failure ends the selection.
    """
    saved = copy.deepcopy(outer.state_dict())
    start = h.detach().clone()
    lr = outer.param_groups[0]["lr"]
    try:
        for attempt in range(retries + 1):
            try:
                return outer.step(closure)
            except _NonFinite:
                if attempt == retries:
                    raise
                with torch.no_grad():
                    h.copy_(start)
                outer.load_state_dict(copy.deepcopy(saved))
                outer.param_groups[0]["lr"] = lr * shrink ** (attempt + 1)
    finally:
        outer.param_groups[0]["lr"] = lr


_FORMAT = "pyro-evidence/checkpoint/2"


def save_checkpoint(path, h, outer, history, state, done, key):
    """Writes the outer loop's state as tensors and plain values (loadable with
    ``weights_only=True``), to a temporary file first and then renamed over ``path``, so a kill
    never leaves half a file. ``key`` is the run's fingerprint (:func:`~pyro_evidence.util.fingerprint`)."""
    value, h_best, theta_best, _, gmax = state["best"]
    payload = {
        "format": _FORMAT,
        "fingerprint": json.dumps(key, sort_keys=True),
        "done": done,
        "h": h.detach().clone(),
        "theta": state["theta"].detach().clone(),
        "best": {"value": value, "h": h_best.detach().clone(), "theta": theta_best.detach().clone(), "grad_norm": gmax},
        "optimizer": outer.state_dict(),
        "objective": torch.tensor([s.objective for s in history], dtype=torch.float64),
        "grad_norm": torch.tensor([s.grad_norm for s in history], dtype=torch.float64),
        "seconds": torch.tensor([s.seconds for s in history], dtype=torch.float64),
        "hyperparameters": {
            name: torch.stack([s.hyperparameters[name] for s in history]) for name in (history[0].hyperparameters if history else {})
        },
    }
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, h, outer, history, state, problem, key):
    """Restores a checkpoint written by :func:`save_checkpoint` for the same run (``key``): ``h``,
    the outer optimiser, the history, the warm-start ``θ`` and the best ``h`` with its own ``θ``,
    in the problem's dtype and on its device. Returns the number of outer iterations done."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume=True but there is no checkpoint at {path!r}")
    try:
        payload = torch.load(path, weights_only=True, map_location=problem.device)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # a class or function to import and call: code, not data
            raise ValueError(f"refusing checkpoint {path!r}: it holds more than tensors and plain values ({e})") from None
        raise ValueError(
            f"checkpoint {path!r} is corrupted or truncated (it does not unpickle as data); delete it, or run again "
            "with resume=False and overwrite=True to start afresh"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"checkpoint {path!r} is corrupted or truncated ({e}); delete it, or run again with resume=False and "
            "overwrite=True to start afresh"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise ValueError(f"{path!r} is not a pyro-evidence checkpoint of format {_FORMAT!r} (found {found!r})")
    missing = [k for k in ("fingerprint", "done", "h", "theta", "best", "optimizer", "objective", "grad_norm", "seconds",
                           "hyperparameters") if k not in payload]
    if missing:
        raise ValueError(f"checkpoint {path!r} is incomplete: it has no {missing[0]!r}")
    reason = mismatch(json.loads(payload["fingerprint"]), key)
    if reason is not None:
        raise ValueError(f"checkpoint {path!r} belongs to another run: {reason}; resume it with the same problem, or "
                         "pass overwrite=True without resume=True to start a new run there")
    kw = {"dtype": problem.dtype, "device": problem.device}
    with torch.no_grad():
        h.copy_(payload["h"].to(**kw))
    outer.load_state_dict(payload["optimizer"])
    state["theta"] = payload["theta"].to(**kw)
    names = list(payload["hyperparameters"])
    for i in range(payload["objective"].numel()):
        history.append(
            Step(
                float(payload["objective"][i]),
                {n: payload["hyperparameters"][n][i].to(**kw) for n in names},
                float(payload["grad_norm"][i]),
                float(payload["seconds"][i]),
            )
        )
    best = payload["best"]
    value = float(best["value"])
    state["best"] = (value, best["h"].to(**kw), best["theta"].to(**kw), torch.tensor(value, **kw), float(best["grad_norm"]))
    return int(payload["done"])


class _NonFinite(Exception):
    def __init__(self, step, reason):
        super().__init__(step, reason)
        self.step, self.reason = step, reason


_SCHEDULES = {
    "exponential": lambda k: 0.1 * 0.9**k,
    "quadratic": lambda k: 0.1 / (k + 1) ** 2,
    "cubic": lambda k: 0.1 / (k + 1) ** 3,
}


def _hoag(evaluate, h, state, max_steps, tol, schedule, lr):
    """
    HOAG (Pedregosa 2016, Algorithm 1), written for ascent on ``Q``: at outer step ``k`` the
    linear system ``H v = ∂Q/∂θ`` is solved by CG to the tolerance ``ε_k`` of the schedule,
    warm-started from the previous ``v``; the step ``h ← h + p_k / L`` is accepted when ``Q`` does
    not fall by more than ``ε_k·(1 + ‖p_k‖)`` — then ``L ← 0.9 L`` — and rejected otherwise —
    then ``L ← 2 L`` and ``h`` stays.
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"unknown HOAG schedule {schedule!r}; use one of {sorted(_SCHEDULES)}")
    eps = _SCHEDULES[schedule]
    lipschitz = 1.0 / (0.05 if lr is None else lr)
    hg = evaluate(h, tol=eps(0))
    v = hg.info.get("v")
    for k in range(1, max_steps):
        if float(hg.grad.abs().max()) <= tol:
            return
        candidate = h + hg.grad / lipschitz
        try:
            new = evaluate(candidate, tol=eps(k), x0=v)
        except _NonFinite:  # the inner problem fails there: a rejected step, like one that lowers Q
            new = None
        if new is not None and float(new.value) >= float(hg.value) - eps(k) * (1 + float(hg.grad.norm())):
            h, hg, v = candidate, new, new.info.get("v")
            lipschitz *= 0.9
        else:
            lipschitz *= 2.0
