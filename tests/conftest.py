import importlib
import os

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


@pytest.fixture(scope="session")
def postgresql_url():
    """A fresh PostgreSQL database for the session (tests/postgres.py). Skipped where no server can run here,
    unless ``PYRO_EVIDENCE_POSTGRES=required`` (as ``.ci/run`` sets it), which makes that a failure."""
    from .postgres import server

    required = os.environ.get("PYRO_EVIDENCE_POSTGRES") == "required"
    running = server()
    try:
        importlib.import_module("psycopg2")  # the driver of the URL
        url = running.__enter__()
    except (ImportError, LookupError) as e:
        if required:
            pytest.fail(f"PYRO_EVIDENCE_POSTGRES=required, but {e}")
        pytest.skip(f"no PostgreSQL server here: {e}")
    yield url
    running.__exit__(None, None, None)
