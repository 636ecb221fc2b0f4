"""
Trace once, replay pure: a function of tensors recorded as the sequence of ATen operations it runs,
then replayed without the Python that produced them.

A Pyro model's log joint costs, besides its arithmetic, Pyro's handler stack, the distribution
objects and the trace — on a small model several times the arithmetic. :func:`record` runs the
function once under a dispatch mode that sees every ATen operation below autograd; what depends only
on constants (the data, fixed parameters, the model's own tensors) is computed there and kept as
constants, and what depends on the inputs (``θ``, ``h``) becomes a :class:`Recording`, replayed by
calling the same operations on new inputs. The replay differentiates (autograd and ``torch.func``),
batches under ``vmap`` and runs on any device, as the operations do.

A recording is refused (:class:`Unreplayable`, with the reason) where it could be wrong for other
inputs: the function reads a value computed from its inputs into Python (data-dependent control flow,
``.item()``, ``bool(tensor)``), or changes in place a constant that an input-dependent operation had
already used. Reading values of the constants (``int(groups.max()) + 1`` groups, say) is fine: they
are the same on every replay. What the recording cannot see is Python state outside tensors (a
global counter, Python's ``random``): the function must be a deterministic function of its tensors,
as for Pyro's own JIT.
"""

from __future__ import annotations

import torch

from .compat import DispatchMode, in_transform, written_arguments

__all__ = ["Recording", "Unreplayable", "record"]


class Unreplayable(Exception):
    """The function cannot be replayed from a recording; the message says why."""


class _Ref:
    """A tensor in a recording: the ``index``-th input or the ``index``-th value an operation produced."""

    __slots__ = ("input", "index")

    def __init__(self, input: bool, index: int):
        self.input, self.index = input, index


def _map(fn, tree):
    """``tree`` with ``fn`` applied to every leaf (lists, tuples and dicts are walked)."""
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(fn, x) for x in tree)
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    return fn(tree)


def _leaves(tree):
    if isinstance(tree, (list, tuple)):
        for x in tree:
            yield from _leaves(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _leaves(x)
    else:
        yield tree


class Recording:
    """The input-dependent operations of a function, replayed by :meth:`__call__` on new inputs
    (tensors of the recorded shapes, dtypes and devices)."""

    def __init__(self, steps, output, num_inputs):
        self.steps, self.output, self.num_inputs = steps, output, num_inputs

    def __len__(self):
        return len(self.steps)

    def __call__(self, *inputs):
        values = []

        def fill(leaf):
            if type(leaf) is _Ref:
                return inputs[leaf.index] if leaf.input else values[leaf.index]
            return leaf

        for func, args, kwargs in self.steps:
            out = func(*_map(fill, args), **_map(fill, kwargs))
            values.extend(x for x in _leaves(out) if isinstance(x, torch.Tensor))
        return _map(fill, self.output)


aten = torch.ops.aten
# results that depend on their argument's shape, dtype and device only, never on its values
_SHAPE_ONLY = {aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
               aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default}
_RESHAPES = {aten.view.default, aten.expand.default, aten.reshape.default}


def _is_identity(func, args, out) -> bool:
    """Whether ``out`` equals ``args[0]`` whatever its values: ``x * 1``, ``x + 0``, ``x − 0``, an alias or a
    view or expansion to its own shape (what Pyro's handlers and transforms add around the arithmetic)."""
    x = args[0] if args else None
    if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)):
        return False
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        return False
    if func is aten.alias.default or func in _RESHAPES:
        return True
    scalar = args[1] if len(args) == 2 and isinstance(args[1], (int, float)) and not isinstance(args[1], bool) else None
    if func is aten.mul.Tensor:
        return scalar == 1
    return func in (aten.add.Tensor, aten.sub.Tensor) and scalar == 0


class _Recorder(DispatchMode):
    """Runs every ATen operation and writes down those that depend on the inputs; with ``fold``, the
    operations that leave their argument as it was (:func:`_is_identity`) are left out."""

    def __init__(self, inputs, fold=True):
        super().__init__()
        self.fold, self.folded, self.mutates = fold, False, False
        self.refs = {id(t): _Ref(True, i) for i, t in enumerate(inputs)}
        self.alive = list(inputs)  # every tensor seen stays alive, so that no id is reused during the run
        self.steps, self.count = [], 0
        self.used = set()  # ids of constants that a recorded step reads
        self.reason = None

    def _ref(self, leaf):
        if isinstance(leaf, torch.Tensor):
            ref = self.refs.get(id(leaf))
            if ref is not None:
                return ref
            self.used.add(id(leaf))
            self.alive.append(leaf)
        return leaf

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = [x for x in _leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        dynamic = func not in _SHAPE_ONLY and any(id(x) in self.refs for x in leaves)
        changed = written_arguments(func, args)
        if changed:
            if any(isinstance(x, torch.Tensor) and id(x) in self.used and id(x) not in self.refs for x in changed):
                self.reason = self.reason or f"{func} changes in place a constant that an earlier operation on θ or h read"
            self.mutates = self.mutates or dynamic
        if not dynamic:
            self.alive.append(out)
            return out
        if any(not isinstance(x, torch.Tensor) for x in _leaves(out) if x is not None):
            self.reason = self.reason or f"the function reads a value computed from its inputs into Python ({func})"
        if self.fold and _is_identity(func, args, out):
            self.refs[id(out)] = self.refs[id(args[0])]
            self.alive.append(out)
            self.folded = True
            return out
        self.steps.append((func, _map(self._ref, args), _map(self._ref, kwargs)))
        for x in _leaves(out):
            if isinstance(x, torch.Tensor):
                self.refs[id(x)] = _Ref(False, self.count)
                self.count += 1
                self.alive.append(x)
        return out


def record(fn, *examples) -> Recording:
    """Runs ``fn(*examples)`` once and records it; returns the :class:`Recording`, which replays ``fn``
    on inputs of the examples' shapes, dtypes and devices.

    The examples must be plain tensors, and no ``torch.func`` transform may be active (inside one, the
    dispatch mode sees the transform's wrappers, not the tensors); the replay is what a transform sees.
    Raises :class:`Unreplayable` where a replay could differ from ``fn``.
    """
    if in_transform():
        raise RuntimeError("record() runs outside torch.func transforms; record first, then transform the replay")
    for fold in (True, False):
        inputs = tuple(x.detach().clone() for x in examples)
        recorder = _Recorder(inputs, fold)
        with torch.no_grad(), recorder:
            result = fn(*inputs)
        # an operation in place on a value that a folded step made an alias of another would change both
        if not (recorder.folded and recorder.mutates):
            break
    if recorder.reason is not None:
        raise Unreplayable(recorder.reason)
    return Recording(recorder.steps, _map(recorder._ref, result), len(inputs))
