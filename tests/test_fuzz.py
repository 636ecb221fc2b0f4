"""
Property-based fuzzing of the conjugate models, whose evidence, hypergradient and optimum have closed forms.

Each case is a linear-Gaussian regression drawn at random: 1–60 rows, 1–5 features, a vector ``y`` or several
outputs in a second plate sharing the hyperparameters, no mask or a mask by ``poutine.mask`` or Pyro's
``obs_mask`` (whose masked values are garbage, to show they are never read), a shared or per-feature (ARD) prior
precision, float32 or float64, data and hyperparameters over four orders of magnitude. The library must match
``log N(y_j | 0, β⁻¹ I + X_j A⁻¹ X_jᵀ)`` summed over the outputs ``j`` (each on its observed rows), its gradient,
and — for a selection — call ``converged`` only a point where the closed form's gradient is small and from which
a quasi-Newton ascent of the closed form finds nothing higher; or raise a clear error.

The suite runs a fixed, derandomised budget; ``PYRO_EVIDENCE_FUZZ=long`` runs 10,000 cases of the evidence and
1,000 of the selection (benchmarks/results/fuzz.md has the command and what it found).
"""

import math
import os
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.optimize
import torch
from torch.distributions import constraints

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pyro_evidence as pe  # noqa: E402
from pyro_evidence.linalg import NotPositiveDefiniteError  # noqa: E402

pytestmark = pytest.mark.fuzz

LONG = os.environ.get("PYRO_EVIDENCE_FUZZ") == "long"
_COMMON = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=not LONG,
               print_blob=True)
EVIDENCE = settings(max_examples=10_000 if LONG else 60, **_COMMON)
OPTIMUM = settings(max_examples=1_000 if LONG else 8, **_COMMON)
CLEAR_ERRORS = (ValueError, TypeError, FloatingPointError, NotPositiveDefiniteError)


@st.composite
def cases(draw):
    n, d = draw(st.integers(1, 60)), draw(st.integers(1, 5))
    outputs = draw(st.sampled_from([0, 1, 3]))  # 0: a vector y in one plate; else an (N, m) y in two plates
    masking = draw(st.sampled_from(["none", "poutine", "obs_mask"]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    ard = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    x_scale, y_scale = 10.0 ** draw(st.floats(-2, 2)), 10.0 ** draw(st.floats(-2, 2))
    alpha = 10.0 ** np.array(draw(st.lists(st.floats(-2, 2), min_size=d if ard else 1, max_size=d if ard else 1)))
    beta = 10.0 ** draw(st.floats(-2, 2))
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if outputs == 0 else (n, outputs)
    X = x_scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, max(outputs, 1), generator=g, dtype=torch.float64)
    y = (X @ w).reshape(shape) / x_scale * y_scale + y_scale * torch.randn(shape, generator=g, dtype=torch.float64)
    mask = torch.rand(shape, generator=g) < draw(st.floats(0.3, 1.0)) if masking != "none" else None
    if mask is not None and not mask.any():
        mask.view(-1)[0] = True
    return dict(X=X.to(dtype), y=y.to(dtype), mask=mask, masking=masking, outputs=outputs, ard=ard,
                alpha=torch.tensor(alpha, dtype=dtype).reshape(-1) if ard else torch.tensor(alpha[0], dtype=dtype),
                beta=torch.tensor(beta, dtype=dtype))


def make_model(case):
    outputs, masking, ard = case["outputs"], case["masking"], case["ard"]
    d = case["X"].shape[1]

    def model(X, y=None, mask=None):
        alpha = pyro.param("prior_precision", lambda: torch.ones(d) if ard else torch.tensor(1.0),
                           constraint=constraints.positive)
        beta = pyro.param("noise_precision", torch.tensor(1.0), constraint=constraints.positive)
        prior = dist.Normal(0.0, alpha.rsqrt()).expand([d]).to_event(1)
        if outputs:
            with pyro.plate("outputs", outputs, dim=-1):
                W = pyro.sample("W", prior)  # (m, d)
            mean = X @ W.T
            plates = [pyro.plate("outputs_y", outputs, dim=-1), pyro.plate("data", X.shape[0], dim=-2)]
        else:
            mean = X @ pyro.sample("w", prior)
            plates = [pyro.plate("data", X.shape[0], dim=-1)]
        with plates[0], (plates[1] if len(plates) > 1 else pyro.poutine.mask(mask=True)):
            likelihood = dist.Normal(mean, beta.rsqrt())
            if masking == "obs_mask":
                pyro.sample("y", likelihood, obs=y, obs_mask=mask)
            elif masking == "poutine":
                with pyro.poutine.mask(mask=mask):
                    pyro.sample("y", likelihood, obs=y)
            else:
                pyro.sample("y", likelihood, obs=y)

    return model


def closed_form(case, log_alpha, log_beta):
    """``Σ_j log N(y_j | 0, β⁻¹ I + X_j A⁻¹ X_jᵀ)`` in float64, differentiable in ``log α`` and ``log β``: in weight
    space, ``½ Σ log α + ½ n log β − ½ n log 2π − ½ log det S − ½ β‖y‖² + ½ β² bᵀ S⁻¹ b`` with ``S = A + β XᵀX`` and
    ``b = Xᵀy`` (Bishop 2006, eq. 3.86), which stays finite where ``β⁻¹ I + X A⁻¹ Xᵀ`` rounds to singular."""
    X, y = case["X"].double(), case["y"].double()
    Y = y.reshape(X.shape[0], -1)
    M = torch.ones_like(Y, dtype=torch.bool) if case["mask"] is None else case["mask"].reshape(Y.shape)
    log_a = log_alpha.expand(X.shape[1])
    beta = log_beta.exp().squeeze()
    total = torch.zeros((), dtype=torch.float64)
    for j in range(Y.shape[1]):
        rows = M[:, j]
        Xj, yj, n = X[rows], Y[rows, j], int(rows.sum())
        S = torch.diag(log_a.exp()) + beta * Xj.T @ Xj
        L = torch.linalg.cholesky(S)
        c = torch.cholesky_solve((Xj.T @ yj).unsqueeze(-1), L).squeeze(-1)
        total = total + 0.5 * (log_a.sum() + n * log_beta.squeeze() - n * math.log(2 * math.pi)) \
            - L.diagonal().log().sum() - 0.5 * beta * (yj @ yj) + 0.5 * beta**2 * ((Xj.T @ yj) @ c)
    return total


def data(case):
    y = case["y"]
    if case["masking"] == "obs_mask":  # masked values are never read: make them garbage
        y = torch.where(case["mask"], y, torch.full_like(y, 1e6))
    return (case["X"], y), {"mask": case["mask"]} if case["masking"] != "none" else {}


def set_params(case, alpha, beta):
    pyro.clear_param_store()
    pyro.param("prior_precision", alpha.clone(), constraint=constraints.positive)
    pyro.param("noise_precision", beta.clone(), constraint=constraints.positive)


def tolerance(case, value):
    """1e-8 relative in float64; in float32, round-off of the sums over rows and of the Cholesky factor."""
    if case["X"].dtype == torch.float64:
        return 1e-8 * max(1.0, abs(value))
    return 2e-3 * max(1.0, abs(value))


def unconstrained(case):
    return case["alpha"].double().log().reshape(-1), case["beta"].double().log().reshape(1)


@EVIDENCE
@given(cases())
def test_evidence_and_hypergradient_match_the_closed_form(case):
    args, kwargs = data(case)
    model = make_model(case)
    log_alpha, log_beta = (t.requires_grad_(True) for t in unconstrained(case))
    exact = closed_form(case, log_alpha, log_beta)
    g_alpha, g_beta = torch.autograd.grad(exact, (log_alpha, log_beta))
    set_params(case, case["alpha"], case["beta"])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            ev = pe.laplace_evidence(model, *args, model_kwargs=kwargs)
        set_params(case, case["alpha"], case["beta"])
        hg = pe.laplace_hypergradient(model, *args, model_kwargs=kwargs)
    except CLEAR_ERRORS:
        assert case["X"].dtype == torch.float32, "a float64 conjugate model must not fail"
        return
    value = float(exact.detach())
    if case["X"].dtype == torch.float32 and any(issubclass(w.category, RuntimeWarning) for w in caught):
        return  # said so: an ill-conditioned Hessian or an unconverged mode in float32
    assert not caught
    assert abs(float(ev.log_evidence) - value) <= tolerance(case, value)
    expected = torch.cat([g_alpha, g_beta])
    scale = max(1.0, float(expected.abs().max()))
    rtol = 1e-6 if case["X"].dtype == torch.float64 else 5e-2
    assert float((hg.grad.double().cpu() - expected).abs().max()) <= rtol * scale


def closed_form_optimum(case, start):
    """The closed form maximised by L-BFGS-B in ``(log α, log β)`` from ``start``."""
    k = start.numel() - 1

    def negative(z):
        z = torch.as_tensor(z, dtype=torch.float64).requires_grad_(True)
        value = -closed_form(case, z[:k], z[k:])
        return float(value.detach()), torch.autograd.grad(value, z)[0].numpy()

    r = scipy.optimize.minimize(negative, start.numpy(), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return -float(r.fun)


@OPTIMUM
@given(cases())
@pytest.mark.filterwarnings("ignore:the selection ended:RuntimeWarning")
def test_selection_reaches_the_closed_form_optimum_and_converged_is_true_only_there(case):
    args, kwargs = data(case)
    model = make_model(case)
    set_params(case, torch.ones_like(case["alpha"]), torch.ones_like(case["beta"]))
    try:
        sel = pe.select_hyperparameters(model, *args, model_kwargs=kwargs, progress=False)
    except CLEAR_ERRORS:
        assert case["X"].dtype == torch.float32, "a float64 conjugate model must not fail"
        return
    h = sel.h.double().cpu()
    bound = h.abs() > math.log(1e6)
    if bool(bound[-1]):
        return  # β at a bound (10¹³, interpolating two rows): the closed form's round-off decides there
    k = case["alpha"].numel()
    z = h.clone().requires_grad_(True)
    value = closed_form(case, z[:k], z[k:])
    gradient = torch.autograd.grad(value, z)[0]
    value = value.detach()
    assert abs(float(sel.objective) - float(value)) <= tolerance(case, float(value))  # Q at the selection is exact
    if sel.converged:
        # stationary to the selection's tolerance (in the closed form, so up to the dtype's round-off) …
        stated = max(1e-6, 10 * torch.finfo(case["X"].dtype).eps ** 0.5)
        if not bound.all():
            assert float(gradient[~bound].abs().max()) <= 2 * stated
        # … a precision at a bound is a maximum along its coordinate: the closed form is no higher at any point
        # from 1 towards that bound (the others held) …
        for j in bound.nonzero().flatten().tolist():
            for u in torch.arange(0.0, math.log(1e6), 2.0, dtype=torch.float64) * torch.sign(h[j]):
                probe = h.clone()
                probe[j] = u
                probed = float(closed_form(case, probe[:k], probe[k:]))
                assert probed <= float(value) + max(tolerance(case, float(value)), 1e-5 * max(1.0, abs(float(value))))
        # … and, in float64, a local maximum: the closed form's own ascent from the selection finds nothing higher
        # (the evidence may have several: noise or signal explaining the data). In float32 the stated tolerance,
        # 3.4e-3 on dQ/dh, can end 0.45 nats short on a long flat slope (two rows): the fuzzer found it, the
        # docs say so, and float64 is the remedy
        if case["X"].dtype == torch.float64:
            reference = closed_form_optimum(case, h)
            assert float(value) >= reference - max(tolerance(case, reference), 1e-5 * max(1.0, abs(reference)))
