"""
The curvature of the Laplace approximation: the matrix ``C`` whose ``log det`` the evidence needs,

.. math::

    \\log p(y \\mid h) \\approx \\log p(y, \\hat\\theta \\mid h) + \\frac{d}{2}\\log 2\\pi - \\frac{1}{2}\\log\\det C.

Write the inner loss as ``L(θ, h) = −Σ_o log p(y_o | η_o(θ)) + R(θ, h)``: the observed sites' log-likelihood
through their distribution parameters ``η(θ)`` (a Normal's ``loc`` and ``scale``, a Bernoulli's or a Categorical's
``logits``, a Poisson's ``rate``) and the rest ``R`` (latent priors, log-Jacobians, ``pyro.factor`` terms).

- ``"exact"`` — ``C = ∇²L``, dense, by batched Hessian-vector products. Cost: ``d`` gradient passes, ``d²``
  memory. Drops nothing.
- ``"ggn"`` — ``C = JᵀΛJ + ∇²R`` (generalised Gauss–Newton / Fisher), ``J = ∂η/∂θ`` and ``Λ`` the Fisher of each
  observed law in ``η``: positive semi-definite at every ``θ``. Cost: ``d`` Jacobian-vector products. Drops the
  curvature of ``η(θ)``.
- ``"diag"`` — ``diag(JᵀΛJ) + diag(∇²R)``. Cost: one backward pass per output of a row, per linear layer. Drops
  every off-diagonal term.
- ``"kron"`` — per weight matrix ``A ⊗ B`` with ``A = Σ_n ā_n ā_nᵀ`` (layer inputs, a 1 appended when the layer
  has a bias) and ``B = (1/N) Σ_n Σ_c g_nc g_ncᵀ`` (output gradients of ``Λ^{½}``-weighted outputs); ``diag``
  elsewhere. Cost: as ``diag``, plus eigendecompositions of the factors. Drops the correlation of inputs and
  output gradients across rows (K-FAC), and every cross-layer block.

``log det`` is a Cholesky factorisation (dense), a sum of logs (``diag``), or
``Σ_ij log(λ_i μ_j + δ)`` over the eigenvalues ``λ`` of ``A`` and ``μ`` of ``B`` with ``δ`` the layer's prior
precision (``kron``; Martens & Grosse 2015, Immer et al. 2021). ``logdet="slq"`` never forms ``C``: stochastic
Lanczos quadrature (Ubaru, Chen & Saad 2017) over ``m`` Rademacher probes ``z`` and ``k`` Lanczos steps,
``log det C ≈ (d/m) Σ_z Σ_i τ_{zi}² log ϑ_{zi}`` (Ritz values ``ϑ`` and first components ``τ`` of the
eigenvectors of each tridiagonal matrix), with its standard error over probes.

The linear layers are found by watching the model run: a matrix product ``X @ w`` or ``F.linear(x, w, b)`` whose
weight is a latent site's value, with ``X`` of ``N`` rows, is a layer; a latent vector added to its output is its
bias. So models written with ``X @ w`` on sample sites and ``PyroModule[nn.Linear]`` with ``PyroSample`` priors
are both seen. Latent sites that are no layer's weight or bias get their exact diagonal (``diag``, ``kron``).

Every function here is pure in ``(θ, h)``, so the evidence built on it can be differentiated again: the
hypergradient keeps ``∂ log det C / ∂θ`` (the θ̂-dependence of the curvature that laplace-torch's prior tuning
drops). For ``"slq"`` the derivative is Hutchinson's ``∂ log det C ≈ (1/m) Σ_z (C⁻¹z)ᵀ ∂C z`` with ``C⁻¹z`` from
the same Lanczos run.

References:
    J. Martens, R. Grosse, *Optimizing neural networks with Kronecker-factored approximate curvature*, ICML 2015.
    A. Immer, M. Korzepa, M. Bauer, *Improving predictions of Bayesian neural nets via local linearization*,
    AISTATS 2021.
    S. Ubaru, J. Chen, Y. Saad, *Fast estimation of tr(f(A)) via stochastic Lanczos quadrature*, SIMAX 2017.
    N. Schraudolph, *Fast curvature matrix-vector products for second-order gradient descent*, Neural Comp. 2002.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.func import jvp, vjp, vmap
from torch.overrides import TorchFunctionMode

from ..compat import mask_of
from ..linalg import NotPositiveDefiniteError, cholesky, hessian_and_value

__all__ = ["STRUCTURES", "LOGDETS", "KRON_BIAS", "Curvature", "LaplaceCurvature", "KronBlock", "slq_logdet", "symmetric_layer", "refuse_symmetric"]

STRUCTURES = ("exact", "ggn", "diag", "kron")
LOGDETS = ("dense", "slq")
KRON_BIAS = ("joint", "separate")
CHUNK = 256  # Hessian/GGN columns per batched product: bounds memory at CHUNK copies of one backward pass


# --- the observed sites' laws and their Fisher information --------------------------------------------------


def _fisher(kind, values, u):
    """``Λ u`` for one output of kind ``kind`` at parameter values ``values``."""
    if kind == "categorical":
        p = values.softmax(-1)
        return p * u - p * (p * u).sum(-1, keepdim=True)
    return _fisher_diag(kind, values) * u


def _fisher_diag(kind, values):
    if kind == "loc":  # values = σ: Fisher of N(loc, σ) in loc
        return values.pow(-2)
    if kind == "scale":
        return 2 * values.pow(-2)
    if kind == "logits":
        p = torch.sigmoid(values)
        return p * (1 - p)
    if kind == "rate":
        return values.reciprocal()
    raise AssertionError(kind)


def _fisher_root(kind, values):
    """``R`` with ``R Rᵀ = Λ``, columns along a new last dimension (size 1 for elementwise laws)."""
    if kind == "categorical":  # diag(p) − p pᵀ = (diag √p − p √pᵀ)(…)ᵀ since Σ p = 1
        p = values.softmax(-1)
        s = p.sqrt()
        return torch.diag_embed(s) - p.unsqueeze(-1) * s.unsqueeze(-2)
    return _fisher_diag(kind, values).sqrt().unsqueeze(-1)


@dataclass(frozen=True)
class _Output:
    """One distribution parameter of an observed site: its kind, where its data-row dimension is, and
    whether a trailing dimension is the event of a categorical."""

    site: str
    kind: str
    row_dim: int | None  # position of the data plate's dimension in the parameter tensor
    event: bool = False

    @property
    def fisher(self) -> str:
        """What :func:`_fisher` calls it: a Normal's ``loc`` output carries its scale as the Fisher's value."""
        return "loc" if self.kind == "loc_param" else self.kind


_SUPPORTED = "Normal, Bernoulli (logits or probs), Categorical, Poisson, Binomial"


def _unwrap(fn):
    mask = None
    while True:
        if isinstance(fn, dist.Independent):
            fn = fn.base_dist
        elif isinstance(fn, MaskedDistribution):
            mask = mask_of(fn) if mask is None else mask & mask_of(fn)
            fn = fn.base_dist
        elif isinstance(fn, ExpandedDistribution):
            fn = fn.base_dist
        else:
            return fn, mask


def _site_outputs(name, site):
    """``[(kind, values, weight, event)]`` for an observed site: parameter values broadcast to the site's
    shape (a categorical's with its classes last), and the per-element weight (scale × mask) that multiplies
    their Fisher. ``kind`` "loc" carries the scale as its value (the Fisher in ``loc`` is ``σ⁻²``)."""
    outer = site["fn"]
    fn, mask = _unwrap(outer)
    shape = outer.batch_shape + outer.event_shape
    weight = torch.ones(shape, dtype=site["value"].dtype, device=site["value"].device) * site["scale"]
    for m in (mask, site["mask"]):
        if m is not None and not isinstance(m, bool):
            weight = weight * torch.as_tensor(m).to(weight.dtype).expand(shape)
        elif m is False:
            weight = weight * 0
    if isinstance(fn, dist.Normal):
        loc, scale = fn.loc.expand(shape), fn.scale.expand(shape)
        return [("loc_param", loc, scale, weight, False), ("scale", scale, scale, weight, False)]
    if isinstance(fn, dist.Bernoulli):
        logits = fn.logits.expand(shape)
        return [("logits", logits, logits, weight, False)]
    if isinstance(fn, dist.Binomial):
        logits = fn.logits.expand(shape)
        return [("logits", logits, logits, weight * fn.total_count.expand(shape), False)]
    if isinstance(fn, dist.Poisson):
        rate = fn.rate.expand(shape)
        return [("rate", rate, rate, weight, False)]
    if isinstance(fn, dist.Categorical):
        logits = fn.logits.expand(shape + fn.logits.shape[-1:])
        return [("categorical", logits, logits, weight.unsqueeze(-1), True)]
    raise ValueError(
        f"observed site {name!r} has a {type(fn).__name__} law; the GGN needs its Fisher information, known here for "
        f"{_SUPPORTED} (use hessian='exact' for this model)"
    )


def _row_position(site, n):
    for frame in site["cond_indep_stack"]:
        if frame.size == n and frame.dim is not None:
            return len(site["fn"].batch_shape) + frame.dim
    return None


# --- watching the model run: layers and observed laws --------------------------------------------------------

_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}
_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}


class _Watch(Messenger, TorchFunctionMode):
    """Runs with the model: learns the latent values (by identity), records each linear layer's input and
    adds a probe (zeros whose gradient is the output's) to its output."""

    def __init__(self, probes=None):
        Messenger.__init__(self)
        TorchFunctionMode.__init__(self)
        self.probes = probes or {}
        self.latent = {}  # id(value) -> site name
        self.inputs, self.out_shapes, self.uses = {}, {}, {}
        self.bias, self.transposed = {}, set()  # weight site -> bias site; F.linear's (out, in) weights
        self._outputs = {}  # id(layer output) -> (weight site, output)

    def __enter__(self):
        Messenger.__enter__(self)
        TorchFunctionMode.__enter__(self)
        return self

    def __exit__(self, *exc):
        TorchFunctionMode.__exit__(self, *exc)
        return Messenger.__exit__(self, *exc)

    def _pyro_post_sample(self, msg):
        if not msg["is_observed"] and not site_is_subsample(msg):
            self.latent[id(msg["value"])] = msg["name"]

    def _layer(self, name, x, out):
        self.uses[name] = self.uses.get(name, 0) + 1
        self.inputs[name], self.out_shapes[name] = x, out.shape
        if name in self.probes:
            out = out + self.probes[name]
        self._outputs[id(out)] = (name, out)  # the reference keeps the id from being reused
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMUL and len(args) == 2 and not kwargs:
            x, w = args
            name = self.latent.get(id(w))
            if name is not None and w.dim() in (1, 2) and x.dim() == 2:
                return self._layer(name, x, func(x, w))
        elif func is F.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            name = self.latent.get(id(w))
            if name is not None and w.dim() == 2 and x.dim() == 2:
                self.transposed.add(name)
                out = self._layer(name, x, F.linear(x, w))
                if b is None:
                    return out
                if id(b) in self.latent:
                    self.bias[name] = self.latent[id(b)]
                return out + b
        elif func in _ADD and len(args) == 2 and not kwargs:
            a, b = args
            for out, other in ((a, b), (b, a)):
                layer = self._outputs.get(id(out))
                if layer is not None and id(other) in self.latent and other.shape == out.shape[1:]:
                    self.bias[layer[0]] = self.latent[id(other)]
        return func(*args, **kwargs)


@dataclass
class _Layer:
    weight: str
    bias: str | None
    transposed: bool  # F.linear's (out, in) weight


@dataclass
class KronBlock:
    """One block's Kronecker factors: ``C_block ≈ A ⊗ B + δ I`` over a layer's weight laid out as (inputs, a bias
    row last) × outputs, ``δ`` the prior precision. A bias factored on its own (``kron_bias="separate"``) is a
    block with no weight whose one input is the constant 1 (``A = [[N]]``)."""

    weight: str | None
    bias: str | None
    A: torch.Tensor
    B: torch.Tensor
    delta: torch.Tensor
    transposed: bool = False  # F.linear's (out, in) weight


@dataclass
class Curvature:
    """
    The curvature ``C`` at ``(θ, h)`` in the structure asked for.

    :ivar structure: ``"exact"``, ``"ggn"``, ``"diag"`` or ``"kron"``.
    :ivar log_det: ``log det C`` (an estimate with ``logdet="slq"``).
    :ivar log_det_se: its standard error (``"slq"``), else 0.
    :ivar dense: ``C`` (``exact``, ``ggn`` with ``logdet="dense"``).
    :ivar diagonal: ``diag C`` (``diag``); for ``kron``, the diagonal of the coordinates outside the blocks.
    :ivar blocks: the Kronecker blocks (``kron``).
    """

    structure: str
    log_det: torch.Tensor
    log_det_se: float = 0.0
    dense: torch.Tensor | None = None
    diagonal: torch.Tensor | None = None
    blocks: list = field(default_factory=list)
    source: "LaplaceCurvature | None" = field(default=None, repr=False)
    theta: torch.Tensor | None = field(default=None, repr=False)
    h: torch.Tensor | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)  # factorisations made by solve, reused

    def sample(self, num_samples: int, seed: int = 0) -> torch.Tensor:
        """``num_samples`` draws of ``N(0, C⁻¹)``, shape ``(S, d)``."""
        return self.source.sample(self, num_samples, seed)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``C v`` for a flat ``v``, in the structure: the dense matrix, the diagonal, the Kronecker blocks (the
        diagonal elsewhere), or GGN-vector products where ``C`` is matrix-free (``logdet="slq"``)."""
        return self._apply(v, inverse=False)

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """``C⁻¹ v`` for a flat ``v``: a Cholesky solve, a division, per block the Kronecker factors'
        eigenbases, ``(A ⊗ B + δI)⁻¹ = (Q_A ⊗ Q_B) (Λ_A ⊗ Λ_B + δI)⁻¹ (Q_A ⊗ Q_B)ᵀ``; conjugate gradients on
        GGN-vector products where ``C`` is matrix-free."""
        return self._apply(v, inverse=True)

    def _apply(self, v, inverse):
        if self.dense is not None:
            if not inverse:
                return self.dense @ v
            if "factor" not in self._cache:
                self._cache["factor"] = cholesky(self.dense)
            return torch.cholesky_solve(v.unsqueeze(-1), self._cache["factor"]).squeeze(-1)
        if self.structure == "diag":
            return v / self.diagonal if inverse else v * self.diagonal
        if self.structure == "kron":
            return self.source.kron_apply(self, v, inverse, self._cache)
        from ..linalg import cg

        op = self._cache.setdefault("op", self.source.ggn_operator(self.theta.detach(), self.h.detach()))
        j = self.source.jitter
        if not inverse:
            return op(v.unsqueeze(0))[0] + j * v
        return cg(lambda u: op(u.unsqueeze(0))[0] + j * u, v, tol=1e-10).x


class LaplaceCurvature:
    """
    The pieces of ``C`` for one :class:`~pyro_evidence.problem.Problem`, found once (which sites are observed
    laws, which latents are linear layers, whether the prior's Hessian is diagonal); then pure functions of
    ``(θ, h)``.

    :param str structure: one of :data:`STRUCTURES`.
    :param str logdet: ``"dense"`` or ``"slq"`` (``exact`` and ``ggn`` only).
    :param float jitter: added to the diagonal of ``C``.
    :param int num_probes: SLQ's Rademacher probes ``m``.
    :param int lanczos_steps: SLQ's Lanczos steps ``k`` (full reorthogonalisation).
    :param int seed: SLQ's probes.
    :param str kron_bias: ``"joint"`` (a layer's bias is a row of its weight: homogeneous coordinates, one
        Kronecker block that keeps the weight–bias cross terms) or ``"separate"`` (laplace-torch's convention: the
        weight's block without the bias row, and the bias a block of its own, ``[[N]] ⊗ B``; no cross terms).
    """

    def __init__(self, problem, structure="exact", logdet="dense", *, jitter=0.0, num_probes=30, lanczos_steps=40,
                 seed=0, kron_bias="joint"):
        if structure not in STRUCTURES:
            raise ValueError(f"unknown hessian {structure!r}; use one of {list(STRUCTURES)}")
        if logdet not in LOGDETS:
            raise ValueError(f"unknown logdet {logdet!r}; use 'dense' or 'slq'")
        if logdet == "slq" and structure not in ("exact", "ggn"):
            raise ValueError(f"logdet='slq' works on a matrix-free operator: use it with hessian='ggn' or 'exact', not {structure!r}")
        if kron_bias not in KRON_BIAS:
            raise ValueError(f"unknown kron_bias {kron_bias!r}; use 'joint' (weight and bias in one block) or 'separate'")
        for key, value in (("num_probes", num_probes), ("lanczos_steps", lanczos_steps)):
            if not isinstance(value, int) or value < 2:
                raise ValueError(f"{key} must be an int >= 2, got {value!r}")
        self.problem, self.structure, self.logdet, self.jitter = problem, structure, logdet, jitter
        self.num_probes, self.lanczos_steps, self.seed = num_probes, lanczos_steps, seed
        self.kron_bias = kron_bias
        self._held = None  # {"theta": θ, …} at a held θ (hold)
        self._laws_move = None  # whether the observed laws' parameters depend on h (hold asks once)
        self._one_row = None  # the data cut to one row, where R on it is R (setup finds out)
        self._setup_done = False

    # --- the functional pieces -------------------------------------------------------------------------------
    def _run(self, theta, h, probes=None, args=None):
        watch = _Watch(probes)
        trace, log_jacobian = self.problem.trace(theta, h, args=args, handlers=(watch,))
        return trace, log_jacobian, watch

    def _outputs(self, trace):
        out = []
        for name in self.problem.observed:
            site = trace.nodes[name]
            if isinstance(site["fn"], dist.Unit) or (site.get("infer") or {}).get("_deterministic"):
                continue
            out.extend((name, *o) for o in _site_outputs(name, site))
        return out

    def split(self, theta, h, probes=None, args=None):
        """``(η, aux, R, watch)``: the observed laws' parameters (a tuple of tensors), the values their Fisher
        needs, the rest ``R(θ, h)`` of the inner loss, and what the run saw (on ``args`` in place of the data)."""
        trace, log_jacobian, watch = self._run(theta, h, probes, args)
        outputs = self._outputs(trace)
        likelihood_sites = {o[0] for o in outputs}
        rest = -log_jacobian
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and not site_is_subsample(site) and name not in likelihood_sites:
                rest = rest - _masked_log_prob(site).sum()
        return tuple(o[2] for o in outputs), tuple((o[3], o[4]) for o in outputs), rest, watch

    def rest(self, theta, h):
        """``R(θ, h)``: on the first row of the data alone where that is verified to give the same function (a
        prior that does not read the data: every derivative of ``R`` then costs a one-row run, not an ``N``-row
        one)."""
        return self.split(theta, h, args=self._one_row)[2]

    def _find_one_row(self, theta, h):
        """The data cut to their first row, where ``R`` on them equals ``R`` on all of it at two points (a prior
        that reads the data, or latents per row, keep the full data)."""
        n = self.problem.num_data
        one = tuple(a[:1] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == n else a for a in self.problem.args)
        wiggle = 0.1 * torch.sin(torch.arange(theta.numel(), dtype=theta.dtype, device=theta.device) + 1.0)
        try:
            for t in (theta, theta + wiggle):
                full, cut = self.split(t, h)[2], self.split(t, h, args=one)[2]
                if not bool(torch.isclose(full, cut, rtol=1e-12, atol=0)):
                    return None
        except (ValueError, RuntimeError, TypeError):
            return None
        return one if n > 1 else None

    def _meta(self):
        if not self._setup_done:
            self.setup()
        return self._kinds

    def setup(self):
        """Finds the observed laws (their kinds and data rows), whether the prior's Hessian is diagonal and, for
        ``diag``/``kron``, the layers; raises a ``ValueError`` naming what a structure cannot handle."""
        if self._setup_done or self.structure == "exact":  # the Hessian itself needs no laws nor layers
            return
        problem = self.problem
        theta, h = problem.theta_init, problem.h_init
        trace, _, watch = self._run(theta, h)
        outputs = self._outputs(trace)
        if not outputs:
            raise ValueError("the GGN needs an observed site whose law depends on the latents; this model has none")
        n = problem.num_data
        self._kinds = [_Output(name, kind, _row_position(trace.nodes[name], n), event) for name, kind, *_, event in outputs]
        self._one_row = self._find_one_row(theta, h)
        self.coupled = self._coupled_site(theta, h)
        self._setup_done = True
        if self.structure not in ("diag", "kron"):
            return
        missing = [k.site for k in self._kinds if k.row_dim is None]
        if missing:
            raise ValueError(
                f"hessian={self.structure!r} needs every observed site in a pyro.plate of size N = {n} (per-row output "
                f"gradients); site {missing[0]!r} is not — use hessian='ggn'"
            )
        if self.coupled is not None:
            raise ValueError(
                f"hessian={self.structure!r} takes the prior's Hessian as diagonal, but the prior couples the "
                f"coordinates of latent site {self.coupled!r} with others (a hierarchical or correlated prior); use "
                "hessian='ggn' (dense or logdet='slq')"
            )
        # a weight used twice (shared) or on other than the N rows is no K-FAC layer: it gets its diagonal
        self.layers = [
            _Layer(name, watch.bias.get(name), name in watch.transposed)
            for name, count in watch.uses.items()
            if count == 1 and watch.inputs[name].shape[0] == n
        ]
        self.out_shapes = {l.weight: watch.out_shapes[l.weight] for l in self.layers}
        if self.structure == "kron":
            self._check_isotropic(theta, h)
        site = problem.latent_by_name
        covered = torch.zeros(problem.theta_dim, dtype=torch.bool, device=problem.device)
        for l in self.layers:
            for s in (l.weight, l.bias):
                if s is not None:
                    covered[site[s].slice] = True
        self.other = torch.nonzero(~covered).reshape(-1)

    def _coupled_site(self, theta, h):
        """The first latent site whose prior Hessian has an off-diagonal entry, or None: ``∇²R z`` against
        ``(∇²R 1) ⊙ z`` for a Rademacher ``z``, at a point moved off the start (a coupling may vanish there)."""
        d = self.problem.theta_dim
        g = torch.Generator().manual_seed(0)
        z = (torch.randint(0, 2, (d,), generator=g) * 2 - 1).to(theta)
        theta = theta + 0.1 * torch.randn(d, generator=g, dtype=torch.float64).to(theta)
        h = h + 0.1 * torch.randn(h.shape, generator=g, dtype=torch.float64).to(h)
        Hz, H1 = vmap(lambda v: _hvp(self.rest, theta, h, v))(torch.stack([z, torch.ones_like(theta)]))
        tol = 100 * torch.finfo(theta.dtype).eps ** 0.5
        bad = ~torch.isclose(Hz, H1 * z, rtol=tol, atol=tol * float(H1.abs().max().clamp(min=1.0)))
        if not bool(bad.any()):
            return None
        i = int(torch.nonzero(bad)[0])
        return next(s.name for s in self.problem.latents if s.offset <= i < s.offset + s.numel)

    def prior_diagonal(self, theta, h):
        """``diag ∇²R``: one Hessian-vector product with ones (the prior's Hessian being diagonal)."""
        return _hvp(self.rest, theta, h, torch.ones_like(theta))

    def _check_isotropic(self, theta, h):
        # at the start and at a random other h: per-weight precisions that start out equal are still per-weight
        g = torch.Generator().manual_seed(1)
        other = h + 0.3 * torch.randn(h.shape, generator=g, dtype=torch.float64).to(h)
        diags = [_hvp(self.rest, theta, x, torch.ones_like(theta)) for x in (h, other)]
        site = self.problem.latent_by_name
        for l in self.layers:
            w = torch.stack([diag[site[l.weight].slice] for diag in diags])
            if not bool(torch.allclose(w, w[:, :1].expand_as(w), rtol=1e-10, atol=0)):
                raise ValueError(
                    f"hessian='kron' needs one prior precision over each weight matrix (K-FAC adds δI to A ⊗ B); the "
                    f"prior Hessian of latent site {l.weight!r} varies over its elements — use hessian='diag' or 'ggn' "
                    "for per-weight precisions"
                )
            if l.bias is not None:
                b = torch.stack([diag[site[l.bias].slice] for diag in diags])
                # joint: the bias shares the weight's block, so its δ; separate: its own block, one δ over it
                ref = w[:, :1] if self.kron_bias == "joint" else b[:, :1]
                if not bool(torch.allclose(b, ref.expand_as(b), rtol=1e-10, atol=0)):
                    l.bias = None  # a bias whose precision fits no block keeps its exact diagonal

    # --- products --------------------------------------------------------------------------------------------
    def _laws(self, theta, h):
        eta, aux, rest, _ = self.split(theta, h)
        return eta, aux, rest

    def ggn_operator(self, theta, h):
        """``v ↦ C v`` for ``C = JᵀΛJ + ∇²R`` (``ggn``) or ``∇²L`` (``exact``), batched over leading
        dimensions of ``v``. Pure in ``(θ, h)``."""
        if self.structure == "exact":
            return lambda V: vmap(lambda v: _hvp(self.problem.loss, theta, h, v))(V)
        self._meta()
        eta, back, aux = vjp(lambda t: self._laws(t, h)[:2], theta, has_aux=True)
        prior = self.prior_diagonal(theta, h) if self.coupled is None else None

        def one(v):
            _, Jv = jvp(lambda t: self._laws(t, h)[0], (theta,), (v,))
            lam = tuple(w * _fisher(k.fisher, a, u) for k, (a, w), u in zip(self._kinds, aux, Jv))
            # a diagonal prior Hessian costs nothing per product; a coupled one a Hessian-vector product
            return back(lam)[0] + (prior * v if prior is not None else _hvp(self.rest, theta, h, v))

        return lambda V: vmap(one)(V)

    def dense(self, theta, h):
        """The dense ``C`` (``exact``: the Hessian by chunked batched Hessian-vector products; ``ggn``: ``JᵀΛJ``
        plus the prior's dense Hessian)."""
        d = theta.shape[-1]
        if self.structure == "exact":
            H, _ = hessian_and_value(self.problem.loss, theta, h, chunk_size=CHUNK)
            return H
        op = self.ggn_operator(theta, h)
        eye = torch.eye(d, dtype=theta.dtype, device=theta.device)
        return torch.cat([op(eye[i : i + CHUNK]) for i in range(0, d, CHUNK)]) if d else eye

    def hold(self, theta, h):
        """Post-hoc tuning at a held ``θ`` (and each round of hyperparameter steps of the online route): where the
        observed laws' parameters do not move with ``h`` (a classifier's logits; not a regression's noise scale),
        each layer's statistics are computed once at ``θ`` and reused for every ``h``; the prior's curvature, which
        moves with ``h``, is recomputed. ``hold(None, h)`` lets go."""
        self._held = None
        if theta is None or self.structure not in ("diag", "kron") or self._laws_move is True:
            return
        if self._laws_move is None:  # whether the laws read h is the model's structure: asked once
            self._meta()
            other = h + 0.5 * torch.ones_like(h)
            first, second = (self._laws(theta, x)[:2] for x in (h, other))
            self._laws_move = not (all(torch.equal(a, b) for a, b in zip(first[0], second[0])) and
                                   all(torch.equal(a, b) for x, y in zip(first[1], second[1]) for a, b in zip(x, y)))
        if not self._laws_move:
            self._held = {"theta": theta.detach().clone()}  # and what _held_or computes there once

    def loss(self, theta, h):
        """``L(θ, h)``; at a held ``θ`` (:meth:`hold`) the likelihood's part, a constant in ``h`` there, once, and
        ``R`` on one row: no step of a post-hoc tuning runs the network on the data."""
        held = self._held
        if held is None or not torch.equal(held["theta"], theta):
            return self.problem.loss(theta, h)
        if "likelihood" not in held:
            with torch.enable_grad():
                t = held["theta"].clone().requires_grad_(True)
                part = self.problem.loss(t, h.detach()) - self.rest(t, h.detach())
                (grad,) = torch.autograd.grad(part, t)
            held["likelihood"], held["likelihood gradient"] = part.detach(), grad
        # the constant's value and its gradient at the held θ (what ‖∇_θ L‖ there needs), no network run
        return held["likelihood"] + torch.dot(held["likelihood gradient"], theta - held["theta"]) + self.rest(theta, h)

    def _factor_eigenvalues(self, block, theta):
        """The eigenvalues of a block's factors; at a held ``θ`` (:meth:`hold`) the factors are constants, so once."""
        return self._held_or(("eig", block.weight, block.bias), theta,
                             lambda: [(torch.linalg.eigvalsh(block.A), torch.linalg.eigvalsh(block.B))])[0]

    def _layer_stats(self, theta, h):
        """Per layer: the input with a 1 appended where it has a bias (``(N, in')``) and the output gradients
        of the ``Λ^{½}``-weighted outputs (``(C, N, out)``), by one batched backward pass over the ``C`` columns
        of ``Λ^{½}`` of a row (rows are independent, so each column serves all rows at once)."""
        n = self.problem.num_data
        probes = {l.weight: torch.zeros(self.out_shapes[l.weight], dtype=theta.dtype, device=theta.device) for l in self.layers}

        def f(p):
            eta, aux, _, watch = self.split(theta, h, p)
            return eta, (aux, {l.weight: watch.inputs[l.weight] for l in self.layers})

        eta, back, (aux, inputs) = vjp(f, probes, has_aux=True)
        cots = self._root_columns(eta, aux, n)
        grads = vmap(back)(cots)[0]
        # where a value first went non-finite: inputs forward from the first layer, gradients back from the last
        checks = [(l, "inputs", inputs[l.weight]) for l in self.layers]
        checks += [(l, "output gradients", grads[l.weight]) for l in reversed(self.layers)]
        for l, what, x in checks:
            # one reduction: a NaN or an infinity anywhere makes the sum non-finite (counted only then)
            if not bool(torch.isfinite(x.sum())) and bool((~torch.isfinite(x)).any()):
                raise FloatingPointError(
                    f"the curvature of layer {l.weight!r} is not finite: its {what} hold {int((~torch.isfinite(x)).sum())} "
                    "non-finite values at these parameters (an exploding activation or logit; check the layer's scale "
                    "and the data's)"
                )
        stats = {}
        for l in self.layers:
            a = inputs[l.weight]
            if l.bias is not None and self.kron_bias == "joint":
                a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
            stats[l.weight] = (a, grads[l.weight].reshape(-1, n, math.prod(self.out_shapes[l.weight][1:])))
        return stats

    def _root_columns(self, eta, aux, n):
        """Cotangents ``Λ^{½}`` column by column, one column per output parameter of a row: stacked over a new
        first dimension, each zero outside its own output and row position."""
        cols = []
        for idx, ((a, w), k) in enumerate(zip(aux, self._kinds)):
            root = _fisher_root(k.fisher, a) * w.sqrt().unsqueeze(-1)  # (*shape, K)
            if not k.event:
                root = root.squeeze(-1)
                rows = root.movedim(k.row_dim, 0).reshape(n, -1)  # (N, P)
                P = rows.shape[1]
                eye = torch.eye(P, dtype=rows.dtype, device=rows.device)
                col = rows.unsqueeze(0) * eye.unsqueeze(1)  # (P, N, P)
                shape = root.movedim(k.row_dim, 0).shape
                col = col.reshape(P, *shape).movedim(1, k.row_dim + 1)
            else:
                K = root.shape[-1]
                moved = root.movedim(k.row_dim, 0)  # (N, ..., K_param, K_col)
                rest = moved.shape[1:-2]
                flat = moved.reshape(n, -1, K, K)  # (N, M, K, Kc)
                M = flat.shape[1]
                eye = torch.eye(M, dtype=flat.dtype, device=flat.device)
                col = torch.einsum("nmkc,mq->qcnmk", flat, eye).reshape(M * K, n, *rest, K)
                col = col.movedim(1, k.row_dim + 1)
            cols.append((idx, col))
        total = sum(c.shape[0] for _, c in cols)
        out, start = [], 0
        for (idx, col), e in zip(cols, eta):
            block = torch.zeros((total,) + e.shape, dtype=e.dtype, device=e.device)
            block = torch.cat([block[:start], col, block[start + col.shape[0] :]])
            out.append(block)
            start += col.shape[0]
        return tuple(out)

    def _other_diagonal(self, theta, h, index):
        """Exact ``diag(JᵀΛJ)`` at the coordinates ``index``: one Jacobian-vector product each."""
        if index.numel() == 0:
            return theta.new_zeros(0)
        aux = self._laws(theta, h)[1]

        def one(i):
            v = torch.zeros_like(theta).index_fill(0, i.reshape(1), 1.0)
            _, Jv = jvp(lambda t: self._laws(t, h)[0], (theta,), (v,))
            return sum((w * u * _fisher(k.fisher, a, u)).sum() for k, (a, w), u in zip(self._kinds, aux, Jv))

        return torch.cat([vmap(one)(index[i : i + CHUNK]) for i in range(0, index.numel(), CHUNK)])

    def diagonal(self, theta, h):
        """``diag(JᵀΛJ) + diag(∇²R)`` exactly, layers by their per-row output gradients."""
        self._meta()
        diag = self.prior_diagonal(theta, h)  # the prior's Hessian is diagonal (checked)
        return diag + self._held_or("ggn diagonal", theta, lambda: self._ggn_diagonal(theta, h))

    def _ggn_diagonal(self, theta, h):
        ggn = theta.new_zeros(theta.shape[-1])
        site = self.problem.latent_by_name
        for l, (a, g) in zip(self.layers, self._layer_stats(theta, h).values()):
            s2 = (g * g).sum(0)  # (N, out)
            if l.bias is not None and self.kron_bias == "separate":  # the exact diagonal: the bias input is 1
                a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
            block = (a * a).T @ s2  # (in', out)
            ggn = _place(ggn, site, l, block)
        return ggn.index_put((self.other,), self._other_diagonal(theta, h, self.other)) if self.other.numel() else ggn

    def kron(self, theta, h):
        """Kronecker blocks per layer and the exact diagonal elsewhere."""
        self._meta()
        n = self.problem.num_data
        prior = self.prior_diagonal(theta, h)
        site = self.problem.latent_by_name
        blocks = []
        for l, (A, B) in zip(self.layers, self._held_or("factors", theta, lambda: self._factors(theta, h))):
            delta = prior[site[l.weight].slice].mean()
            if l.bias is None or self.kron_bias == "joint":
                blocks.append(KronBlock(l.weight, l.bias, A, B, delta, l.transposed))
                continue
            blocks.append(KronBlock(l.weight, None, A, B, delta, l.transposed))
            ones = torch.full((1, 1), float(n), dtype=A.dtype, device=A.device)
            blocks.append(KronBlock(None, l.bias, ones, B, prior[site[l.bias].slice].mean()))
        other = prior[self.other] + self._held_or("other", theta, lambda: self._other_diagonal(theta, h, self.other))
        return blocks, other

    def _factors(self, theta, h):
        """Per layer ``(A, B)``: ``A = Σ_n ā_n ā_nᵀ`` and ``B = (1/N) Σ_n Σ_c g_nc g_ncᵀ``."""
        n = self.problem.num_data
        factors = []
        for a, g in self._layer_stats(theta, h).values():
            g = g.reshape(-1, g.shape[-1])  # (C·N, out): Σ_n Σ_c g_nc g_ncᵀ is one matrix product
            factors.append((a.T @ a, g.T @ g / n))
        return factors

    def _held_or(self, key, theta, compute):
        """``compute()``, or at a held ``θ`` (:meth:`hold`) its value computed once: there the observed laws, and
        so every statistic of the layers, are constants in ``h``."""
        held = self._held
        if held is None or not torch.equal(held["theta"], theta):
            return compute()
        if key not in held:
            value = compute()
            held[key] = [tuple(x.detach() for x in v) for v in value] if isinstance(value, list) else value.detach()
        return held[key]

    # --- the curvature and its log det -----------------------------------------------------------------------
    def log_det(self, theta, h):
        """``log det C`` as a differentiable function of ``(θ, h)`` (for ``slq``: a surrogate whose value is the
        estimate and whose gradient is Hutchinson's estimate of the gradient)."""
        return self.curvature(theta, h).log_det

    def curvature(self, theta, h) -> Curvature:
        j = self.jitter
        if self.logdet == "slq":
            return self._slq(theta, h)
        if self.structure in ("exact", "ggn"):
            C = self.dense(theta, h)
            if j:
                C = C + j * torch.eye(C.shape[-1], dtype=C.dtype, device=C.device)
            what = "Hessian of the inner loss" if self.structure == "exact" else "GGN (with the prior's Hessian)"
            factor = cholesky(C, what=what)
            return Curvature(self.structure, 2 * factor.diagonal().log().sum(), dense=C, source=self, theta=theta, h=h)
        if self.structure == "diag":
            diag = self.diagonal(theta, h) + j
            _check_positive(diag, "diagonal")
            return Curvature("diag", diag.log().sum(), diagonal=diag, source=self, theta=theta, h=h)
        blocks, other = self.kron(theta, h)
        other = other + j
        _check_positive(other, "diagonal outside the Kronecker blocks")
        total = other.log().sum()
        for b in blocks:
            lam, mu = self._factor_eigenvalues(b, theta)
            eig = lam.clamp(min=0).unsqueeze(1) * mu.clamp(min=0).unsqueeze(0) + b.delta + j
            _check_positive(eig, f"Kronecker block of {b.weight or b.bias!r} (its prior precision must be > 0)")
            total = total + eig.log().sum()
        return Curvature("kron", total, diagonal=other, blocks=blocks, source=self, theta=theta, h=h)

    def _slq(self, theta, h):
        est, trace = self._hutchinson(theta, h)
        surrogate = est.value + (trace - trace.detach()).mean()
        return Curvature(self.structure, surrogate, log_det_se=est.se, source=self, theta=theta, h=h)

    def probe_log_dets(self, theta, h):
        """Per-probe SLQ surrogates ``(m,)``: their mean is :meth:`log_det`; their spread is the estimator's."""
        est, trace = self._hutchinson(theta, h)
        return est.per_probe + trace - trace.detach()

    def _hutchinson(self, theta, h):
        """The SLQ estimate at ``(θ, h)`` held fixed, and ``(C⁻¹z)ᵀ C(θ, h) z`` per probe, live in ``(θ, h)``: its
        gradient is Hutchinson's estimate of ``∂ log det C``, the solves taken from the same Lanczos bases."""
        op = self.ggn_operator(theta.detach(), h.detach())
        j = self.jitter
        est = slq_logdet((lambda V: op(V) + j * V) if j else op, theta.shape[-1], theta, self.num_probes,
                         self.lanczos_steps, self.seed)
        return est, (est.solves * self.ggn_operator(theta, h)(est.probes)).sum(-1)

    def linearised_rows(self, theta, h, deltas):
        """
        The GLM (linearised) predictive's per-row log-likelihoods ``log p(y_n | η(θ̂) + J δ_s)``, shape ``(S, N)``, for
        draws ``δ_s ~ N(0, C⁻¹)`` (Immer et al. 2021): the network is linearised at the mode, so the predictive is
        the one whose curvature the GGN is.
        """
        self._meta()
        trace, _, _ = self._run(theta, h)
        outputs = self._outputs(trace)
        eta = tuple(o[2] for o in outputs)
        # 64 draws at a time: S draws at once would hold S copies of the network's activations
        Jd = vmap(lambda v: jvp(lambda t: self.split(t, h)[0], (theta,), (v,))[1], chunk_size=64)(deltas)
        n = self.problem.num_data
        rows = 0
        for (name, kind, values, a, w, event), k, e, je in zip(outputs, self._kinds, eta, Jd):
            if kind == "scale":
                continue  # the Normal's scale enters with its loc (kept at the mode)
            if kind == "loc_param":
                scale = next(o[2] for o in outputs if o[0] == name and o[1] == "scale")
            else:
                scale = None
            y = trace.nodes[name]["value"]
            shifted = e + je  # (S, *shape)
            lp = _law_log_prob(kind, shifted, scale, y.expand(shifted.shape[:-1] if event else shifted.shape))
            lp = lp * (w[..., 0] if event else w)
            rows = rows + lp.movedim(k.row_dim + 1, 1).reshape(lp.shape[0], n, -1).sum(-1)
        return rows

    def kron_apply(self, curv: Curvature, v, inverse, cache):
        """``C v`` or ``C⁻¹ v`` in the Kronecker structure: each block's ``(in', out)`` slice of ``v`` is mapped
        into the factors' eigenbases, scaled by ``λ_i μ_j + δ`` (or divided by it), and mapped back."""
        site = self.problem.latent_by_name
        other = v[self.other] / curv.diagonal if inverse else v[self.other] * curv.diagonal
        out = torch.zeros_like(v).index_put((self.other,), other)
        if "eig" not in cache:
            cache["eig"] = [(*torch.linalg.eigh(b.A), *torch.linalg.eigh(b.B)) for b in curv.blocks]
        for b, (lam, QA, mu, QB) in zip(curv.blocks, cache["eig"]):
            scale = lam.clamp(min=0).unsqueeze(1) * mu.clamp(min=0).unsqueeze(0) + b.delta + self.jitter
            V = _block_of(v, site, b)
            W = QA @ ((QA.T @ V @ QB) / scale if inverse else (QA.T @ V @ QB) * scale) @ QB.T
            out = _place(out, site, b, W)
        return out

    # --- draws of N(0, C⁻¹) ----------------------------------------------------------------------------------
    def sample(self, curv: Curvature, num_samples: int, seed: int = 0):
        theta = curv.theta
        g = torch.Generator().manual_seed(seed)
        eps = torch.randn(num_samples, theta.shape[-1], generator=g, dtype=torch.float64).to(theta)
        if curv.dense is not None:
            factor = torch.linalg.cholesky(curv.dense)
            return torch.linalg.solve_triangular(factor.mT, eps.mT, upper=True).mT
        if curv.structure == "diag":
            return eps * curv.diagonal.rsqrt()
        if curv.structure == "kron":
            out = torch.zeros_like(eps)
            out[:, self.other] = eps[:, self.other] * curv.diagonal.rsqrt()
            site = self.problem.latent_by_name
            for b in curv.blocks:
                lam, QA = torch.linalg.eigh(b.A)
                mu, QB = torch.linalg.eigh(b.B)
                scale = (lam.clamp(min=0).unsqueeze(1) * mu.clamp(min=0).unsqueeze(0) + b.delta + self.jitter).rsqrt()
                Z = torch.randn(num_samples, *scale.shape, generator=g, dtype=torch.float64).to(theta)
                W = QA @ (Z * scale) @ QB.T  # (S, in', out)
                n_in = W.shape[1] - (b.bias is not None)
                if b.weight is not None:
                    weight = W[:, :n_in].mT if b.transposed else W[:, :n_in]
                    out[:, site[b.weight].slice] = weight.reshape(num_samples, -1)
                if b.bias is not None:
                    out[:, site[b.bias].slice] = W[:, n_in]
            return out
        if curv.structure == "exact":
            raise ValueError("draws from the matrix-free exact Hessian are not available; use hessian='ggn' with logdet='slq'")
        return self._perturbation_draws(curv, eps, g)

    def _perturbation_draws(self, curv, eps, g):
        """Matrix-free draws: ``C⁻¹ (JᵀΛ^{½}ε₁ + (∇²R)^{½} ε₂)`` has covariance ``C⁻¹`` (the prior's Hessian must be
        diagonal), each solve by conjugate gradients."""
        from ..linalg import cg

        theta, h = curv.theta.detach(), curv.h.detach()
        self._meta()
        if self.coupled is not None:
            raise ValueError(
                f"matrix-free draws need a prior whose Hessian is diagonal; latent site {self.coupled!r} is coupled "
                "to others (use logdet='dense')"
            )
        _, back, aux = vjp(lambda t: self._laws(t, h)[:2], theta, has_aux=True)
        prior = self.prior_diagonal(theta, h).clamp(min=0) + self.jitter
        op = self.ggn_operator(theta, h)
        draws = []
        for s in range(eps.shape[0]):
            noise = []
            for k, (a, w) in zip(self._kinds, aux):
                root = _fisher_root(k.fisher, a) * w.sqrt().unsqueeze(-1)
                if k.event:  # (…, K, K) root times one normal per column
                    e = torch.randn(root.shape[:-1], generator=g, dtype=torch.float64).to(a)
                    noise.append((root @ e.unsqueeze(-1)).squeeze(-1))
                else:
                    noise.append(root.squeeze(-1) * torch.randn(a.shape, generator=g, dtype=torch.float64).to(a))
            b = back(tuple(noise))[0] + prior.sqrt() * eps[s]
            draws.append(cg(lambda v: op(v.unsqueeze(0))[0] + self.jitter * v, b, tol=1e-8).x)
        return torch.stack(draws)


def symmetric_layer(problem, theta, h):
    """The first linear layer (its weight site) whose output units are interchangeable at ``θ``, or None: a layer
    followed by another whose weight columns are all equal, its bias elements too (all-zero weights, say). Every
    unit of such a layer gets the same gradient, so no inner solve can tell them apart: it ends at a saddle with a
    zero gradient, which would read as converged."""
    watch = _Watch()
    trace, _ = problem.trace(theta, h, handlers=(watch,))
    layers = [name for name, count in watch.uses.items() if count == 1]
    values = {s.name: trace.nodes[s.name]["value"] for s in problem.latents}
    for name in layers[:-1]:  # the last layer's units are the outputs, told apart by the data
        w = values[name]
        if w.dim() != 2:
            continue
        units = w if name in watch.transposed else w.T  # (out, in)
        bias = values.get(watch.bias.get(name), torch.zeros(units.shape[0], dtype=w.dtype, device=w.device))
        if units.shape[0] > 1 and bool((units == units[:1]).all()) and bool((bias == bias.reshape(-1)[0]).all()):
            return name
    return None


def refuse_symmetric(problem, theta, h, where="the start"):
    """Raises a ``ValueError`` naming the layer where :func:`symmetric_layer` finds one at ``θ``."""
    if theta.dim() != 1 or theta.numel() != problem.theta_dim or not problem.theta_dim:
        return
    name = symmetric_layer(problem, theta, h)
    if name is not None:
        raise ValueError(
            f"at {where} the units of layer {name!r} are identical (its weight columns and bias elements are equal, "
            "all-zero weights say): each gets the same gradient, so the inner solve cannot tell them apart and would "
            "stop at a saddle with a zero gradient; start from a draw of the prior "
            "(init_loc_fn=pyro.infer.autoguide.init_to_sample) or give a trained network (at=, theta_init=)"
        )


def _law_log_prob(kind, eta, scale, y):
    """Element-wise log-density of an observed law rebuilt from (linearised) parameters ``eta``."""
    if kind == "loc_param":
        return torch.distributions.Normal(eta, scale).log_prob(y)
    if kind == "logits":
        return y * eta - F.softplus(eta)
    if kind == "rate":
        rate = eta.clamp(min=torch.finfo(eta.dtype).tiny)  # a linearised rate may leave the support
        return y * rate.log() - rate - torch.lgamma(y + 1)
    if kind == "categorical":
        return eta.log_softmax(-1).gather(-1, y.long().unsqueeze(-1)).squeeze(-1)
    raise ValueError(f"the linearised predictive does not cover {kind!r} outputs")


def _block_of(flat, site, block):
    """A block's ``(in', out)`` matrix (bias row last) read from the flat vector: the inverse of :func:`_place`."""
    rows, out = [], block.B.shape[0]
    if block.weight is not None:
        weight = flat[site[block.weight].slice]
        rows.append(weight.reshape(out, -1).T if block.transposed else weight.reshape(-1, out))
    if block.bias is not None:
        rows.append(flat[site[block.bias].slice].reshape(1, -1))
    return torch.cat(rows)


def _place(flat, site, layer, block):
    """Writes a layer's ``(in', out)`` block (bias row last) into the flat vector at its sites."""
    n_in = block.shape[0] - (layer.bias is not None)
    if layer.weight is not None:
        w = site[layer.weight]
        weight = block[:n_in].T if layer.transposed else block[:n_in]
        flat = flat.index_put((torch.arange(w.offset, w.offset + w.numel, device=flat.device),), weight.reshape(-1))
    if layer.bias is not None:
        b = site[layer.bias]
        flat = flat.index_put((torch.arange(b.offset, b.offset + b.numel, device=flat.device),), block[n_in].reshape(-1))
    return flat


def _hvp(fn, theta, h, v):
    return jvp(lambda t: torch.func.grad(fn)(t, h), (theta,), (v,))[1]


def _masked_log_prob(site):
    from pyro.distributions.util import scale_and_mask

    return scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])


def _check_positive(x, what):
    if not bool((x > 0).all()):
        raise NotPositiveDefiniteError(
            f"the curvature's {what} has {int((x <= 0).sum())} entries <= 0: a latent with no prior curvature "
            "and no data (give it a proper prior, or leave it out; jitter= would change the evidence without bound)"
        )


@dataclass
class SLQEstimate:
    """``value`` = the estimate of ``log det C``; ``se`` its standard error over probes; ``per_probe`` the
    ``m`` single-probe estimates; ``probes`` ``z``; ``solves`` ``C⁻¹z`` from the Lanczos bases."""

    value: torch.Tensor
    se: float
    per_probe: torch.Tensor
    probes: torch.Tensor
    solves: torch.Tensor


def slq_logdet(matvec, d: int, like, num_probes: int = 30, lanczos_steps: int = 40, seed: int = 0) -> SLQEstimate:
    """
    Stochastic Lanczos quadrature of ``log det C`` for a symmetric positive definite ``C`` given as a batched
    ``matvec`` (``(m, d) → (m, d)``): for each Rademacher probe ``z``, ``k = lanczos_steps`` Lanczos steps from ``z/‖z‖`` with full
    reorthogonalisation give a tridiagonal ``T = U diag(ϑ) Uᵀ`` and ``zᵀ log(C) z ≈ ‖z‖² Σ_i U_{0i}² log ϑ_i``
    (Gauss quadrature; Ubaru, Chen & Saad 2017). Raises :class:`NotPositiveDefiniteError` at a Ritz value ``≤ 0``.
    """
    steps = min(lanczos_steps, d)
    g = torch.Generator().manual_seed(seed)
    Z = (torch.randint(0, 2, (num_probes, d), generator=g) * 2 - 1).to(like)
    with torch.no_grad():
        Q = torch.zeros(num_probes, steps, d, dtype=like.dtype, device=like.device)
        alpha = torch.zeros(num_probes, steps, dtype=like.dtype, device=like.device)
        beta = torch.zeros(num_probes, steps, dtype=like.dtype, device=like.device)
        q = Z / math.sqrt(d)
        alive = torch.ones(num_probes, dtype=torch.bool, device=like.device)
        tol = torch.finfo(like.dtype).eps ** 0.5
        for i in range(steps):
            Q[:, i] = q
            w = matvec(q)
            # a probe whose Krylov space is exhausted (β ≈ 0) is done: its later steps are decoupled from e₁
            alpha[:, i] = torch.where(alive, (w * q).sum(-1), torch.ones_like(alpha[:, i]))
            basis = Q[:, : i + 1]
            for _ in range(2):  # full reorthogonalisation, twice is enough
                w = w - torch.einsum("mid,mi->md", basis, torch.einsum("mid,md->mi", basis, w))
            b = w.norm(dim=-1)
            alive = alive & (b > tol * alpha[:, : i + 1].abs().amax(-1))
            beta[:, i] = torch.where(alive, b, torch.zeros_like(b))
            q = torch.where(alive.unsqueeze(-1), w / b.clamp(min=torch.finfo(like.dtype).tiny).unsqueeze(-1), torch.zeros_like(w))
        T = torch.diag_embed(alpha) + torch.diag_embed(beta[:, :-1], 1) + torch.diag_embed(beta[:, :-1], -1)
        ritz, U = torch.linalg.eigh(T)
        if bool((ritz <= 0).any()):
            raise NotPositiveDefiniteError(
                "stochastic Lanczos quadrature met a Ritz value <= 0: the curvature is not positive definite"
            )
        per_probe = d * (U[:, 0, :] ** 2 * ritz.log()).sum(-1)
        # C⁻¹z ≈ ‖z‖ Q T⁻¹ e₁
        e1 = torch.zeros(num_probes, steps, 1, dtype=like.dtype, device=like.device)
        e1[:, 0] = 1
        coef = (U @ (U.mT @ e1 / ritz.unsqueeze(-1))).squeeze(-1) * math.sqrt(d)
        solves = torch.einsum("mi,mid->md", coef, Q)
    value = per_probe.mean()
    se = float(per_probe.std() / math.sqrt(num_probes)) if num_probes > 1 else float("inf")
    return SLQEstimate(value, se, per_probe, Z, solves)
