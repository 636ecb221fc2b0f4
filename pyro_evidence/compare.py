"""
Model comparison: Laplace evidence, ELBO, k-fold CV and PSIS-LOO side by side, and export to
ArviZ.

Every ArviZ call of the library lives in this module (ArviZ 0.2x: ``az.from_dict``, ``az.loo``),
so supporting another ArviZ line is this file's work.

Posterior model probabilities come from the evidence with a uniform prior over the models,
``p(f | D) = p(D | f) / Σ_g p(D | g)``.
"""

from __future__ import annotations

import warnings

import torch
from torch.func import vmap

from .objectives.cv import cv_log_predictive
from .objectives.elbo import elbo_evidence
from .objectives.laplace import laplace_evidence
from .problem import Problem
from .util import isolated_params

__all__ = ["compare_models", "to_inference_data", "laplace_draws"]


def laplace_draws(result, num_samples: int = 1000, seed: int = 0):
    """Draws ``θ_s ~ N(θ̂, C⁻¹)`` of a :class:`~pyro_evidence.LaplaceEvidence` in its curvature, shape ``(S, D)``."""
    return result.sample(num_samples, seed)


def laplace_rows(result, draws):
    """Per-row log-likelihoods ``(S, N)`` of the Laplace predictive at ``draws``: the model itself at each draw for
    the exact Hessian, the model linearised at the mode (the GLM predictive) for the GGN and its structures."""
    problem, h = result.problem, result.problem.h_init
    with torch.no_grad():
        if result.curvature is None or result.curvature.structure == "exact":
            return vmap(lambda t: problem.terms(t, h)[1])(draws)
        return result.curvature.source.linearised_rows(result.theta, h, draws - result.theta)


def _arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ 0.2x announces its 1.x refactor
        import arviz

    return arviz


def to_inference_data(model, *args, model_kwargs: dict | None = None, num_samples: int = 1000, seed: int = 0, result=None,
                      hessian: str = "exact"):
    """
    ArviZ ``InferenceData`` from the Laplace posterior of a Pyro model: ``posterior`` (the latent
    sites, constrained), ``log_likelihood`` (the per-row log-likelihood of every draw; rows that
    ``poutine.mask`` leaves out of the likelihood are left out here too) and ``observed_data``. ``az.loo``, ``az.waic``, ``az.compare`` and ArviZ's plots work on it.

    :param result: a :class:`~pyro_evidence.LaplaceEvidence` of the same model and data, to
        reuse (computed at the param store's hyperparameters if None, with curvature ``hessian``).
        Its curvature sets the draws, and for the GGN family the log-likelihood is the linearised (GLM)
        predictive's.
    """
    az = _arviz()
    result = result if result is not None else laplace_evidence(model, *args, model_kwargs=model_kwargs, hessian=hessian)
    problem = result.problem
    h = problem.h_init
    draws = laplace_draws(result, num_samples, seed)
    keep = problem.observed_rows()  # masked rows have no likelihood: PSIS has nothing to weigh there
    with torch.no_grad():
        rows = laplace_rows(result, draws)[:, keep]
        latents = vmap(lambda t: problem.latent_values(t, h))(draws)
    name = problem.observed[0] if len(problem.observed) == 1 else "y"
    observed = {}
    trace, _ = problem.trace(result.theta, h)
    for site in problem.observed:
        value = trace.nodes[site]["value"]
        if isinstance(value, torch.Tensor) and value.shape[:1] == (problem.num_data,):
            observed[site] = value[keep].detach().cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return az.from_dict(
            posterior={k: v.detach().cpu().numpy()[None] for k, v in latents.items()},
            log_likelihood={name: rows.detach().cpu().numpy()[None]},
            observed_data=observed or None,
        )


def _loo(idata):
    az = _arviz()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ 0.2x: pandas deprecations, high-k warnings (reported)
        return az.loo(idata, pointwise=True)


def _entries(models, args, model_kwargs):
    if not isinstance(models, dict) or not models:
        raise TypeError("models must be a non-empty dict {name: model} or {name: (model, args[, model_kwargs])}")
    out = {}
    for name, spec in models.items():
        if callable(spec):
            out[name] = (spec, args, dict(model_kwargs or {}))
        elif isinstance(spec, tuple) and 2 <= len(spec) <= 3 and callable(spec[0]):
            out[name] = (spec[0], tuple(spec[1]), dict(spec[2]) if len(spec) == 3 else {})
        else:
            raise TypeError(f"model {name!r}: expected a model or (model, args[, model_kwargs]), got {type(spec).__name__}")
        if not out[name][1]:
            raise ValueError(f"model {name!r} has no data: pass positional data to compare_models or in its tuple")
    return out


def _observed(problem):
    trace, _ = problem.trace(problem.theta_init, problem.h_init)
    return {s: trace.nodes[s]["value"] for s in problem.observed if not trace.nodes[s]["infer"].get("_deterministic")}


def compare_models(
    models: dict,
    *args,
    model_kwargs: dict | None = None,
    k: int = 4,
    select: bool = False,
    elbo: bool = True,
    num_samples: int = 1000,
    seed: int = 0,
    hessian: str = "exact",
):
    """
    One row per model: Laplace log evidence, ELBO (with its Monte-Carlo error), k-fold CV log
    predictive density, PSIS-LOO ``elpd_loo`` (ArviZ, from Laplace-posterior draws) with its
    ``p_loo`` and largest Pareto ``k``, and the posterior model probability from the evidence.

    :param dict models: ``{name: model}`` (all fitted to ``*args``) or
        ``{name: (model, args[, model_kwargs])}``; every model must explain the same observed data.
    :param bool select: first select each model's hyperparameters by Laplace evidence; each model
        works on its own copy of the param store, so models may share ``pyro.param`` names.
    :param str hessian: the Laplace curvature (``"exact"``, ``"ggn"``, ``"diag"``, ``"kron"``) for the evidence,
        the selection and the draws behind PSIS-LOO.
    :returns: a pandas ``DataFrame`` indexed by model name; ``hyperparameters`` holds the values
        used.
    """
    import pandas as pd

    from .select import select_hyperparameters

    entries = _entries(models, args, model_kwargs)
    rows, reference = {}, None
    for name, (model, data, kwargs) in entries.items():
        with isolated_params():  # each model starts from the caller's store and leaves nothing in it
            problem = Problem(model, *data, model_kwargs=kwargs)
            observed = _observed(problem)
            if reference is None:
                reference = (name, observed)
            elif not _same(observed, reference[1]):
                raise ValueError(
                    f"models {reference[0]!r} and {name!r} do not explain the same observed data; "
                    "their evidences cannot be compared"
                )
            if select:
                select_hyperparameters(model, *data, model_kwargs=kwargs, progress=False, objective_options={"hessian": hessian})
            lap = laplace_evidence(model, *data, model_kwargs=kwargs, hessian=hessian)
            row = {"log_evidence": float(lap.log_evidence)}
            if elbo:
                ev = elbo_evidence(model, *data, model_kwargs=kwargs, seed=seed)
                row.update(elbo=float(ev.elbo), elbo_se=float(ev.stderr))
            row["cv"] = float(cv_log_predictive(model, *data, k=k, seed=seed, model_kwargs=kwargs).value)
            loo = _loo(to_inference_data(model, *data, model_kwargs=kwargs, num_samples=num_samples, seed=seed, result=lap))
            row.update(elpd_loo=float(loo.elpd_loo), p_loo=float(loo.p_loo), pareto_k_max=float(loo.pareto_k.max()))
            row["hyperparameters"] = {n: v.detach().cpu() for n, v in lap.problem.params(lap.problem.h_init).items()}
            rows[name] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    log_ev = torch.tensor(table["log_evidence"].to_numpy())
    table.insert(1, "posterior_probability", torch.softmax(log_ev, 0).numpy())
    return table


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(
        isinstance(a[s], torch.Tensor) and a[s].shape == b[s].shape and torch.equal(a[s].to(b[s]), b[s]) for s in a
    )
