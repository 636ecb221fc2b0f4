"""
A Pyro model plus its data, seen as pure functions of two flat vectors.

``θ`` (``theta``) stacks the continuous latent sample sites of the model, each mapped to
unconstrained space by ``biject_to(site.support)``; ``h`` stacks the hyperparameters, the
``pyro.param`` sites of the model, each mapped to unconstrained space by ``biject_to`` of its
constraint (a positive parameter is optimised as its logarithm). The log joint in
unconstrained space is

.. math::

    \\log p(y, w \\mid h) = \\sum_{\\text{sites}} \\log p(\\text{site} \\mid \\ldots)
        + \\sum_{\\text{latents}} \\log \\left| \\det \\frac{\\partial w}{\\partial \\theta} \\right|,

and every function of :class:`Problem` that takes ``(theta, h)`` is pure, so it can be used under
``torch.func.grad``, ``jvp``, ``vjp``, ``hessian`` and ``vmap``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to, constraints

from .compat import in_transform
from .replay import Unreplayable, record

__all__ = ["Problem", "LatentSite", "HyperSite", "prepare_data"]


@dataclass(frozen=True)
class _Block:
    """A named stretch ``[offset, offset + numel)`` of a flat vector."""

    name: str
    offset: int
    numel: int

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


@dataclass(frozen=True)
class LatentSite(_Block):
    """A continuous latent sample site and where it lives in ``θ``.

    ``free`` (None: all of them) indexes the coordinates of the site's flat unconstrained value that are in
    ``θ``; the others are held at ``fill``. They are the elements a mask switches off and nothing else reads
    (Pyro's ``obs_mask`` makes a latent ``<name>_unobserved`` of the full shape whose observed elements are
    such): the log joint is flat along them, so they have no Laplace approximation and no place in ``θ``.
    """

    shape: torch.Size  # constrained shape
    unconstrained_shape: torch.Size
    free: torch.Tensor | None = field(default=None, compare=False)
    fill: torch.Tensor | None = field(default=None, compare=False)

    def unflatten(self, theta, fill=None):
        """The site's unconstrained value, ``(…, *unconstrained_shape)``, from flat ``θ`` (the held elements at
        ``fill``, default their held values)."""
        u = theta[..., self.slice]
        if self.free is not None:
            full = self.fill.to(u.dtype) if fill is None else torch.full_like(self.fill, fill, dtype=u.dtype)
            u = full.expand(u.shape[:-1] + self.fill.shape).index_copy(-1, self.free, u)
        return u.reshape(theta.shape[:-1] + self.unconstrained_shape)

    def flatten(self, value):
        """The site's coordinates in ``θ`` of an unconstrained value of its full shape."""
        flat = value.reshape(-1)
        return flat if self.free is None else flat[self.free.to(flat.device)]


@dataclass(frozen=True)
class HyperSite(_Block):
    """A ``pyro.param`` site of the model that is optimised as a hyperparameter."""

    shape: torch.Size
    constraint: constraints.Constraint

    @property
    def transform(self):
        return biject_to(self.constraint)


@contextlib.contextmanager
def default_dtype(dtype):
    """The data's dtype as torch's default while the model runs, so that constants the model
    writes as Python numbers (``dist.Gamma(2.0, 1.0)``) are made in it too: in float32 they would
    round the log density of float64 data to float32. The caller's default is restored after."""
    previous = torch.get_default_dtype()
    if dtype == previous or dtype not in (torch.float32, torch.float64):
        yield
        return
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _is_floating(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def prepare_data(args: Iterable, dtype=None, device=None):
    """
    Checks the positional data of a model and brings it to one floating dtype and device.

    Positional arguments are the data: tensors (or arrays) sharing their first dimension ``N``,
    or ``None``. The dtype and device are those of the first floating tensor unless given.

    :returns: ``(args, dtype, device)``
    """
    out = []
    for i, a in enumerate(args):
        if a is None:
            out.append(a)
            continue
        if not isinstance(a, torch.Tensor):
            try:
                a = torch.as_tensor(a)
            except Exception as e:  # noqa: BLE001 - anything not convertible is a type error
                raise TypeError(
                    f"positional argument {i} must be a tensor or array of data, "
                    f"got {type(a).__name__}; pass other model arguments in model_kwargs="
                ) from e
        if a.dim() == 0:
            raise ValueError(
                f"positional argument {i} is a scalar; positional arguments are data with a "
                "first dimension N (pass other model arguments in model_kwargs=)"
            )
        if a.is_floating_point() and not torch.isfinite(a.sum()) and not torch.isfinite(a).all():  # (one reduction first)
            nan = int(torch.isnan(a).sum())
            hint = (f" ({nan} NaN: for missing observations, write any number in their place and pass the model a mask, "
                    "pyro.sample(..., obs=y, obs_mask=~missing), whose missing values are then integrated out)") if nan else ""
            raise ValueError(f"positional argument {i} contains NaN or inf{hint}")
        out.append(a)
    tensors = [a for a in out if a is not None]
    if not tensors:
        raise ValueError("the model needs at least one positional data tensor")
    sizes = {a.shape[0] for a in tensors}
    if len(sizes) > 1:
        shapes = ", ".join(
            f"argument {i}: {tuple(a.shape)}" for i, a in enumerate(out) if a is not None
        )
        raise ValueError(
            f"positional data must share the first dimension N (observations); got {shapes}"
        )
    floating = [a for a in tensors if a.is_floating_point()]
    if dtype is None:
        dtype = floating[0].dtype if floating else torch.get_default_dtype()
    if device is None:
        device = (floating or tensors)[0].device
    out = [
        None
        if a is None
        else a.to(device=device, dtype=dtype)
        if a.is_floating_point()
        else a.to(device=device)
        for a in out
    ]
    return tuple(out), dtype, torch.device(device)


def _initial_value(fn):
    """The prior mean where it exists and lies in the support, else the image of zero under
    ``biject_to(support)``: deterministic, and defined for improper priors too."""
    try:
        value = fn.mean.detach()
        if torch.isfinite(value).all() and bool(fn.support.check(value).all()):
            return value
    except (NotImplementedError, ValueError, AttributeError):
        pass
    transform = biject_to(fn.support)
    return transform(torch.zeros(transform.inverse_shape(fn.shape()))).detach()


class Discover(Messenger):
    """First run of a model: initialises its params, records latent sites, casts to the data's
    dtype and device so that ``pyro.param("a", torch.tensor(1.0))`` works with float64 data."""

    def __init__(self, dtype, device, init_loc_fn=None):
        super().__init__()
        self.dtype, self.device = dtype, device
        self.init_loc_fn = init_loc_fn

    def _cast(self, value):
        if _is_floating(value):
            return value.to(device=self.device, dtype=self.dtype)
        return value

    def _pyro_sample(self, msg):
        if not _is_latent(msg):
            return
        fn = msg["fn"]
        if fn.support.is_discrete:
            raise TypeError(
                f"latent site '{msg['name']}' is discrete ({type(fn).__name__}); "
                "only continuous latent sites can be integrated by a Laplace approximation or "
                "a Gaussian guide (marginalise it out, or observe it)"
            )
        if msg["value"] is None:
            value = _initial_value(fn) if self.init_loc_fn is None else self.init_loc_fn(msg)
            if value.shape != fn.shape():
                raise ValueError(
                    f"init_loc_fn gave latent site '{msg['name']}' a value of shape {tuple(value.shape)}; "
                    f"the site has shape {tuple(fn.shape())}"
                )
            msg["value"] = self._cast(value.detach())

    def _pyro_post_sample(self, msg):
        msg["value"] = self._cast(msg["value"])

    def _pyro_post_param(self, msg):
        msg["value"] = self._cast(msg["value"])
        _check_param(msg["name"], msg["value"])


def _unvalidated(fn):
    """``fn`` with Pyro's and torch's argument validation off for the whole call. A distribution made without
    ``validate_args`` reads the global default when its ``log_prob`` runs, after the trace: validation there
    would read tensor values into Python, which neither a recording nor ``vmap`` allows."""

    @functools.wraps(fn)
    def unvalidated(*args, **kwargs):
        with pyro.validation_enabled(False):
            return fn(*args, **kwargs)

    return unvalidated


def _example(x, start):
    """A plain tensor shaped like ``x`` (which may be a ``torch.func`` wrapper) to record with: ``start``
    where the shapes agree, zeros otherwise."""
    if tuple(x.shape) == tuple(start.shape) and x.dtype == start.dtype and x.device == start.device:
        return start
    return torch.zeros(x.shape, dtype=x.dtype, device=x.device)


def _check_param(name, value):
    """A param must lie inside its support: a positive one initialised at 0 or below is stored
    as ``log 0`` or NaN and would poison every density that uses it."""
    if not _is_floating(value):
        return
    constraint = pyro.get_param_store().get_state()["constraints"].get(name, constraints.real)
    if not (bool(torch.isfinite(value).all()) and bool(constraint.check(value.detach()).all())):
        raise ValueError(
            f"param {name!r} = {_short(value)} lies outside its support ({constraint}); initialise it inside, "
            "e.g. a positive param above 0"
        )


class _Substitute(Messenger):
    """Puts ``θ`` (unconstrained) into the latent sites and ``h`` (constrained values) into the
    param sites, accumulating the log-Jacobian of each latent's transform."""

    def __init__(self, latents: dict, theta, params: dict, dtype, device):
        super().__init__()
        self.latents, self.theta, self.params = latents, theta, params
        self.dtype, self.device = dtype, device
        self.log_jacobian = 0.0

    def _pyro_sample(self, msg):
        site = self.latents.get(msg["name"])
        value = msg["value"]
        if msg["is_observed"] and isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool:
            # counts in the data's dtype: Pyro's log_prob would take lgamma(1 + y) of int64 counts in float32
            msg["value"] = value.to(self.dtype)
        if site is None:
            if _is_latent(msg):
                raise ValueError(
                    f"latent site {msg['name']!r} was not in the model's first trace: the set of "
                    "latent sites must not depend on the data or on the latent values"
                )
            return
        u = site.unflatten(self.theta)
        transform = biject_to(msg["fn"].support)
        value = transform(u)
        log_jacobian = transform.log_abs_det_jacobian(u, value)
        if site.free is not None:  # the held elements are no coordinates of θ: no Jacobian of theirs
            kept = torch.zeros(site.fill.shape, dtype=log_jacobian.dtype, device=log_jacobian.device)
            log_jacobian = log_jacobian * kept.index_fill(0, site.free, 1.0).reshape(site.unconstrained_shape)
        self.log_jacobian = self.log_jacobian + log_jacobian.sum()
        msg["value"] = value

    def _pyro_param(self, msg):
        if msg["name"] in self.params:
            msg["value"] = self.params[msg["name"]]
            msg["done"] = True

    def _pyro_post_param(self, msg):
        # Params that are not hyperparameters are constants here, not leaves of the user's graph.
        v = msg["value"]
        if msg["name"] not in self.params and _is_floating(v):
            msg["value"] = v.detach().to(device=self.device, dtype=self.dtype)


def _is_latent(site) -> bool:
    return not (
        site["is_observed"]
        or site_is_subsample(site)
        or (site.get("infer") or {}).get("is_auxiliary", False)
    )


def _per_row(site, n, values):
    """``values`` (shaped like the site's log-probability) as ``(n, rest)`` along the site's plate
    of size ``n``, or None where the site lies in no such plate."""
    for frame in site["cond_indep_stack"]:
        if frame.size == n and frame.dim is not None:
            dim = frame.dim
            if values.dim() < -dim:
                values = values.reshape((1,) * (-dim - values.dim()) + values.shape)
            shape = list(values.shape)
            shape[dim] = n
            return values.expand(shape).movedim(dim, 0).reshape(n, -1)
    return None


def _rows(site, n):
    """Per-row log-probability of an observed site along its plate of size ``n``, or None."""
    if not any(frame.size == n and frame.dim is not None for frame in site["cond_indep_stack"]):
        return None
    return _per_row(site, n, _site_log_prob(site)).sum(-1)


def split_by_row(trace, prior, n, override=None):
    """Splits a trace's log density into ``(prior, rows)``: ``rows`` (or None) sums the per-row
    log-likelihood of the observed sites in a plate of size ``n``; every other site adds to
    ``prior``. ``override(name, site)`` may return a site's contribution to ``prior`` instead."""
    rows = None
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        replaced = override(name, site) if override is not None else None
        if replaced is not None:
            prior = prior + replaced
            continue
        per_row = _rows(site, n) if site["is_observed"] else None
        if per_row is None:
            prior = prior + _site_log_prob(site).sum()
        else:
            rows = per_row if rows is None else rows + per_row
    return prior, rows


def _site_log_prob(site):
    lp = site["fn"].log_prob(site["value"])
    return scale_and_mask(lp, site["scale"], site["mask"])


def _check_finite_kwargs(kwargs, where="model_kwargs"):
    for key, value in kwargs.items():
        label = f"{where}[{key!r}]"
        if isinstance(value, dict):
            _check_finite_kwargs(value, label)
        elif isinstance(value, (list, tuple)):
            _check_finite_kwargs(dict(enumerate(value)), label)
        elif _is_floating(value) and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{label} contains NaN or inf")


def _check_trace(trace):
    """Refuses what a Laplace fit or a Gaussian guide would get silently wrong: no observed
    site, observed data whose shape broadcasts against the site's, and subsampled plates."""
    observed = False
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site_is_subsample(site):
            size, used = site["fn"].size, site["value"].numel()
            if used != size:
                raise ValueError(
                    f"plate {name!r} subsamples {used} of its {size} rows (subsample_size=); the evidence, the ELBO "
                    "and cross-validation are sums over all the data, so give the plate its full size (minibatch "
                    "steps of the unrolled methods take method_options={'batch_size': B} and scale by N/B themselves)"
                )
            continue
        if not site["is_observed"] or (site.get("infer") or {}).get("_deterministic"):
            continue
        observed = True
        fn, value = site["fn"], site["value"]
        if isinstance(fn, pyro.distributions.Unit) or not isinstance(value, torch.Tensor):
            continue  # pyro.factor
        try:
            joint = torch.broadcast_shapes(value.shape, fn.shape())
        except RuntimeError:
            joint = None
        if joint not in (tuple(value.shape), tuple(fn.shape())):
            raise ValueError(
                f"observed site {name!r}: the data have shape {tuple(value.shape)} and the distribution "
                f"{tuple(fn.shape())}; they would broadcast to "
                f"{'nothing' if joint is None else tuple(joint)} and count every observation many times "
                "(e.g. y of shape (N, 1) against a plate of N: pass y.squeeze(-1))"
            )
    if not observed:
        raise ValueError(
            "the model has no observed site: the evidence, the ELBO and cross-validation need data to explain "
            "(pass the observations, e.g. y, to the model's obs=)"
        )


def _check_start(trace, hyperparameters, hint=""):
    """A finite log density at the start, or an error naming the site and the hyperparameters'
    values ``{name: value}``."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        try:
            with pyro.validation_enabled(False):
                lp = _site_log_prob(site).sum()
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"site {name!r}: its log density cannot be evaluated at the start ({e}){hint}") from e
        if not bool(torch.isfinite(lp)):
            hyper = ", ".join(f"{n} = {_short(v)}" for n, v in hyperparameters.items()) or "none"
            raise ValueError(
                f"the log density of site {name!r} is {float(lp)} at the start (latents at their initial values; "
                f"hyperparameters: {hyper}); check the values the site's distribution gets and its support"
            )


def _short(value) -> str:
    value = value.detach().cpu()
    return f"{float(value):g}" if value.numel() == 1 else f"tensor of shape {tuple(value.shape)} ({value.reshape(-1)[:4].tolist()}…)"


def _latent_layout(trace, dtype, device):
    """The latent sites' places in flat unconstrained ``θ``, ``θ`` at the trace's values, and the param sites."""
    latents, offset, theta_init, params = [], 0, [], {}
    for name, site in trace.nodes.items():
        if site["type"] == "param":
            params[name] = site["value"]
        if site["type"] != "sample" or not _is_latent(site):
            continue
        transform = biject_to(site["fn"].support)
        shape = site["value"].shape
        ushape = transform.inverse_shape(shape)
        numel = math.prod(ushape)
        latents.append(LatentSite(name, offset, numel, shape, torch.Size(ushape)))
        theta_init.append(transform.inv(site["value"].detach()).reshape(-1))
        offset += numel
    theta = torch.cat(theta_init) if theta_init else torch.zeros(0, dtype=dtype, device=device)
    return tuple(latents), theta, params


def _hyperparameter_names(params, hyperparameters, required):
    if isinstance(hyperparameters, str):
        hyperparameters = [hyperparameters]
    if hyperparameters is None:
        names = list(params)
    else:
        names = list(hyperparameters)
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ValueError(f"unknown hyperparameter {unknown[0]!r}: the model's pyro.param sites are {sorted(params)}")
    if required and not names:
        raise ValueError(
            "the model has no pyro.param site to select: hyperparameters are the "
            "pyro.param sites of the model, e.g. "
            "pyro.param('prior_precision', torch.tensor(1.0), constraint=constraints.positive)"
        )
    return names


def _hyper_layout(params, names, dtype, device):
    """The hyperparameters' places in flat unconstrained ``h`` (through their param-store constraints), and ``h``."""
    store_constraints = pyro.get_param_store().get_state()["constraints"]
    hypers, offset, h_init = [], 0, []
    for name in names:
        value = params[name].detach()
        if not value.is_floating_point():
            raise TypeError(f"hyperparameter {name!r} must be a floating tensor")
        constraint = store_constraints.get(name, constraints.real)
        numel = value.numel()
        hypers.append(HyperSite(name, offset, numel, value.shape, constraint))
        h_init.append(biject_to(constraint).inv(value).reshape(-1))
        offset += numel
    h = torch.cat(h_init) if h_init else torch.zeros(0, dtype=dtype, device=device)
    return tuple(hypers), h


def _module_values(module, sites):
    """``{site: parameter}`` of a module's parameters, each matched to the latent site whose name is the
    parameter's or ends in ``"." + `` its name."""
    params = dict(module.named_parameters())
    out = {}
    for site in sites:
        match = [k for k in params if site == k or site.endswith("." + k)]
        if len(match) > 1:
            match = [k for k in match if k == site] or match
        if len(match) != 1:
            raise ValueError(f"at= is a {type(module).__name__} whose parameters {sorted(params)} give latent site "
                             f"{site!r} {'no value' if not match else f'several: {match}'}")
        out[site] = match[0]
    used = list(out.values())
    twice, unused = sorted({k for k in used if used.count(k) > 1}), sorted(set(params) - set(used))
    if twice or unused:
        raise ValueError(f"at= is a {type(module).__name__} whose parameters do not match the latent sites {sites} one "
                         f"to one: " + "; ".join(f"{what} {v}" for what, v in (("given to several sites:", twice),
                                                                             ("matching no site:", unused)) if v))
    return {site: params[k] for site, k in out.items()}


class Problem:
    """
    Functional view of a Pyro model on its data.

    :param callable model: a Pyro model whose positional arguments are the data.
    :param args: the data, tensors sharing their first dimension ``N``.
    :param dict model_kwargs: keyword arguments for the model (never split or cast).
    :param hyperparameters: names of the ``pyro.param`` sites to treat as hyperparameters
        ``h``; all param sites of the model when ``None``. The rest stay fixed at their
        param-store values.
    :param bool require_hyperparameters: raise if the model has no ``pyro.param`` site.
    :param callable init_loc_fn: Pyro's init strategy, ``site → value`` (constrained), for the
        starting point ``theta_init``, e.g. ``pyro.infer.autoguide.init_to_sample``; default the
        prior mean (or the image of zero where there is none). A neural network needs one that
        breaks the symmetry: at all-zero weights every hidden unit is the same and the gradient
        of the first layer vanishes.

    Attributes: ``latents`` and ``hypers`` (site descriptions), ``theta_init`` and ``h_init``
    (flat tensors on the data's device and dtype), ``dtype``, ``device``, ``args``.
    """

    def __init__(
        self,
        model: Callable,
        *args,
        model_kwargs: dict | None = None,
        hyperparameters: Iterable[str] | None = None,
        require_hyperparameters: bool = False,
        init_loc_fn: Callable | None = None,
    ):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if model_kwargs is not None and not isinstance(model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
        self.model = model
        self.model_kwargs = dict(model_kwargs or {})
        self.args, self.dtype, self.device = prepare_data(args)
        trace, integer = self._first_run(init_loc_fn)
        self.latents, self.theta_init, params = _latent_layout(trace, self.dtype, self.device)
        self.latent_by_name = {s.name: s for s in self.latents}
        names = _hyperparameter_names(params, hyperparameters, require_hyperparameters)
        self.hypers, self.h_init = _hyper_layout(params, names, self.dtype, self.device)
        self._drop_flat(trace)
        hint = f"; positional argument {integer[0]} is integer-typed ({self.args[integer[0]].dtype})" if integer else ""
        _check_start(trace, {s.name: params[s.name] for s in self.hypers}, hint)
        self.observed = tuple(
            name for name, site in trace.nodes.items() if site["type"] == "sample" and site["is_observed"]
        )
        self._record()

    def _first_run(self, init_loc_fn):
        """Traces the model once (the start point); returns the trace and which data arguments are integers.
        The run initialises the param store outside any torch.func transform (the store calls
        ``requires_grad_``) and keeps Pyro's validation on, so bad models get its messages."""
        _check_finite_kwargs(self.model_kwargs)
        integer = [i for i, a in enumerate(self.args) if a is not None and not a.is_floating_point()]
        discover = Discover(self.dtype, self.device, init_loc_fn)
        try:
            # (not under default_dtype: the params this run creates keep the dtype the user gave them)
            with pyro.validation_enabled(True), discover:
                trace = pyro.poutine.trace(self.model).get_trace(*self.args, **self.model_kwargs)
        except (RuntimeError, TypeError) as e:
            if not integer:
                raise
            raise TypeError(
                f"the model failed on integer-typed data: positional argument {integer[0]} has dtype "
                f"{self.args[integer[0]].dtype} ({str(e).splitlines()[0]}); pass floating data (e.g. X.double()) — integer "
                "arguments are passed on unchanged, as labels and indices need"
            ) from e
        _check_trace(trace)
        return trace, integer

    def _drop_flat(self, trace):
        """Takes out of ``θ`` the elements of latent sites that a mask switches off and nothing else reads
        (:class:`LatentSite`'s ``free``): the gradient of the log joint along them is exactly 0 at the start and
        at a second point. Masked elements that something reads stay in ``θ``."""
        candidates = {}
        for site in self.latents:
            node = trace.nodes[site.name]
            mask, fn = node["mask"], node["fn"]
            if not isinstance(mask, torch.Tensor) or bool(mask.all()) or site.unconstrained_shape != site.shape:
                continue
            if biject_to(fn.support).codomain.event_dim:
                continue  # a transform of whole events: its Jacobian cannot be split by element
            try:  # a mask broader than the batch shape (a whole event masked per element) holds nothing apart
                mask = mask.to(self.device).expand(fn.batch_shape)
            except RuntimeError:
                continue
            candidates[site.name] = mask.reshape(mask.shape + (1,) * fn.event_dim).expand(site.shape).reshape(-1)
        if not candidates:
            return
        off = torch.zeros_like(self.theta_init, dtype=torch.bool)
        for name, mask in candidates.items():
            off[self.latent_by_name[name].slice] = ~mask
        wiggle = 0.1 * torch.sin(torch.arange(self.theta_dim, dtype=self.dtype, device=self.device) + 1.0)
        flat = off.clone()
        for theta in (self.theta_init, self.theta_init + wiggle):
            theta = theta.detach().requires_grad_(True)
            g, = torch.autograd.grad(self._log_joint(theta, self.h_init), theta, allow_unused=True)
            if g is not None:
                flat &= g == 0
        if not flat.any():
            return
        latents, offset, keep = [], 0, []
        for site in self.latents:
            free = (~flat[site.slice]).nonzero().flatten()
            held = free.numel() < site.numel
            latents.append(LatentSite(site.name, offset, free.numel(), site.shape, site.unconstrained_shape,
                                      free if held else None, self.theta_init[site.slice].clone() if held else None))
            keep.append(self.theta_init[site.slice][free])
            offset += free.numel()
        self.latents, self.theta_init = tuple(latents), torch.cat(keep)
        self.latent_by_name = {s.name: s for s in self.latents}

    @property
    def held(self) -> dict:
        """``{site: number of elements held out of θ}`` (:class:`LatentSite`'s ``free``)."""
        return {s.name: math.prod(s.unconstrained_shape) - s.numel for s in self.latents if s.free is not None}

    # --- sizes -------------------------------------------------------------------------------
    @property
    def theta_dim(self) -> int:
        return self.theta_init.numel()

    @property
    def h_dim(self) -> int:
        return self.h_init.numel()

    @property
    def num_data(self) -> int:
        return next(a for a in self.args if a is not None).shape[0]

    def with_args(self, *args) -> "Problem":
        """The same model and sites on other data (cast to this problem's dtype and device)."""
        new = copy.copy(self)
        new.args, _, _ = prepare_data(args, self.dtype, self.device)
        new._record()  # other data may give the model another structure
        return new

    # --- h ↔ constrained values -----------------------------------------------------------
    def params(self, h) -> dict:
        """Constrained hyperparameter values ``{name: tensor}`` of an unconstrained ``h``."""
        return {
            s.name: s.transform(h[..., s.slice].reshape(h.shape[:-1] + s.shape))
            for s in self.hypers
        }

    def unconstrain(self, values: dict):
        """Flat unconstrained ``h`` of constrained values ``{name: value}`` (missing names keep
        ``h_init``)."""
        h = self.h_init.clone()
        for s in self.hypers:
            if s.name in values:
                v = torch.as_tensor(values[s.name], dtype=self.dtype, device=self.device)
                h[s.slice] = s.transform.inv(v.expand(s.shape)).reshape(-1)
        return h

    def theta_at(self, at, h=None) -> torch.Tensor:
        """Flat unconstrained ``θ`` of a point given as the flat ``θ`` itself, as constrained latent values
        ``{site: value}`` (every latent site), or as a ``torch.nn.Module`` whose parameters carry the latents'
        values (a network trained in plain torch: its parameter ``"0.weight"`` gives the site ``"0.weight"`` or
        ``"<prefix>.0.weight"``)."""
        if isinstance(at, torch.nn.Module):
            at = _module_values(at, [s.name for s in self.latents])
        if not isinstance(at, dict):
            theta = torch.as_tensor(at, dtype=self.dtype, device=self.device)
            if theta.shape != self.theta_init.shape:
                raise ValueError(f"at= has shape {tuple(theta.shape)}; the model's flat unconstrained latents have shape "
                                 f"{tuple(self.theta_init.shape)} (or pass {{site: value}})")
            return theta.detach()
        names = [s.name for s in self.latents]
        unknown, missing = sorted(set(at) - set(names)), [n for n in names if n not in at]
        if unknown or missing:
            raise ValueError(f"at= must give every latent site of the model, {names}: "
                             + "; ".join(f"{what} {v}" for what, v in (("unknown", unknown), ("missing", missing)) if v))
        trace, _ = self.trace(self.theta_init, self.h_init if h is None else h)
        theta = self.theta_init.clone()
        for site in self.latents:
            value = torch.as_tensor(at[site.name]).detach().to(dtype=self.dtype, device=self.device)
            if value.shape != site.shape:
                raise ValueError(f"at[{site.name!r}] has shape {tuple(value.shape)}; the site has shape {tuple(site.shape)}")
            u = biject_to(trace.nodes[site.name]["fn"].support).inv(value)
            if not bool(torch.isfinite(u).all()):
                raise ValueError(f"at[{site.name!r}] lies outside the support of its site")
            theta[site.slice] = site.flatten(u)
        return theta

    def write_params(self, h) -> None:
        """Writes the constrained hyperparameters of ``h`` into Pyro's param store, in the dtype
        and device each param had there."""
        store = pyro.get_param_store()
        for name, value in self.params(h.detach()).items():
            old = store[name] if name in store else value
            store[name] = value.to(dtype=old.dtype, device=old.device)

    # --- the functional model ----------------------------------------------------------------
    def trace(self, theta, h, args=None, handlers=()):
        """Runs the model with ``θ`` and ``h`` substituted (and ``handlers``, context managers entered inside the
        substitution). Returns ``(trace, log_jacobian)``."""
        sub = _Substitute(self.latent_by_name, theta, self.params(h), self.dtype, self.device)
        args = self.args if args is None else args
        # Pyro's NaN-warning hooks are data-dependent control flow, which torch.func rejects.
        with pyro.validation_enabled(False), default_dtype(self.dtype), sub, contextlib.ExitStack() as stack:
            for handler in handlers:
                stack.enter_context(handler)
            trace = pyro.poutine.trace(self.model).get_trace(*args, **self.model_kwargs)
        return trace, sub.log_jacobian

    def _record(self):
        """Records the log joint, its per-row terms and the pointwise log-likelihood on this problem's data
        (:mod:`pyro_evidence.replay`), at ``θ`` and ``h`` of their starting shapes, before any ``torch.func``
        transform needs them; where the model cannot be replayed the reason is kept in ``unreplayable``."""
        self._recordings, self.unreplayable = {}, {}
        for fn in (self._log_joint, self._terms, self._log_likelihood):
            self._recording(fn, self.theta_init, self.h_init)

    def _recording(self, fn, theta, h):
        key = (fn.__name__, tuple(theta.shape), tuple(h.shape), theta.dtype, theta.device)
        if key not in self._recordings and not in_transform():
            try:
                self._recordings[key] = record(fn, _example(theta, self.theta_init), _example(h, self.h_init))
            except Unreplayable as e:
                self._recordings[key], self.unreplayable[fn.__name__] = None, str(e)
            except Exception:  # noqa: BLE001 — the model's own error, raised again where fn is called
                self._recordings[key] = None
        return self._recordings.get(key)

    def _replay(self, fn, theta, h):
        """``fn(θ, h)`` replayed from its recording for ``θ`` and ``h`` of these shapes, dtype and device
        (made at the first call outside ``torch.func`` transforms); by running the model where there is none."""
        recording = self._recording(fn, theta, h)
        return fn(theta, h) if recording is None else recording(theta, h)

    def log_joint(self, theta, h, args=None):
        """``log p(y, w(θ) | h) + log|det ∂w/∂θ|`` — the unnormalised log posterior density of
        ``θ`` in unconstrained space. On this problem's data the model is traced once and replayed
        (:mod:`pyro_evidence.replay`)."""
        return self._replay(self._log_joint, theta, h) if args is None else self._log_joint(theta, h, args)

    @_unvalidated
    def _log_joint(self, theta, h, args=None):
        trace, log_jacobian = self.trace(theta, h, args)
        total = log_jacobian
        for site in trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                total = total + _site_log_prob(site).sum()
        return total

    def terms(self, theta, h, args=None):
        """
        The log joint split by observation: ``(prior, rows)`` with ``rows[i]`` the log-likelihood
        of row ``i`` (every observed site inside a ``pyro.plate`` of size ``N``, summed) and
        ``prior`` everything else (latent priors, log-Jacobians, observed sites outside such a
        plate, e.g. a hyperprior ``pyro.factor``). ``log_joint = prior + rows.sum()``; per-row
        weights of ``rows`` give cross-validation folds and minibatches.
        """
        return self._replay(self._terms, theta, h) if args is None else self._terms(theta, h, args)

    @_unvalidated
    def _terms(self, theta, h, args=None):
        trace, log_jacobian = self.trace(theta, h, args)
        n = self.num_data if args is None else next(a for a in args if a is not None).shape[0]
        prior, rows = split_by_row(trace, log_jacobian, n)
        if rows is None:
            raise ValueError(
                f"no observed site of the model lies in a pyro.plate of size N = {n}; per-row "
                "log-likelihoods (cross-validation, hold-out) need one"
            )
        return prior, rows

    def observed_rows(self):
        """``(N,)`` booleans: whether row ``i`` has an observed site's element that is not masked
        out (``poutine.mask``, ``obs_mask``); masked rows add nothing to the log-likelihood."""
        trace, _ = self.trace(self.theta_init, self.h_init)
        keep = torch.zeros(self.num_data, dtype=torch.bool, device=self.device)
        for site in trace.nodes.values():
            if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site):
                shape = _site_log_prob(site).shape  # may exceed batch_shape (a scalar law, N values)
                observed = torch.ones(shape, dtype=torch.bool, device=self.device)
                if site["mask"] is not None:
                    observed = observed & torch.as_tensor(site["mask"], device=self.device)
                rows = _per_row(site, self.num_data, observed)
                if rows is not None:
                    keep = keep | rows.any(-1)
        return keep

    def loss(self, theta, h):
        """The inner loss ``L(θ, h) = −log p(y, w(θ) | h)`` (Jacobian included)."""
        return -self.log_joint(theta, h)

    def log_likelihood(self, theta, h, args=None) -> dict:
        """Pointwise log-likelihood of each observed site, ``{name: tensor}``."""
        return self._replay(self._log_likelihood, theta, h) if args is None else self._log_likelihood(theta, h, args)

    @_unvalidated
    def _log_likelihood(self, theta, h, args=None) -> dict:
        trace, _ = self.trace(theta, h, args)
        return {name: _site_log_prob(trace.nodes[name]) for name in self.observed}

    def latent_values(self, theta, h) -> dict:
        """Constrained values ``{site: tensor}`` of the latents at ``θ``."""
        trace, _ = self.trace(theta, h)
        return {s.name: trace.nodes[s.name]["value"] for s in self.latents}
