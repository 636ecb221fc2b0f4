import io
import subprocess
import sys

import pytest

from pyro_evidence.cli import demo, main

from .common import assert_close, linear_gaussian_log_evidence


def test_demo_table_is_the_exact_evidence(tmp_path):
    out = io.StringIO()
    png = tmp_path / "demo.png"
    rows = demo(max_degree=4, output=str(png), progress=False, out=out)
    text = out.getvalue()
    assert "log evidence" in text and "← best" in text
    assert [r["degree"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["converged"] for r in rows)
    assert all(0 < r["prior_precision"] < 1e3 for r in rows)  # well posed, degree 0 included
    pytest.importorskip("matplotlib")
    assert png.stat().st_size > 10_000

    import torch

    from pyro_evidence.datasets import sin_data
    from pyro_evidence.models import polynomial_features

    x, y = sin_data()
    for r in rows:
        phi = polynomial_features(2 * x - 1, r["degree"])
        expected = linear_gaussian_log_evidence(phi, y, r["prior_precision"], r["noise_precision"])
        assert_close(r["log_evidence"], expected, rtol=1e-8)
    best = max(rows, key=lambda r: r["log_evidence"])
    assert best["degree"] >= 3
    del torch


def test_demo_and_select_leave_the_callers_param_store_alone():
    from argparse import Namespace

    import pyro
    import torch

    from pyro_evidence.cli import select

    pyro.param("prior_precision", torch.tensor(7.0))
    demo(max_degree=1, output=None, progress=False, out=io.StringIO())
    args = Namespace(case="linear-diabetes", objective="laplace", method="ift-cg", max_steps=5, n_trials=None, storage=None,
                     study_name=None, seed=0, heartbeat_interval=None, grace_period=None, checkpoint=None, resume=False,
                     overwrite=False, device="cpu", progress=False)
    select(args, out=io.StringIO())
    assert list(pyro.get_param_store().keys()) == ["prior_precision"]
    assert float(pyro.param("prior_precision").detach()) == 7.0


def test_console_script_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pyro_evidence.cli", "demo", "--max-degree", "2", "--output", ""],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "selected degree" in result.stdout


def test_cuda_refused_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit):
        main(["demo", "--device", "cuda"])


def test_select_command_prints_a_table():
    out = io.StringIO()
    from argparse import Namespace

    from pyro_evidence.cli import select

    args = Namespace(case="linear-diabetes", objective="laplace", method="ift-cg", max_steps=50, n_trials=None, storage=None,
                     study_name=None, seed=0, heartbeat_interval=None, grace_period=None, checkpoint=None, resume=False,
                     overwrite=False, device="cpu", progress=False)
    sel = select(args, out=out)
    text = out.getvalue()
    assert "prior_precision" in text and "objective" in text and "converged" in text
    assert sel.converged


def test_select_command_reports_bad_input(capsys):
    with pytest.raises(SystemExit):
        main(["select", "--method", "random", "--storage", "ftp://nowhere", "--no-progress"])
    assert "unknown storage scheme 'ftp'" in capsys.readouterr().err


def test_experiment_fast_mode(tmp_path):
    code = main(["experiment", "synthetic", "--fast", "--objective", "cv", "--methods", "random", "ift-cg", "rmad", "--output-dir", str(tmp_path)])
    assert code == 0
    table = (tmp_path / "synthetic.md").read_text()
    for method in ("random", "ift-cg", "rmad"):
        assert f"| cv | {method} |" in table
    assert "Failed runs" not in table
    assert "Deviations from the protocol" in table and "σ = 0.5" in table
    rows = (tmp_path / "synthetic.csv").read_text().splitlines()
    assert len(rows) == 4  # header and one run per method
    assert len((tmp_path / "synthetic_trajectories.csv").read_text().splitlines()) == 1 + 3 * 3


def test_mnist_experiment_fast_mode(tmp_path):
    code = main(["experiment", "mnist", "--fast", "--output-dir", str(tmp_path)])
    assert code == 0
    table = (tmp_path / "mnist.md").read_text()
    for objective in ("cv", "elbo"):
        for method in ("random", "greedy", "drmad", "hoag", "ift-cg"):
            assert f"| {objective} | {method} |" in table
    assert "test accuracy" in table and "σ = 0.5" in table and "784-300-10" not in table
    assert "Failed runs" not in table  # every method ran with the options it was given
    assert len((tmp_path / "mnist.csv").read_text().splitlines()) == 1 + 10


def test_experiment_bad_arguments(capsys):
    for argv, message in [
        (["experiment", "mnist", "--pool", "3"], "argument --pool: invalid choice: 3"),
        (["experiment", "mnist", "--runs", "0"], "--runs must be >= 1, got 0"),
        (["experiment", "mnist", "--methods", "newton"], "unknown method 'newton'"),
    ]:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_select_lists_the_choices(capsys):
    for argv, message in [
        (["select", "--objective", "evidence"], "argument --objective: invalid choice: 'evidence'"),
        (["select", "--method", "newton"], "argument --method: invalid choice: 'newton'"),
    ]:
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert message in err and ("laplace" in err or "ift-exact" in err)  # the choices are listed
