"""The tutorials run as scripts; CI runs the evidence-vs-CV one in its fast mode."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("matplotlib")
pytest.importorskip("arviz")


def test_evidence_vs_cv_fast(tmp_path):
    script = os.path.join(ROOT, "tutorials", "evidence_vs_cv.py")
    result = subprocess.run(
        [sys.executable, script, "--fast", "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "evidence_vs_cv.md").read_text()
    for figure in ("sin_criteria", "sin_fits", "synthetic_criteria", "chain_rule", "sizes"):
        assert (tmp_path / "figures" / f"{figure}.png").stat().st_size > 10_000
        assert f"figures/{figure}.png" in text
    assert "Laplace log evidence" in text and "PSIS-LOO" in text


def test_experiments_tutorial_renders_from_results(tmp_path):
    from pyro_evidence.cli import main

    results = tmp_path / "results"
    assert main(["experiment", "synthetic", "--fast", "--methods", "random", "ift-cg", "--output-dir", str(results)]) == 0
    assert main(["experiment", "mnist", "--fast", "--pool", "4", "--objective", "cv", "--methods", "random", "greedy", "--output-dir", str(results)]) == 0
    script = os.path.join(ROOT, "tutorials", "experiments.py")
    out = tmp_path / "rendered"
    done = subprocess.run(
        [sys.executable, script, "--results", str(results), "--output-dir", str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = (out / "experiments.md").read_text()
    assert "| cv | ift-cg |" in text and "| elbo | random |" in text
    assert "| cv | greedy |" in text and "test accuracy" in text
    for figure in ("synthetic_q", "synthetic_noise", "mnist_q", "mnist_noise"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 10_000
