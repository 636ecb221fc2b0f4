import io
from argparse import Namespace

import pyro
import pytest
import torch

from pyro_evidence import select_hyperparameters
from pyro_evidence.cli import select
from pyro_evidence.datasets import diabetes
from pyro_evidence.models import linear_regression
from pyro_evidence.placement import choose_device, gradient_seconds, place
from pyro_evidence.problem import Problem

from .common import assert_close


def test_auto_is_the_cpu_where_there_is_no_gpu(monkeypatch):
    X, y = diabetes()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device(linear_regression, X, y) == torch.device("cpu")


def test_a_small_problem_never_asks_the_gpu(monkeypatch):
    """Below min_work (rows × latents) the CPU is chosen without building the problem on a GPU."""
    X, y = diabetes()  # 442 rows × 10 latents
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def no_gpu(*args, **kwargs):
        raise AssertionError("the GPU was asked")

    monkeypatch.setattr(torch.cuda, "current_device", no_gpu)
    pyro.get_param_store()["prior_precision"] = torch.tensor(3.0)
    assert choose_device(linear_regression, X, y, min_work=4421) == torch.device("cpu")
    with pytest.raises(AssertionError, match="the GPU was asked"):
        choose_device(linear_regression, X, y, min_work=4420)
    assert float(pyro.param("prior_precision").detach()) == 3.0 and "noise_precision" not in pyro.get_param_store()


def test_place_moves_the_data_or_refuses_a_missing_gpu():
    X, y = diabetes()
    assert place(None, linear_regression, (X, y)) == (X, y)
    moved = place("cpu", linear_regression, (X, y.long()))
    assert moved[1].dtype == torch.int64 and moved[0].device == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda': CUDA is not available"):
            place("cuda", linear_regression, (X, y))


def test_gradient_seconds_times_the_replayed_gradient():
    X, y = diabetes()
    seconds = gradient_seconds(Problem(linear_regression, X, y), repeats=3)
    assert 0 < seconds < 10


def test_auto_selects_as_the_device_it_chooses():
    X, y = diabetes()
    sel = select_hyperparameters(linear_regression, X, y, device="auto", progress=False)
    pyro.clear_param_store()
    plain = select_hyperparameters(linear_regression, X, y, progress=False)
    assert sel.problem.device == choose_device(linear_regression, X, y)
    assert_close(sel.objective.cpu(), plain.objective, rtol=1e-10)


def test_the_select_command_takes_auto():
    args = Namespace(case="linear-diabetes", objective="laplace", method="ift-exact", max_steps=50, n_trials=None,
                     storage=None, study_name=None, seed=0, heartbeat_interval=None, grace_period=None, checkpoint=None,
                     resume=False, overwrite=False, device="auto", progress=False)
    out = io.StringIO()
    sel = select(args, out=out)
    assert f"on {sel.problem.device}" in out.getvalue() and sel.converged
