import os
import signal
import subprocess
import sys
import textwrap
import time

import pyro
import pytest
import torch

from pyro_evidence import select_hyperparameters
from pyro_evidence.datasets import diabetes
from pyro_evidence.models import linear_regression

optuna = pytest.importorskip("optuna")

BEST = -485.7763295935  # BayesianRidge's optimum on the standardised diabetes data (tests/test_select.py)


def completed(storage_path, name="s"):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not os.path.exists(storage_path):
        return []
    try:
        study = optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(storage_path)))
    except KeyError:
        return []
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def test_grid_visits_every_point_exactly_once():
    X, y = diabetes()
    grid = {"prior_precision": [1.0, 10.0, 100.0], "noise_precision": [1.0, 2.0, 4.0]}
    sel = select_hyperparameters(linear_regression, X, y, method="grid", grid=grid, progress=False)
    seen = [(round(float(s.hyperparameters["prior_precision"]), 6), round(float(s.hyperparameters["noise_precision"]), 6)) for s in sel.history]
    assert sorted(seen) == sorted((a, b) for a in grid["prior_precision"] for b in grid["noise_precision"])
    assert float(sel.hyperparameters["prior_precision"]) == pytest.approx(10.0)
    assert float(sel.hyperparameters["noise_precision"]) == pytest.approx(2.0)


def test_random_search_is_reproducible_by_seed():
    X, y = diabetes()
    runs = []
    for seed in (3, 3, 4):
        pyro.clear_param_store()
        sel = select_hyperparameters(linear_regression, X, y, method="random", n_trials=8, seed=seed, progress=False)
        runs.append([s.objective for s in sel.history])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def trials_to(target, method, seed, n_trials):
    X, y = diabetes()
    pyro.clear_param_store()
    sel = select_hyperparameters(
        linear_regression, X, y, method=method, n_trials=n_trials, seed=seed, progress=False,
        bounds={"prior_precision": (1.0, 1000.0), "noise_precision": (0.5, 10.0)},
    )
    hits = [i + 1 for i, s in enumerate(sel.history) if s.objective >= target]
    return hits[0] if hits else n_trials + 1


def test_gp_beats_random_on_a_smooth_2d_evidence():
    gp = [trials_to(BEST - 0.5, "gp", seed, 40) for seed in range(5)]
    rnd = [trials_to(BEST - 0.5, "random", seed, 150) for seed in range(5)]
    assert sum(gp) / 5 < sum(rnd) / 5
    assert max(gp) <= 40  # the GP got there every time


def test_bad_search_input():
    X, y = diabetes()
    with pytest.raises(ValueError, match="low must be < high"):
        select_hyperparameters(linear_regression, X, y, method="random", bounds={"prior_precision": (10.0, 1.0)}, progress=False)
    pyro.clear_param_store()  # the ARD model's prior precision is a vector
    with pytest.raises(ValueError, match="at most 3 elements without explicit points"):
        select_hyperparameters(linear_regression, X, y, method="grid", model_kwargs={"ard": True}, progress=False)
    with pytest.raises(ValueError, match="unknown storage scheme 'redis'"):
        select_hyperparameters(linear_regression, X, y, method="random", storage="redis://localhost/0", progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        select_hyperparameters(linear_regression, X, y, checkpoint="/nonexistent/ck.pt", resume=True, progress=False)
    with pytest.raises(ValueError, match="resume=True needs checkpoint="):
        select_hyperparameters(linear_regression, X, y, resume=True, progress=False)


SCRIPT = textwrap.dedent(
    """
    import sys, time
    import pyro, torch
    from pyro_evidence import select_hyperparameters
    from pyro_evidence.datasets import diabetes
    from pyro_evidence.models import linear_regression

    def slow(X, y=None):
        time.sleep(0.01)
        return linear_regression(X, y)

    mode, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    X, y = diabetes()
    if mode == "search":
        select_hyperparameters(slow, X, y, method="random", n_trials=n, storage=path, study_name="s", seed=0, progress=False)
    else:
        select_hyperparameters(slow, X, y, method="ift-exact", optimizer="adam", lr=0.1, max_steps=n, tol=1e-12,
                               checkpoint=path, checkpoint_every=1, resume=mode == "resume", progress=False)
    """
)


def launch(tmp_path, *args):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, timeout=240):
    start = time.time()
    while not condition():
        if time.time() - start > timeout:
            raise TimeoutError
        time.sleep(0.1)


def test_search_killed_with_sigkill_resumes_without_rerunning(tmp_path):
    journal = str(tmp_path / "study.log")
    proc = launch(tmp_path, "search", journal, 20)
    wait_for(lambda: len(completed(journal)) >= 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.number: (t.params, t.value) for t in completed(journal)}
    assert 5 <= len(before) < 20
    proc = launch(tmp_path, "search", journal, 20)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    after = completed(journal)
    assert len(after) == 20
    kept = {t.number: (t.params, t.value) for t in after}
    assert all(kept[n] == before[n] for n in before)  # kept, not rerun
    params = [tuple(sorted(t.params.items())) for t in after]
    assert len(set(params)) == len(params)  # no trial ran twice


def test_two_workers_share_one_journal(tmp_path):
    journal = str(tmp_path / "shared.log")
    workers = [launch(tmp_path, "search", journal, 24) for _ in range(2)]
    for w in workers:
        assert w.wait(timeout=300) == 0, w.stderr.read().decode()[-2000:]
    trials = completed(journal)
    assert len(trials) == 24
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == 24
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both did work


def test_gradient_selection_killed_resumes_from_its_checkpoint(tmp_path):
    ckpt = str(tmp_path / "ck.pt")
    proc = launch(tmp_path, "start", ckpt, 40)

    def steps():
        try:
            return torch.load(ckpt, weights_only=True)["objective"].numel()
        except Exception:  # noqa: BLE001 - not written yet, or being renamed
            return 0

    wait_for(lambda: steps() >= 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(ckpt, weights_only=True)
    proc = launch(tmp_path, "resume", ckpt, 40)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    final = torch.load(ckpt, weights_only=True)
    n = saved["objective"].numel()
    assert torch.equal(final["objective"][:n], saved["objective"])  # every checkpointed step kept
    assert final["objective"].numel() == 40  # and only the rest was run


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pyro_evidence_pwned",))


def test_a_checkpoint_holding_pickled_code_is_refused(tmp_path):
    ckpt = str(tmp_path / "evil.pt")
    torch.save({"format": "pyro-evidence/checkpoint/1", "h": _Exploit()}, ckpt)
    X, y = diabetes()
    if os.path.exists("/tmp/pyro_evidence_pwned"):
        os.remove("/tmp/pyro_evidence_pwned")
    with pytest.raises(ValueError, match="refusing checkpoint"):
        select_hyperparameters(linear_regression, X, y, checkpoint=ckpt, resume=True, progress=False)
    assert not os.path.exists("/tmp/pyro_evidence_pwned")
