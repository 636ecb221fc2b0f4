"""
What pyro-evidence needs from Pyro and torch that they expose only privately.

Every use of another library's private attribute or method goes through this module, so that a release
which moves one is one file's work; ``pyproject.toml`` bounds the versions it was written against
(pyro-ppl 1.9, torch 2.11–2.13). From torch: ``TorchDispatchMode`` (``torch.utils._python_dispatch``; the
documented way to see every ATen operation, used by :mod:`pyro_evidence.replay`) and whether a ``torch.func``
transform is active (``torch._C._functorch``).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode as DispatchMode

__all__ = ["DispatchMode", "autodiagonal_latents", "autonormal_loc_scale", "in_transform", "mask_of", "setup_prototype",
           "written_arguments"]


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
