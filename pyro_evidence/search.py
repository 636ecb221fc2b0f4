"""
Black-box search over hyperparameters on Optuna (seed, "Basic methods"; "Gaussian process").

``grid`` (``GridSampler``), ``random`` (``RandomSampler``, Bergstra & Bengio 2012) and ``gp``
(``GPSampler``, Gaussian-process Bayesian optimisation, Shahriari et al. 2016) search a box in
unconstrained hyperparameter space, one Optuna parameter per element; every trial fits the
inner problem and evaluates the objective ``Q(θ*(h), h)``.

A study lives in an Optuna storage — an RDB URL (``sqlite:///study.db``) or a journal file
(``JournalStorage(JournalFileBackend(path))``) — so a killed run resumes with every finished
trial kept, and several processes, on one machine or many, share one study. ``n_trials`` counts
the study's completed trials, however many processes contribute. A journal has no heartbeat:
trials that a dead process on this host left RUNNING are marked failed and their parameters
queued again.
"""

from __future__ import annotations

import math
import os
import socket
import warnings

import torch

__all__ = ["search", "default_bounds", "GRID_MAX_ELEMENTS", "open_storage", "history_of", "SEARCH_METHODS"]

SEARCH_METHODS = ("grid", "random", "gp")

GRID_MAX_ELEMENTS = 3  # beyond this many elements a default grid is refused (10^k points)
_DEFAULT_HALF_WIDTH = math.log(1e4)  # four decades either side of the initial value


def _optuna():
    try:
        import optuna
    except ImportError as e:  # pragma: no cover - optuna is a declared dependency
        raise ImportError("black-box search needs optuna: pip install optuna") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_storage(storage):
    """An Optuna storage from a URL (``sqlite:///…``, ``postgresql://…``, ``mysql://…``) or a
    journal file path (``*.log``/``*.journal``/any other path); None for in-memory."""
    optuna = _optuna()
    if storage is None or not isinstance(storage, str):
        return storage
    if "://" in storage:
        scheme = storage.split("://", 1)[0].split("+", 1)[0]
        if scheme not in ("sqlite", "postgresql", "mysql", "oracle", "mssql"):
            raise ValueError(
                f"unknown storage scheme {scheme!r} in {storage!r}: use an RDB URL "
                "(sqlite:///file.db, postgresql://…, mysql://…) or a journal file path"
            )
        return optuna.storages.RDBStorage(storage)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(storage))


def _element_names(problem):
    names = []
    for site in problem.hypers:
        if site.numel == 1 and site.shape == torch.Size([]):
            names.append(site.name)
        else:
            names += [f"{site.name}[{i}]" for i in range(site.numel)]
    return names


def default_bounds(problem, bounds=None):
    """``(low, high)`` per element in unconstrained space: from ``bounds={name: (low, high)}`` in
    constrained values (a positive parameter's box is on a log scale), else four decades either
    side of the initial value (``h₀ ± ln 10⁴``)."""
    bounds = dict(bounds or {})
    unknown = [n for n in bounds if n not in {s.name for s in problem.hypers}]
    if unknown:
        raise ValueError(f"bounds for unknown hyperparameter {unknown[0]!r}; the model's are {[s.name for s in problem.hypers]}")
    low = problem.h_init - _DEFAULT_HALF_WIDTH
    high = problem.h_init + _DEFAULT_HALF_WIDTH
    for site in problem.hypers:
        if site.name not in bounds:
            continue
        lo, hi = bounds[site.name]
        lo_t = torch.as_tensor(lo, dtype=problem.dtype, device=problem.device).expand(site.shape)
        hi_t = torch.as_tensor(hi, dtype=problem.dtype, device=problem.device).expand(site.shape)
        if bool((lo_t >= hi_t).any()):
            raise ValueError(f"bounds for {site.name!r}: low must be < high, got ({lo}, {hi})")
        low[site.slice] = site.transform.inv(lo_t).reshape(-1)
        high[site.slice] = site.transform.inv(hi_t).reshape(-1)
        if not bool(torch.isfinite(low[site.slice]).all() and torch.isfinite(high[site.slice]).all()):
            raise ValueError(f"bounds for {site.name!r} must lie strictly inside its constraint, got ({lo}, {hi})")
    return low, high


def _NumberedRandomSampler(optuna, seed):
    """Optuna's random sampler, drawing trial ``n``'s value of a parameter from a generator seeded
    by ``(seed, n, parameter)``, so processes sharing a study never draw the same points."""
    import zlib

    import numpy as np

    class NumberedRandomSampler(optuna.samplers.RandomSampler):
        def sample_independent(self, study, trial, param_name, param_distribution):
            rng = np.random.default_rng([seed, trial.number, zlib.crc32(param_name.encode())])
            if isinstance(param_distribution, optuna.distributions.FloatDistribution) and not param_distribution.log:
                return float(rng.uniform(param_distribution.low, param_distribution.high))
            return super().sample_independent(study, trial, param_name, param_distribution)

    return NumberedRandomSampler(seed=seed)


def _fail_orphans(study, optuna):
    """Trials left RUNNING by a process of this host that no longer exists: fail them and queue
    their parameters again."""
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") != host or _alive(attrs.get("pid")):
            continue
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)


def _alive(pid) -> bool:
    if pid is None:
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def search(obj, method, *, n_trials, bounds=None, grid=None, grid_points=10, storage=None, study_name=None, seed=0, on_trial=None):
    """
    Runs (or joins) an Optuna study over the objective ``obj``.

    :param str method: ``"grid"``, ``"random"`` or ``"gp"``.
    :param int n_trials: completed trials of the study in all (``None`` with ``grid``: the grid).
    :param dict grid: explicit grid points ``{name: [constrained values]}`` per hyperparameter
        (a vector-valued one gets the same points for each element).
    :param int grid_points: points per element of the default grid, evenly spaced in the box.
    :param on_trial: ``(h, value) → None``, called after every trial this process runs.
    :returns: the study.
    """
    optuna = _optuna()
    problem = obj.problem
    names = _element_names(problem)
    low, high = default_bounds(problem, bounds)
    if method == "grid":
        space = _grid_space(problem, names, low, high, grid, grid_points)
        size = math.prod(len(v) for v in space.values())
        n_trials = size if n_trials is None else min(n_trials, size)
        sampler = optuna.samplers.GridSampler(space, seed=seed)
    elif n_trials is None or n_trials < 1:
        raise ValueError(f"n_trials must be a positive int for method={method!r}, got {n_trials!r}")
    storage = open_storage(storage)
    study = optuna.create_study(
        study_name=study_name or "pyro-evidence", storage=storage, direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.RandomSampler(seed=seed),
    )
    _fail_orphans(study, optuna)
    # random draws depend on (seed, trial number) only: reproducible by seed, and a resumed or
    # joining process never replays the draws already in the study
    if method == "random":
        study.sampler = _NumberedRandomSampler(optuna, seed)
    elif method == "gp":
        study.sampler = optuna.samplers.GPSampler(
            seed=seed + len(study.trials),
            n_startup_trials=min(10, n_trials),
            independent_sampler=_NumberedRandomSampler(optuna, seed),
        )
    else:
        study.sampler = sampler

    complete = optuna.trial.TrialState.COMPLETE
    running = optuna.trial.TrialState.RUNNING
    state = {"theta": None}

    def objective(trial):
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        # this trial runs only while completed trials and earlier running ones leave room
        others = study.get_trials(deepcopy=False, states=(complete, running))
        ahead = sum(1 for t in others if t.state == complete or t.number < trial.number)
        if ahead >= n_trials:
            study.stop()
            raise optuna.TrialPruned("the study has its trials")
        values = []
        for i, name in enumerate(names):
            if method == "grid":
                values.append(trial.suggest_categorical(name, space[name]))
            else:
                values.append(trial.suggest_float(name, float(low[i]), float(high[i])))
        h = torch.tensor(values, dtype=problem.dtype, device=problem.device)
        m = obj.solve(h, state["theta"])
        state["theta"] = m.theta
        value = float(obj.validation(m.theta, h))
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"the objective is not finite ({value})")
        if on_trial is not None:
            on_trial(h, value)
        return value

    def enough(study, trial):
        if len(study.get_trials(deepcopy=False, states=(complete,))) >= n_trials:
            study.stop()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
        if len(study.get_trials(deepcopy=False, states=(complete,))) < n_trials:
            study.optimize(objective, callbacks=[enough], catch=(FloatingPointError,))
    return study


def _grid_space(problem, names, low, high, grid, grid_points):
    if grid is None:
        if len(names) > GRID_MAX_ELEMENTS:
            raise ValueError(
                f"a default grid over {len(names)} hyperparameter elements would have {grid_points}^{len(names)} "
                f"points; grid search takes at most {GRID_MAX_ELEMENTS} elements without explicit points "
                "(pass grid={name: [values]}, or use method='random' or 'gp')"
            )
        return {
            name: torch.linspace(float(low[i]), float(high[i]), grid_points, dtype=torch.float64).tolist()
            for i, name in enumerate(names)
        }
    space = {}
    for site in problem.hypers:
        if site.name not in grid:
            raise ValueError(f"grid= has no points for hyperparameter {site.name!r}")
        values = torch.as_tensor(grid[site.name], dtype=problem.dtype, device=problem.device).reshape(-1)
        points = site.transform.inv(values).tolist()
        elements = [site.name] if site.shape == torch.Size([]) else [f"{site.name}[{i}]" for i in range(site.numel)]
        for element in elements:
            space[element] = points
    return space


def history_of(study, problem):
    """Completed trials in order: ``(value, h, seconds since the study's first trial)``."""
    optuna = _optuna()
    trials = sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.number)
    names = _element_names(problem)
    start = min((t.datetime_start for t in trials), default=None)
    out = []
    for t in trials:
        h = torch.tensor([t.params[n] for n in names], dtype=problem.dtype, device=problem.device)
        seconds = (t.datetime_complete - start).total_seconds() if start else 0.0
        out.append((t.value, h, seconds, t.number))
    return out
