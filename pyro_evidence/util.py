"""
What a call must leave as it found it, and what a saved run must remember about itself.

- :func:`isolated_params` runs a block on its own param store and puts the caller's back.
- :func:`seeded` runs a block on seeded random-number generators and puts the caller's states
  back, so a seed makes a result reproducible without reseeding the user's global RNG.
- :func:`fingerprint` names a run — the model, its hyperparameters' names and shapes, a digest of
  the data and the options — so that a checkpoint or a study can refuse to be resumed on
  something else.
- :class:`StopCheck` lets a loop on the GPU ask "done yet?" without stalling the device.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import random

import numpy as np
import pyro
import torch

__all__ = ["isolated_params", "preserved_rng", "seeded", "fingerprint", "describe", "digest", "mismatch", "check_positive_int",
           "check_options", "StopCheck"]


@contextlib.contextmanager
def isolated_params(clear: bool = False):
    """Runs a block on a copy of Pyro's param store and restores the store exactly afterwards:
    params the block creates are removed, params it changes get their old values back.

    :param bool clear: start the block on an empty store instead of a copy.
    """
    store = pyro.get_param_store()
    saved = store.get_state()
    if clear:
        store.clear()
    try:
        yield
    finally:
        store.clear()  # set_state only adds: without this the block's own params would stay
        store.set_state(saved)


def _cuda_indices(devices):
    return sorted({torch.device(d).index or 0 for d in devices if torch.device(d).type == "cuda"})


@contextlib.contextmanager
def preserved_rng(devices=()):
    """Restores the states of torch's CPU generator (and those of the given CUDA ``devices``),
    numpy's and Python's global generators after the block, whatever it seeded or drew."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=_cuda_indices(devices)):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def seeded(seed: int, devices=()):
    """Seeds torch's CPU generator (and those of the given CUDA ``devices``), numpy and Python's
    ``random`` for a block, as ``pyro.set_rng_seed`` would, and restores their previous states
    afterwards: a seed makes a result reproducible without reseeding the caller's generators."""
    with preserved_rng(devices):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # torch.manual_seed would seed every GPU too
        for index in _cuda_indices(devices):
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def digest(value) -> str:
    """A short SHA-256 digest of data: tensors and arrays by dtype, shape and bytes; containers
    element by element; plain values by their ``repr``; anything else by its type's name."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()[:16]


def _feed(h, value):
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        h.update(f"tensor{value.dtype}{tuple(value.shape)}".encode())
        h.update(value.contiguous().view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    elif isinstance(value, np.ndarray):
        h.update(f"array{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            h.update(repr(key).encode())
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for v in value:
            _feed(h, v)
    elif value is None or isinstance(value, (bool, int, float, str)):
        h.update(repr(value).encode())
    elif isinstance(value, torch.nn.Module):  # a network by its weights, not only its class
        h.update(describe(value).encode())
        _feed(h, dict(value.state_dict()))
    else:
        h.update(describe(value).encode())


def describe(fn) -> str:
    """A stable name for a model or other callable: its module and qualified name, with the bound
    arguments of a ``functools.partial``; a ``PyroModule`` by its class."""
    if isinstance(fn, functools.partial):
        return f"{describe(fn.func)}(*{digest(fn.args)}, **{digest(fn.keywords)})"
    if isinstance(fn, torch.nn.Module):
        return f"{type(fn).__module__}.{type(fn).__qualname__}"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{name}"


def fingerprint(problem, **options) -> dict:
    """What a saved run belongs to, JSON-clean: the model's name, the hyperparameters' names and
    shapes, digests of the data and of the model's keyword arguments, and ``options`` (the
    objective, the method, …; values other than plain ones are digested)."""
    out = {
        "model": describe(problem.model),
        "hyperparameters": {s.name: list(s.shape) for s in problem.hypers},
        "data": digest(problem.args),
        "model_kwargs": digest(problem.model_kwargs),
    }
    for key, value in options.items():
        plain = value is None or isinstance(value, (bool, int, float, str))
        out[key] = value if plain else digest(value)
    return json.loads(json.dumps(out))


def mismatch(saved: dict, current: dict) -> str | None:
    """The first field in which two fingerprints differ, described for an error message."""
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            what = {"data": "the data", "model_kwargs": "the model's keyword arguments"}.get(key, key)
            return f"{what} differ (saved: {saved.get(key)!r}, now: {current.get(key)!r})"
    return None


def check_positive_int(name, value):
    """Refuses a count that is not a positive int (a bool or a float is not one), naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_options(label: str, options: dict, accepted, owner: str):
    """Refuses a key of ``options`` that is not in ``accepted``, naming it, its owner and the accepted ones."""
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{label} {unknown[0]!r} is not an option of {owner}; its options are {sorted(accepted)}")


class StopCheck:
    """
    Whether an iterative loop may stop, read from a boolean on the loop's device without idling it.

    On the CPU the flag is read at once. On CUDA reading it would block the host until the device
    has finished, and the device would then idle while the host queues the next iteration; instead
    each flag is copied to pinned host memory behind the work that computes it, and the answer
    given is the previous call's flag, by which time the device is busy with the iteration queued
    since. A loop therefore runs one iteration past its stopping point: it must freeze finished
    work with masks (``torch.where``), so that this iteration changes nothing.
    """

    def __init__(self, device):
        self.lagged = torch.device(device).type == "cuda"
        self._pending = None

    def __call__(self, flag: torch.Tensor) -> bool:
        if not self.lagged:
            return bool(flag)
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        arrived = torch.cuda.Event()
        arrived.record()
        previous, self._pending = self._pending, (host, arrived)
        if previous is None:
            return False
        previous[1].synchronize()
        return bool(previous[0])
