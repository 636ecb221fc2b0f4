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
