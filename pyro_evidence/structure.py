"""
Structure as a relaxed discrete hyperparameter (seed, "Discrete distribution: relaxation").

A model declares its structure ``Γ`` — which features, units or layers are on — with :func:`gate`
(a 0/1 switch per element) or :func:`choice` (one of ``n`` alternatives), and multiplies what they
switch by the value it gets back. Their logits are ``pyro.param`` sites (``{name}_logits``), the
hyperparameters of the structure's prior ``p(Γ | h)``: ``Γ_j ~ Bernoulli(σ(ℓ_j))`` for a gate,
``Γ ~ Categorical(softmax ℓ)`` for a choice. A discrete ``Γ`` has no gradient; its Concrete
relaxation (Maddison et al. 2017; Jang et al. 2017) has one: at temperature ``τ`` and noise
``u ~ U(0, 1)``,

.. math::

    g = \\sigma\\big((\\ell + \\log u - \\log(1 - u)) / \\tau\\big) \\quad\\text{(RelaxedBernoulli)}, \\qquad
    g = \\operatorname{softmax}\\big((\\ell - \\log(-\\log u)) / \\tau\\big) \\quad\\text{(RelaxedOneHotCategorical)},

the reparameterised samples of ``RelaxedBernoulli(τ, ℓ)`` and ``RelaxedOneHotCategorical(τ, ℓ)``, which
tend to the discrete ``Γ`` as ``τ → 0``. :func:`select_structure` maximises the objective averaged over
``S`` fixed draws of the noise, ``(1/S) Σ_s Q(g(ℓ, u_s, τ), h)`` — the expected objective under the
relaxed prior, whose maximum over a probability is at a vertex, so the gates are driven to decide —
with every other hyperparameter, by the same hypergradient machinery as any selection (the ``S`` draws
are ``S`` copies of the model in one problem, so the sum is one objective with one ``θ``), lowering
``τ`` stage by stage. The hard structure is then read out (``1[ℓ > 0]``, the more probable state;
``argmax ℓ`` for a choice), the other hyperparameters are selected again with it fixed, and its
objective is evaluated exactly, with no relaxation left.

Outside :func:`relaxed` and :func:`hard` a gate is ``σ(ℓ)`` and a choice ``softmax ℓ`` (temperature 1,
no noise).

References:
    C. J. Maddison, A. Mnih, Y. W. Teh, *The Concrete distribution: a continuous relaxation of discrete
    random variables*, ICLR 2017.
    E. Jang, S. Gu, B. Poole, *Categorical reparameterization with Gumbel-softmax*, ICLR 2017.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass, field

import pyro
import torch
from pyro.contrib.autoname import scope

__all__ = ["gate", "choice", "relaxed", "hard", "select_structure", "StructureSelection", "LOGITS"]

UNDECIDED = 0.3  # a gate with |σ(ℓ) − ½| below this is settled by the exact objective
LOGITS = "{}_logits"  # the pyro.param site of a gate's or a choice's logits
_state = {"mode": None}  # the active relaxed() or hard() block; None: σ(ℓ) / softmax ℓ


@contextlib.contextmanager
def relaxed(temperature: float, num_particles: int = 1, seed: int | None = 0):
    """Gates and choices are Concrete samples at ``temperature`` within the block; the noise of each is
    drawn once per name, particle and ``seed`` (``seed=None``: no noise, ``u = ½``). With
    ``num_particles = S`` a model run inside :func:`particle` ``s`` uses the ``s``-th draw."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    outer = _state["mode"]
    _state["mode"] = {"kind": "relaxed", "temperature": float(temperature), "seed": seed, "particle": 0, "noise": {},
                      "names": {}, "num_particles": num_particles}
    try:
        yield _state["mode"]
    finally:
        _state["mode"] = outer


@contextlib.contextmanager
def hard():
    """Gates are ``1[ℓ > 0]`` and choices ``one_hot(argmax ℓ)`` within the block: the discrete structure."""
    outer = _state["mode"]
    _state["mode"] = {"kind": "hard", "names": {}}
    try:
        yield _state["mode"]
    finally:
        _state["mode"] = outer


def _noise(mode, name, logits):
    """``u`` of one gate in the current particle: a fixed draw (a generator seeded by seed, particle and
    name, so every run of the model sees the same one), on the logits' device and dtype."""
    if mode["seed"] is None:
        return torch.full_like(logits, 0.5)
    key = (name, mode["particle"], tuple(logits.shape))
    if key not in mode["noise"]:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{mode['seed']}/{mode['particle']}/{name}".encode()))
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
        mode["noise"][key] = u.clamp(1e-12, 1 - 1e-12)
    return mode["noise"][key].to(dtype=logits.dtype, device=logits.device)


def relaxed_bernoulli(logits, u, temperature):
    """``σ((ℓ + log u − log(1 − u)) / τ)``: ``RelaxedBernoulli(τ, logits=ℓ).rsample()`` at the noise ``u``."""
    return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)


def relaxed_one_hot(logits, u, temperature):
    """``softmax((ℓ − log(−log u)) / τ)``: ``RelaxedOneHotCategorical(τ, logits=ℓ).rsample()`` at the noise ``u``."""
    return torch.softmax((logits - torch.log(-torch.log(u))) / temperature, dim=-1)


@dataclass(frozen=True)
class _Switch:
    """What a gate or a choice is: its relaxation, its hard state and its probabilities, each of the logits."""

    relax: object
    harden: object
    soft: object

    def hard(self, logits):
        return self.harden(logits).to(logits.dtype)


def _switch(name, start, switch):
    logits = pyro.param(LOGITS.format(name), lambda: start)
    mode = _state["mode"]
    if mode is None:
        return switch.soft(logits)
    mode["names"][name] = switch
    if mode["kind"] == "hard":
        return switch.hard(logits)
    return switch.relax(logits, _noise(mode, name, logits), mode["temperature"])


_GATE = _Switch(relaxed_bernoulli, lambda logits: logits > 0, torch.sigmoid)


def gate(name: str, shape=(), init: float = 2.0):
    """A 0/1 switch per element of ``shape`` (features, units, layers), relaxed (module docstring); its
    logits are the hyperparameter ``{name}_logits``, initially ``init`` (on, with probability σ(init))."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return _switch(name, torch.full(shape, float(init)), _GATE)


def choice(name: str, n: int, init=None):
    """One of ``n`` alternatives as a relaxed one-hot vector (module docstring); its logits are the
    hyperparameter ``{name}_logits`` (initially equal, or ``init``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"choice {name!r} needs n >= 2 alternatives, got {n!r}")
    start = torch.zeros(n) if init is None else torch.as_tensor(init, dtype=torch.float32).clone()
    if start.shape != (n,):
        raise ValueError(f"init of choice {name!r} must have shape ({n},), got {tuple(start.shape)}")
    one_hot = lambda logits: torch.nn.functional.one_hot(logits.argmax(-1), n)  # noqa: E731
    return _switch(name, start, _Switch(relaxed_one_hot, one_hot, lambda logits: torch.softmax(logits, -1)))


def particles(model, num_particles):
    """The model run ``num_particles`` times on the same data, the ``s``-th run's sites prefixed
    ``particle{s}/`` and its gates drawn with the ``s``-th noise; the ``pyro.param`` sites are shared. Its
    log joint (and Laplace evidence, ELBO, CV objective) is the sum of the runs'."""

    def each(*args, **kwargs):
        mode = _state["mode"]
        try:
            for s in range(num_particles):
                mode["particle"] = s
                with scope(prefix=f"particle{s}"):
                    model(*args, **kwargs)
        finally:
            mode["particle"] = 0

    return each


@dataclass
class StructureSelection:
    """
    Result of :func:`select_structure`.

    :ivar structure: the hard structure, ``{name: 0/1 tensor}`` (a gate's switches; a choice's one-hot vector).
    :ivar objective: ``Q`` of the hard structure, exactly (no relaxation), with the other hyperparameters
        selected again for it.
    :ivar selection: that last :class:`~pyro_evidence.select.Selection`.
    :ivar probabilities: ``{name: σ(ℓ) or softmax ℓ}``, the structure prior ``p(Γ | h)`` selected.
    :ivar stages: ``[(τ, Selection)]`` of the relaxed objective at each temperature (its ``objective`` is the
        sum over the particles).
    :ivar undecided: ``[(name, index, ΔQ)]``: what the relaxation left undecided, in the order it was settled — a
        gate's switch ``index`` flipped, or a choice's alternative ``index`` taken — and what that changed the exact
        objective by, against the best structure found until then (kept where ``ΔQ > 0``).
    """

    structure: dict
    objective: torch.Tensor
    selection: object
    probabilities: dict
    stages: list = field(default_factory=list)
    undecided: list = field(default_factory=list)


def select_structure(model, *args, objective="laplace", method: str = "ift-exact", temperatures=(1.0, 0.5, 0.2, 0.1),
                     num_particles: int = 8, seed: int | None = 0, max_steps: int = 50, hyperparameters=None,
                     **options) -> StructureSelection:
    """
    Selects a model's structure (its :func:`gate` and :func:`choice` sites) with its other hyperparameters
    by the relaxed objective, annealing the temperature, then reads out the hard structure and evaluates it
    exactly (module docstring).

    :param temperatures: the annealing schedule, one selection per temperature, each warm-started from the last.
    :param int num_particles: noise draws ``S`` the relaxed objective averages over (``S`` copies of the latents).
    :param seed: the noise draws' seed (``None``: no noise, ``u = ½``, the relaxation's median).
    :param hyperparameters: the ``pyro.param`` sites to select besides the logits (default: all).
    :param options: passed to every :func:`~pyro_evidence.select.select_hyperparameters` call (``objective_options``,
        ``method_options``, ``optimizer``, ``lr``, ``tol``, ``progress``, ``model_kwargs``, ``init_loc_fn``, …).
    :rtype: StructureSelection
    """
    from .objectives import Objective, as_objective
    from .select import select_hyperparameters
    from .util import check_positive_int

    check_positive_int("num_particles", num_particles)
    if not temperatures or any(not t > 0 for t in temperatures):
        raise ValueError(f"temperatures must be a non-empty sequence of positive numbers, got {temperatures!r}")
    stages, names = [], _switches(model, args, options.get("model_kwargs"))
    if not names:
        raise ValueError("the model has no gate() or choice() site: there is no structure to select")
    objective = as_objective(objective, options.pop("objective_options", None))
    # the stages solve S copies of the latents at once: the inner solver's bound on a dense Hessian (Newton) is
    # one copy's (the ELBO's 100 guide parameters would otherwise leave 8 copies of 12 weights to L-BFGS alone)
    bound = min(num_particles * objective.objective.newton_max_dim, Objective.newton_max_dim)
    copies = objective.with_defaults(newton_max_dim=bound)
    for temperature in temperatures:
        with relaxed(temperature, num_particles, seed):
            sel = select_hyperparameters(particles(model, num_particles), *args, objective=copies, method=method,
                                         max_steps=max_steps, hyperparameters=_with_logits(hyperparameters, names), **options)
        stages.append((temperature, sel))
    logits = {LOGITS.format(n) for n in names}
    others = [n for n in (hyperparameters or sel.hyperparameters) if n not in logits]

    def exact():
        with hard():
            return select_hyperparameters(model, *args, objective=objective, method=method, max_steps=max_steps,
                                          hyperparameters=others or sorted(logits), **options)

    final, undecided = _settle(names, exact)
    store = {n: pyro.param(LOGITS.format(n)).detach() for n in names}
    structure = {n: names[n].hard(logits) for n, logits in store.items()}
    probabilities = {n: names[n].soft(logits) for n, logits in store.items()}
    return StructureSelection(structure, final.objective, final, probabilities, stages, undecided)


def _settle(names, exact, undecided=UNDECIDED):
    """``(selection, settled)``: the exact selection of the hard structure, after settling what the relaxation
    left undecided: a gate with ``|σ(ℓ) − ½| < undecided`` (one whose noise draws all saturate at a low
    temperature has no gradient left) is flipped, least decided first, and kept flipped where the exact objective
    rises; a choice whose most probable alternative has probability below ``½ + undecided`` has each of its other
    alternatives (the ``MAX_ALTERNATIVES`` most probable) evaluated exactly, and keeps the best. ``settled`` lists
    ``(name, index, ΔQ)`` for every switch or alternative tried."""
    best = exact()
    store = pyro.get_param_store()
    doubtful = [(float(pyro.param(LOGITS.format(n)).detach().reshape(-1)[i].abs()), n, i)
                for n, switch in names.items() if switch is _GATE
                for i, p in enumerate(torch.sigmoid(pyro.param(LOGITS.format(n)).detach()).reshape(-1).tolist())
                if abs(p - 0.5) < undecided]
    settled = []
    for _, name, i in sorted(doubtful):
        flipped = pyro.param(LOGITS.format(name)).detach().clone().reshape(-1)  # with the flips kept so far
        flipped[i] = -flipped[i] if flipped[i] != 0 else -1.0
        best = _try(store, name, i, flipped, exact, best, settled)
    for name, switch in names.items():
        if switch is _GATE:
            continue
        logits = pyro.param(LOGITS.format(name)).detach().clone()
        p = torch.softmax(logits, -1)
        if float(p.max()) >= 0.5 + undecided:
            continue
        chosen = int(logits.argmax())
        for a in p.argsort(descending=True)[:MAX_ALTERNATIVES].tolist():
            if a != chosen:  # ``a`` made the most probable alternative by the least change of its logit
                moved = logits.clone()
                moved[a] = logits.max() + 1.0
                best = _try(store, name, a, moved, exact, best, settled)
    return best, settled


MAX_ALTERNATIVES = 16  # alternatives of an undecided choice evaluated exactly


def _try(store, name, index, logits, exact, best, settled):
    """The exact selection with ``name``'s logits replaced by ``logits``: kept (and returned) where its objective
    beats ``best``'s, else the param store is restored; ``(name, index, ΔQ)`` is appended to ``settled``."""
    before = {k: v.detach().clone() for k, v in store.items()}
    shape = pyro.param(LOGITS.format(name)).shape
    _write(store, LOGITS.format(name), logits.reshape(shape))
    other = exact()
    settled.append((name, index, float(other.objective - best.objective)))
    if float(other.objective) > float(best.objective):
        return other
    for k, v in before.items():
        _write(store, k, v)
    return best


def _write(store, name, value):
    """Sets a param site's constrained value in place (its constraint kept)."""
    with torch.no_grad():
        unconstrained = store.get_param(name)
        store[name] = value.to(unconstrained)


def _switches(model, args, model_kwargs):
    """``{name: _Switch}`` of the model's gates and choices, from the run that casts its params to the data's
    dtype and device."""
    from .problem import Problem

    with relaxed(1.0, seed=None) as mode:
        Problem(model, *args, model_kwargs=model_kwargs)
    return mode["names"]


def _with_logits(hyperparameters, names):
    if hyperparameters is None:
        return None
    return list(hyperparameters) + [LOGITS.format(n) for n in names if LOGITS.format(n) not in hyperparameters]
