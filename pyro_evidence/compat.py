"""
What pyro-evidence needs from Pyro and torch that they expose only privately.

Every use of another library's private attribute or method goes through this module, so that a release
which moves one is one file's work; ``pyproject.toml`` bounds the versions it was written against
(pyro-ppl 1.9, torch 2.11–2.13, optuna 4.x–5.x). From torch: ``TorchDispatchMode`` (``torch.utils._python_dispatch``;
the documented way to see every ATen operation, used by :mod:`pyro_evidence.replay`) and whether a ``torch.func``
transform is active (``torch._C._functorch``). From Optuna: the heartbeat of a trial run by ask-and-tell
(``optuna.storages._heartbeat``; ``study.optimize`` keeps one, ``study.ask`` does not) and the parameters a
queued trial was created with (the system attribute ``fixed_params``); the completed trials a ``GPSampler`` fits
its GP to (``_sample_relative_impl``).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode as DispatchMode

__all__ = ["DispatchMode", "autodiagonal_latents", "autonormal_loc_scale", "in_transform", "mask_of", "setup_prototype",
           "written_arguments", "heartbeat_enabled", "heartbeat", "queued_params", "gp_sampler"]


def autodiagonal_latents(guide, flat):
    """``[(site, value)]``: an ``AutoDiagonalNormal``'s flat vector split into its sites (``_unpack_latent``)."""
    return list(guide._unpack_latent(flat))


def autonormal_loc_scale(guide, name):
    """``(loc, scale)`` of one site of an ``AutoNormal`` (``_get_loc_and_scale``; it nests dotted names)."""
    return guide._get_loc_and_scale(name)


def setup_prototype(guide, wrap, *args, **kwargs):
    """Builds an autoguide's prototype trace with its model wrapped by ``wrap`` for that one run: the
    prototype runs under ``poutine.block``, which outer handlers cannot see through."""
    model = guide._model
    guide._model = (wrap(model[0]),)
    with contextlib.ExitStack() as stack:
        stack.callback(setattr, guide, "_model", model)
        guide._setup_prototype(*args, **kwargs)


def mask_of(fn):
    """The boolean mask a ``MaskedDistribution`` applies (``_mask``)."""
    return fn._mask


def in_transform() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, …) is active here
    (``torch._C._functorch.peek_interpreter_stack``)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def written_arguments(func, args) -> list:
    """The positional arguments an ATen operation writes to (``x`` in ``x.add_(y)``; from its schema, ``_schema``)."""
    schema = func._schema
    if not schema.is_mutable:
        return []
    return [x for x, a in zip(args, schema.arguments) if a.alias_info is not None and a.alias_info.is_write]


def heartbeat_enabled(study) -> bool:
    """Whether the study's storage keeps heartbeats of running trials (an RDB storage made with a
    ``heartbeat_interval``)."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


@contextlib.contextmanager
def heartbeat(study, trial):
    """Beats for ``trial`` while the block runs, as ``study.optimize`` does for its trials: the first beat is
    recorded before the block starts, so a trial that has been tagged also has a heartbeat."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    if not heartbeat_enabled(study):
        yield
        return
    study._storage.record_heartbeat(trial._trial_id)
    with get_heartbeat_thread(trial._trial_id, study._storage):
        yield


def queued_params(trial) -> dict:
    """The parameters of a ``FrozenTrial``: those it drew and those it was queued with (``enqueue_trial``)
    but had not drawn yet."""
    return {**trial.system_attrs.get("fixed_params", {}), **trial.params}


def gp_sampler(optuna, warp, **options):
    """Optuna's ``GPSampler(**options)`` whose Gaussian process is fitted to ``warp(values)`` of the completed
    trials instead of their values (``_sample_relative_impl`` receives them; the study keeps the values), and
    told that the objective is deterministic (``deterministic_objective``, experimental in Optuna 5). An Optuna
    without these gets the plain sampler, with a warning."""
    import copy
    import inspect
    import warnings

    base = optuna.samplers.GPSampler
    if not (hasattr(base, "_sample_relative_impl") and "deterministic_objective" in inspect.signature(base).parameters):
        warnings.warn(f"optuna {optuna.__version__}'s GPSampler cannot be given warped values: its GP is fitted to the raw "
                      "objective", RuntimeWarning, stacklevel=3)
        return base(**options)

    class WarpedGPSampler(base):
        def _sample_relative_impl(self, study, completed_trials, *args, **kwargs):
            warped = []
            for trial, value in zip(completed_trials, warp([t.value for t in completed_trials])):
                trial = copy.copy(trial)
                trial.value = float(value)
                warped.append(trial)
            return super()._sample_relative_impl(study, warped, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return WarpedGPSampler(deterministic_objective=True, **options)
