"""
Hyperparameter selection: ``h* = argmax_h Q(θ*(h), h)`` with ``θ*(h) = argmin_θ L(θ, h)``.

Each outer evaluation warm-starts the inner solve from the previous ``θ*``, then asks a
hypergradient method for ``dQ/dh`` (what the method needs besides — a dense Hessian, per-example
losses — is read from its registry entry, :class:`~pyro_evidence.hypergrad.api.Method`); the outer
loops (:mod:`pyro_evidence.ascent`) work in unconstrained ``h``, so positive hyperparameters move on
a log scale, and checkpoint through :mod:`pyro_evidence.checkpoint`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .ascent import OUTER_LOOPS, NonFinite, ascend, at_bounds, probe_points
from .checkpoint import Best, Checkpoint, CheckpointLock, Progress, Saver, Step, check_path
from .hypergrad import METHODS
from .hypergrad.implicit import check_validation, partial_hypergradient
from .hypergrad.unrolled import UNROLLED
from .linalg import NotPositiveDefiniteError
from .objectives.curvature import refuse_symmetric
from .objectives import ObjectiveSpec, as_objective
from .placement import place
from .problem import Problem
from .search import SEARCH_METHODS, SearchInterrupted, SearchOptions, history_of, search
from .util import check_options, check_positive_int, fingerprint

__all__ = ["Selection", "select_hyperparameters"]


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
        whether the coordinate ascent reached its fixed point) and, for a coordinate that ran to a bound of its
        support, no probe along it from inside rose above the selection; False after an interruption.
    :ivar theta: the inner solution ``θ*(h)`` at the selection (flat, unconstrained).
    :ivar h: the selection in flat unconstrained coordinates.
    :ivar grad_norm: ``max |dQ/dh|`` at the selection (NaN where it could not be computed).
    :ivar cold_objective: ``Q`` at the selected ``h`` with ``θ`` solved from the model's own start instead of the
        path's warm start (gradient selections that refit ``θ``); where it differs from ``objective`` beyond
        round-off the inner problem has several modes and the selection warned so. None where not measured.
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
    cold_objective: float | None = None

    @property
    def value(self) -> torch.Tensor:
        """The result's main value, ``objective`` (every result calls its main value ``value``)."""
        return self.objective


def _check_choice(kind, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; available: {sorted(choices)}")


def select_hyperparameters(
    model, *args, objective: str | ObjectiveSpec = "laplace", method: str = "ift-exact", hyperparameters=None,
    model_kwargs: dict | None = None, init_loc_fn=None, optimizer: str | None = None, lr: float | None = None,
    max_steps: int = 100, tol: float | None = None, progress: bool | None = None, objective_options: dict | None = None,
    method_options: dict | None = None, search: SearchOptions | dict | None = None,
    checkpoint: Checkpoint | str | None = None, device: str | torch.device | None = None, **deprecated,
) -> Selection:
    """
    Selects the ``pyro.param`` hyperparameters of a Pyro model by maximising an objective.

    :param model: a Pyro model whose prior takes its hyperparameters from ``pyro.param``.
    :param args: the data: tensors sharing their first dimension, on the device and in the dtype to use.
    :param objective: an objective with its options, :class:`~pyro_evidence.objectives.spec.Laplace` (the
        Laplace log evidence, e.g. ``Laplace(hessian="kron")``), :class:`~pyro_evidence.objectives.spec.Elbo`
        (a diagonal Gaussian posterior's ELBO), :class:`~pyro_evidence.objectives.spec.CV` (k-fold
        cross-validation) or :class:`~pyro_evidence.objectives.spec.Holdout`; or its name (``"laplace"``,
        ``"elbo"``, ``"cv"``, ``"holdout"``) with ``objective_options``.
    :param str method: a hypergradient method of :data:`~pyro_evidence.hypergrad.METHODS` (``"ift-exact"``,
        ``"ift-cg"``, …, ``"drmad"``), an outer loop (``"hoag"``; ``"graves"``, ELBO only) or a black-box
        search (``"grid"``, ``"random"``, ``"gp"``). docs/hypergradients.md says what each drops.
    :param hyperparameters: names of the param sites to select (default: all of the model's).
    :param dict model_kwargs: keyword arguments for the model.
    :param callable init_loc_fn: Pyro's init strategy for the first inner solve's start (a network needs a
        random one, e.g. ``functools.partial(init_to_uniform, radius=0.05)``).
    :param str optimizer: the outer loop: ``"lbfgs"`` (default for ``ift-exact`` and ``ift-cg``), ``"adam"``
        (default for the approximate methods, whose gradients a line search cannot trust) or ``"sgd"``.
    :param float lr: the outer step (Adam/SGD 0.05; L-BFGS 1, its line search's first trial; HOAG ``1/L₀``).
    :param int max_steps: outer evaluations at most.
    :param float tol: stop at ``max |dQ/dh| ≤ tol`` (unconstrained ``h``); default 1e-6 in float64.
    :param progress: show a tqdm bar; default: only in a terminal.
    :param dict objective_options: with an objective's name, its options: ``{"hessian": "kron", "logdet": "slq",
        "jitter": …}`` for the Laplace evidence, ``{"num_particles": 128}`` for the ELBO, ``{"k": 10, "stratify":
        labels}`` for CV; ``"max_iter"`` (500) bounds each inner solve's L-BFGS iterations.
    :param dict method_options: the method's, e.g. ``{"tol": 1e-8}`` for CG, ``{"terms": 100}`` for Neumann,
        ``{"schedule": "cubic"}`` for HOAG.
    :param search: :class:`~pyro_evidence.search.SearchOptions` (or a dict of them) of a black-box search:
        trials, box, grid, storage shared between processes, study name, seed.
    :param checkpoint: :class:`~pyro_evidence.checkpoint.Checkpoint` (or its path) of a gradient-based
        selection: written as it goes, resumed with ``resume=True``, locked against a second writer.
    :param device: where to run: None (default) where the data are, ``"auto"`` the faster of the CPU and the
        GPU for this problem (:func:`~pyro_evidence.placement.choose_device`), or a torch device.
    :rtype: Selection
    """
    search, checkpoint, spec = _regroup(deprecated, objective, search, checkpoint, objective_options)
    method_options = dict(method_options or {})
    if method in METHODS:
        method_options = METHODS[method].upgrade(method_options)
    optimizer = _check_arguments(spec.name, method, optimizer, lr, max_steps, search, checkpoint, method_options)
    args = place(device, model, args, model_kwargs, hyperparameters)
    problem = Problem(model, *args, model_kwargs=model_kwargs, hyperparameters=hyperparameters,
                      require_hyperparameters=True, init_loc_fn=init_loc_fn)
    obj = spec.bind(problem)
    tol = max(1e-6, 10 * torch.finfo(problem.dtype).eps ** 0.5) if tol is None else tol
    bar = tqdm(total=max_steps, desc=f"select ({spec.name}, {method})", disable=None if progress is None else not progress)
    if method in SEARCH_METHODS:
        return _black_box(obj, problem, method, search, max_steps, bar, spec.name, tol)
    return _gradient(obj, spec, method, optimizer, lr, tol, max_steps, method_options, checkpoint, bar)


def _gradient(obj, spec, method, optimizer, lr, tol, max_steps, method_options, checkpoint, bar):
    """A gradient-based selection: one evaluator handed to the method's outer loop."""
    problem = obj.problem
    loop = OUTER_LOOPS.get(method)
    own = {k: method_options.pop(k) for k in (loop.own if loop else ()) if k in method_options}
    evaluate = _Evaluator(obj, loop.hypergradient if loop else method, method_options, bar)
    keyed = {k: v for k, v in spec.options.items() if k not in _SOLVER_OPTIONS}
    key = fingerprint(problem, objective=spec.name, method=method, optimizer=optimizer, objective_options=keyed,
                      **getattr(obj, "key", {}))
    saver = Saver(None) if checkpoint is None else Saver(checkpoint.path, checkpoint.every, checkpoint.resume, key, problem)
    progress, h, budget, restarts = evaluate.progress, obj.h_init, max_steps, 0
    # the warm-start check re-solves θ from the start: for methods whose θ is the inner solve's
    name = loop.hypergradient if loop else method
    solved = METHODS.get(name) is not None and not METHODS[name].needs & {"trajectory", "hypernet"}
    cold = obj if solved else None
    try:
        while True:
            stopped = _run(loop, own, evaluate, obj, optimizer, lr, tol, budget, saver, h)
            if stopped is not None or not _stationary(progress, tol):
                if stopped is None:
                    _warn_unconverged(progress, problem.dtype, tol)
                return _selection(progress, problem, spec.name, method, tol, stopped, verified=False, obj=cold)
            try:
                h, verified = _rise_from_bounds(obj, progress.best, max_steps)
            except KeyboardInterrupt:
                warnings.warn("selection interrupted while probing its bounds; returning the best hyperparameters "
                              "evaluated so far (converged=False)", RuntimeWarning, stacklevel=3)
                return _selection(progress, problem, spec.name, method, tol, "interrupted", verified=False)
            if h is None or restarts == MAX_RESTARTS:
                if h is not None or not verified:
                    warnings.warn("hyperparameters at a bound of their support could not be verified as a maximum within "
                                  f"{max_steps} probes and {MAX_RESTARTS} restarts: converged=False", RuntimeWarning,
                                  stacklevel=3)
                return _selection(progress, problem, spec.name, method, tol, None, verified=verified and h is None,
                                  obj=cold)
            restarts, budget = restarts + 1, len(progress.history) + max_steps
            saver = dataclasses.replace(saver, resume=False)
            bar.total += max_steps
    finally:
        bar.close()


MAX_RESTARTS = 10  # ascents restarted from a probe that rose above a maximum with coordinates at a bound


def _rise_from_bounds(obj, best, max_probes):
    """``(h, verified)``: a point above ``best`` found along a coordinate that ran to a bound of its support, or
    None where no such coordinate, or none of at most ``max_probes`` probes, rises above it (``verified`` is False
    where the probes ran out first).

    Such a coordinate is flat in ``h`` whether or not its bound is a maximum (:func:`~pyro_evidence.ascent.at_bounds`),
    so each is probed alone, the others kept: ``Q(θ*(h), h)`` at points from its start towards its bound
    (:func:`~pyro_evidence.ascent.probe_points`), each by a fresh inner solve warm-started from ``best``'s ``θ``.
    """
    problem = obj.problem
    at = at_bounds(problem, best.h).nonzero().flatten().tolist()
    if not at:
        return None, True

    def value(h):
        m = obj.solve(h, best.theta)
        return float(obj.validation(m.theta, h))

    reference, probes = value(best.h), 0
    margin = _negligible(reference, problem.dtype)
    for j in at:
        for u in probe_points(problem, best.h, j):
            if probes == max_probes:
                return None, False
            probes += 1
            h = best.h.detach().clone()
            h[j] = u
            try:
                if value(h) > reference + margin:
                    return h, True
            except (FloatingPointError, NotPositiveDefiniteError):
                continue
    return None, True


def _stationary(progress, tol):
    return progress.fixed_point if progress.fixed_point is not None else progress.best.grad_norm <= tol


def _negligible(value, dtype):
    """A rise of ``Q`` that round-off can explain."""
    return torch.finfo(dtype).eps ** 0.5 * max(1.0, abs(value))


def _warn_unconverged(progress, dtype, tol):
    """An unconverged selection says so (max_steps spent, or a line search that found no rise of ``Q``)."""
    best, n = progress.best, len(progress.history)
    if progress.fixed_point is not None:
        message = f"the selection ended after {n} evaluations before its fixed point"
    else:
        message = f"the selection ended after {n} evaluations with max |dQ/dh| = {best.grad_norm:.3g} > tol = {tol:.3g}"
    hint = " (in float32, round-off in Q can hide its rise: pass float64 data)" if dtype == torch.float32 else ""
    warnings.warn(f"{message}: converged=False; returning the best point evaluated (Q = {best.value:.6g}){hint}",
                  RuntimeWarning, stacklevel=4)


# objective options that were keywords of select_hyperparameters, kept out of the run's fingerprint as they were
_SOLVER_OPTIONS = ("max_iter", "jitter", "hessian")
_DEPRECATED = {
    **{name: "search" for name in ("n_trials", "bounds", "grid", "storage", "study_name", "seed")},
    **{name: "checkpoint" for name in ("checkpoint_every", "resume", "overwrite")},
    "jitter": "objective_options", "hessian": "objective_options", "inner_max_iter": "objective_options",
}


def _regroup(deprecated, objective, search, checkpoint, objective_options):
    """The options in their groups: ``search`` and ``checkpoint`` as their classes, the objective as an
    :class:`~pyro_evidence.objectives.spec.ObjectiveSpec`; the flat keywords of earlier versions moved into
    them with a ``FutureWarning``."""
    unknown = sorted(set(deprecated) - set(_DEPRECATED))
    if unknown:
        raise TypeError(f"select_hyperparameters() got an unexpected keyword argument {unknown[0]!r}")
    if deprecated:
        moves = "; ".join(f"{name}= in {_DEPRECATED[name]}=" for name in deprecated)
        warnings.warn(f"select_hyperparameters({', '.join(f'{n}=…' for n in deprecated)}) is deprecated: pass {moves} "
                      "instead (see docs/search.md)", FutureWarning, stacklevel=3)
    spec = as_objective(objective, objective_options)
    moved = {name: deprecated[name] for name in ("jitter", "hessian") if name in deprecated}
    if moved and spec.name != "laplace":
        raise ValueError(f"{next(iter(moved))}= is an option of objective='laplace'; objective={spec.name!r} would ignore it")
    if "inner_max_iter" in deprecated:
        check_positive_int("inner_max_iter", deprecated["inner_max_iter"])
        moved["max_iter"] = deprecated["inner_max_iter"]
    spec = spec.with_defaults(**moved) if moved else spec
    fields = {n: deprecated[n] for n in _DEPRECATED if _DEPRECATED[n] == "search" and n in deprecated}
    if fields or isinstance(search, dict):
        given = search if isinstance(search, dict) else (dataclasses.asdict(search) if search is not None else {})
        search = SearchOptions(**{**given, **fields})
    persist = {n.replace("checkpoint_", ""): deprecated[n] for n in ("checkpoint_every", "resume", "overwrite") if n in deprecated}
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = Checkpoint(os.fspath(checkpoint), **persist)
    elif isinstance(checkpoint, Checkpoint) and persist:
        checkpoint = dataclasses.replace(checkpoint, **persist)
    elif checkpoint is None and persist.get("resume"):
        raise ValueError("resume=True needs checkpoint= (the file to resume from)")
    return search, checkpoint, spec


def _check_arguments(objective, method, optimizer, lr, max_steps, search, checkpoint, method_options):
    """Refuses a bad or ignored argument with a message that names it; returns the outer optimiser's name."""
    _check_choice("method", method, {**METHODS, **OUTER_LOOPS, **dict.fromkeys(SEARCH_METHODS)})
    loop = OUTER_LOOPS.get(method)
    if loop is not None and loop.objective not in (None, objective):
        raise ValueError(f"method={method!r} ({loop.description}) needs objective={loop.objective!r}, not {objective!r}")
    _check_ignored(method, objective, optimizer, lr, search, checkpoint)
    optimizer = optimizer or ("lbfgs" if method in ("ift-exact", "ift-cg") else "adam")
    _check_choice("optimizer", optimizer, ("lbfgs", "adam", "sgd"))
    check_positive_int("max_steps", max_steps)
    _check_method_options(method, method_options)
    if checkpoint is not None:
        check_path(checkpoint.path, checkpoint.resume, checkpoint.overwrite)
    return optimizer


def _run(loop, own, evaluate, obj, optimizer, lr, tol, max_steps, saver, h):
    """Runs the outer loop (``loop``, with its ``own`` options, or the L-BFGS/Adam/SGD ascent) from ``h`` until
    ``max_steps`` evaluations are recorded in all; returns why it stopped early (``"interrupted"``,
    ``"non-finite"``) or None."""
    progress, h = evaluate.progress, h.detach().clone()
    lock = CheckpointLock(saver.path) if saver.path is not None else contextlib.nullcontext()
    try:
        with lock:
            if loop is not None:
                loop.run(evaluate, obj, h, progress, max_steps - len(progress.history), tol, lr, **own)
            else:
                ascend(optimizer, evaluate, h.requires_grad_(True), lr, tol, max_steps, progress, saver)
    except KeyboardInterrupt:
        if progress.best is None:
            raise KeyboardInterrupt("interrupted during the first evaluation: no hyperparameters evaluated yet to "
                                    "return") from None
        warnings.warn("selection interrupted; returning the best hyperparameters evaluated so far", RuntimeWarning,
                      stacklevel=3)
        return "interrupted"
    except NonFinite as e:
        if progress.best is None:
            raise FloatingPointError("the objective or its hypergradient is not finite at the initial hyperparameters") from None
        warnings.warn(
            f"the objective or its hypergradient is not finite at outer step {e.step} ({e.reason}); "
            "stopping with the last good hyperparameters",
            RuntimeWarning,
            stacklevel=3,
        )
        return "non-finite"
    return None


def _selection(progress, problem, objective, method, tol, stopped, verified, obj=None):
    best = progress.best
    problem.write_params(best.h)
    cold = None if obj is None or stopped == "interrupted" else _cold_objective(obj, best)
    return Selection(
        hyperparameters={k: v.detach() for k, v in problem.params(best.h).items()},
        objective=best.objective,
        history=progress.history,
        converged=stopped is None and verified,
        theta=best.theta,
        h=best.h,
        objective_name=objective,
        method=method,
        problem=problem,
        grad_norm=best.grad_norm,
        cold_objective=cold,
    )


def _cold_objective(obj, best):
    """``Q`` at the selection with ``θ`` solved from the model's start; a warning where the warm start mattered."""
    if obj.holds_theta:
        return None
    try:
        value = float(obj.validation(obj.solve(best.h).theta, best.h))
    except (FloatingPointError, NotPositiveDefiniteError):
        return None
    except KeyboardInterrupt:
        warnings.warn("interrupted while solving θ from the model's start at the selection: the selection stands, "
                      "cold_objective=None", RuntimeWarning, stacklevel=4)
        return None
    if abs(value - best.value) > _negligible(best.value, obj.problem.dtype):
        warnings.warn(f"Q at the selected hyperparameters depends on the inner solve's start: {best.value:.6g} from the "
                      f"path's warm start, {value:.6g} from the model's start (another mode of θ; "
                      "Selection.cold_objective). The selection keeps the path's", RuntimeWarning, stacklevel=5)
    return value


class _Evaluator:
    """``Q`` and ``dQ/dh`` at ``h``: the inner solve warm-started from the last ``θ*`` (or, for a method that
    runs the inner optimisation itself, that method from there), then the hypergradient; each evaluation
    recorded in ``progress``. What a method needs besides is read from its registry entry."""

    def __init__(self, obj, method, options, bar):
        self.obj, self.method, self.bar = obj, METHODS.get(method), bar
        # the dense Hessian handed to the method is the one the objective's evidence uses
        self.options, self.jitter = dict(options), getattr(obj, "jitter", 0.0)
        needs = self.method.needs if self.method is not None else ()
        if "per_example" in needs:
            self.options["per_example"] = obj.per_example_loss
        if "trajectory" in needs and "batch_size" in self.options:
            self.options["step_loss"] = obj.step_loss(self.options.pop("batch_size"), self.options.pop("seed", 0))
        refuse_symmetric(obj.problem, obj.theta_init, obj.h_init)
        self.progress = Progress(obj.theta_init)
        self.start, self.hypernet = time.perf_counter(), None

    def __call__(self, h, **extra):
        cache = self.progress.cache
        if cache is not None and not extra and torch.equal(cache[0], h):
            return cache[1]  # L-BFGS re-evaluates the point its last line search ended on
        try:
            hg, theta = self._hypergradient(h.detach(), {**self.options, **extra})
        except (FloatingPointError, NotPositiveDefiniteError) as e:
            if self.progress.best is None:  # nothing good to fall back on
                raise type(e)(f"at the initial hyperparameters, before any point to fall back on: {e}") from e
            raise NonFinite(len(self.progress.history) + 1, str(e)) from e
        value, gmax = float(hg.value), float(hg.grad.abs().max()) if hg.grad.numel() else 0.0
        if not (math.isfinite(value) and math.isfinite(gmax)):
            raise NonFinite(len(self.progress.history) + 1, f"Q = {value}, max |dQ/dh| = {gmax}")
        self.progress.theta = theta
        hp = {k: v.detach().clone() for k, v in self.obj.problem.params(h).items()}
        self.progress.record(Step(value, hp, gmax, time.perf_counter() - self.start),
                             Best(value, h.detach().clone(), theta, hg.value.detach(), gmax))
        self.progress.cache = (h.detach().clone(), hg)
        self.show(value, grad=gmax)
        return hg

    def _hypergradient(self, h, opts):
        obj, method = self.obj, self.method
        if "hypernet" in method.needs:  # the network is the inner solve: trained around h from the last one
            hg = method(obj.inner_loss, obj.validation, self.progress.theta, h, hypernet=self.hypernet, **opts)
            self.hypernet = hg.info["hypernet"]
            return hg, hg.info["theta"]
        if "trajectory" in method.needs:  # the trajectory is the inner solve, warm-started from the last θ_η
            hg = method(obj.inner_loss, obj.validation, self.progress.theta, h, **opts)
            return hg, hg.info["theta"]
        m = obj.solve(h, self.progress.theta)
        if not self.progress.history:  # at the first inner optimum, not at the unfitted start
            check_validation(obj.validation, m.theta, h)
        if obj.holds_theta:  # θ fixed: the partial derivative is the whole of dQ/dh
            return partial_hypergradient(obj.validation, m.theta, h), m.theta
        curvature = obj.implicit_curvature(m, h)
        if curvature is not None:  # a structured Laplace curvature stands in for the Hessian
            takes = inspect.signature(method.fn).parameters
            opts.update({"solve": curvature.solve} if "solve" in takes else
                        {"operator": curvature.matvec} if "operator" in takes else {})
        elif "hessian" in method.needs:
            opts.update(jitter=self.jitter, hessian=m.hessian)
        return method(obj.inner_loss, obj.validation, m.theta, h, **opts), m.theta

    def show(self, value, **postfix):
        self.bar.update(1)
        self.bar.set_postfix(Q=f"{value:.6g}", **{k: f"{v:.2g}" for k, v in postfix.items()})


def _check_ignored(method, objective, optimizer, lr, search, checkpoint):
    """Refuses an option that the chosen method would silently ignore."""
    ignored = []
    if method not in SEARCH_METHODS:
        given = search.given() if search is not None else []
        ignored += [(n, "the black-box search (method='grid' | 'random' | 'gp')") for n in given]
    else:
        ignored += [(n, "the gradient methods") for n, v in (("optimizer", optimizer), ("lr", lr), ("checkpoint", checkpoint))
                    if v is not None]
    loop = OUTER_LOOPS.get(method)
    if loop is not None:
        ignored += [(n, f"the L-BFGS/Adam/SGD outer loop; {loop.description} has its own loop")
                    for n, v in (("optimizer", optimizer), ("checkpoint", checkpoint)) if v is not None]
        if not loop.takes_lr and lr is not None:
            ignored.append(("lr", f"the gradient steps ({loop.description} takes no step size)"))
    if ignored:
        name, owner = ignored[0]
        raise ValueError(f"{name}= is an option of {owner}; method={method!r} with objective={objective!r} would ignore it")


def _check_method_options(method, options):
    loop = OUTER_LOOPS.get(method)
    if method in SEARCH_METHODS or (loop is not None and not loop.own | loop.passed):
        if options:
            raise ValueError(f"method_options {sorted(options)[0]!r}: method {method!r} takes no method_options")
        return
    internal = {"hessian", "per_example", "step_loss", "x0", "hypernet"}  # supplied by the selection loop itself
    given = set(options) & internal
    if given:
        raise ValueError(f"method_options {sorted(given)[0]!r} is set by select_hyperparameters itself; leave it out")
    if loop is not None:
        check_options("method_options", options, loop.own | loop.passed, f"method {method!r} ({loop.description})")
        return
    # past the four positional arguments every method takes: inner_loss, validation, theta, h
    params = list(inspect.signature(METHODS[method].fn).parameters.values())[4:]
    accepted = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    accepted |= {"batch_size", "seed"} if method in UNROLLED else set()
    check_options("method_options", options, accepted, f"method {method!r}")


def _black_box(obj, problem, method, options, max_steps, bar, objective, tol):
    """Optuna search; the result is a Selection like the gradient methods'. Ctrl-C returns the best
    completed trial so far (with a warning), as the gradient loops do."""
    options = options or SearchOptions()
    n_trials = options.n_trials if options.n_trials is not None else (None if method == "grid" else max_steps)
    if n_trials is not None:
        bar.total = n_trials

    def on_trial(h, value):
        bar.update(1)
        bar.set_postfix(Q=f"{value:.6g}")

    interrupted = False
    try:
        study = search(obj, method, n_trials=n_trials, bounds=options.bounds, grid=options.grid, storage=options.storage,
                       study_name=options.study_name, seed=options.seed, heartbeat_interval=options.heartbeat_interval,
                       grace_period=options.grace_period, on_trial=on_trial)
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
    if obj.holds_theta:  # θ held: dQ/dh is the partial derivative, no solve
        return float(partial_hypergradient(obj.validation, theta, h).grad.abs().max())
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
