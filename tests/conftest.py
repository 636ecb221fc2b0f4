import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_param_store():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
