"""
Online selection of a network's prior: minibatch training of ``θ`` interleaved with steps of ``h`` on the Laplace
evidence (Immer, Bauer, Fortuin, Rätsch & Khan 2021, Algorithm 1).

Each epoch takes Adam steps of ``θ`` on minibatches ``B`` of the rows,

.. math::

    L_B(\\theta, h) = -\\frac{N}{|B|} \\sum_{n \\in B} \\log p(y_n \\mid \\theta) - \\log p(\\theta \\mid h),

an unbiased estimate of the inner loss ``L(θ, h)``; every ``frequency`` epochs after ``burnin``, ``hyper_steps``
Adam steps of ``h`` ascend the Laplace evidence ``Q(θ, h)`` of the structure asked for (K-FAC by default) at the
current ``θ`` on all the data, with the exact ``∂Q/∂h`` (``θ`` held: the post-hoc gradient, no implicit term).
Where the two meet, ``θ`` is the mode of ``L(·, h)`` and ``∂Q/∂h = 0``: for a model whose curvature does not depend
on ``θ`` (linear-Gaussian) that is the nested selection's maximum; for a network, the fixed point of the
Gauss–Newton model of it.

Reference:
    A. Immer, M. Bauer, V. Fortuin, G. Rätsch, M. E. Khan, *Scalable marginal likelihood estimation for model
    selection in deep learning*, ICML 2021.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, CheckpointLock, check_path
from .hypergrad.implicit import partial_hypergradient
from .objectives.curvature import refuse_symmetric
from .objectives.laplace import LaplaceObjective
from .objectives.spec import Laplace, as_objective
from .problem import Problem
from .util import check_positive_int, fingerprint, mismatch

__all__ = ["EvidenceStep", "OnlineSelection", "train_with_evidence"]

FORMAT = "pyro-evidence/online/1"


@dataclass
class EvidenceStep:
    """The evidence after one round of hyperparameter steps: the ``epoch`` it followed, ``Q(θ, h)`` at the new ``h``,
    the constrained ``hyperparameters``, ``max |∂Q/∂h|`` there and the ``seconds`` since the start."""

    epoch: int
    objective: float
    hyperparameters: dict
    grad_norm: float
    seconds: float


@dataclass
class OnlineSelection:
    """
    Result of :func:`train_with_evidence`.

    :ivar theta: the trained network, flat unconstrained ``θ``.
    :ivar h: the selected hyperparameters, flat unconstrained; ``hyperparameters`` constrained (also written to
        Pyro's param store).
    :ivar objective: ``Q(θ, h)`` at the end (the Laplace evidence of the structure at the trained network).
    :ivar history: an :class:`EvidenceStep` per round of hyperparameter steps.
    :ivar losses: the mean minibatch loss ``L_B`` of each epoch.
    :ivar grad_norm: ``max |∂Q/∂h|`` at the end; ``theta_grad_norm``: ``‖∇_θ L‖`` on all the data at the end.
    :ivar converged: both are within their tolerances (``tol`` and the inner solver's): the pair is a verified
        fixed point. Minibatch training rarely ends exactly at one; False is the honest answer then.
    """

    theta: torch.Tensor
    h: torch.Tensor
    hyperparameters: dict
    objective: torch.Tensor
    history: list
    losses: list
    grad_norm: float
    theta_grad_norm: float
    converged: bool
    problem: Problem | None = field(default=None, repr=False)

    @property
    def value(self) -> torch.Tensor:
        """The result's main value, ``objective``."""
        return self.objective


def train_with_evidence(model, *args, model_kwargs: dict | None = None, objective=None, epochs: int = 100,
                        batch_size: int | None = None, lr: float = 1e-3, lr_hyper: float = 0.1, hyper_steps: int = 10,
                        frequency: int = 1, burnin: int = 0, init_loc_fn=None, theta_init=None, seed: int = 0,
                        tol: float | None = None, progress: bool | None = None, checkpoint=None) -> OnlineSelection:
    """
    Trains a Pyro model's latents by minibatch Adam and its ``pyro.param`` hyperparameters by Adam on the Laplace
    evidence every ``frequency`` epochs (see the module's docstring).

    :param model: a Pyro model whose prior takes its hyperparameters from ``pyro.param``; ``args`` its data (rows
        first).
    :param objective: the evidence, a :class:`~pyro_evidence.objectives.spec.Laplace` (default
        ``Laplace(hessian="kron")``; any structure, ``kron_bias=`` too).
    :param int epochs: passes over the data.
    :param int batch_size: rows per minibatch (default: all, full-batch Adam).
    :param float lr: Adam's step size for ``θ``; ``lr_hyper`` for ``h``.
    :param int hyper_steps: Adam steps of ``h`` per round; ``frequency``: epochs between rounds; ``burnin``: epochs
        before the first.
    :param init_loc_fn: Pyro's init strategy for ``θ``'s start (a network needs one that breaks the symmetry of its
        units); ``theta_init``: a start given (flat ``θ``, ``{site: value}`` or a ``torch.nn.Module``).
    :param int seed: the minibatches' order.
    :param float tol: the bound on ``max |∂Q/∂h|`` for ``converged`` (default ``10·√ε``).
    :param progress: a tqdm bar over the epochs (default: in a terminal).
    :param checkpoint: a path or :class:`~pyro_evidence.checkpoint.Checkpoint`: the state (``θ``, ``h``, both
        optimisers, the epoch, the history) written after every ``every`` epochs; ``resume=True`` continues from it.
        Ctrl-C returns the state after the last whole epoch.
    :rtype: OnlineSelection
    """
    spec = _check(objective, epochs, hyper_steps, frequency, burnin, lr, lr_hyper)
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = Checkpoint(os.fspath(checkpoint))
    problem = Problem(model, *args, model_kwargs=model_kwargs, require_hyperparameters=True, init_loc_fn=init_loc_fn)
    n = problem.num_data
    batch = n if batch_size is None else batch_size
    check_positive_int("batch_size", batch)
    if batch > n:
        raise ValueError(f"batch_size must lie in [1, N = {n}], got {batch}")
    obj = LaplaceObjective(problem, **spec.options)
    if not obj.refit:
        raise ValueError("train_with_evidence trains θ: refit=False/at= belong to the post-hoc route "
                         "(select_hyperparameters(objective=Laplace(refit=False, at=...)))")
    theta = (problem.theta_init if theta_init is None else problem.theta_at(theta_init)).clone()
    refuse_symmetric(problem, theta, problem.h_init)
    theta.requires_grad_(True)
    h = problem.h_init.clone().requires_grad_(True)
    opt_theta, opt_h = torch.optim.Adam([theta], lr=lr), torch.optim.Adam([h], lr=lr_hyper)
    tol = 10 * torch.finfo(problem.dtype).eps ** 0.5 if tol is None else tol
    state = {"epoch": 0, "history": [], "losses": [], "seconds": 0.0}
    key = fingerprint(problem, objective="laplace", route="online", objective_options=spec.options, epochs=epochs,
                      batch_size=batch, lr=lr, lr_hyper=lr_hyper, hyper_steps=hyper_steps, frequency=frequency,
                      burnin=burnin, seed=seed)
    if checkpoint is not None:
        check_path(checkpoint.path, checkpoint.resume, checkpoint.overwrite)
    rounds = (hyper_steps, frequency, burnin)
    _loop(obj, theta, h, (opt_theta, opt_h), state, epochs, batch, seed, rounds, checkpoint, key, progress)
    return _result(obj, theta.detach(), h.detach(), state, tol)


def _loop(obj, theta, h, optimizers, state, epochs, batch, seed, rounds, checkpoint, key, progress):
    """The epochs from ``state["epoch"]`` on (a resumed run's from its checkpoint's), updating ``state``; Ctrl-C
    leaves ``θ``, ``h`` and ``state`` as they were after the last whole epoch."""
    problem, (opt_theta, opt_h), (hyper_steps, frequency, burnin) = obj.problem, optimizers, rounds
    lock = CheckpointLock(checkpoint.path) if checkpoint is not None else None
    bar = tqdm(total=epochs, desc="train with evidence", disable=None if progress is None else not progress)
    start, whole = time.perf_counter(), (theta.detach().clone(), h.detach().clone())
    try:
        if lock is not None:
            lock.__enter__()
            if checkpoint.resume:
                _load(checkpoint.path, key, theta, h, opt_theta, opt_h, state, problem)
                bar.update(state["epoch"])
        start -= state["seconds"]
        while state["epoch"] < epochs:
            epoch = state["epoch"] + 1
            whole = (theta.detach().clone(), h.detach().clone())  # what an interrupt mid-epoch returns to
            loss = _epoch(problem, theta, h, opt_theta, batch, np.random.default_rng([seed, epoch]))
            state["losses"].append(loss)
            if epoch > burnin and (epoch - burnin) % frequency == 0:
                step = _hyper_round(obj, theta, h, opt_h, hyper_steps)
                state["history"].append(EvidenceStep(epoch, *step, time.perf_counter() - start))
            state["epoch"], state["seconds"] = epoch, time.perf_counter() - start
            if checkpoint is not None and (epoch % checkpoint.every == 0 or epoch == epochs):
                _save(checkpoint.path, key, theta, h, opt_theta, opt_h, state)
            bar.update(1)
            last = state["history"][-1].objective if state["history"] else math.nan
            bar.set_postfix(loss=f"{loss:.5g}", Q=f"{last:.6g}")
    except KeyboardInterrupt:
        if state["epoch"] == 0:
            raise KeyboardInterrupt("interrupted during the first epoch: nothing trained yet to return") from None
        warnings.warn(f"training interrupted; returning the state after epoch {state['epoch']}", RuntimeWarning,
                      stacklevel=3)
        with torch.no_grad():  # an epoch cut short would leave θ part-way
            theta.copy_(whole[0])
            h.copy_(whole[1])
        del state["history"][len([s for s in state["history"] if s.epoch <= state["epoch"]]):]
        del state["losses"][state["epoch"]:]
    finally:
        bar.close()
        if lock is not None:
            lock.__exit__(None, None, None)


def _check(objective, epochs, hyper_steps, frequency, burnin, lr, lr_hyper):
    """The Laplace spec to select on; a ``ValueError`` naming any option out of its range."""
    spec = Laplace(hessian="kron") if objective is None else as_objective(objective)
    if not isinstance(spec, Laplace):
        raise ValueError(f"train_with_evidence selects on the Laplace evidence: objective=Laplace(...), got {spec!r}")
    for name, value in (("epochs", epochs), ("hyper_steps", hyper_steps), ("frequency", frequency)):
        check_positive_int(name, value)
    if not isinstance(burnin, int) or burnin < 0:
        raise ValueError(f"burnin must be an int >= 0, got {burnin!r}")
    for name, value in (("lr", lr), ("lr_hyper", lr_hyper)):
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be > 0, got {value!r}")
    return spec


def _epoch(problem, theta, h, opt, batch, rng):
    """One pass over the rows in minibatches of ``batch``: Adam on ``L_B``; returns the mean ``L_B``."""
    n, losses = problem.num_data, []
    order = torch.as_tensor(rng.permutation(n), device=problem.device)
    for start in range(0, n - batch + 1, batch):  # whole minibatches only: each L_B is unbiased
        rows = order[start:start + batch]
        args = tuple(a[rows] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == n else a for a in problem.args)
        opt.zero_grad()
        prior, per_row = problem.terms(theta, h.detach(), args)
        loss = -(prior + per_row.sum() * (n / batch))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


def _hyper_round(obj, theta, h, opt, steps):
    """``steps`` Adam steps of ``h`` up ``Q(θ, h)`` at the current ``θ``; ``(Q, hyperparameters, max |∂Q/∂h|)`` after
    them."""
    t = theta.detach().clone()
    obj.curvature.hold(t, h.detach())  # θ is fixed for the round: the factors once, not once per step
    try:
        for _ in range(steps):
            opt.zero_grad()
            q = obj.validation(t, h)
            (-q).backward()
            opt.step()
        value, g = _value_and_grad(obj, t, h.detach())
    finally:
        obj.curvature.hold(None, h)
    params = {k: v.detach().clone() for k, v in obj.problem.params(h.detach()).items()}
    return value, params, g


def _value_and_grad(obj, theta, h):
    """``Q(θ, h)`` and ``max |∂Q/∂h|`` at a ``θ`` held."""
    hg = partial_hypergradient(obj.validation, theta, h.detach())
    return float(hg.value), float(hg.grad.abs().max()) if hg.grad.numel() else 0.0


def _result(obj, theta, h, state, tol):
    problem = obj.problem
    value, gmax = _value_and_grad(obj, theta, h)
    m = obj.evaluate(h, theta)
    problem.write_params(h)
    return OnlineSelection(
        theta=theta, h=h, hyperparameters={k: v.detach() for k, v in problem.params(h).items()},
        objective=torch.tensor(value, dtype=problem.dtype, device=problem.device), history=state["history"],
        losses=state["losses"], grad_norm=gmax, theta_grad_norm=m.grad_norm,
        converged=bool(m.converged and gmax <= tol), problem=problem,
    )


def _save(path, key, theta, h, opt_theta, opt_h, state):
    """Write-then-rename, as the selection's checkpoints: a kill never leaves half a file."""
    history = state["history"]
    payload = {
        "format": FORMAT, "fingerprint": json.dumps(key, sort_keys=True), "epoch": state["epoch"],
        "seconds": state["seconds"], "theta": theta.detach().clone(), "h": h.detach().clone(),
        "opt_theta": opt_theta.state_dict(), "opt_h": opt_h.state_dict(),
        "losses": torch.tensor(state["losses"], dtype=torch.float64),
        "steps": {"epoch": torch.tensor([s.epoch for s in history], dtype=torch.long),
                  "objective": torch.tensor([s.objective for s in history], dtype=torch.float64),
                  "grad_norm": torch.tensor([s.grad_norm for s in history], dtype=torch.float64),
                  "seconds": torch.tensor([s.seconds for s in history], dtype=torch.float64),
                  "hyperparameters": {k: torch.stack([s.hyperparameters[k] for s in history])
                                      for k in (history[0].hyperparameters if history else {})}},
    }
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load(path, key, theta, h, opt_theta, opt_h, state, problem):
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume=True but there is no checkpoint at {path!r}")
    try:
        payload = torch.load(path, weights_only=True, map_location=problem.device)
    except Exception as e:  # noqa: BLE001 - any unreadable file is refused with its reason
        raise ValueError(f"checkpoint {path!r} cannot be read ({e}); delete it, or run again with resume=False and "
                         "overwrite=True to start afresh") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a checkpoint of train_with_evidence (format {FORMAT!r})")
    reason = mismatch(json.loads(payload["fingerprint"]), key)
    if reason is not None:
        raise ValueError(f"checkpoint {path!r} belongs to another run: {reason}")
    kw = {"dtype": problem.dtype, "device": problem.device}
    with torch.no_grad():
        theta.copy_(payload["theta"].to(**kw))
        h.copy_(payload["h"].to(**kw))
    opt_theta.load_state_dict(payload["opt_theta"])
    opt_h.load_state_dict(payload["opt_h"])
    steps = payload["steps"]
    state.update(epoch=int(payload["epoch"]), seconds=float(payload["seconds"]), losses=payload["losses"].tolist())
    state["history"] = [
        EvidenceStep(int(steps["epoch"][i]), float(steps["objective"][i]),
                     {k: v[i].to(**kw) for k, v in steps["hyperparameters"].items()}, float(steps["grad_norm"][i]),
                     float(steps["seconds"][i]))
        for i in range(steps["epoch"].numel())
    ]
