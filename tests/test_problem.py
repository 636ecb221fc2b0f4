import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints
from torch.func import grad, vmap

from pyro_evidence import Problem, select_hyperparameters
from pyro_evidence.datasets import diabetes
from pyro_evidence.models import linear_regression, polynomial_regression

from .common import assert_close


def scale_model(y):
    rate = pyro.param("rate", torch.tensor(0.2), constraint=constraints.positive)
    sigma = pyro.sample("sigma", dist.Exponential(rate))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(0.0, sigma), obs=y)


def test_float32_params_with_float64_data():
    X, y = diabetes()
    p = Problem(linear_regression, X, y)
    assert p.dtype == torch.float64
    assert p.theta_init.dtype == torch.float64 and p.h_init.dtype == torch.float64
    assert [s.name for s in p.latents] == ["w"]
    assert [s.name for s in p.hypers] == ["prior_precision", "noise_precision"]
    assert p.theta_dim == 10 and p.h_dim == 2
    # the user's float32 initial values survive in the store; h holds them in float64
    assert pyro.param("noise_precision").dtype == torch.float32
    assert_close(p.params(p.h_init)["noise_precision"], 1.0)


def test_log_joint_matches_hand_computation():
    X, y = diabetes()
    X, y = X[:50], y[:50]
    p = Problem(linear_regression, X, y, model_kwargs={"ard": True})
    theta = torch.linspace(-1, 1, 10, dtype=torch.float64)
    alpha = torch.linspace(0.5, 2.0, 10, dtype=torch.float64)
    beta = torch.tensor(3.0, dtype=torch.float64)
    h = torch.cat([alpha.log(), beta.log().reshape(1)])
    expected = (
        torch.distributions.Normal(0.0, alpha.rsqrt()).log_prob(theta).sum()
        + torch.distributions.Normal(X @ theta, beta.rsqrt()).log_prob(y).sum()
    )
    assert_close(p.log_joint(theta, h), expected, rtol=1e-12)
    assert_close(p.loss(theta, h), -expected, rtol=1e-12)
    ll = p.log_likelihood(theta, h)
    assert list(ll) == ["y"] and ll["y"].shape == (50,)


def test_log_jacobian_of_positive_latent():
    y = torch.randn(20, dtype=torch.float64) * 3
    p = Problem(scale_model, y)
    s = torch.tensor([0.7], dtype=torch.float64)  # unconstrained: log sigma
    h = p.h_init
    sigma = s.exp()
    expected = (
        torch.distributions.Exponential(p.params(h)["rate"]).log_prob(sigma).sum()
        + torch.distributions.Normal(0.0, sigma).log_prob(y).sum()
        + s.sum()  # log |d sigma / d s|
    )
    assert_close(p.log_joint(s, h), expected, rtol=1e-12)
    assert_close(p.latent_values(s, h)["sigma"], sigma[0])


def test_pure_functions_under_torch_func():
    X, y = diabetes()
    p = Problem(linear_regression, X, y)
    theta = torch.randn(10, dtype=torch.float64)
    h = torch.tensor([0.3, -0.2], dtype=torch.float64)
    t = theta.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(p.loss(t, h), t)
    assert_close(grad(p.loss)(theta, h), expected, rtol=1e-12)
    batch = torch.randn(4, 10, dtype=torch.float64)
    assert_close(vmap(p.loss, in_dims=(0, None))(batch, h), torch.stack([p.loss(b, h) for b in batch]), rtol=1e-12)
    g_h = grad(p.loss, argnums=1)(theta, h)
    assert g_h.shape == (2,) and torch.isfinite(g_h).all()
    v = torch.randn(10, dtype=torch.float64)
    _, tangent = torch.func.jvp(lambda t: p.loss(t, h), (theta,), (v,))
    assert_close(tangent, expected @ v, rtol=1e-12)
    _, pullback = torch.func.vjp(lambda t: p.loss(t, h), theta)
    assert_close(pullback(torch.tensor(2.0, dtype=torch.float64))[0], 2 * expected, rtol=1e-12)


def test_model_kwargs_and_named_subset():
    x = torch.linspace(-1, 1, 15, dtype=torch.float64)
    p = Problem(polynomial_regression, x, x**2, model_kwargs={"degree": 4}, hyperparameters=["noise_precision"])
    assert p.theta_dim == 5
    assert [s.name for s in p.hypers] == ["noise_precision"]
    p = Problem(polynomial_regression, x, x**2, model_kwargs={"degree": 4}, hyperparameters="prior_precision")
    assert [s.name for s in p.hypers] == ["prior_precision"]


def test_write_params_keeps_store_dtype():
    X, y = diabetes()
    p = Problem(linear_regression, X, y)
    p.write_params(torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert pyro.param("noise_precision").dtype == torch.float32
    assert_close(pyro.param("noise_precision"), torch.tensor(2.0).exp(), rtol=1e-6)


def test_numpy_data_is_accepted():
    X, y = diabetes()
    p = Problem(linear_regression, X.numpy(), y.numpy())
    assert p.dtype == torch.float64 and isinstance(p.args[0], torch.Tensor)


# --- bad input ---------------------------------------------------------------------------


def test_no_pyro_param_is_an_error():
    def model(y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(w, 1.0), obs=y)

    with pytest.raises(ValueError, match="no pyro.param site"):
        select_hyperparameters(model, torch.zeros(3), progress=False)


def test_unknown_hyperparameter_name():
    X, y = diabetes()
    with pytest.raises(ValueError, match="unknown hyperparameter 'prior_precison'.*noise_precision"):
        Problem(linear_regression, X, y, hyperparameters=["prior_precison"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_data(bad):
    X, y = diabetes()
    y = y.clone()
    y[3] = bad
    with pytest.raises(ValueError, match="positional argument 1 contains NaN or inf"):
        Problem(linear_regression, X, y)


def test_discrete_latent_site():
    def model(y):
        p = pyro.param("p", torch.tensor(0.5), constraint=constraints.unit_interval)
        k = pyro.sample("k", dist.Bernoulli(p))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(k, 1.0), obs=y)

    with pytest.raises(TypeError, match="latent site 'k' is discrete"):
        Problem(model, torch.zeros(4))


def test_data_with_different_first_dimensions():
    X, y = diabetes()
    with pytest.raises(ValueError, match=r"first dimension.*\(442, 10\).*\(441,\)"):
        Problem(linear_regression, X, y[:-1])


def test_non_data_positional_argument():
    X, y = diabetes()
    with pytest.raises(TypeError, match="model_kwargs"):
        Problem(linear_regression, X, y, "ard")
    with pytest.raises(ValueError, match="scalar"):
        Problem(linear_regression, X, y, 3)


def test_latent_sites_must_not_change_between_runs():
    def model(y):
        pyro.param("a", torch.tensor(1.0), constraint=constraints.positive)
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        if y.shape[0] > 3:  # more data, one more latent
            pyro.sample("extra", dist.Normal(0.0, 1.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    p = Problem(model, torch.zeros(3))
    with pytest.raises(ValueError, match="latent site 'extra' was not in the model's first trace"):
        p.log_joint(torch.zeros(1, dtype=p.dtype), p.h_init, args=(torch.zeros(5, dtype=p.dtype),))


def test_init_loc_fn_sets_the_starting_point():
    from functools import partial

    from pyro.infer.autoguide import init_to_uniform, init_to_value

    y = torch.randn(20, dtype=torch.float64)
    p = Problem(scale_model, y, init_loc_fn=init_to_value(values={"sigma": torch.tensor(2.5)}))
    assert_close(p.theta_init, torch.tensor([2.5], dtype=torch.float64).log(), rtol=1e-12)  # unconstrained
    assert p.theta_init.dtype == torch.float64
    # the default is the prior mean: 1 / rate
    assert_close(Problem(scale_model, y).theta_init, torch.tensor([5.0], dtype=torch.float64).log(), rtol=1e-6)
    # a network's weights: random, inside the radius, and seeded
    X, labels = torch.rand(10, 4, dtype=torch.float64), torch.arange(10) % 3
    from pyro_evidence.models import mlp_classifier

    pyro.set_rng_seed(0)
    a = Problem(mlp_classifier, X, labels, model_kwargs={"hidden": 5, "classes": 3}, init_loc_fn=partial(init_to_uniform, radius=0.05))
    pyro.set_rng_seed(0)
    b = Problem(mlp_classifier, X, labels, model_kwargs={"hidden": 5, "classes": 3}, init_loc_fn=partial(init_to_uniform, radius=0.05))
    assert torch.equal(a.theta_init, b.theta_init)
    assert float(a.theta_init.abs().max()) <= 0.05 and float(a.theta_init.abs().min()) > 0


def test_init_loc_fn_of_the_wrong_shape():
    y = torch.randn(20, dtype=torch.float64)
    with pytest.raises(ValueError, match="init_loc_fn gave latent site 'sigma' a value of shape \\(3,\\)"):
        Problem(scale_model, y, init_loc_fn=lambda site: torch.ones(3))


# --- inputs that would give a wrong answer are refused, naming the culprit ---------------------


def test_observed_data_that_broadcast_against_the_plate():
    X, y = diabetes()
    with pytest.raises(ValueError, match=r"observed site 'y': the data have shape \(442, 1\) and the distribution \(442,\)"):
        Problem(linear_regression, X, y[:, None])


def test_a_model_without_observed_data():
    from pyro_evidence import laplace_evidence

    X, _ = diabetes()
    with pytest.raises(ValueError, match="the model has no observed site"):
        Problem(linear_regression, X, None)
    with pytest.raises(ValueError, match="the model has no observed site"):
        laplace_evidence(linear_regression, X, None)
    with pytest.raises(ValueError, match="the model has no observed site"):
        select_hyperparameters(linear_regression, X, None, progress=False)


def test_a_model_whose_only_observation_is_a_factor_is_accepted():
    def factor_only(x):
        a = pyro.param("a", torch.tensor(1.0), constraint=constraints.positive)
        w = pyro.sample("w", dist.Normal(0.0, a.rsqrt()))
        pyro.factor("lik", -0.5 * ((x - w) ** 2).sum())

    p = Problem(factor_only, torch.randn(5, dtype=torch.float64))
    assert p.observed == ("lik",)


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_a_hyperparameter_outside_its_support(value):
    X, y = diabetes()
    pyro.param("prior_precision", torch.tensor(value), constraint=constraints.positive)
    with pytest.raises(ValueError, match=r"param 'prior_precision' = (0|nan) lies outside its support"):
        Problem(linear_regression, X, y)
    with pytest.raises(ValueError, match="param 'prior_precision'"):
        select_hyperparameters(linear_regression, X, y, progress=False)


def test_a_log_density_that_is_not_finite_at_the_start_names_its_site():
    def cliff(y):
        a = pyro.param("a", torch.tensor(2.0), constraint=constraints.positive)
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        pyro.factor("barrier", torch.where(a > 1, -torch.inf, 0.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(w, 1.0), obs=y)

    with pytest.raises(ValueError, match=r"log density of site 'barrier' is -inf at the start .*hyperparameters: a = 2"):
        Problem(cliff, torch.tensor([0.0, 5.0], dtype=torch.float64))


def test_observed_data_outside_the_support_names_the_site():
    def uniform(y):
        a = pyro.param("a", torch.tensor(2.0), constraint=constraints.positive)
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Uniform(w - a, w + a), obs=y)  # y = 5 lies outside [−2, 2]

    with pytest.raises(ValueError, match=r"site 'y': its log density cannot be evaluated at the start .*within the support"):
        Problem(uniform, torch.tensor([0.0, 5.0], dtype=torch.float64))


def subsampled(X, y=None):
    a = pyro.param("a", torch.tensor(1.0), constraint=constraints.positive)
    w = pyro.sample("w", dist.Normal(0.0, a.rsqrt()).expand([X.shape[1]]).to_event(1))
    with pyro.plate("data", X.shape[0], subsample_size=50) as i:
        pyro.sample("y", dist.Normal(X[i] @ w, 1.0), obs=y[i])


@pytest.mark.parametrize("objective", ["laplace", "elbo", "cv", "holdout"])
def test_subsampled_plates_are_refused_by_every_objective(objective):
    X, y = diabetes()
    with pytest.raises(ValueError, match="plate 'data' subsamples 50 of its 442 rows"):
        select_hyperparameters(subsampled, X, y, objective=objective, progress=False)


def test_subsampled_plates_are_refused_by_the_evidence_functions():
    from pyro_evidence import cv_log_predictive, elbo_evidence, laplace_evidence

    X, y = diabetes()
    for fn in (laplace_evidence, elbo_evidence, cv_log_predictive):
        with pytest.raises(ValueError, match="subsamples 50 of its 442 rows"):
            fn(subsampled, X, y)


def test_integer_data_that_the_model_cannot_use():
    X, y = diabetes()
    with pytest.raises(TypeError, match=r"integer-typed data: positional argument 0 has dtype torch.int64"):
        Problem(linear_regression, X.round().long(), y)


def softmax_regression(X, y=None):
    a = pyro.param("a", torch.tensor(1.0), constraint=constraints.positive)
    W = pyro.sample("W", dist.Normal(0.0, a.rsqrt()).expand([X.shape[1], 3]).to_event(2))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Categorical(logits=X @ W), obs=y)


def test_integer_labels_are_kept_for_models_that_use_them():
    X, y = diabetes()
    labels = torch.bucketize(y, torch.tensor([-0.5, 0.5], dtype=torch.float64))  # three classes, int64
    p = Problem(softmax_regression, X, labels)
    assert p.args[1].dtype == torch.int64
    theta = torch.linspace(-0.1, 0.1, p.theta_dim, dtype=torch.float64)
    W = theta.reshape(10, 3)
    expected = torch.log_softmax(X @ W, -1)[torch.arange(442), labels].sum() + dist.Normal(0.0, 1.0).log_prob(theta).sum()
    assert_close(p.log_joint(theta, p.h_init), expected, rtol=1e-12)


def test_integer_labels_a_distribution_cannot_take_are_named():
    from pyro_evidence.models import logistic_regression

    X, y = diabetes()
    with pytest.raises(ValueError, match=r"site 'y'.*positional argument 1 is integer-typed \(torch.int64\)"):
        Problem(logistic_regression, X, (y > 0).long())


@pytest.mark.parametrize("kwargs, where", [({"s": torch.tensor([1.0, float("nan")])}, "model_kwargs['s']"),
                                           ({"opts": {"t": torch.tensor(float("inf"))}}, "model_kwargs['opts']['t']")])
def test_nan_in_model_kwargs(kwargs, where):
    X, y = diabetes()

    def model(X, y=None, **kw):
        linear_regression(X, y)

    with pytest.raises(ValueError, match=f"{where.replace('[', '.').replace(']', '.')} contains NaN or inf"):
        Problem(model, X, y, model_kwargs=kwargs)


def test_constants_written_as_python_numbers_follow_the_data_dtype():
    def gamma_scale(y):
        rate = pyro.param("rate", torch.tensor(1.0), constraint=constraints.positive)
        sigma = pyro.sample("sigma", dist.Gamma(2.0, rate))  # 2.0 would be a float32 tensor
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(0.0, sigma), obs=y)

    y = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    p = Problem(gamma_scale, y)
    s = torch.tensor([0.1 + 1e-9], dtype=torch.float64)  # log σ; 1e-9 is below float32's resolution
    sigma = s.exp()
    expected = (
        torch.distributions.Gamma(torch.tensor(2.0, dtype=torch.float64), 1.0).log_prob(sigma)
        + torch.distributions.Normal(0.0, sigma).log_prob(y).sum()
        + s
    )
    value = p.log_joint(s, p.h_init)
    assert value.dtype == torch.float64
    assert_close(value, expected.squeeze(), rtol=1e-15)
    assert torch.get_default_dtype() == torch.float32  # the caller's default, restored


def test_a_nan_in_the_data_suggests_a_mask():
    X, y = diabetes()
    y = y.clone()
    y[3] = float("nan")
    with pytest.raises(ValueError, match=r"positional argument 1 contains NaN or inf \(1 NaN: .*obs_mask="):
        Problem(linear_regression, X, y)
