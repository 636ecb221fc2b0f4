"""
Black-box search over hyperparameters on Optuna (seed, "Basic methods"; "Gaussian process").

``grid`` (``GridSampler``), ``random`` (``RandomSampler``, Bergstra & Bengio 2012) and ``gp``
(``GPSampler``, Gaussian-process Bayesian optimisation, Shahriari et al. 2016) search a box in
unconstrained hyperparameter space, one Optuna parameter per element; every trial fits the
inner problem and evaluates the objective ``Q(θ*(h), h)``. The GP of ``gp`` is fitted to the values
capped at their median (:func:`capped_at_median`) and knows the objective is deterministic.

A study lives in an Optuna storage — an RDB URL (``sqlite:///study.db``) or a journal file
(``JournalStorage(JournalFileBackend(path))``) — so a killed run resumes with every finished
trial kept, and several processes, on one machine or many, share one study. ``n_trials`` counts
the study's completed trials, however many processes contribute.

Guarantees, and how they are kept:

- The trial loop is Optuna's ask-and-tell, so this module, not Optuna's ``optimize``, decides
  when a trial may start: only while the completed trials and the running ones of live processes
  leave room, so the study completes exactly ``n_trials`` (a trial that finds no room after it
  was created is told PRUNED).
- On an RDB storage (``sqlite:///…``, ``postgresql://…``, ``mysql://…``: every machine that reaches
  the database can join) each running trial has Optuna's heartbeat, recorded every
  ``heartbeat_interval`` seconds by a thread of its process; a RUNNING trial whose heartbeat is older
  than ``grace_period`` is an orphan, whichever machine ran it: it is told FAIL and queued again with
  its parameters (Optuna's ``RetryFailedTrialCallback``), and it never counts. A worker whose study
  still has running trials waits for them, so the last live worker completes the study.
- On a journal file (one machine) every trial is tagged with its host and process id instead; a
  RUNNING trial whose process on this host is dead is an orphan, told FAIL and queued again. A
  trial of another host cannot be checked from here: use an RDB storage across machines.
- On both, a trial that was never tagged and is older than :data:`ORPHAN_GRACE_SECONDS` (its
  process died between Optuna creating it and the tag, before any heartbeat) is an orphan too.
- Ctrl-C tells the running trial FAIL, queues its parameters again and returns to the caller,
  which keeps the completed trials.
- A study records a fingerprint of the model, its hyperparameters, the data, the objective and
  the method (and explicit grid points); joining it with anything else is refused (a different
  box is allowed: a trial's value is ``Q`` at its point, wherever it was drawn from). Without ``study_name`` the name
  is derived from that fingerprint, so different problems never share a study.
- A journal whose last record was cut short by a crash is cut back to its last whole record
  (under the journal's own lock) before it is opened; a damaged record further in is reported
  with the line to cut at.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass, fields

import torch

from . import compat
from .linalg import NotPositiveDefiniteError
from .util import check_positive_int, digest, fingerprint, mismatch

__all__ = [
    "SearchOptions",
    "search", "SearchInterrupted", "default_bounds", "GRID_MAX_ELEMENTS", "ORPHAN_GRACE_SECONDS", "open_storage", "history_of",
    "SEARCH_METHODS", "capped_at_median",
]

SEARCH_METHODS = ("grid", "random", "gp")

GRID_MAX_ELEMENTS = 3  # beyond this many elements a default grid is refused (10^k points)
ORPHAN_GRACE_SECONDS = 10.0  # an untagged RUNNING trial older than this lost its process
_DEFAULT_HALF_WIDTH = math.log(1e4)  # four decades either side of the initial value
_FINGERPRINT = "pyro_evidence_fingerprint"


def _optuna():
    try:
        import optuna
    except ImportError as e:  # pragma: no cover - optuna is a declared dependency
        raise ImportError("black-box search needs optuna: pip install optuna") from e
    return optuna


@contextlib.contextmanager
def _quiet(optuna):
    """Optuna's per-trial INFO lines off for the block; the caller's log level restored after."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
            # we keep the heartbeat of asked trials ourselves (compat.heartbeat), as Study.optimize would
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
            yield
    finally:
        optuna.logging.set_verbosity(level)


HEARTBEAT_INTERVAL = 10  # seconds between the heartbeats of a running trial on an RDB storage
MAX_RETRY = 3  # an orphaned point is queued again at most this many times (a point that kills its worker)


def open_storage(storage, heartbeat_interval: int = HEARTBEAT_INTERVAL, grace_period: int | None = None):
    """An Optuna storage from a URL (``sqlite:///…``, ``postgresql://…``, ``mysql://…``: any URL SQLAlchemy
    and Optuna's ``RDBStorage`` accept) or a journal file path (``*.log``/``*.journal``/any other path);
    None for in-memory. An RDB storage keeps heartbeats every ``heartbeat_interval`` seconds; a running
    trial without one for ``grace_period`` seconds (default ``2·heartbeat_interval``) is failed and
    retried."""
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
        check_positive_int("heartbeat_interval", heartbeat_interval)
        if grace_period is not None:
            check_positive_int("grace_period", grace_period)
        with warnings.catch_warnings():  # the heartbeat arguments are marked experimental
            warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                heartbeat_stale_trial_callback=_retry(optuna)(max_retry=MAX_RETRY),
            )
    from optuna.storages.journal import JournalFileBackend

    repair_journal(storage)
    try:
        return optuna.storages.JournalStorage(JournalFileBackend(storage))
    except ValueError as e:  # json.JSONDecodeError included
        raise _damaged_journal(storage, e) from None


def _retry(optuna):
    """Optuna's callback that queues a stale trial again (renamed in Optuna 4.9)."""
    return getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback


def repair_journal(path) -> int:
    """Cuts a journal file back to its last whole record when a crash left a partial one at its
    end (Optuna would append the next record to it and then fail to read the file). Works under
    the journal's own lock; returns the number of bytes removed and warns when there were any."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return 0
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
    from optuna.storages.journal import JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(path)
    lock.acquire()
    try:
        with open(path, "rb+") as f:
            data = f.read()
            keep = data.rfind(b"\n") + 1
            if keep == len(data):  # completed by a writer meanwhile
                return 0
            f.truncate(keep)
    finally:
        lock.release()
    cut = len(data) - keep
    warnings.warn(
        f"journal {path!r} ended in an incomplete record ({cut} bytes, a write cut short by a crash); "
        "it was cut back to its last whole record",
        RuntimeWarning,
        stacklevel=3,
    )
    return cut


def _damaged_journal(path, error):
    """The error for a journal that Optuna cannot read: where the damage is, and what to do."""
    line_number = None
    with open(path, "rb") as f:
        for i, line in enumerate(f, start=1):
            try:
                json.loads(line)
            except ValueError:
                line_number = i
                break
    where = f"record {line_number}" if line_number else "a record"
    keep = f" (keep the trials before it: head -n {line_number - 1} {path} > repaired.log)" if line_number else ""
    return ValueError(f"the journal {path!r} is damaged at {where} ({error}); move it aside to start afresh{keep}")


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


def capped_at_median(values):
    """``max(Q, median Q)`` for each value: the output warping of the GP search.

    Expected improvement looks only for points that may beat the best, so what a GP needs to know of a
    point below the median is that it is bad, not how bad. Its magnitude does harm: an evidence falls by
    six orders over a box of four decades either side (about −10⁶ nats where the noise precision is too
    high, against a peak a few nats wide), and fitted to such values the standardised GP sees the region
    of the optimum as flat and spends its trials in the corners. Capped, the bad half is one plateau that the
    GP models with confidence (the same split of the trials at a quantile that drives TPE, Bergstra et al. 2011).
    On the Laplace evidence of diabetes (default box, 40 trials, 20 seeds) the best value found ends 0.032 nats
    from the optimum on average, worst 0.122, against 15.6 and 42.9 for Optuna's ``GPSampler`` fitted to the raw
    values (``benchmarks/results/search.md``)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    return np.maximum(values, np.median(values)) if values.size else values


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


def _owner(trial, heartbeats):
    """``"live"`` (a process that may still finish it), ``"dead"`` (an orphan) or ``"unknown"``
    (untagged and younger than :data:`ORPHAN_GRACE_SECONDS`: perhaps being tagged right now). With
    ``heartbeats`` a tagged trial is live until Optuna finds its heartbeat stale."""
    attrs = trial.user_attrs
    if attrs.get("trial") != trial.number:  # a retried trial carries its orphan's tags until it is tagged
        started = trial.datetime_start or datetime.datetime.now()
        age = (datetime.datetime.now() - started).total_seconds()
        return "dead" if age > ORPHAN_GRACE_SECONDS else "unknown"
    if heartbeats or attrs.get("host") != socket.gethostname():
        return "live"  # another machine's process, on a journal: no way to ask it from here
    return "live" if _alive(attrs["pid"]) else "dead"


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _running(study, optuna, names, heartbeats):
    """The study's RUNNING trials that are not orphans, after failing the orphans and queueing
    their parameters again (where the orphan had them all)."""
    if heartbeats:
        optuna.storages.fail_stale_trials(study)  # and queues them again (RetryFailedTrialCallback)
    alive = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = _owner(trial, heartbeats)
        if owner != "dead":
            alive.append((trial, owner))
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):  # another process failed it first
            continue
        params = compat.queued_params(trial)
        if set(names) <= set(params):
            study.enqueue_trial(params, skip_if_exists=False)
    return alive


def _check_fingerprint(study, key, name):
    saved = study.user_attrs.get(_FINGERPRINT)
    if saved is None:
        if study.get_trials(deepcopy=False):
            raise ValueError(
                f"the study {name!r} in this storage was not made by pyro-evidence (or by a version that "
                "recorded no fingerprint); give another study_name="
            )
        study.set_user_attr(_FINGERPRINT, key)
        return
    reason = mismatch(saved, key)
    if reason is not None:
        raise ValueError(
            f"the study {name!r} in this storage belongs to another search: {reason}. Its trials would answer "
            "for a different problem; give another study_name= (or leave it out: the default name is derived "
            "from the problem)"
        )


@dataclass
class SearchOptions:
    """
    Options of the black-box search (``select_hyperparameters(method="grid" | "random" | "gp", search=...)``).

    :ivar int n_trials: the study's completed trials in all, however many processes share it (default the
        selection's ``max_steps``; for ``grid`` the whole grid).
    :ivar dict bounds: ``{name: (low, high)}`` in constrained values; the search box is their image in
        unconstrained space (log scale for positive parameters); default four decades either side of the
        initial value.
    :ivar dict grid: explicit grid points ``{name: [values]}``; without it a grid of 10 points per element is
        built, for at most 3 elements.
    :ivar storage: an Optuna storage URL (``sqlite:///study.db``, ``postgresql://…``) or a journal file path:
        the study persists there, resumes after a kill and is shared by every process using it.
    :ivar str study_name: the study's name in the storage; default a name derived from the problem's
        fingerprint. A study made for another model, data, objective or method is refused.
    :ivar int seed: the samplers' seed.
    :ivar int heartbeat_interval: on an RDB storage URL, seconds between the heartbeats of a running trial.
    :ivar int grace_period: on an RDB storage URL, seconds without a heartbeat after which a running trial
        is an orphan, failed and run again (default ``2·heartbeat_interval``). Both are ignored for a
        journal file and for a storage object, which keeps its own settings.
    """

    n_trials: int | None = None
    bounds: dict | None = None
    grid: dict | None = None
    storage: object = None
    study_name: str | None = None
    seed: int = 0
    heartbeat_interval: int = HEARTBEAT_INTERVAL
    grace_period: int | None = None

    def __post_init__(self):
        if self.n_trials is not None:
            check_positive_int("n_trials", self.n_trials)
        check_positive_int("heartbeat_interval", self.heartbeat_interval)
        if self.grace_period is not None:
            check_positive_int("grace_period", self.grace_period)

    def given(self) -> list:
        """The names of the options set to other than their defaults."""
        return [f.name for f in fields(self) if getattr(self, f.name) != f.default]


def search(obj, method, *, n_trials, bounds=None, grid=None, grid_points=10, storage=None, study_name=None, seed=0,
           heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=None, on_trial=None):
    """
    Runs (or joins) an Optuna study over the objective ``obj``.

    :param str method: ``"grid"``, ``"random"`` or ``"gp"``.
    :param int n_trials: completed trials of the study in all (``None`` with ``grid``: the grid).
    :param dict grid: explicit grid points ``{name: [constrained values]}`` per hyperparameter
        (a vector-valued one gets the same points for each element).
    :param int grid_points: points per element of the default grid, evenly spaced in the box.
    :param int heartbeat_interval: seconds between heartbeats of a running trial (RDB storage URLs).
    :param int grace_period: seconds without a heartbeat that make a running trial an orphan.
    :param on_trial: ``(h, value) → None``, called after every trial this process runs.
    :returns: the study. Ctrl-C fails the running trial, queues it again and raises
        ``KeyboardInterrupt``; the study keeps every completed trial.
    """
    optuna = _optuna()
    problem = obj.problem
    names = _element_names(problem)
    low, high = default_bounds(problem, bounds)
    space = None
    if method == "grid":
        space = _grid_space(problem, names, low, high, grid, grid_points)
        size = math.prod(len(v) for v in space.values())
        n_trials = size if n_trials is None else min(n_trials, size)
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise ValueError(f"n_trials must be a positive int for method={method!r}, got {n_trials!r}")
    # a trial's value is Q at its point whatever box it was drawn from: the box is not part of the key
    key = fingerprint(problem, objective=obj.name, method=method, grid=grid, **getattr(obj, "key", {}))
    name = study_name or f"pyro-evidence-{digest(key)}"
    with _quiet(optuna):
        path = storage if isinstance(storage, str) and "://" not in storage else None
        storage = open_storage(storage, heartbeat_interval, grace_period)
        try:
            study, created = _study(optuna, name, storage)
        except ValueError as e:  # a journal read further while the study loads
            if path is None or "Invalid log format" not in str(e) and "Expecting" not in str(e):
                raise
            raise _damaged_journal(path, e) from None
        _check_fingerprint(study, key, name)
        start = problem.h_init.detach().cpu().tolist()
        if created and method != "grid" and all(lo <= x <= hi for x, lo, hi in zip(start, low.tolist(), high.tolist())):
            # the first point is where every gradient method starts: no search ends below its start; only the
            # process that created the study queues it, so workers starting together do not run it twice
            study.enqueue_trial(dict(zip(names, start)), skip_if_exists=True)
        study.sampler = _sampler(optuna, method, seed, study, n_trials, space)
        try:
            _trials(study, optuna, obj, names, low, high, method, space, n_trials, on_trial)
        except KeyboardInterrupt:
            raise SearchInterrupted(study) from None
    return study


def _sampler(optuna, method, seed, study, n_trials, space):
    # random draws depend on (seed, trial number) only: reproducible by seed, and a resumed or
    # joining process never replays the draws already in the study
    if method == "random":
        return _NumberedRandomSampler(optuna, seed)
    if method == "gp":
        return compat.gp_sampler(optuna, capped_at_median, seed=seed + len(study.trials), n_startup_trials=min(10, n_trials),
                                 independent_sampler=_NumberedRandomSampler(optuna, seed))
    return _Grid(optuna)(space, seed=seed)


def _study(optuna, name, storage):
    """``(study, created)``: the study of that name, and whether this call created it (creation is atomic in
    every storage, so exactly one of several processes starting together learns it did)."""
    try:
        return optuna.create_study(study_name=name, storage=storage, direction="maximize"), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage), False


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a search, after the running trial was failed and queued again; ``study``
    holds every completed trial."""

    def __init__(self, study):
        super().__init__("search interrupted")
        self.study = study


def _trials(study, optuna, obj, names, low, high, method, space, n_trials, on_trial):
    """The ask-and-tell loop: a trial starts only while the study has room for it. A point where
    the objective is not finite is told FAIL (tagged ``"failed"``) and replaced by a new draw; a grid
    point is not, so there it counts as done. ``n_trials`` such failures in a row end the search."""
    complete = optuna.trial.TrialState.COMPLETE
    heartbeats = compat.heartbeat_enabled(study)
    state = {"theta": None, "failures": 0}
    while True:
        running = _running(study, optuna, names, heartbeats)
        done = len(study.get_trials(deepcopy=False, states=(complete,)))
        if method == "grid":
            done += sum(1 for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)) if "failed" in t.user_attrs)
        if done >= n_trials:
            return
        if done + len(running) >= n_trials:
            # with heartbeats a running trial either completes or is found stale and queued again:
            # wait for it, so that the last live worker completes the study
            if heartbeats or any(owner == "unknown" for _, owner in running):
                time.sleep(0.2)
                continue
            return  # live processes are finishing the last trials
        trial = study.ask()
        with compat.heartbeat(study, trial):
            told = _trial(study, optuna, trial, obj, names, low, high, method, space, n_trials, state)
        if told is not None and on_trial is not None:
            on_trial(*told)


def _trial(study, optuna, trial, obj, names, low, high, method, space, n_trials, state):
    """Runs one asked trial and tells its outcome; ``(h, value)`` where it completed."""
    problem = obj.problem
    finished = (ValueError, optuna.exceptions.UpdateFinishedTrialError)  # failed as stale meanwhile: retried
    try:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("trial", trial.number)  # tagged, and (on an RDB storage) already beating
        others = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING))
        ahead = sum(1 for t in others if t.state == optuna.trial.TrialState.COMPLETE or t.number < trial.number)
        if ahead >= n_trials:  # another process took the last place meanwhile
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return None
        values = []
        for i, element in enumerate(names):
            if method == "grid":
                values.append(trial.suggest_categorical(element, space[element]))
            else:
                values.append(trial.suggest_float(element, float(low[i]), float(high[i])))
        h = torch.tensor(values, dtype=problem.dtype, device=problem.device)
        m = obj.solve(h, state["theta"])
        value = float(obj.validation(m.theta, h))
    except (FloatingPointError, NotPositiveDefiniteError) as e:
        _failed(study, optuna, trial, f"{type(e).__name__}: {e}"[:200], state, n_trials)
        return None
    except BaseException:  # Ctrl-C or an error: the trial is not left RUNNING, its point not lost
        with contextlib.suppress(*finished):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            params = compat.queued_params(study.get_trials(deepcopy=False)[trial.number])
            if set(names) <= set(params):
                study.enqueue_trial(params, skip_if_exists=False)
        raise
    if not math.isfinite(value):
        _failed(study, optuna, trial, f"the objective is {value}", state, n_trials)
        return None
    try:
        study.tell(trial, value)
    except finished:
        return None
    state["theta"], state["failures"] = m.theta, 0
    return h, value


def _failed(study, optuna, trial, reason, state, n_trials):
    """Tells FAIL for a point where the objective could not be evaluated, and ends the search after
    ``n_trials`` of them in a row."""
    trial.set_user_attr("failed", reason)
    with contextlib.suppress(ValueError, optuna.exceptions.UpdateFinishedTrialError):
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    state["failures"] += 1
    if state["failures"] >= n_trials:
        raise FloatingPointError(f"the objective was not finite at {n_trials} trials in a row (the last: {reason})")


def _Grid(optuna):
    class Grid(optuna.samplers.GridSampler):
        """Optuna's grid sampler without its own stopping rule: the trial loop counts the trials
        (``GridSampler`` calls ``study.stop()``, which only ``optimize`` allows)."""

        def after_trial(self, study, trial, state, values):
            pass

    return Grid


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
    if not isinstance(grid, dict):
        raise TypeError(f"grid must be a dict {{name: [values]}}, got {type(grid).__name__}")
    known = {s.name for s in problem.hypers}
    unknown = [n for n in grid if n not in known]
    if unknown:
        raise ValueError(f"grid= names unknown hyperparameter {unknown[0]!r}; the model's are {sorted(known)}")
    space = {}
    for site in problem.hypers:
        if site.name not in grid:
            raise ValueError(f"grid= has no points for hyperparameter {site.name!r}")
        values = torch.as_tensor(grid[site.name], dtype=problem.dtype, device=problem.device).reshape(-1)
        if values.numel() == 0:
            raise ValueError(f"grid= has an empty list of points for hyperparameter {site.name!r}")
        outside = [float(v) for v in values.cpu() if not bool(site.constraint.check(v)) or not math.isfinite(float(v))]
        if outside:
            raise ValueError(
                f"grid point {outside[0]:g} of hyperparameter {site.name!r} lies outside its support ({site.constraint})"
            )
        points = site.transform.inv(values).tolist()
        elements = [site.name] if site.shape == torch.Size([]) else [f"{site.name}[{i}]" for i in range(site.numel)]
        for element in elements:
            space[element] = points
    return space


def history_of(study, problem):
    """Completed trials in order: ``(value, h, seconds since the study's first trial, number)``."""
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
