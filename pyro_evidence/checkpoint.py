"""
The outer loop's state, and its checkpoint on disk.

:class:`Progress` is what a selection knows between outer evaluations — the warm-start ``θ``, the best
point with its own ``θ``, the history — and what a checkpoint holds besides ``h`` and the outer
optimiser's state. A checkpoint is written to a temporary file and renamed over the old one, so a kill
never leaves half a file; it holds tensors and plain values only (loadable with ``weights_only=True``);
a lock beside it keeps two processes from writing it.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field

import torch

from .util import check_positive_int, mismatch

__all__ = ["Best", "Checkpoint", "CheckpointLock", "Progress", "Saver", "Step", "check_path", "load_checkpoint", "save_checkpoint"]

FORMAT = "pyro-evidence/checkpoint/2"


@dataclass
class Step:
    """One outer evaluation: ``objective`` = ``Q(θ*(h), h)``, ``hyperparameters`` (constrained),
    ``grad_norm`` = ``max |dQ/dh|`` in unconstrained ``h``, ``seconds`` since the start."""

    objective: float
    hyperparameters: dict
    grad_norm: float
    seconds: float


@dataclass
class Best:
    """The best point so far: ``Q`` (a float and the tensor), ``h``, its own ``θ*(h)`` and ``max |dQ/dh|``."""

    value: float
    h: torch.Tensor
    theta: torch.Tensor
    objective: torch.Tensor
    grad_norm: float


@dataclass
class Progress:
    """The state of a selection between outer evaluations."""

    theta: torch.Tensor  # the warm start of the next inner solve
    history: list = field(default_factory=list)
    best: Best | None = None
    cache: tuple | None = None  # (h, hypergradient) of the last evaluation
    fixed_point: bool | None = None  # set by a loop that judges convergence by its fixed point (Graves')

    def record(self, step: Step, best: Best):
        """Appends ``step``; ``best`` replaces the best point where its ``Q`` is higher by more than round-off, or
        equal to round-off and more nearly stationary (a line search's last trials can rise by 10⁻¹² past the
        stationary point they started from)."""
        self.history.append(step)
        if self.best is None:
            self.best = best
            return
        noise = 100 * torch.finfo(best.objective.dtype).eps * max(1.0, abs(self.best.value))
        if best.value > self.best.value + noise or (best.value >= self.best.value - noise
                                                    and best.grad_norm < self.best.grad_norm):
            self.best = best


def check_path(path, resume, overwrite):
    """Refuses to resume from a missing file or to overwrite an existing one unasked."""
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


class CheckpointLock:
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


def save_checkpoint(path, h, outer, progress: Progress, done, key):
    """Writes the outer loop's state to a temporary file first and then renames it over ``path``.
    ``key`` is the run's fingerprint (:func:`~pyro_evidence.util.fingerprint`)."""
    best, history = progress.best, progress.history
    payload = {
        "format": FORMAT,
        "fingerprint": json.dumps(key, sort_keys=True),
        "done": done,
        "h": h.detach().clone(),
        "theta": progress.theta.detach().clone(),
        "best": {"value": best.value, "h": best.h.detach().clone(), "theta": best.theta.detach().clone(),
                 "grad_norm": best.grad_norm},
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


def _read(path, device):
    """The payload of checkpoint ``path``, or a ``ValueError`` that says what is wrong with the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume=True but there is no checkpoint at {path!r}")
    afresh = "delete it, or run again with resume=False and overwrite=True to start afresh"
    try:
        payload = torch.load(path, weights_only=True, map_location=device)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # a class or function to import and call: code, not data
            raise ValueError(f"refusing checkpoint {path!r}: it holds more than tensors and plain values ({e})") from None
        raise ValueError(f"checkpoint {path!r} is corrupted or truncated (it does not unpickle as data); {afresh}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"checkpoint {path!r} is corrupted or truncated ({e}); {afresh}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise ValueError(f"{path!r} is not a pyro-evidence checkpoint of format {FORMAT!r} (found {found!r})")
    missing = [k for k in ("fingerprint", "done", "h", "theta", "best", "optimizer", "objective", "grad_norm", "seconds",
                           "hyperparameters") if k not in payload]
    if missing:
        raise ValueError(f"checkpoint {path!r} is incomplete: it has no {missing[0]!r}")
    return payload


def load_checkpoint(path, h, outer, progress: Progress, problem, key):
    """Restores a checkpoint written by :func:`save_checkpoint` for the same run (``key``) into ``h``, the
    outer optimiser and ``progress``, in the problem's dtype and on its device. Returns the number of outer
    iterations done."""
    payload = _read(path, problem.device)
    reason = mismatch(json.loads(payload["fingerprint"]), key)
    if reason is not None:
        raise ValueError(f"checkpoint {path!r} belongs to another run: {reason}; resume it with the same problem, or "
                         "pass overwrite=True without resume=True to start a new run there")
    kw = {"dtype": problem.dtype, "device": problem.device}
    with torch.no_grad():
        h.copy_(payload["h"].to(**kw))
    outer.load_state_dict(payload["optimizer"])
    progress.theta = payload["theta"].to(**kw)
    names = list(payload["hyperparameters"])
    for i in range(payload["objective"].numel()):
        hp = {n: payload["hyperparameters"][n][i].to(**kw) for n in names}
        progress.history.append(
            Step(float(payload["objective"][i]), hp, float(payload["grad_norm"][i]), float(payload["seconds"][i]))
        )
    best = payload["best"]
    value = float(best["value"])
    progress.best = Best(value, best["h"].to(**kw), best["theta"].to(**kw), torch.tensor(value, **kw),
                         float(best["grad_norm"]))
    return int(payload["done"])


@dataclass
class Checkpoint:
    """
    Persistence of a gradient-based selection (``select_hyperparameters(checkpoint=...)``; a path alone is
    shorthand for ``Checkpoint(path)``).

    :ivar str path: the file to which ``h``, the outer optimiser's state, the warm-start ``θ``, the best ``h``
        with its own ``θ``, the history and a fingerprint of the problem are written (write, then rename),
        while a lock beside it (``<path>.lock``) keeps other processes from writing it.
    :ivar int every: write it every this many outer steps (and at the end).
    :ivar bool resume: continue from it (refused for another model, data, objective, method or optimizer).
    :ivar bool overwrite: replace an existing file with a new run (otherwise refused).
    """

    path: str
    every: int = 1
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        check_positive_int("checkpoint_every", self.every)


@dataclass
class Saver:
    """Where and how often an outer loop checkpoints: ``path`` (None: never), every ``every`` outer
    iterations and at the end; ``resume`` from the file first; ``key`` the run's fingerprint."""

    path: str | None
    every: int = 1
    resume: bool = False
    key: dict = field(default_factory=dict)
    problem: object = None

    def restore(self, h, outer, progress: Progress) -> int:
        if self.path is None or not self.resume:
            return 0
        return load_checkpoint(self.path, h, outer, progress, self.problem, self.key)

    def save(self, h, outer, progress: Progress, done: int, final: bool = False):
        if self.path is not None and progress.history and (final or done % self.every == 0):
            save_checkpoint(self.path, h, outer, progress, done, self.key)
