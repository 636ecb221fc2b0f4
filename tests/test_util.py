import random

import numpy as np
import pyro
import pytest
import torch

from pyro_evidence import Problem
from pyro_evidence.datasets import diabetes
from pyro_evidence.models import linear_regression
from pyro_evidence.util import describe, digest, fingerprint, isolated_params, mismatch, seeded


def test_isolated_params_restores_the_store_exactly():
    pyro.param("kept", torch.tensor(1.0))
    pyro.param("changed", torch.tensor(2.0))
    with isolated_params():
        assert float(pyro.param("kept").detach()) == 1.0
        pyro.get_param_store()["changed"] = torch.tensor(5.0)
        pyro.param("created", torch.tensor(3.0))
    store = pyro.get_param_store()
    assert sorted(store.keys()) == ["changed", "kept"]
    assert float(store["changed"].detach()) == 2.0
    with isolated_params(clear=True):
        assert len(pyro.get_param_store()) == 0
    assert sorted(pyro.get_param_store().keys()) == ["changed", "kept"]


def test_seeded_blocks_are_reproducible_and_leave_the_generators_alone():
    torch.manual_seed(123)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    draws = []
    for _ in range(2):
        with seeded(7):
            draws.append((torch.randn(3), np.random.rand(), random.random()))
    assert torch.equal(draws[0][0], draws[1][0]) and draws[0][1:] == draws[1][1:]
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


def test_digest_tells_data_apart():
    x = torch.arange(6.0).reshape(2, 3)
    assert digest(x) == digest(x.clone())
    y = x.clone()
    y[1, 2] = 5.0 + 1e-6
    assert digest(y) != digest(x)
    assert digest(x.double()) != digest(x)  # dtype
    assert digest(x.reshape(3, 2)) != digest(x)  # shape
    assert digest({"a": 1, "b": (x, None)}) == digest({"b": (x.clone(), None), "a": 1})


def test_describe_names_functions_partials_and_modules():
    from functools import partial

    assert describe(linear_regression) == "pyro_evidence.models.linear.linear_regression"
    assert describe(partial(linear_regression, ard=True)) != describe(partial(linear_regression, ard=False))
    assert describe(partial(linear_regression, ard=True)) == describe(partial(linear_regression, ard=True))
    assert describe(torch.nn.Linear(2, 3)) == "torch.nn.modules.linear.Linear"


def test_fingerprint_and_mismatch():
    X, y = diabetes()
    a = fingerprint(Problem(linear_regression, X, y), objective="laplace", options={"k": 4})
    pyro.clear_param_store()
    b = fingerprint(Problem(linear_regression, X, y), objective="laplace", options={"k": 4})
    assert a == b and mismatch(a, b) is None
    pyro.clear_param_store()
    c = fingerprint(Problem(linear_regression, X, y, model_kwargs={"ard": True}), objective="laplace", options={"k": 4})
    assert mismatch(a, c).endswith("now: {'prior_precision': [10], 'noise_precision': []})")
    assert mismatch(a, {**a, "objective": "cv"}) == "objective differ (saved: 'laplace', now: 'cv')"
    with pytest.raises(TypeError):
        hash(a["hyperparameters"])  # JSON-clean: plain dicts and lists, no tensors


def test_stop_check_answers_at_once_on_the_cpu_and_one_call_late_on_cuda(device):
    from pyro_evidence.util import StopCheck

    stop = StopCheck(device)
    flags = [False, True, True]
    answers = [stop(torch.tensor(flag, device=device)) for flag in flags]
    # on CUDA each answer is the previous call's flag, read without waiting for the one just queued
    assert answers == (flags if device.type == "cpu" else [False, *flags[:-1]])
