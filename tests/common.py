"""Independent truths the tests compare against: closed forms written without the library."""

import math

import torch


def assert_close(actual, expected, rtol=1e-8, atol=0.0, msg=""):
    actual = torch.as_tensor(actual, dtype=torch.float64).cpu()
    expected = torch.as_tensor(expected, dtype=torch.float64).cpu()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg or None)


def linear_gaussian_log_evidence(X, y, prior_precision, noise_precision):
    """``log N(y | 0, β⁻¹ I + X A⁻¹ Xᵀ)`` (Bishop 2006, eq. 3.86), by a dense solve."""
    X, y = X.double().cpu(), y.double().cpu()
    a = torch.as_tensor(prior_precision, dtype=torch.float64).expand(X.shape[1])
    C = torch.eye(X.shape[0], dtype=torch.float64) / float(noise_precision) + (X / a) @ X.T
    return torch.distributions.MultivariateNormal(torch.zeros(X.shape[0], dtype=torch.float64), C).log_prob(y)


def linear_gaussian_posterior(X, y, prior_precision, noise_precision):
    """Mean and covariance of ``p(w | y)`` (Bishop 2006, eqs. 3.53–3.54)."""
    X, y = X.double().cpu(), y.double().cpu()
    a = torch.as_tensor(prior_precision, dtype=torch.float64).expand(X.shape[1])
    precision = torch.diag(a) + float(noise_precision) * X.T @ X
    cov = torch.linalg.inv(precision)
    return float(noise_precision) * cov @ X.T @ y, cov


LOG_2PI = math.log(2 * math.pi)
