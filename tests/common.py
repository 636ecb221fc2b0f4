"""Independent truths the tests compare against: closed forms written without the library."""

import math

import torch

from pyro_evidence.compat import DispatchMode

# the operations through which a value reaches the host: each one stalls a GPU until it has finished
HOST_READS = {"aten._local_scalar_dense.default", "aten._linalg_check_errors.default", "aten.nonzero.default"}


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


class HostReads(DispatchMode):
    """Counts the values a block reads from tensors to the host (``bool(t)``, ``float(t)``, ``.item()``,
    ``torch.linalg.cholesky``'s error check, boolean indexing)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += str(func) in HOST_READS
        return func(*args, **(kwargs or {}))
