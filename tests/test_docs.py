"""The documentation site builds from the docstrings and the Markdown pages, warnings as errors."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_docs_build_without_a_warning(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html", os.path.join(ROOT, "docs"),
         str(tmp_path / "html")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    api = (tmp_path / "html" / "api.html").read_text()
    for name in ("select_hyperparameters", "SearchOptions", "laplace_evidence", "LaplaceCurvature", "newton"):
        assert name in api
