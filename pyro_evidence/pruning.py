"""
Pruning by the Graves ratio (Graves 2011; seed, "Graves, 2011").

For a weight with diagonal Gaussian posterior ``q(w_i) = N(μ_i, σ_i²)`` the ratio of the posterior
density at zero to that at its mean,

.. math::

    \\lambda_i = \\frac{q(0)}{q(\\mu_i)} = \\exp\\left(-\\frac{\\mu_i^2}{2\\sigma_i^2}\\right) \\in (0, 1],

is near 1 when the posterior cannot tell the weight from zero; those weights are removed first.
Magnitude pruning (``|μ_i|``, smallest first) is offered on the same interface as the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro.poutine.messenger import Messenger

from .objectives.elbo import guide_loc_scale

__all__ = ["graves_ratio", "magnitude", "prune", "Pruning"]


def graves_ratio(guide) -> dict:
    """``{site: exp(−μ²/2σ²)}`` of a diagonal Gaussian guide (``AutoDiagonalNormal`` or
    ``AutoNormal``), in each site's unconstrained shape."""
    return {name: torch.exp(-0.5 * (loc / scale) ** 2) for name, (loc, scale) in guide_loc_scale(guide).items()}


def magnitude(guide) -> dict:
    """``{site: |μ|}`` of a diagonal Gaussian guide — the magnitude-pruning baseline."""
    return {name: loc.abs() for name, (loc, _) in guide_loc_scale(guide).items()}


class _Prune(Messenger):
    """Fixes the pruned elements of latent sites at zero: ``w ← w ⊙ keep``."""

    def __init__(self, keep: dict):
        super().__init__()
        self.keep = keep

    def _pyro_post_sample(self, msg):
        keep = self.keep.get(msg["name"])
        if keep is not None:  # conditioned on posterior means (prediction) too
            msg["value"] = msg["value"] * keep.to(device=msg["value"].device, dtype=msg["value"].dtype)


@dataclass
class Pruning:
    """
    Result of :func:`prune`.

    :ivar model: the model with the pruned weights fixed at zero (a Pyro handler around it).
    :ivar keep: ``{site: bool tensor}``, True where a weight is kept.
    :ivar pruned: ``{site: number of weights pruned}``.
    :ivar fraction: the fraction of the considered weights that were pruned.
    """

    model: object
    keep: dict
    pruned: dict
    fraction: float


def prune(model, guide, *, threshold: float | None = None, fraction: float | None = None, by: str = "graves", sites=None) -> Pruning:
    """
    Prunes the weights of a model whose posterior is a diagonal Gaussian guide.

    :param model: the Pyro model the guide was fitted to.
    :param guide: an ``AutoDiagonalNormal`` or ``AutoNormal`` of it.
    :param float threshold: ``by="graves"``: prune where ``λ ≥ threshold``, ``threshold ∈ (0, 1]``;
        ``by="magnitude"``: prune where ``|μ| ≤ threshold``, ``threshold > 0``.
    :param float fraction: prune this fraction, ``∈ [0, 1)``, of the considered weights, the most
        prunable first (largest ``λ``, or smallest ``|μ|``), ranked across all sites.
    :param str by: ``"graves"`` or ``"magnitude"``.
    :param sites: names of the latent sites to prune (default: all of the guide's).
    :rtype: Pruning
    """
    if (threshold is None) == (fraction is None):
        raise ValueError("give exactly one of threshold= and fraction=")
    if by == "graves":
        scores = graves_ratio(guide)  # higher = more prunable
        if threshold is not None and not 0 < threshold <= 1:
            raise ValueError(f"threshold for the Graves ratio must lie in (0, 1], got {threshold}")
    elif by == "magnitude":
        scores = {k: -v for k, v in magnitude(guide).items()}
        if threshold is not None and not threshold > 0:
            raise ValueError(f"threshold for magnitude pruning must be > 0, got {threshold}")
    else:
        raise ValueError(f"unknown pruning criterion {by!r}; use 'graves' or 'magnitude'")
    if fraction is not None and not 0 <= fraction < 1:
        raise ValueError(f"fraction must lie in [0, 1), got {fraction}")
    if sites is not None:
        unknown = [s for s in sites if s not in scores]
        if unknown:
            raise ValueError(f"unknown site {unknown[0]!r}; the guide has {sorted(scores)}")
        scores = {k: scores[k] for k in sites}

    if threshold is not None:
        cut = threshold if by == "graves" else -threshold
        keep = {k: v < cut for k, v in scores.items()}
    else:
        flat = torch.cat([v.reshape(-1) for v in scores.values()])
        n_prune = int(round(fraction * flat.numel()))
        order = torch.argsort(flat, descending=True, stable=True)
        keep_flat = torch.ones_like(flat, dtype=torch.bool)
        keep_flat[order[:n_prune]] = False
        keep, offset = {}, 0
        for k, v in scores.items():
            keep[k] = keep_flat[offset : offset + v.numel()].reshape(v.shape)
            offset += v.numel()
    pruned = {k: int((~v).sum()) for k, v in keep.items()}
    total = sum(v.numel() for v in keep.values())
    return Pruning(_Prune(keep)(model), keep, pruned, sum(pruned.values()) / max(total, 1))
