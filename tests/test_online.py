import warnings

import pyro
import pytest
import torch

import pyro_evidence as pe
import pyro_evidence.online as online
from pyro_evidence.datasets import diabetes
from pyro_evidence.models import linear_regression

from .common import assert_close


def _nested():
    X, y = diabetes()
    pyro.clear_param_store()
    sel = pe.select_hyperparameters(linear_regression, X, y, progress=False)
    pyro.clear_param_store()
    return X, y, sel


def test_the_online_route_reaches_the_nested_selection_on_a_linear_gaussian_model():
    """The curvature of a linear-Gaussian model does not depend on θ, so the fixed point of θ ← mode and
    h ← argmax ∂Q/∂h is the nested maximum; full-batch Adam gets there within its step size's oscillation."""
    X, y, sel = _nested()
    r = pe.train_with_evidence(linear_regression, X, y, epochs=120, lr=0.1, lr_hyper=0.2, hyper_steps=5, progress=False)
    for name, value in sel.hyperparameters.items():
        assert_close(r.hyperparameters[name], value, rtol=2e-3)
    assert abs(float(r.objective) - float(sel.objective)) < 1e-3
    assert len(r.losses) == 120 and len(r.history) == 120 and r.history[-1].epoch == 120
    # the evidence reported is the Laplace evidence at the trained network
    again = pe.laplace_evidence(linear_regression, X, y, hessian="kron", at=r.theta)
    assert_close(again.log_evidence, r.objective, rtol=1e-12)
    assert_close(r.theta_grad_norm, again.grad_norm, rtol=1e-6)  # (the param store keeps h in its float32)


def test_minibatches_land_near_the_nested_selection():
    X, y, sel = _nested()
    r = pe.train_with_evidence(linear_regression, X, y, epochs=40, batch_size=64, lr=0.02, lr_hyper=0.2, hyper_steps=5,
                               progress=False)
    assert_close(r.hyperparameters["prior_precision"], sel.hyperparameters["prior_precision"], rtol=0.05)
    assert_close(r.hyperparameters["noise_precision"], sel.hyperparameters["noise_precision"], rtol=0.02)
    assert abs(float(r.objective) - float(sel.objective)) < 1.0 and not r.converged


def test_a_resumed_run_continues_where_the_checkpoint_ended(tmp_path):
    X, y = diabetes()
    options = dict(epochs=6, batch_size=128, lr=0.05, hyper_steps=3, progress=False)
    pyro.clear_param_store()
    whole = pe.train_with_evidence(linear_regression, X, y, **options)
    path = str(tmp_path / "online.pt")
    calls = []
    real = online._epoch

    def killed_in_epoch_4(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    pyro.clear_param_store()
    online._epoch = killed_in_epoch_4
    try:
        with pytest.warns(RuntimeWarning, match="returning the state after epoch 3"):
            cut = pe.train_with_evidence(linear_regression, X, y, checkpoint=path, **options)
    finally:
        online._epoch = real
    assert len(cut.losses) == 3 and [s.epoch for s in cut.history] == [1, 2, 3]
    pyro.clear_param_store()
    resumed = pe.train_with_evidence(linear_regression, X, y, checkpoint=pe.Checkpoint(path, resume=True), **options)
    assert torch.equal(resumed.theta, whole.theta) and torch.equal(resumed.h, whole.h)
    assert resumed.losses == whole.losses and [s.objective for s in resumed.history] == [s.objective for s in whole.history]
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="belongs to another run: batch_size differ"):
        pe.train_with_evidence(linear_regression, X, y, checkpoint=pe.Checkpoint(path, resume=True),
                               **{**options, "batch_size": 64})


def test_bad_options_are_named():
    X, y = diabetes()
    for kwargs, message in (({"objective": "elbo"}, "Laplace evidence"), ({"batch_size": 10_000}, "batch_size must lie"),
                            ({"epochs": 0}, "epochs must be a positive int"), ({"lr": -1.0}, "lr must be > 0"),
                            ({"objective": pe.Laplace(refit=False)}, "post-hoc route")):
        pyro.clear_param_store()
        with pytest.raises(ValueError, match=message):
            pe.train_with_evidence(linear_regression, X, y, progress=False, **kwargs)
    with pytest.raises(KeyboardInterrupt, match="first epoch"), warnings.catch_warnings():
        real, online._epoch = online._epoch, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt)
        try:
            pe.train_with_evidence(linear_regression, X, y, progress=False)
        finally:
            online._epoch = real
