import torch

from pyro_evidence.experiments import LR_GRID, run_synthetic, synthetic_design

from .common import assert_close


def test_synthetic_design_follows_the_protocol():
    (X, y), (X_test, y_test), (x, x_test), _ = synthetic_design(m=40, seed=0)
    assert X.shape == (40, 12) and X_test.shape == (40, 12)
    assert torch.equal(X[:, 0], torch.ones(40, dtype=torch.float64))
    assert_close(X[:, 1:].mean(0), torch.zeros(11, dtype=torch.float64), atol=1e-12)
    assert_close(X[:, 1:].std(0, unbiased=False), torch.ones(11, dtype=torch.float64), rtol=1e-12)
    assert 0.5 < float((y - x).std()) < 1.5  # y = x + N(0, 1)
    assert not torch.equal(x, x_test)


def test_hyper_learning_rates_are_the_seeds_grid():
    assert len(LR_GRID) == 32 and max(LR_GRID) == 750.0 and min(LR_GRID) == 1e-6


def test_same_seed_same_numbers():
    kw = {"objectives": ("elbo",), "methods": ["ift-cg", "random"], "fast": True, "progress": False}
    a, b = run_synthetic(**kw), run_synthetic(**kw)
    for ra, rb in zip(a, b):
        assert (ra.method, ra.best_q, ra.test_rmse, ra.noise_050, ra.trajectory) == (rb.method, rb.best_q, rb.test_rmse, rb.noise_050, rb.trajectory)
    assert all(len(r.trajectory) == 3 for r in a)
