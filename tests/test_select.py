import warnings

import pyro
import pytest
import torch
from torch.distributions import constraints
from sklearn.linear_model import BayesianRidge

from pyro_evidence import Checkpoint, NotPositiveDefiniteError, SearchOptions, Selection, laplace_evidence, select_hyperparameters
from pyro_evidence.datasets import diabetes
from pyro_evidence.models import linear_regression, polynomial_regression
from pyro_evidence.objectives.base import Objective

from .common import assert_close, linear_gaussian_log_evidence


@pytest.fixture(scope="module")
def bayesian_ridge():
    X, y = diabetes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        br = BayesianRidge(
            fit_intercept=False,
            alpha_1=0.0,
            alpha_2=0.0,
            lambda_1=0.0,
            lambda_2=0.0,
            tol=1e-12,
            max_iter=100_000,
            compute_score=True,
        ).fit(X.numpy(), y.numpy())
    return br


def test_reaches_bayesian_ridge_optimum(bayesian_ridge):
    X, y = diabetes()
    sel = select_hyperparameters(linear_regression, X, y, progress=False)
    assert isinstance(sel, Selection) and sel.converged
    # scikit-learn calls the noise precision alpha_ and the weight precision lambda_
    assert_close(sel.hyperparameters["prior_precision"], bayesian_ridge.lambda_, rtol=1e-4)
    assert_close(sel.hyperparameters["noise_precision"], bayesian_ridge.alpha_, rtol=1e-4)
    assert_close(sel.objective, bayesian_ridge.scores_[-1], rtol=1e-8)
    # the objective is the exact evidence at the selected values
    hp = sel.hyperparameters
    assert_close(sel.objective, linear_gaussian_log_evidence(X, y, hp["prior_precision"], hp["noise_precision"]), rtol=1e-10)
    # written back to the param store, in the dtype the store had
    assert pyro.param("prior_precision").dtype == torch.float32
    assert_close(pyro.param("prior_precision").detach(), hp["prior_precision"], rtol=1e-6)
    # history: one step per outer evaluation, the best of which is the selection
    assert len(sel.history) >= 2
    assert max(s.objective for s in sel.history) == pytest.approx(float(sel.objective), rel=1e-13)
    assert sel.history[0].seconds <= sel.history[-1].seconds
    assert set(sel.history[0].hyperparameters) == {"prior_precision", "noise_precision"}


def test_adam_ascent_reaches_the_same_optimum(bayesian_ridge):
    X, y = diabetes()
    sel = select_hyperparameters(linear_regression, X, y, optimizer="adam", lr=0.1, max_steps=400, tol=1e-5, progress=False)
    assert sel.converged
    assert_close(sel.hyperparameters["prior_precision"], bayesian_ridge.lambda_, rtol=1e-3)
    assert_close(sel.objective, bayesian_ridge.scores_[-1], rtol=1e-9)


def test_named_subset_keeps_the_rest_fixed():
    X, y = diabetes()
    pyro.param("prior_precision", torch.tensor(5.0), constraint=torch.distributions.constraints.positive)
    sel = select_hyperparameters(linear_regression, X, y, hyperparameters=["noise_precision"], progress=False)
    assert list(sel.hyperparameters) == ["noise_precision"]
    beta = sel.hyperparameters["noise_precision"]
    # the 1-D optimum: the closed-form evidence is flat there
    f = lambda b: float(linear_gaussian_log_evidence(X, y, 5.0, b))  # noqa: E731
    d = 1e-4 * float(beta)
    assert abs(f(beta + d) - f(beta - d)) / (2 * d) < 1e-5
    assert_close(pyro.param("prior_precision").detach(), 5.0)


def test_selection_follows_the_evidence_per_degree():
    x = torch.linspace(-1, 1, 30, dtype=torch.float64)
    y = x**3 - 0.5 * x + 0.1 * torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    values = {}
    for degree in (1, 3, 6):
        pyro.clear_param_store()
        sel = select_hyperparameters(polynomial_regression, x, y, model_kwargs={"degree": degree}, progress=False)
        check = laplace_evidence(polynomial_regression, x, y, model_kwargs={"degree": degree})
        assert_close(sel.objective, check.log_evidence, rtol=1e-10)
        values[degree] = float(sel.objective)
    assert values[3] > values[1] and values[3] > values[6]


def test_progress_bar_is_shown_when_asked(capsys):
    X, y = diabetes()
    select_hyperparameters(linear_regression, X[:50], y[:50], progress=True, max_steps=3)
    assert "select (laplace, ift-exact)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"objective": "evidence"}, "unknown objective 'evidence'"),
        ({"method": "magic"}, "unknown method 'magic'"),
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
        ({"max_steps": 0}, "max_steps must be a positive int, got 0"),
        ({"hyperparameters": ["noise"]}, "unknown hyperparameter 'noise'"),
        ({"max_steps": 2.5}, "max_steps must be a positive int, got 2.5"),
        ({"inner_max_iter": 0}, "inner_max_iter must be a positive int"),
        ({"n_trials": 0, "method": "random"}, "n_trials must be a positive int, got 0"),
        # options the chosen method or objective would silently ignore
        ({"method_options": {"terms": 5}}, "method_options 'terms' is not an option of method 'ift-exact'; its options are"),
        ({"method": "ift-neumann", "method_options": {"tol": 1e-3}}, "'tol' is not an option of method 'ift-neumann'"),
        ({"method": "hoag", "method_options": {"tol": 1e-3}}, "'tol' is not an option of method 'hoag' \\(HOAG's adaptive step\\)"),
        ({"method": "ift-cg", "method_options": {"x0": None}}, "'x0' is set by select_hyperparameters itself"),
        ({"method": "random", "method_options": {"tol": 1e-3}}, "method 'random' takes no method_options"),
        ({"n_trials": 10}, "n_trials= is an option of the black-box search"),  # the flat keywords of earlier versions
        ({"search": {"n_trials": 10}}, "n_trials= is an option of the black-box search"),
        ({"method": "random", "checkpoint": "run.pt"}, "checkpoint= is an option of the gradient methods"),
        ({"objective": "elbo", "objective_options": {"jitter": 1e-6}}, "objective_options 'jitter' is not an option of objective 'elbo'"),
        ({"objective_options": {"max_iter": 0}}, "objective_options 'max_iter' must be a positive int, got 0"),
        ({"storage": "study.log"}, "storage= is an option of the black-box search"),
        ({"bounds": {"prior_precision": (1.0, 2.0)}}, "bounds= is an option of the black-box search"),
        ({"method": "random", "lr": 0.1}, "lr= is an option of the gradient methods"),
        ({"method": "grid", "optimizer": "adam"}, "optimizer= is an option of the gradient methods"),
        ({"method": "hoag", "optimizer": "adam"}, "optimizer= is an option of the L-BFGS/Adam/SGD outer loop; HOAG's adaptive step"),
        ({"objective": "elbo", "method": "graves", "lr": 0.1}, "lr= is an option of the gradient steps"),
        ({"objective": "elbo", "jitter": 1e-6}, "jitter= is an option of objective='laplace'"),
        ({"objective_options": {"k": 3}}, "objective_options 'k' is not an option of objective 'laplace'"),
        ({"objective": "cv", "objective_options": {"folds": 3}}, "objective_options 'folds' is not an option of objective 'cv'; its options are"),
        ({"method": "hoag", "method_options": {"schedule": "linear"}}, "unknown HOAG schedule 'linear'"),
        ({"method": "elbo"}, "unknown method 'elbo'"),
        ({"method": "graves"}, "method='graves' \\(Graves' closed-form update\\) needs objective='elbo', not 'laplace'"),
    ],
)
def test_bad_options(kwargs, message):
    X, y = diabetes()
    with pytest.raises(ValueError, match=message), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # some rows spell the options as earlier versions did
        select_hyperparameters(linear_regression, X, y, progress=False, **kwargs)


def test_an_interrupt_before_any_result_or_after_the_selection(monkeypatch):
    X, y = diabetes()
    solve, calls = Objective.solve, []

    def counted(self, h, theta0=None):
        calls.append(h)
        return solve(self, h, theta0)

    monkeypatch.setattr(Objective, "solve", counted)
    select_hyperparameters(linear_regression, X, y, progress=False)
    last = len(calls)
    pyro.clear_param_store()  # (the selection wrote its hyperparameters there: each run starts from the same)  # the warm-start check's solve, from the model's start, after the selection converged

    def interrupt_at(k):
        def impatient(self, h, theta0=None):
            calls.append(h)
            if len(calls) == k:
                raise KeyboardInterrupt
            return solve(self, h, theta0)
        return impatient

    calls.clear()
    monkeypatch.setattr(Objective, "solve", interrupt_at(1))
    with pytest.raises(KeyboardInterrupt, match="first evaluation"):
        select_hyperparameters(linear_regression, X, y, progress=False)
    calls.clear()
    pyro.clear_param_store()
    monkeypatch.setattr(Objective, "solve", interrupt_at(last))
    with pytest.warns(RuntimeWarning, match="interrupted while solving θ from the model's start"):
        sel = select_hyperparameters(linear_regression, X, y, progress=False)
    assert sel.converged and sel.cold_objective is None


def test_interrupt_returns_the_best_so_far(monkeypatch):
    X, y = diabetes()
    solve, calls = Objective.solve, []

    def impatient(self, h, theta0=None):  # Ctrl-C during the fourth inner solve
        calls.append(h)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return solve(self, h, theta0)

    monkeypatch.setattr(Objective, "solve", impatient)
    with pytest.warns(RuntimeWarning, match="interrupted"):
        sel = select_hyperparameters(linear_regression, X, y, progress=False)
    assert not sel.converged and 1 <= len(sel.history)
    best = max(sel.history, key=lambda s: s.objective)
    assert float(sel.objective) == pytest.approx(best.objective, rel=1e-14)
    assert_close(pyro.param("noise_precision").detach(), best.hyperparameters["noise_precision"], rtol=1e-6)


def test_options_the_method_uses_are_accepted():
    X, y = diabetes()
    sel = select_hyperparameters(linear_regression, X, y, method="hoag", method_options={"schedule": "cubic", "max_iter": 50},
                                 objective="cv", objective_options={"k": 3, "seed": 1}, max_steps=3, progress=False)
    assert len(sel.history) >= 1


# --- checkpoints ---------------------------------------------------------------------------


def run(path, *data, resume=False, overwrite=False, **kw):
    X, y = data or diabetes()
    checkpoint = Checkpoint(str(path), resume=resume, overwrite=overwrite)
    options = {"optimizer": "adam", "lr": 0.1, "max_steps": 5, "tol": 1e-12, "checkpoint": checkpoint, "progress": False}
    return select_hyperparameters(linear_regression, X, y, **{**options, **kw})


def test_a_checkpoint_is_refused_for_another_model_data_objective_or_method(tmp_path):
    ck = tmp_path / "run.pt"
    run(ck)
    X, y = diabetes()
    for kw, what in [
        ({"data": (X[:400], y[:400])}, "the data differ"),
        ({"objective": "cv"}, "objective differ"),
        ({"method": "ift-cg"}, "method differ"),
        ({"optimizer": "sgd"}, "optimizer differ"),
        ({"model_kwargs": {"ard": True}}, "hyperparameters differ"),
    ]:
        pyro.clear_param_store()
        data = kw.pop("data", ())
        with pytest.raises(ValueError, match=f"checkpoint .* belongs to another run: {what}"):
            run(ck, *data, resume=True, **kw)


def test_resuming_restores_the_best_hyperparameters_with_their_own_theta(tmp_path):
    from .common import linear_gaussian_posterior

    ck = tmp_path / "run.pt"
    first = run(ck, max_steps=6)
    saved = torch.load(ck, weights_only=True)
    assert_close(saved["best"]["h"], first.h, rtol=0)
    pyro.clear_param_store()
    again = run(ck, max_steps=6, resume=True)  # nothing left to do: the result comes from the file
    assert len(again.history) == 6 and again.objective.dtype == torch.float64 and again.theta.dtype == torch.float64
    assert_close(again.h, first.h, rtol=0)
    X, y = diabetes()
    alpha, beta = again.hyperparameters["prior_precision"], again.hyperparameters["noise_precision"]
    mean, _ = linear_gaussian_posterior(X, y, alpha, beta)
    assert_close(again.theta, mean, rtol=1e-8)  # θ*(h_best), not the θ of the last step
    assert_close(again.objective, linear_gaussian_log_evidence(X, y, alpha, beta), rtol=1e-10)
    best = max(range(6), key=lambda i: first.history[i].objective)
    assert best != 5 or first.history[5].objective >= first.history[4].objective


def test_an_existing_checkpoint_is_only_overwritten_when_asked(tmp_path):
    ck = tmp_path / "run.pt"
    run(ck, max_steps=3)
    with pytest.raises(FileExistsError, match="pass resume=True to continue that run, or overwrite=True"):
        run(ck, max_steps=2)
    pyro.clear_param_store()
    run(ck, max_steps=2, overwrite=True)
    assert torch.load(ck, weights_only=True)["objective"].numel() == 2


def test_two_processes_cannot_write_one_checkpoint(tmp_path):
    import fcntl

    ck = tmp_path / "run.pt"
    with open(f"{ck}.lock", "w") as held:  # another writer holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="is in use: another process is writing it"):
            run(ck)
    run(ck)  # free again
    assert not (tmp_path / "run.pt.lock").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "incomplete", "foreign"])
def test_a_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    ck = tmp_path / "run.pt"
    run(ck, max_steps=2)
    data = ck.read_bytes()
    if damage == "truncated":
        ck.write_bytes(data[: len(data) // 2])
        message = "is corrupted or truncated .*overwrite=True"
    elif damage == "garbage":
        ck.write_bytes(b"not a checkpoint at all")
        message = "is corrupted or truncated"
    elif damage == "incomplete":
        payload = torch.load(ck, weights_only=True)
        del payload["best"]
        torch.save(payload, ck)
        message = "is incomplete: it has no 'best'"
    else:
        torch.save({"weights": torch.zeros(3)}, ck)
        message = "is not a pyro-evidence checkpoint"
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=message):
        run(ck, resume=True)


def test_a_missing_checkpoint_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="the directory .* does not exist"):
        run(tmp_path / "nowhere" / "run.pt")


def fail_inner_solves_above(monkeypatch, limit):
    """Makes the inner solve fail where the prior precision exceeds ``limit``; returns the failed ``h``."""
    failed, solve = [], Objective.solve

    def failing_solve(self, h, theta0=None):
        if float(self.problem.params(h)["prior_precision"]) > limit:
            failed.append(h)
            raise NotPositiveDefiniteError("the Hessian of the inner loss is not positive definite")
        return solve(self, h, theta0)

    monkeypatch.setattr(Objective, "solve", failing_solve)
    return failed


def test_lbfgs_steps_back_from_a_trial_point_where_the_inner_problem_fails(bayesian_ridge, monkeypatch):
    # beyond 1.05 × the optimal prior precision, a region the line search overshoots into on its way there
    X, y = diabetes()
    failed = fail_inner_solves_above(monkeypatch, 1.05 * bayesian_ridge.lambda_)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "stopping with the last good hyperparameters"
        sel = select_hyperparameters(linear_regression, X, y, progress=False)
    assert failed and sel.converged
    assert_close(sel.hyperparameters["prior_precision"], bayesian_ridge.lambda_, rtol=1e-4)
    assert_close(sel.objective, bayesian_ridge.scores_[-1], rtol=1e-8)


def test_hoag_rejects_a_step_to_where_the_inner_problem_fails(monkeypatch):
    X, y = diabetes()
    failed = fail_inner_solves_above(monkeypatch, 1.2)  # HOAG's first step from 1 goes to 1.26
    with pytest.warns(RuntimeWarning) as caught:
        sel = select_hyperparameters(linear_regression, X, y, method="hoag", max_steps=10, progress=False)
    assert [str(w.message).split(" with")[0] for w in caught] == [f"the selection ended after {len(sel.history)} evaluations"]
    assert failed and len(sel.history) + len(failed) == 10  # it went on after each failure, to the last step
    assert all(float(s.hyperparameters["prior_precision"]) <= 1.2 for s in sel.history)
    assert float(sel.objective) > sel.history[0].objective


def test_grouped_options_and_the_flat_keywords_they_replace(tmp_path):
    X, y = diabetes()
    grouped = select_hyperparameters(linear_regression, X, y, method="random", progress=False,
                                     search=SearchOptions(n_trials=6, seed=3, bounds={"prior_precision": (1.0, 100.0)}))
    pyro.clear_param_store()  # each selection writes its result back: start every one from the same point
    as_dict = select_hyperparameters(linear_regression, X, y, method="random", progress=False,
                                     search={"n_trials": 6, "seed": 3, "bounds": {"prior_precision": (1.0, 100.0)}})
    pyro.clear_param_store()
    with pytest.warns(FutureWarning, match=r"\(n_trials=…, seed=…, bounds=…\) is deprecated: pass n_trials= in search="):
        flat = select_hyperparameters(linear_regression, X, y, method="random", progress=False, n_trials=6, seed=3,
                                      bounds={"prior_precision": (1.0, 100.0)})
    assert len(grouped.history) == 6
    for other in (as_dict, flat):  # the same trials: the same sampler, seed and box
        assert [s.objective for s in other.history] == [s.objective for s in grouped.history]

    path = str(tmp_path / "run.pt")
    pyro.clear_param_store()
    sel = select_hyperparameters(linear_regression, X, y, max_steps=4, progress=False, checkpoint=Checkpoint(path, every=2))
    pyro.clear_param_store()
    with pytest.warns(FutureWarning, match="checkpoint_every"):
        again = select_hyperparameters(linear_regression, X, y, max_steps=4, progress=False, checkpoint=path,
                                       checkpoint_every=2, overwrite=True)
    assert_close(again.objective, sel.objective, rtol=1e-12)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int, got 0"):
        Checkpoint(path, every=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_trial'"):
        select_hyperparameters(linear_regression, X, y, n_trial=3)


def test_the_curvature_is_an_objective_option():
    X, y = diabetes()
    X = X[:, :4]
    sel = select_hyperparameters(linear_regression, X, y, progress=False, objective_options={"hessian": "ggn"})
    pyro.clear_param_store()
    with pytest.warns(FutureWarning, match="hessian=…"):
        flat = select_hyperparameters(linear_regression, X, y, progress=False, hessian="ggn")
    assert sel.converged
    assert_close(flat.objective, sel.objective, rtol=1e-12)
    # the GGN of a linear-Gaussian model is its Hessian: the same optimum as the exact evidence
    pyro.clear_param_store()
    exact = select_hyperparameters(linear_regression, X, y, progress=False)
    assert_close(sel.hyperparameters["prior_precision"], exact.hyperparameters["prior_precision"], rtol=1e-6)
    with pytest.raises(ValueError, match="objective_options 'hessian' is not an option of objective 'elbo'"):
        select_hyperparameters(linear_regression, X, y, objective="elbo", objective_options={"hessian": "ggn"})


def test_a_flat_resume_with_a_checkpoint_object_is_not_dropped(tmp_path):
    path = tmp_path / "run.pt"
    first = run(path, max_steps=4)
    pyro.clear_param_store()
    X, y = diabetes()
    with pytest.warns(FutureWarning, match="resume="):
        again = select_hyperparameters(linear_regression, X, y, optimizer="adam", lr=0.1, max_steps=4, tol=1e-12,
                                       checkpoint=Checkpoint(str(path)), resume=True, progress=False)
    assert len(again.history) == 4 and torch.equal(again.h, first.h)  # restored from the file, not run afresh


def test_a_resume_without_its_file_is_refused(tmp_path):
    X, y = diabetes()
    with pytest.raises(FileNotFoundError, match="resume=True but there is no checkpoint at"):
        select_hyperparameters(linear_regression, X, y, checkpoint=Checkpoint(str(tmp_path / "none.pt"), resume=True))


def test_the_flat_inner_max_iter_is_the_objectives_max_iter():
    X, y = diabetes()
    grouped = select_hyperparameters(linear_regression, X, y, objective_options={"max_iter": 3}, max_steps=3, progress=False)
    pyro.clear_param_store()
    with pytest.warns(FutureWarning, match="inner_max_iter= in objective_options="):
        flat = select_hyperparameters(linear_regression, X, y, inner_max_iter=3, max_steps=3, progress=False)
    assert [s.objective for s in flat.history] == [s.objective for s in grouped.history]


def test_hoag_stops_once_the_hypergradient_is_within_tol(bayesian_ridge):
    X, y = diabetes()
    sel = select_hyperparameters(linear_regression, X, y, method="hoag", tol=1e-2, max_steps=1000, lr=0.5, progress=False)
    assert sel.converged and sel.grad_norm <= 1e-2 and len(sel.history) < 1000
    # short of the optimum by about |dQ/dh|²/(2 |d²Q/dh²|): far below a hundredth of a nat
    assert -1e-8 < bayesian_ridge.scores_[-1] - float(sel.objective) < 1e-3


def test_a_hypergradient_that_is_not_finite_at_the_start_is_an_error():
    def trap(X, y=None):
        alpha = pyro.param("prior_precision", torch.tensor(1.0), constraint=constraints.positive)
        # a finite value with a NaN gradient: the branch not taken has a NaN derivative, and 0 · NaN = NaN
        pyro.factor("trap", torch.where(alpha > 0, torch.zeros(()), (alpha - 2).sqrt()))
        return linear_regression(X, y)

    X, y = diabetes()
    with pytest.raises(FloatingPointError, match="not finite at the initial hyperparameters"):
        select_hyperparameters(trap, X, y, progress=False)


# --- hyperparameters at a bound of their support -------------------------------------------------------------


def closed_form_in_gamma(X, y, gamma, beta):
    """``log N(y | 0, β⁻¹ I + X diag(γ) Xᵀ)``: the ARD evidence in ``γ = 1/α``, where a pruned weight is ``γ = 0``,
    a finite bound at which the derivative is not lost to round-off."""
    C = torch.eye(X.shape[0], dtype=X.dtype) / beta + (X * gamma) @ X.T
    return torch.distributions.MultivariateNormal(torch.zeros_like(y), C).log_prob(y)


@pytest.mark.parametrize("method", ["ift-exact", "ift-cg"])
def test_ard_on_diabetes_restarts_a_precision_at_a_bound_and_reaches_the_maximum(method):
    X, y = diabetes()
    sel = select_hyperparameters(linear_regression, X, y, model_kwargs={"ard": True}, method=method, progress=False)
    alpha, beta = sel.hyperparameters["prior_precision"], sel.hyperparameters["noise_precision"]
    # the maximum: scipy on the closed form, and ARDRegression with vanishing hyperpriors (before: -480.70575,
    # converged=True, s6 pruned at alpha = 9.6e13 on a plateau)
    assert_close(sel.objective, -480.69300, atol=1e-5, rtol=0)
    assert_close(sel.objective, linear_gaussian_log_evidence(X, y, alpha, beta), rtol=1e-8)
    assert sel.converged
    assert_close(alpha[9], 2516.0, rtol=2e-3)  # s6 is relevant: q^2 > s (Tipping & Faul 2003)
    # verified in 1/alpha: no pruned weight would raise Q by entering, every kept one is stationary
    gamma = (1 / alpha).requires_grad_(True)
    dgamma, = torch.autograd.grad(closed_form_in_gamma(X, y, gamma, beta), gamma)
    pruned = alpha > 1e6
    assert pruned.sum() == 3 and bool((dgamma[pruned] <= 0).all())
    # the plateau the selection used to stop on: s6 pruned, yet Q rises as 1/alpha_s6 leaves 0
    at_plateau = gamma.detach().clone()
    at_plateau[9] = 1 / 9.6e13
    at_plateau.requires_grad_(True)
    d_plateau, = torch.autograd.grad(closed_form_in_gamma(X, y, at_plateau, beta), at_plateau)
    assert float(d_plateau[9]) > 1.0


def test_at_bounds_finds_every_constrained_coordinate_past_the_bound():
    from pyro_evidence import Problem
    from pyro_evidence.ascent import BOUND, at_bounds, probe_points

    def model(X, y=None):
        a = pyro.param("a", torch.ones(2), constraint=constraints.positive)
        p = pyro.param("p", torch.tensor(0.5), constraint=constraints.unit_interval)
        m = pyro.param("m", torch.tensor(0.0))
        w = pyro.sample("w", pyro.distributions.Normal(m, a.rsqrt()).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", pyro.distributions.Normal(X @ w, p), obs=y)

    X, y = diabetes()
    problem = Problem(model, X[:, :2], y)
    h = torch.tensor([20.0, 1.0, -20.0, 40.0], dtype=torch.float64)  # a = (e^20, e), p = σ(−20), m = 40
    assert at_bounds(problem, h).tolist() == [True, False, True, False]  # m is real: it has no edge
    assert 40 > BOUND
    assert probe_points(problem, h, 0) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0]  # from its start, a = 1, upwards
    assert probe_points(problem, h, 2) == [0.0, -2.0, -4.0, -6.0, -8.0, -10.0, -12.0]  # p = ½ downwards


# --- selections that stop short say so ----------------------------------------------------------------------


def test_a_stationary_point_is_kept_over_a_round_off_higher_one():
    from pyro_evidence.checkpoint import Best, Progress, Step

    def best(value, grad_norm):
        return Best(value, torch.zeros(1), torch.zeros(1), torch.tensor(value, dtype=torch.float64), grad_norm)

    progress = Progress(torch.zeros(1))
    progress.record(Step(-382.6, {}, 1e-9, 0.0), best(-382.6, 1e-9))
    progress.record(Step(-382.6 + 1e-12, {}, 3e-5, 0.0), best(-382.6 + 1e-12, 3e-5))  # a line search's last trial
    assert progress.best.grad_norm == 1e-9  # before: the round-off-higher, unconverged point
    progress.record(Step(-382.5, {}, 3e-5, 0.0), best(-382.5, 3e-5))
    assert progress.best.value == -382.5  # a real rise is taken


def test_an_lbfgs_stall_forgets_the_curvature_history_once_and_goes_on(bayesian_ridge, monkeypatch):
    import pyro_evidence.ascent as ascent

    X, y = diabetes()
    calls, step = [], ascent.lbfgs_step

    def stalling_step(outer, closure, h, **kw):
        calls.append(1)
        if len(calls) == 2:  # a line search that finds nothing: h unchanged
            return None
        return step(outer, closure, h, **kw)

    monkeypatch.setattr(ascent, "lbfgs_step", stalling_step)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        sel = select_hyperparameters(linear_regression, X, y, progress=False)
    assert sel.converged and len(calls) > 2  # before: stopped at the stall, converged=False, no warning
    assert_close(sel.objective, bayesian_ridge.scores_[-1], rtol=1e-8)


def test_a_selection_that_ends_unconverged_warns():
    X, y = diabetes()
    with pytest.warns(RuntimeWarning, match=r"ended after 3 evaluations with max \|dQ/dh\| = .* > tol = 1e-06: converged=False"):
        sel = select_hyperparameters(linear_regression, X, y, max_steps=3, progress=False)
    assert not sel.converged and len(sel.history) == 3


def test_a_failure_at_the_first_evaluation_says_there_is_nothing_to_fall_back_on(monkeypatch):
    X, y = diabetes()
    fail_inner_solves_above(monkeypatch, 0.5)  # the start, 1, already fails
    with pytest.raises(NotPositiveDefiniteError, match="at the initial hyperparameters, before any point to fall back on"):
        select_hyperparameters(linear_regression, X, y, method="ift-exact", progress=False)


# --- the nested route, reproducible ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:the selection ended:RuntimeWarning")
def test_a_nested_selection_is_reproduced_by_the_evidence_at_its_network():
    """``Selection.objective`` is ``laplace_evidence(..., at=Selection.theta)`` at the returned ``h``, and the
    evidence from the model's own start is measured beside it."""
    import pyro_evidence as pe
    from pyro_evidence.models import mlp_classifier

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    kwargs = {"hidden": 4, "classes": 3}
    pyro.clear_param_store()
    with pyro.poutine.seed(rng_seed=0):
        sel = select_hyperparameters(mlp_classifier, X, y, model_kwargs=kwargs, objective=pe.Laplace(hessian="kron"),
                                     max_steps=12, progress=False, init_loc_fn=pyro.infer.autoguide.init_to_sample)
    again = laplace_evidence(mlp_classifier, X, y, model_kwargs=kwargs, hessian="kron", at=sel.theta)
    assert_close(again.log_evidence, sel.objective, rtol=1e-8)
    assert sel.cold_objective is not None and abs(sel.cold_objective) > 0


def test_a_warm_start_dependence_is_reported():
    """Where the inner problem's mode at the selection depends on where its solve starts, the selection warns and
    keeps both values (``objective`` on the path, ``cold_objective`` from the model's start)."""
    from pyro_evidence.checkpoint import Best
    from pyro_evidence.optim import Minimum
    from pyro_evidence.select import _cold_objective

    class TwoModes(Objective):  # θ* from the start is 1, the path's was −1: Q = θ at h
        holds_theta = False

        def __init__(self):
            self.problem = type("P", (), {"dtype": torch.float64})()

        def solve(self, h, theta0=None):
            return Minimum(torch.ones(1, dtype=torch.float64), torch.tensor(0.0), 0.0, True, 0, 0)

        def validation(self, theta, h):
            return theta.sum()

    path = Best(-1.0, torch.zeros(1, dtype=torch.float64), -torch.ones(1, dtype=torch.float64), torch.tensor(-1.0), 0.0)
    with pytest.warns(RuntimeWarning, match=r"depends on the inner solve's start: -1 from the path's warm start, 1 from"):
        assert _cold_objective(TwoModes(), path) == 1.0
    same = Best(1.0, path.h, torch.ones(1, dtype=torch.float64), torch.tensor(1.0), 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _cold_objective(TwoModes(), same) == 1.0
