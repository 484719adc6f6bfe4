r"""NeuTra: Hamiltonian Monte Carlo in the base space of a fitted flow guide.

A fitted :class:`~flowguide.guides.AutoFlow` maps standard normal noise to the model's packed
unconstrained latents, :math:`z = T(\varepsilon)`, :math:`\varepsilon \sim \mathcal{N}(0, I_D)`.
NeuTra (Hoffman et al. 2019) runs HMC on :math:`\varepsilon` instead of :math:`z`, with the
potential energy

.. math::

    U(\varepsilon) = -\Big[\log p\big(x, c(z)\big) + \log\big|\det J_c(z)\big|
        + \log\big|\det \partial T / \partial \varepsilon\big|\Big],
    \qquad z = T(\varepsilon),

where :math:`c` applies the ``biject_to`` map of each site's support. The density
:math:`e^{-U}` is the posterior pulled back through :math:`c \circ T`, so the draws
:math:`c(T(\varepsilon))` are exact posterior draws whatever the flow: the flow only
preconditions. When the guide fits well, :math:`e^{-U}` is close to :math:`\mathcal{N}(0, I)`,
which HMC samples with a large step and short trajectories.

Two samplers share one result interface (``get_samples``, ``summary``, ``diagnostics``,
``to_inference_data``):

* :class:`NeuTraMCMC`: Pyro's own NUTS or HMC kernel on a single site ``eps``, one chain at a
  time in this process (no multiprocessing), shaped like :class:`pyro.infer.MCMC`.
* :class:`ManyChainHMC`: jittered HMC over many chains at once, one batched potential and
  gradient evaluation for all chains per leapfrog step (the model is run once, the chains on a
  batch dim left of its plates), with the step size tuned by dual averaging on the chains'
  harmonic-mean acceptance and the trajectory length by the ChEES criterion (Hoffman, Radul &
  Sountsov 2021). Suited to GPUs; the device follows the guide.

Both return draws in the constrained space under the model's own site names and shapes, unlike
Pyro's ``NeuTraReparam`` that leaves a single ``*_shared_latent`` site (pyro#2317), and both can
trace the potential with ``jit_compile=True`` (which fails with Pyro's own flow guides, pyro#3132).

References:
    M. Hoffman, P. Sountsov, J. V. Dillon, I. Langmore, D. Tran, S. Vasudevan (2019), "NeuTra-lizing
    Bad Geometry in Hamiltonian Monte Carlo Using Neural Transport", arXiv:1903.03704.

    M. Hoffman, A. Radul, P. Sountsov (2021), "An Adaptive-MCMC Scheme for Setting Trajectory
    Lengths in Hamiltonian Monte Carlo", AISTATS.

    M. Hoffman, A. Gelman (2014), "The No-U-Turn Sampler", JMLR 15 (dual averaging).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.infer.mcmc import HMC, NUTS
from pyro.infer.mcmc.util import select_samples
from pyro.ops.integrator import _EXCEPTION_HANDLERS
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import Transform, biject_to

from .guides import AutoFlow, _probe_init, plate_nesting
from .train import _LogJoint

if TYPE_CHECKING:
    import arviz
    import pandas

__all__ = ["ManyChainHMC", "NeuTraMCMC", "NeuTraPotential"]

_MAX_ENERGY_ERROR = 1000.0  # Pyro's and Stan's threshold for calling a transition divergent
_KERNELS = {"nuts": NUTS, "hmc": HMC}
# NeuTraMCMC's NUTS default (Pyro's is 0.8): fewer divergences in the base space's far tails
_NUTS_TARGET_ACCEPT = 0.95
# the options NeuTraMCMC sets itself
_RESERVED = {
    "model",
    "potential_fn",
    "transforms",
    "max_plate_nesting",
    "jit_compile",
    "jit_options",
    "ignore_jit_warnings",
    "init_strategy",
}


# ------------------------------------------------------------------------------------------------
# the potential
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Site:
    name: str
    shape: torch.Size  # the constrained value's shape
    unconstrained_shape: torch.Size
    transform: Transform
    batch_dims: int  # dims of the value left of the event dims (the plate dims)
    offset: int
    size: int


def _check_int(value: Any, name: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _latent_sites(trace: poutine.Trace) -> dict[str, dict]:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }


def _row_sum(value: Tensor, n: int) -> Tensor:
    value = torch.as_tensor(value)
    if value.dim() == 0 or value.shape[0] != n:
        return value.sum().expand(n)
    return value.reshape(n, -1).sum(-1)


class NeuTraPotential:
    r"""The NeuTra potential energy :math:`U(\varepsilon)` of a model and a fitted flow guide,
    callable on base-space points:

    .. math::

        U(\varepsilon) = -\log p\big(x, c(z)\big) - \log\big|\det J_c(z)\big|
            - \log\big|\det \partial T / \partial \varepsilon\big|, \qquad z = T(\varepsilon),

    with :math:`T` the guide's flow (noise to packed unconstrained latents) and :math:`c` the
    ``biject_to`` maps of the sites' supports (see the module docstring). :math:`e^{-U}` is the
    posterior pulled back to the base space, close to :math:`\mathcal{N}(0, I)` when the guide
    fits well.

    ``potential(eps)`` takes ``eps`` of shape ``(D,)`` (one model run) or ``(..., D)`` (one model
    run for all rows, on a batch dim left of the model's plates) and returns :math:`U` of
    shape ``eps.shape[:-1]``. Each call with ``eps.requires_grad`` counts as one gradient call of
    ``prod(eps.shape[:-1])`` gradient evaluations (``num_grad_calls``, ``num_grad_evals``).

    Constructing it checks the inputs: a guide that is not a flowguide :class:`AutoFlow`
    (``TypeError``), a model with discrete latent sites or none (``ValueError``), a guide whose
    latent sites differ from the model's (``ValueError`` naming the sites), and a guide that looks
    never fitted (``UserWarning``).

    Args:
        model: the Pyro model.
        guide: an :class:`AutoFlow` fitted to it (set up with ``model_args`` if it is not yet).
        model_args, model_kwargs: the model's arguments.
        warn_unfitted: warn when the guide is still at its initialisation.

    Reference: Hoffman et al. 2019, "NeuTra-lizing Bad Geometry in Hamiltonian Monte Carlo Using
    Neural Transport", arXiv:1903.03704.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from flowguide import AutoIAF
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> potential = NeuTraPotential(model, AutoIAF(model), warn_unfitted=False)
        >>> potential(torch.zeros(5, 2)).shape
        torch.Size([5])
    """

    def __init__(
        self,
        model: Callable[..., Any],
        guide: AutoFlow,
        model_args: tuple = (),
        model_kwargs: dict[str, Any] | None = None,
        *,
        warn_unfitted: bool = True,
    ) -> None:
        if not isinstance(guide, AutoFlow):
            raise TypeError(
                "NeuTra needs a flowguide AutoFlow guide (AutoIAF, AutoNeuralSpline, ...), got "
                f"{type(guide).__name__}; for other AutoContinuous guides use Pyro's "
                "pyro.infer.reparam.NeuTraReparam"
            )
        self.model = model
        self.guide = guide
        self.model_args = tuple(model_args)
        self.model_kwargs = dict(model_kwargs or {})
        set_up = guide.prototype_trace is not None
        probe = self._probe(guide.affine.loc.device if set_up else None)  # errors name sites
        if not set_up:
            guide._setup_prototype(*self.model_args, **self.model_kwargs)
        loc = guide.affine.loc
        self.device, self.dtype = loc.device, loc.dtype
        self.dim: int = guide.latent_dim
        self.max_plate_nesting = plate_nesting(probe)
        self.sites = self._layout(_latent_sites(probe))
        self.transform = guide.get_transform().with_cache(0)
        self.num_grad_calls = 0
        self.num_grad_evals = 0
        self._compiled: dict[tuple, Callable[[Tensor], Tensor]] = {}
        self._frozen = 0
        if warn_unfitted and _looks_unfitted(guide):
            warnings.warn(
                f"the {type(guide).__name__} guide looks unfitted: its flow is still the identity "
                "(up to a permutation) and its location and scale are at their initial values, "
                f"so NeuTra would precondition with the initial diagonal Normal (scale "
                f"{guide._init_scale}) only. Fit it first, e.g. flowguide.fit(model, guide, ...)",
                UserWarning,
                stacklevel=3,
            )

    # -- set-up checks -------------------------------------------------------------------------
    def _probe(self, device: torch.device | None) -> poutine.Trace:
        """Trace the model at feasible values (on ``device``), without sampling continuous
        sites; check that its latent sites are continuous."""

        def init(site: dict) -> Tensor:
            value = _probe_init(site)
            discrete = site["fn"].support.is_discrete
            return value if discrete or device is None else value.to(device)

        probe_model = InitMessenger(init)(self.model)
        trace = poutine.block(poutine.trace(probe_model).get_trace)(
            *self.model_args, **self.model_kwargs
        )
        latents = _latent_sites(trace)
        discrete = [
            f"{name!r} (support {site['fn'].support})"
            for name, site in latents.items()
            if site["fn"].support.is_discrete
        ]
        if discrete:
            raise ValueError(
                f"the model has discrete latent sites: {', '.join(discrete)}. NeuTra runs HMC, "
                "which needs continuous latent sites only: sum the discrete ones out in the model "
                "(for example with torch.logsumexp and pyro.factor), or condition on them"
            )
        if not latents:
            raise ValueError("the model has no latent sample site: there is nothing to sample")
        return trace

    def _layout(self, latents: dict[str, dict]) -> list[_Site]:
        guide = self.guide
        guide_sites = dict(guide.prototype_trace.iter_stochastic_nodes())
        missing = [name for name in latents if name not in guide_sites]
        extra = [name for name in guide_sites if name not in latents]
        problems = []
        if missing:
            problems.append(f"model sites the guide lacks: {missing}")
        if extra:
            problems.append(f"guide sites the model lacks: {extra}")
        sites: list[_Site] = []
        offset = 0
        for name, guide_site in guide_sites.items():
            unconstrained_shape = torch.Size(guide._unconstrained_shapes[name])
            size = math.prod(unconstrained_shape)
            site = latents.get(name)
            if site is not None:
                shape = site["value"].shape
                transform = biject_to(site["fn"].support)
                model_unconstrained = torch.Size(transform.inverse_shape(shape))
                if shape != guide_site["value"].shape or model_unconstrained != unconstrained_shape:
                    problems.append(
                        f"site {name!r} has shape {tuple(shape)} (unconstrained "
                        f"{tuple(model_unconstrained)}) in the model but "
                        f"{tuple(guide_site['value'].shape)} (unconstrained "
                        f"{tuple(unconstrained_shape)}) in the guide"
                    )
                else:
                    batch_dims = len(shape) - site["fn"].event_dim
                    sites.append(
                        _Site(name, shape, unconstrained_shape, transform, batch_dims, offset, size)
                    )
            offset += size
        if problems:
            raise ValueError(
                "the guide does not match this model (was it fitted to another model, or with "
                "other data?): " + "; ".join(problems)
            )
        return sites

    # -- evaluation ----------------------------------------------------------------------------
    def _unpack(
        self, z: Tensor, plate_shaped: bool, jacobian: bool
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Split packed unconstrained ``z`` (``(D,)`` or ``(N, D)``) into constrained site values,
        with the log-Jacobian of the ``biject_to`` maps (``()`` or ``(N,)``)."""
        lead = z.shape[:-1]
        n = lead[0] if lead else 1
        values: dict[str, Tensor] = {}
        log_jac = z.new_zeros(lead)
        nesting = self.max_plate_nesting
        for s in self.sites:
            u = z[..., s.offset : s.offset + s.size].reshape(lead + s.unconstrained_shape)
            value = s.transform(u)
            if jacobian:
                lj = s.transform.log_abs_det_jacobian(u, value)
                log_jac = log_jac + (_row_sum(lj, n) if lead else torch.as_tensor(lj).sum())
            if plate_shaped and lead:
                value = value.reshape(n, *(1,) * (nesting - s.batch_dims), *s.shape)
            values[s.name] = value
        return values, log_jac

    def _potential(self, eps: Tensor) -> Tensor:
        if eps.dim() not in (1, 2):
            batch = eps.shape[:-1]
            return self._potential(eps.reshape(-1, eps.shape[-1])).reshape(batch)
        z, ladj = self.transform.forward_and_log_abs_det(eps)
        values, log_jac = self._unpack(z, plate_shaped=True, jacobian=True)
        # the model's log joint summed as it runs, one per chain: the chains sit on a batch dim
        # left of the model's plates, and a site that does not depend on them counts for each
        chains = eps.shape[0] if eps.dim() == 2 else 1
        joint = _LogJoint(values, chains, self.max_plate_nesting, per_particle=True)
        with poutine.block(), joint:
            self.model(*self.model_args, **self.model_kwargs)
        log_p = joint.total()
        if eps.dim() == 2 and chains == 1:
            log_p = log_p.reshape(1)
        return -(log_p + log_jac + ladj)

    def __call__(self, eps: Tensor) -> Tensor:
        if not isinstance(eps, Tensor) or eps.dim() < 1 or eps.shape[-1] != self.dim:
            shape = tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__
            raise ValueError(f"eps must be a tensor of shape (..., {self.dim}), got {shape}")
        if eps.requires_grad and torch.is_grad_enabled():
            self.num_grad_calls += 1
            self.num_grad_evals += math.prod(eps.shape[:-1])
        fn = self._compiled.get(_key(eps), self._potential) if self._frozen else self._potential
        return fn(eps)

    def log_density(self, eps: Tensor) -> Tensor:
        r"""The base-space log density :math:`-U(\varepsilon)` (unnormalised)."""
        return -self(eps)

    @torch.no_grad()
    def constrain(self, eps: Tensor, chunk_size: int = 4096) -> dict[str, Tensor]:
        """Map base-space draws ``eps`` of shape ``(..., D)`` to the model's sites: a dict of
        ``(..., *site_shape)`` tensors in each site's support."""
        batch = eps.shape[:-1]
        flat = eps.reshape(-1, self.dim)
        parts: dict[str, list[Tensor]] = {s.name: [] for s in self.sites}
        for chunk in flat.split(chunk_size):
            z, _ = self.transform.forward_and_log_abs_det(chunk)
            values, _ = self._unpack(z, plate_shaped=False, jacobian=False)
            for name, value in values.items():
                parts[name].append(value)
        return {s.name: torch.cat(parts[s.name]).reshape(batch + s.shape) for s in self.sites}

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Within this context the guide's and the param store's parameters do not require
        grad (the samplers differentiate with respect to ``eps`` only, so this saves the graph
        for the parameters), and traces made by :meth:`compile` are used. On exit the parameters
        are restored and the traces dropped: they hold the parameters as constants."""
        params = [p for p in self.guide.parameters() if p.requires_grad]
        params += [p for _, p in pyro.get_param_store().named_parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        self._frozen += 1
        try:
            yield
        finally:
            self._frozen -= 1
            if not self._frozen:
                self._compiled.clear()
            for p in params:
                p.requires_grad_(True)

    def compile(self, example: Tensor) -> None:
        """Trace the potential with ``torch.jit.trace`` for inputs shaped like ``example``; only
        inside :meth:`frozen`, which uses the trace until it exits.

        The trace records one run of the model: a model whose control flow depends on the latent
        values is traced wrongly, as with Pyro's ``jit_compile``.
        """
        if not self._frozen:
            raise RuntimeError("compile() must be called inside `with potential.frozen():`")
        with warnings.catch_warnings(), pyro.validation_enabled(False):
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*torch.jit.trace.* is deprecated")
            traced = torch.jit.trace(
                self._potential, (example.detach().clone(),), check_trace=False
            )
        self._compiled[_key(example)] = traced

    def potential_and_grad(self, eps: Tensor) -> tuple[Tensor, Tensor]:
        """``U(eps)`` (detached) and its gradient with respect to ``eps``, row by row."""
        eps = eps.detach().requires_grad_(True)
        with torch.enable_grad():
            u = self(eps)
            (grad,) = torch.autograd.grad(u.sum(), eps)
        return u.detach(), grad


def _key(eps: Tensor) -> tuple:
    return (tuple(eps.shape), eps.dtype, eps.device)


@torch.no_grad()
def _looks_unfitted(guide: AutoFlow) -> bool:
    """Whether the guide's affine part is at its initial values and its flow is the identity
    up to a permutation (the state ``AutoFlow`` starts in)."""
    affine = guide.affine
    init_loc = guide._init_loc().to(affine.loc)
    if not torch.allclose(affine.loc, init_loc, rtol=1e-5, atol=1e-7):
        return False
    init_log_scale = torch.full_like(affine.log_scale, math.log(guide._init_scale))
    if not torch.allclose(affine.log_scale, init_log_scale, rtol=1e-5, atol=1e-6):
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, guide.latent_dim, generator=gen, dtype=torch.float64).to(affine.loc)
    y, ladj = guide.flow.with_cache(0).forward_and_log_abs_det(x)
    same_values = torch.allclose(y.sort(-1).values, x.sort(-1).values, rtol=1e-4, atol=1e-5)
    return bool(same_values and (ladj.abs() < 1e-4).all())


# ------------------------------------------------------------------------------------------------
# the shared result interface
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_arviz() -> Iterator[None]:
    """ArviZ logs a warning for single-chain input (we split such chains ourselves) and warns
    when there are more chains than draws, which is :class:`ManyChainHMC`'s usual shape."""
    log = logging.getLogger("arviz")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"More chains \(\d+\) than draws")
            yield
    finally:
        log.setLevel(level)


def _arviz() -> Any:
    """Import ArviZ lazily (slow to import), without its ``FutureWarning`` about its coming
    refactor (an error under a warnings-as-errors test suite)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning)
        import arviz
    return arviz


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class _Results:
    """Draws, per-draw statistics and diagnostics shared by :class:`NeuTraMCMC` and
    :class:`ManyChainHMC` (filled in by ``run``)."""

    num_samples: int
    warmup_steps: int
    num_chains: int
    save_warmup: bool
    _sampler_name: str = ""

    def __init__(self) -> None:
        self._potential: NeuTraPotential | None = None
        self._eps: Tensor | None = None  # (C, S, D)
        self._eps_warmup: Tensor | None = None  # (C, W, D)
        self._stats: dict[str, Tensor] = {}  # (C, S) each
        self._warmup_stats: dict[str, Tensor] = {}
        self._samples: dict[str, Tensor] | None = None
        self._warmup_samples: dict[str, Tensor] | None = None
        self._wall_time = math.nan
        self._num_grad_evals = 0
        self._num_grad_calls = 0
        self._sampler_info: dict[str, float] = {}

    def _require_run(self) -> NeuTraPotential:
        if self._potential is None or self._eps is None:
            raise RuntimeError(f"{type(self).__name__} has no draws yet: call .run(*args) first")
        return self._potential

    def _finish(
        self,
        potential: NeuTraPotential,
        eps: Tensor,
        stats: dict[str, Tensor],
        eps_warmup: Tensor | None,
        warmup_stats: dict[str, Tensor],
        start: float,
    ) -> None:
        self._potential = potential
        self._eps = eps.detach()
        self._stats = stats
        self._eps_warmup = eps_warmup.detach() if eps_warmup is not None else None
        self._warmup_stats = warmup_stats if self.save_warmup else {}
        self._samples = None
        self._warmup_samples = None
        self._num_grad_evals = potential.num_grad_evals
        self._num_grad_calls = potential.num_grad_calls
        self._wall_time = time.perf_counter() - start

    # -- draws ---------------------------------------------------------------------------------
    def get_samples(
        self, num_samples: int | None = None, group_by_chain: bool = False
    ) -> dict[str, Tensor]:
        """Posterior draws keyed by the model's site names, in each site's support: tensors of
        shape ``(num_chains * num_samples, *site_shape)``, or ``(num_chains, num_samples,
        *site_shape)`` with ``group_by_chain=True``. ``num_samples`` draws a random subset, as
        :meth:`pyro.infer.MCMC.get_samples` does."""
        potential = self._require_run()
        if self._samples is None:
            self._samples = potential.constrain(self._eps)  # type: ignore[arg-type]
        return select_samples(self._samples, num_samples, group_by_chain)

    def get_warmup_samples(self, group_by_chain: bool = False) -> dict[str, Tensor]:
        """The warm-up draws (only with ``save_warmup=True``), shaped as in
        :meth:`get_samples`."""
        potential = self._require_run()
        if self._eps_warmup is None:
            raise RuntimeError("warm-up draws were not kept: pass save_warmup=True")
        if self._warmup_samples is None:
            self._warmup_samples = potential.constrain(self._eps_warmup)
        return select_samples(self._warmup_samples, None, group_by_chain)

    def get_base_samples(self, group_by_chain: bool = False) -> Tensor:
        r"""The base-space draws :math:`\varepsilon`, of shape ``(num_chains * num_samples, D)``
        or ``(num_chains, num_samples, D)``."""
        self._require_run()
        eps = self._eps
        return eps if group_by_chain else eps.reshape(-1, eps.shape[-1])  # type: ignore[union-attr]

    def get_sample_stats(self, group_by_chain: bool = True) -> dict[str, Tensor]:
        """Per-draw sampler statistics (``diverging``, ``acceptance_rate``, ``energy``,
        ``step_size``, ``n_steps``, ``lp``, ``tree_depth`` for NUTS), each ``(num_chains,
        num_samples)``."""
        self._require_run()
        if group_by_chain:
            return dict(self._stats)
        return {k: v.reshape(-1) for k, v in self._stats.items()}

    # -- diagnostics ---------------------------------------------------------------------------
    def _arrays_for_diagnostics(self) -> dict[str, np.ndarray]:
        """The draws as ``(chain, draw, ...)`` arrays; a single chain is split in two halves so
        that R-hat is defined (ArviZ needs two chains)."""
        out = {}
        for name, value in self.get_samples(group_by_chain=True).items():
            arr = _numpy(value)
            if arr.shape[0] == 1 and arr.shape[1] >= 8:
                half = arr.shape[1] // 2
                arr = np.stack([arr[0, :half], arr[0, half : 2 * half]])
            out[name] = arr
        return out

    def diagnostics(
        self, mean_tol: float = 0.3, var_bounds: tuple[float, float] = (0.5, 2.0)
    ) -> dict[str, Any]:
        r"""Convergence and efficiency diagnostics.

        Returns a dict with

        * ``ess_bulk``, ``ess_tail``, ``r_hat``: per site, tensors of the site's shape (rank-
          normalised split R-hat and ESS from ArviZ; one chain is split into halves),
        * ``divergences``: ``{"chain i": [draw indices]}``, ``num_divergences``; for
          :class:`ManyChainHMC` also ``num_first_stage_divergences`` and ``num_retried`` (see its
          delayed rejection),
        * ``acceptance_rate`` and ``step_size`` per chain (mean acceptance, final step size),
        * ``bfmi``: the energy Bayesian fraction of missing information per chain,
        * ``num_grad_evals``: gradient evaluations of the potential summed over chains, warm-up
          and set-up included; ``num_grad_calls``: gradient calls (one call covers all chains
          for :class:`ManyChainHMC`); ``wall_time`` in seconds,
        * ``preconditioner``: the per-dimension ``mean`` and ``var`` of the base-space draws
          :math:`\varepsilon`, their extremes, and ``ok``: whether every mean is within
          ``mean_tol`` of 0 and every variance within ``var_bounds``. When the flow fits, the
          posterior in base space is close to :math:`\mathcal{N}(0, I)`; otherwise a
          ``UserWarning`` says the guide preconditions poorly (the draws stay exact, the
          sampling is only less efficient). Mind the Monte Carlo error of these moments with
          few effective draws.
        """
        az = _arviz()

        self._require_run()
        with _quiet_arviz():
            data = az.convert_to_dataset(self._arrays_for_diagnostics())
            ess_bulk = az.ess(data, method="bulk")
            ess_tail = az.ess(data, method="tail")
            r_hat = az.rhat(data)
        names = list(data.data_vars)

        def per_site(ds: Any) -> dict[str, Tensor]:
            return {n: torch.as_tensor(np.asarray(ds[n].values, dtype=np.float64)) for n in names}

        diverging = self._stats["diverging"]
        chains = range(diverging.shape[0])
        energy = _numpy(self._stats["energy"]).astype(np.float64)
        finite = np.isfinite(energy).all() and energy.shape[1] > 2
        bfmi = (
            np.square(np.diff(energy, axis=1)).mean(1) / energy.var(1)
            if finite
            else np.full(energy.shape[0], np.nan)
        )
        eps = self.get_base_samples().double()
        mean, var = eps.mean(0).cpu(), eps.var(0).cpu()
        max_abs_mean = float(mean.abs().max())
        min_var, max_var = float(var.min()), float(var.max())
        ok = max_abs_mean <= mean_tol and var_bounds[0] <= min_var and max_var <= var_bounds[1]
        if not ok:
            warnings.warn(
                "the flow preconditions poorly: in its base space the posterior draws should be "
                f"close to N(0, I), but their per-dimension means reach |{max_abs_mean:.3g}| "
                f"(tolerance {mean_tol}) and variances range over [{min_var:.3g}, {max_var:.3g}] "
                f"(bounds {list(var_bounds)}). The draws are still exact; fit the guide longer "
                "or with a more expressive flow for better efficiency",
                UserWarning,
                stacklevel=2,
            )
        return {
            "ess_bulk": per_site(ess_bulk),
            "ess_tail": per_site(ess_tail),
            "r_hat": per_site(r_hat),
            "divergences": {
                f"chain {c}": torch.nonzero(diverging[c]).reshape(-1).tolist() for c in chains
            },
            "num_divergences": int(diverging.sum()),
            **{
                name: int(self._stats[key].sum())
                for key, name in (
                    ("first_stage_diverging", "num_first_stage_divergences"),
                    ("retried", "num_retried"),
                )
                if key in self._stats
            },
            "acceptance_rate": {
                f"chain {c}": float(self._stats["acceptance_rate"][c].double().mean())
                for c in chains
            },
            "step_size": {f"chain {c}": float(self._stats["step_size"][c, -1]) for c in chains},
            "bfmi": {f"chain {c}": float(bfmi[c]) for c in chains},
            "num_grad_evals": self._num_grad_evals,
            "num_grad_calls": self._num_grad_calls,
            "wall_time": self._wall_time,
            "preconditioner": {
                "mean": mean,
                "var": var,
                "max_abs_mean": max_abs_mean,
                "min_var": min_var,
                "max_var": max_var,
                "ok": ok,
            },
        }

    def to_inference_data(self, khat_samples: int = 1000) -> arviz.InferenceData:
        """An ArviZ ``InferenceData``: ``posterior`` under the model's site names,
        ``sample_stats`` (``diverging``, ``acceptance_rate``, ``energy``, ``step_size``,
        ``n_steps``, ``lp``, and ``tree_depth`` for NUTS), the warm-up groups when
        ``save_warmup=True``, and in ``attrs`` the sampler, the gradient count, the wall time and,
        when :mod:`flowguide.diagnostics` is available and ``khat_samples > 0``, the guide's
        PSIS :math:`\\hat k` from ``khat_samples`` guide draws (``guide_khat``).

        ``lp`` is the base-space log density :math:`-U(\\varepsilon)` of each draw, flow
        Jacobian included, not the model's log joint.
        """
        az = _arviz()

        self._require_run()
        posterior = {k: _numpy(v) for k, v in self.get_samples(group_by_chain=True).items()}
        stats = {k: _numpy(v) for k, v in self._stats.items()}
        kwargs: dict[str, Any] = {}
        if self._eps_warmup is not None:
            warm = self.get_warmup_samples(group_by_chain=True)
            kwargs["warmup_posterior"] = {k: _numpy(v) for k, v in warm.items()}
            kwargs["warmup_sample_stats"] = {k: _numpy(v) for k, v in self._warmup_stats.items()}
            kwargs["save_warmup"] = True
        attrs: dict[str, Any] = {
            "inference_library": "flowguide",
            "sampler": self._sampler_name,
            "guide": type(self._potential.guide).__name__,  # type: ignore[union-attr]
            "num_grad_evals": int(self._num_grad_evals),
            "sampling_time": float(self._wall_time),
            **self._sampler_info,
        }
        khat = self._guide_khat(khat_samples) if khat_samples > 0 else None
        if khat is not None:
            attrs["guide_khat"] = khat
        with _quiet_arviz():
            return az.from_dict(posterior=posterior, sample_stats=stats, attrs=attrs, **kwargs)

    def _guide_khat(self, num_samples: int) -> float | None:
        try:
            from .diagnostics import log_importance_weights, psis_khat
        except ImportError:  # pragma: no cover - the diagnostics module is optional here
            return None
        potential = self._potential
        assert potential is not None
        device = potential.device
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            warnings.catch_warnings(),
            torch.no_grad(),
        ):
            torch.manual_seed(0)  # reproducible, and the global random state is left alone
            warnings.simplefilter("ignore")  # a model that does not vectorise is only slower
            _, log_w = log_importance_weights(
                potential.model,
                potential.guide,
                *potential.model_args,
                num_samples=num_samples,
                **potential.model_kwargs,
            )
            return float(psis_khat(log_w))

    def summary(self, prob: float = 0.9) -> pandas.DataFrame:
        """Print and return a per-site table: mean, sd, the ``(1 - prob) / 2``, median and
        ``(1 + prob) / 2`` quantiles, MCSE, bulk and tail ESS and R-hat (from ArviZ), followed by
        the number of divergences."""
        az = _arviz()
        import pandas as pd

        if not 0 < prob < 1:
            raise ValueError(f"prob must lie in (0, 1), got {prob!r}")
        self._require_run()
        lo, hi = (1 - prob) / 2, (1 + prob) / 2
        funcs = {
            "mean": np.mean,
            "sd": lambda x: np.std(x, ddof=1),
            f"{100 * lo:g}%": lambda x: np.quantile(x, lo),
            "median": np.median,
            f"{100 * hi:g}%": lambda x: np.quantile(x, hi),
        }
        with _quiet_arviz():
            data = az.convert_to_dataset(self._arrays_for_diagnostics())
            stats = az.summary(data, kind="stats", stat_funcs=funcs, extend=False)
            diag = az.summary(data, kind="diagnostics")
        table = pd.concat([stats, diag], axis=1)
        with pd.option_context("display.width", 120, "display.max_columns", 20):
            print(table)
        print(f"Number of divergences: {int(self._stats['diverging'].sum())}")
        return table


# ------------------------------------------------------------------------------------------------
# NeuTraMCMC: Pyro's NUTS / HMC on the base space
# ------------------------------------------------------------------------------------------------
class _RecordStart:
    """Remembers the kinetic energy of the momentum drawn at the start of each transition (Pyro
    names that draw ``r_t=...``), so that the transition's energy can be reported."""

    start_kinetic: float = math.nan

    def _sample_r(self, name: str) -> tuple[dict, dict]:
        r, r_unscaled = super()._sample_r(name)  # type: ignore[misc]
        if name.startswith("r_t="):
            self.start_kinetic = float(self._kinetic_energy(r_unscaled))  # type: ignore[attr-defined]
        return r, r_unscaled


class _NUTS(_RecordStart, NUTS):
    pass


class _HMC(_RecordStart, HMC):
    r"""Pyro's HMC, optionally with the number of leapfrog steps jittered: :math:`\lceil u T / h
    \rceil` with :math:`u \sim \mathcal{U}(0, 1]` drawn afresh each transition (a state-
    independent choice, so detailed balance holds), against periodic trajectories."""

    def __init__(self, *args: Any, jitter: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.jitter = bool(jitter)

    @property
    def num_steps(self) -> int:  # type: ignore[override]
        steps = self.trajectory_length / self.step_size
        if not self.jitter:
            return max(1, int(steps))
        return max(1, math.ceil(steps * (1.0 - float(torch.rand(())))))


def _initial_eps(potential: NeuTraPotential, num: int, batched: bool, tries: int = 100) -> Tensor:
    """``num`` draws from N(0, I) at which the potential is finite (redrawing the others),
    evaluated in one vectorised model run when ``batched``, else one draw at a time."""
    eps = torch.randn(num, potential.dim, device=potential.device, dtype=potential.dtype)
    with torch.no_grad():
        for _ in range(tries):
            u = potential(eps) if batched else torch.stack([potential(e) for e in eps])
            bad = ~torch.isfinite(u)
            if not bad.any():
                return eps
            eps[bad] = torch.randn_like(eps[bad])
    raise ValueError(
        f"the model's log density is not finite at any of {tries} draws from N(0, I) for some "
        "chains: check the model and the guide's fit"
    )


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True)


class NeuTraMCMC(_Results):
    r"""NUTS or HMC in the base space of a fitted flow guide (NeuTra, Hoffman et al. 2019),
    shaped like :class:`pyro.infer.MCMC`.

    The kernel is Pyro's own :class:`~pyro.infer.mcmc.NUTS` or :class:`~pyro.infer.mcmc.HMC`
    with ``potential_fn`` the :class:`NeuTraPotential` on a single site ``eps`` of size
    :math:`D`, started at :math:`\varepsilon_0 \sim \mathcal{N}(0, I)`. Chains run one after the
    other in this process (no multiprocessing), each with its own kernel and adaptation. Draws
    come back in the constrained space under the model's site names and shapes.

    Args:
        model: the Pyro model.
        guide: an :class:`~flowguide.guides.AutoFlow` fitted to it.
        kernel: ``"nuts"`` or ``"hmc"``.
        num_samples: draws kept per chain.
        warmup_steps: adaptation steps per chain (step size and, by Pyro's default, a diagonal
            mass matrix; with a good flow the latter stays near the identity).
        num_chains: chains, run sequentially.
        jit_compile: trace the potential with ``torch.jit.trace`` (see
            :meth:`NeuTraPotential.compile`).
        save_warmup: keep the warm-up draws and statistics (for ``to_inference_data``).
        progress: show a progress bar.
        **kernel_options: passed to Pyro's kernel (``step_size``, ``adapt_step_size``,
            ``adapt_mass_matrix``, ``full_mass``, ``target_accept_prob``, ``max_tree_depth``,
            ``trajectory_length``, ``num_steps``, ...). For ``"hmc"``, ``jitter=True`` (the
            default unless ``num_steps`` is given) draws the number of leapfrog steps as
            :math:`\lceil u T / h \rceil`, :math:`u \sim \mathcal{U}(0, 1]`, each transition,
            and the trajectory length :math:`T` defaults to :math:`\pi` (:math:`\pi / 2`
            without jitter): the ideal target :math:`\mathcal{N}(0, I)` gives independent draws
            at :math:`T = \pi / 2` (Pyro's default :math:`2 \pi` would be a full period).
            For ``"nuts"``, ``target_accept_prob`` defaults to 0.95 (Pyro's default is 0.8):
            where the flow extrapolates, in the base space's far tails, the funnel-like geometry
            it did not learn comes back, and the step size adapted to the well-fitted bulk
            diverges there. On the 10-D funnel with ``AutoIAF`` (3000-step fits, three seeds,
            1000 draws each) the same fits gave 0, 5 and 0 divergences at 0.9 and none at 0.95,
            for 2 to 3.7 times the gradients per effective draw (still 23 to 120 times plain
            NUTS's ESS per gradient); earlier fits gave 4 and 23 at 0.8. Pass
            ``target_accept_prob=0.8`` for Pyro's behaviour, 0.9 for a cheaper compromise.

    Per-draw statistics: ``acceptance_rate`` (Pyro's per-transition acceptance statistic),
    ``energy`` (the Hamiltonian at the start of the transition), ``step_size``, ``n_steps``
    (gradient evaluations in the transition), ``tree_depth`` for NUTS (the bit length of
    ``n_steps``), ``lp`` and ``diverging``. Pyro's kernels flag divergences after warm-up only, so
    warm-up draws are never marked divergent.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from flowguide import AutoIAF, fit
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> pyro.clear_param_store()  # fit finds the guide's parameters there by name
        >>> guide = AutoIAF(model, num_flows=1, hidden=(8,))
        >>> _ = fit(model, guide, num_steps=100, progress=False, seed=0)
        >>> mcmc = NeuTraMCMC(model, guide, num_samples=50, warmup_steps=50, progress=False)
        >>> mcmc.run().get_samples()["x"].shape
        torch.Size([50, 2])
    """

    def __init__(
        self,
        model: Callable[..., Any],
        guide: AutoFlow,
        kernel: str = "nuts",
        num_samples: int = 1000,
        warmup_steps: int = 500,
        num_chains: int = 1,
        jit_compile: bool = False,
        *,
        save_warmup: bool = False,
        progress: bool = True,
        **kernel_options: Any,
    ) -> None:
        super().__init__()
        if kernel not in _KERNELS:
            raise ValueError(f"kernel must be one of {sorted(_KERNELS)}, got {kernel!r}")
        if not isinstance(guide, AutoFlow):
            raise TypeError(
                "NeuTraMCMC needs a flowguide AutoFlow guide (AutoIAF, AutoNeuralSpline, ...), "
                f"got {type(guide).__name__}; for other AutoContinuous guides use Pyro's "
                "pyro.infer.reparam.NeuTraReparam"
            )
        reserved = sorted(_RESERVED & kernel_options.keys())
        if reserved:
            raise TypeError(f"NeuTraMCMC sets {reserved} itself; do not pass them")
        self.model = model
        self.guide = guide
        self.kernel = kernel
        self.num_samples = _check_int(num_samples, "num_samples", 1)
        self.warmup_steps = _check_int(warmup_steps, "warmup_steps", 0)
        self.num_chains = _check_int(num_chains, "num_chains", 1)
        self.jit_compile = bool(jit_compile)
        self.save_warmup = bool(save_warmup)
        self.progress = bool(progress)
        self.kernel_options = dict(kernel_options)
        if kernel == "hmc":
            self.kernel_options.setdefault("jitter", "num_steps" not in kernel_options)
            if not {"trajectory_length", "num_steps"} & kernel_options.keys():
                self.kernel_options["trajectory_length"] = (
                    math.pi if self.kernel_options["jitter"] else math.pi / 2
                )
        elif "jitter" in kernel_options:
            raise TypeError("jitter is an option of kernel='hmc' only (NUTS needs none)")
        else:
            self.kernel_options.setdefault("target_accept_prob", _NUTS_TARGET_ACCEPT)
        self._sampler_name = f"NeuTra {kernel.upper()} (Pyro)"
        try:  # fail now on options the kernel does not take
            self._make_kernel(lambda params: torch.zeros(()))
        except TypeError as error:
            raise TypeError(f"invalid kernel option for {kernel.upper()}: {error}") from error

    def _make_kernel(self, potential_fn: Callable[[dict[str, Tensor]], Tensor]) -> HMC:
        cls = _NUTS if self.kernel == "nuts" else _HMC
        return cls(potential_fn=potential_fn, **self.kernel_options)

    def run(self, *args: Any, **kwargs: Any) -> NeuTraMCMC:
        """Sample the posterior of ``model(*args, **kwargs)``; returns ``self``."""
        start = time.perf_counter()
        potential = NeuTraPotential(self.model, self.guide, args, kwargs)
        with pyro.validation_enabled(False), poutine.block(), potential.frozen():
            eps0 = _initial_eps(potential, self.num_chains, batched=False)
            if self.jit_compile:
                potential.compile(eps0[0])
            warm_steps, num = self.warmup_steps, self.num_samples
            bar = _progress(self.num_chains * (warm_steps + num), self.progress, "NeuTra")
            chains = []
            try:
                for c in range(self.num_chains):
                    chains.append(self._run_chain(potential, eps0[c], c, bar))
            finally:
                if bar is not None:
                    bar.close()
        eps = torch.stack([draws for draws, _ in chains])
        stats = {k: torch.stack([s[k] for _, s in chains]) for k in chains[0][1]}
        keep, warm = slice(warm_steps, None), slice(0, warm_steps)
        self._finish(
            potential,
            eps[:, keep],
            {k: v[:, keep] for k, v in stats.items()},
            eps[:, warm] if self.save_warmup else None,
            {k: v[:, warm] for k, v in stats.items()},
            start,
        )
        return self

    def _run_chain(
        self, potential: NeuTraPotential, eps0: Tensor, chain: int, bar: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        def potential_fn(params: dict[str, Tensor]) -> Tensor:
            return potential(params["eps"])

        kernel = self._make_kernel(potential_fn)
        kernel.initial_params = {"eps": eps0}
        warm_steps = self.warmup_steps
        kernel.setup(warm_steps)
        params = kernel.initial_params
        draws: list[Tensor] = []
        rows: list[tuple[float, ...]] = []
        nuts = self.kernel == "nuts"
        for _ in range(warm_steps + self.num_samples):
            energy_before = float(kernel._potential_energy_last)
            step_size = float(kernel.step_size)
            calls = potential.num_grad_calls
            mean_accept = kernel._mean_accept_prob
            num_div = len(kernel._divergences)
            params = kernel.sample(params)
            t = kernel._t
            n = t - warm_steps if t > warm_steps else t
            accept = mean_accept + n * (kernel._mean_accept_prob - mean_accept)
            n_steps = potential.num_grad_calls - calls
            rows.append(
                (
                    float(len(kernel._divergences) > num_div),
                    min(max(accept, 0.0), 1.0),
                    kernel.start_kinetic + energy_before,
                    step_size,
                    float(n_steps),
                    -float(kernel._potential_energy_last),
                    float(n_steps.bit_length()),
                )
            )
            draws.append(params["eps"].detach().clone())
            if bar is not None:
                bar.update(1)
                bar.set_description(f"NeuTra {self.kernel.upper()} chain {chain}", refresh=False)
        kernel.cleanup()
        table = torch.tensor(rows, dtype=torch.float64)
        stats = {
            "diverging": table[:, 0].bool(),
            "acceptance_rate": table[:, 1],
            "energy": table[:, 2],
            "step_size": table[:, 3],
            "n_steps": table[:, 4].long(),
            "lp": table[:, 5],
        }
        if nuts:
            stats["tree_depth"] = table[:, 6].long()
        return torch.stack(draws), stats


# ------------------------------------------------------------------------------------------------
# ManyChainHMC: vectorised jittered HMC with ChEES trajectory adaptation
# ------------------------------------------------------------------------------------------------
def _van_der_corput(i: int) -> float:
    """The ``i``-th point (``i >= 1``) of the base-2 van der Corput (Halton) sequence in (0, 1)."""
    result, f = 0.0, 0.5
    while i:
        result += f * (i & 1)
        i >>= 1
        f *= 0.5
    return result


class _DualAveraging:
    """Nesterov's dual averaging of the log step size (Hoffman & Gelman 2014, Sec. 3.2)."""

    def __init__(
        self, step_size: float, gamma: float = 0.05, t0: float = 10.0, kappa: float = 0.75
    ) -> None:
        self.mu = math.log(10 * step_size)
        self.gamma, self.t0, self.kappa = gamma, t0, kappa
        self.t = 0
        self.h_bar = 0.0
        self.log_x = math.log(step_size)
        self.log_x_avg = math.log(step_size)

    def update(self, error: float) -> float:
        """Feed ``target - statistic``; returns the next step size."""
        self.t += 1
        eta = 1.0 / (self.t + self.t0)
        self.h_bar = (1 - eta) * self.h_bar + eta * error
        self.log_x = self.mu - math.sqrt(self.t) / self.gamma * self.h_bar
        w = self.t ** (-self.kappa)
        self.log_x_avg = w * self.log_x + (1 - w) * self.log_x_avg
        return math.exp(self.log_x)


class _Adam:
    """Adam on a scalar, as gradient *ascent* (beta1 = 0, beta2 = 0.5: TFP's ChEES defaults)."""

    def __init__(self, lr: float, beta1: float = 0.0, beta2: float = 0.5, eps: float = 1e-8):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = self.v = 0.0
        self.t = 0

    def step(self, grad: float) -> float:
        self.t += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * grad
        self.v = self.beta2 * self.v + (1 - self.beta2) * grad * grad
        m_hat = self.m / (1 - self.beta1**self.t)
        v_hat = self.v / (1 - self.beta2**self.t)
        return self.lr * m_hat / (math.sqrt(v_hat) + self.eps)


class ManyChainHMC(_Results):
    r"""Jittered HMC over many chains at once in the base space of a fitted flow guide, with
    cross-chain adaptation of the step size and the trajectory length.

    Every leapfrog step evaluates the potential and its gradient for all ``num_chains`` chains in
    one call: the flow runs on a ``(C, D)`` batch and the model once, the chains on a batch dim
    of size ``C`` left of the model's own plates (where Pyro's vectorised ELBO puts its
    particles). All chains share the step size :math:`h` and the number of leapfrog steps,
    which keeps them in lock-step; the mass matrix is the identity, since the flow is the
    preconditioner. A transition draws fresh momenta :math:`p \sim \mathcal{N}(0, I)`, runs
    :math:`n = \lceil u_t T / h \rceil` leapfrog steps with :math:`u_t` the base-2 Halton
    sequence in :math:`(0, 1)` (jitter against periodic trajectories), and accepts per chain
    with probability :math:`\alpha_c = \min(1, e^{-\Delta H_c})`; :math:`\Delta H_c > 1000` or a
    non-finite energy is a divergence (and a rejection).

    Delayed rejection (Modi, Barnett & Carpenter 2023): a chain whose proposal is rejected with an
    energy error above ``retry_energy_error`` (so every divergent one) tries again at once from
    the same state and momentum, with the step size divided by ``retry_factor`` over the same
    trajectory length, and accepts the second proposal with the probability that keeps detailed
    balance (it runs the first stage once more from the second proposal, the "ghost"; see
    :meth:`_second_stage`). Only those chains take the second trajectory, as a smaller batch. In
    a funnel the flow preconditions least well in the far neck and mouth, where a step size that
    suits the bulk diverges; there the second stage moves the chain instead of leaving it stuck
    (on a 10-D funnel, eight seeds: 20 divergences without it, none with it; see the NeuTra
    benchmark page). A transition counts as ``diverging`` only when every trajectory it tried
    diverged; ``first_stage_diverging`` and ``retried`` say how often the second stage ran and why.

    Warm-up (Hoffman, Radul & Sountsov 2021):

    * the step size follows dual averaging (Hoffman & Gelman 2014) on the harmonic mean of the
      non-divergent chains' acceptance probabilities (0 when all diverge), targeting
      ``target_accept_prob`` (0.651, optimal for HMC in high dimension); it starts from a
      doubling/halving search on one leapfrog step;
    * the trajectory length :math:`T` follows Adam gradient ascent on :math:`\log T` of the
      ChEES criterion
      :math:`\tfrac14 \mathbb{E}\big[(\lVert\theta' - \bar\theta'\rVert^2 -
      \lVert\theta - \bar\theta\rVert^2)^2\big]`, whose per-chain gradient estimate is
      :math:`u_t T\,(\lVert\theta' - \bar\theta'\rVert^2 - \lVert\theta - \bar\theta\rVert^2)
      (\theta' - \bar\theta') \cdot p'` (:math:`\theta'`, :math:`p'` the proposal and its
      momentum, :math:`\bar\theta` the cross-chain mean), averaged over the chains with weights
      :math:`\alpha_c`; updates are clipped to :math:`\pm 0.35` and :math:`T` to
      :math:`[h, \text{max\_num\_steps} \cdot h]`;
    * sampling then uses the averaged iterates: :math:`h = \exp(\overline{\log h})` of dual
      averaging and :math:`T = \exp` of a :math:`t^{-1/2}`-weighted running mean of
      :math:`\log T`.

    Args:
        model: the Pyro model; it must broadcast over a leading batch dim (no Python control flow on
            latent values, no ``.item()``); :meth:`run` checks this and raises a ``ValueError``
            suggesting :class:`NeuTraMCMC` otherwise.
        guide: an :class:`~flowguide.guides.AutoFlow` fitted to it; the chains live on its
            device and in its dtype.
        num_chains: chains run in parallel.
        num_samples: draws kept per chain.
        warmup_steps: adaptation transitions (shared by all chains).
        step_size: the initial (or, without adaptation, the fixed) step size; default: found by
            the search.
        trajectory_length: the initial (or fixed) :math:`T`; default :math:`\pi / 2`, a quarter
            period of the ideal :math:`\mathcal{N}(0, I)` target.
        adapt_step_size, adapt_trajectory_length: whether to adapt them in warm-up.
        target_accept_prob: the dual-averaging target for the harmonic-mean acceptance.
        max_num_steps: the most leapfrog steps per transition.
        learning_rate: Adam's learning rate on :math:`\log T`.
        retry_factor: delayed rejection's step-size divisor for the second proposal (an integer;
            1 turns delayed rejection off).
        retry_energy_error: the energy error above which a rejected proposal is retried.
        jit_compile: trace the batched potential with ``torch.jit.trace`` (delayed rejection's
            smaller batches run untraced).
        save_warmup: keep the warm-up draws and statistics.
        progress: show a progress bar.

    Per-draw statistics: ``diverging``, ``first_stage_diverging``, ``retried``,
    ``acceptance_rate`` (:math:`\alpha_c`, the first stage's), ``energy`` (the Hamiltonian of the
    state kept), ``step_size``, ``n_steps`` (the first stage's) and ``lp``.
    ``num_grad_evals`` in :meth:`diagnostics` counts the chains of every batched call: chains
    times calls, plus the retried chains' second trajectories and ghosts.

    References: Hoffman, Radul & Sountsov 2021, "An Adaptive-MCMC Scheme for Setting Trajectory
    Lengths in Hamiltonian Monte Carlo", AISTATS 2021 (ChEES, jittered many-chain HMC);
    Hoffman et al. 2019, "NeuTra-lizing Bad Geometry in Hamiltonian Monte Carlo Using Neural
    Transport", arXiv:1903.03704 (the base-space potential); Hoffman & Gelman 2014, "The No-U-Turn
    Sampler: Adaptively Setting Path Lengths in Hamiltonian Monte Carlo", JMLR 15,
    arXiv:1111.4246 (dual averaging of the step size); Modi, Barnett & Carpenter 2023, "Delayed
    Rejection Hamiltonian Monte Carlo for Sampling Multiscale Distributions", Bayesian Analysis,
    arXiv:2110.00610; Mira 2001, "On Metropolis-Hastings Algorithms with Delayed Rejection",
    Metron 59 (delayed rejection).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from flowguide import AutoIAF, fit
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> pyro.clear_param_store()  # fit finds the guide's parameters there by name
        >>> guide = AutoIAF(model, num_flows=1, hidden=(8,))
        >>> _ = fit(model, guide, num_steps=100, progress=False, seed=0)
        >>> sampler = ManyChainHMC(model, guide, num_chains=8, num_samples=20, warmup_steps=50,
        ...                        progress=False)
        >>> sampler.run().get_samples(group_by_chain=True)["x"].shape
        torch.Size([8, 20, 2])
    """

    _sampler_name = "NeuTra ManyChainHMC (ChEES)"

    def __init__(
        self,
        model: Callable[..., Any],
        guide: AutoFlow,
        num_chains: int = 64,
        num_samples: int = 500,
        warmup_steps: int = 500,
        *,
        step_size: float | None = None,
        trajectory_length: float | None = None,
        adapt_step_size: bool = True,
        adapt_trajectory_length: bool = True,
        target_accept_prob: float = 0.651,
        max_num_steps: int = 1024,
        learning_rate: float = 0.025,
        retry_factor: int = 4,
        retry_energy_error: float = 10.0,
        jit_compile: bool = False,
        save_warmup: bool = False,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(guide, AutoFlow):
            raise TypeError(
                "ManyChainHMC needs a flowguide AutoFlow guide (AutoIAF, AutoNeuralSpline, ...), "
                f"got {type(guide).__name__}"
            )
        for name, value in (("step_size", step_size), ("trajectory_length", trajectory_length)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if not 0 < target_accept_prob < 1:
            raise ValueError(f"target_accept_prob must lie in (0, 1), got {target_accept_prob!r}")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
        self.model = model
        self.guide = guide
        self.num_chains = _check_int(num_chains, "num_chains", 1)
        self.num_samples = _check_int(num_samples, "num_samples", 1)
        self.warmup_steps = _check_int(warmup_steps, "warmup_steps", 0)
        self.max_num_steps = _check_int(max_num_steps, "max_num_steps", 1)
        self.step_size = None if step_size is None else float(step_size)
        self.trajectory_length = math.pi / 2 if trajectory_length is None else trajectory_length
        self.adapt_step_size = bool(adapt_step_size)
        self.adapt_trajectory_length = bool(adapt_trajectory_length)
        self.target_accept_prob = float(target_accept_prob)
        self.learning_rate = float(learning_rate)
        self.retry_factor = _check_int(retry_factor, "retry_factor", 1)
        if not (isinstance(retry_energy_error, (int, float)) and retry_energy_error > 0):
            raise ValueError(f"retry_energy_error must be a number > 0, got {retry_energy_error!r}")
        self.retry_energy_error = float(retry_energy_error)
        self.jit_compile = bool(jit_compile)
        self.save_warmup = bool(save_warmup)
        self.progress = bool(progress)
        self.adaptation: list[tuple[float, float]] = []

    # -- pieces --------------------------------------------------------------------------------
    def _check_vectorised(self, potential: NeuTraPotential, k: int = 3) -> None:
        gen = torch.Generator().manual_seed(1)
        eps = 0.5 * torch.randn(k, potential.dim, generator=gen, dtype=torch.float64)
        eps = eps.to(device=potential.device, dtype=potential.dtype)
        advice = (
            "ManyChainHMC evaluates all chains in one model run, on a batch dim left of the "
            "model's plates, so the model must broadcast over a leading batch dimension (no "
            "Python branching on latent values, no .item(), no sums over all dims; see Pyro's "
            "tensor shapes tutorial). Use NeuTraMCMC, which runs one chain at a time, instead"
        )
        try:
            with torch.no_grad():
                batched = potential(eps)
                single = torch.stack([potential(e) for e in eps])
        except Exception as error:
            raise ValueError(
                f"the model cannot be vectorised over chains ({type(error).__name__}: {error}). "
                + advice
            ) from error
        tol = 1e-4 if potential.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-8
        scale = 1.0 + float(single.abs().nan_to_num(posinf=0.0, neginf=0.0).max())
        if batched.shape != single.shape or not torch.allclose(
            batched, single, rtol=tol, atol=tol * scale, equal_nan=True
        ):
            raise ValueError(
                "the model cannot be vectorised over chains: evaluated for several chains at "
                f"once it gives {batched.tolist()}, one chain at a time {single.tolist()}. "
                + advice
            )

    def _grad(self, potential: NeuTraPotential, eps: Tensor) -> tuple[Tensor, Tensor]:
        try:
            return potential.potential_and_grad(eps)
        except Exception as error:  # e.g. a failed Cholesky: reject every chain
            if any(handler(error) for handler in _EXCEPTION_HANDLERS.values()):
                nan = torch.full_like(eps, math.nan)
                return nan[:, 0], nan
            raise

    def _leapfrog(
        self,
        potential: NeuTraPotential,
        eps: Tensor,
        p: Tensor,
        grad: Tensor,
        step_size: float,
        num_steps: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        p = p - 0.5 * step_size * grad
        u = grad.new_zeros(eps.shape[:-1])
        for i in range(num_steps):
            eps = eps + step_size * p
            u, grad = self._grad(potential, eps)
            if i < num_steps - 1:
                p = p - step_size * grad
        p = p - 0.5 * step_size * grad
        return eps, p, u, grad

    def _transition(
        self,
        potential: NeuTraPotential,
        eps: Tensor,
        u: Tensor,
        grad: Tensor,
        step_size: float,
        num_steps: int,
        retry: bool = True,
    ) -> dict[str, Tensor]:
        p = torch.randn_like(eps)
        h0 = u + 0.5 * p.square().sum(-1)
        eps_new, p_new, u_new, grad_new = self._leapfrog(
            potential, eps, p, grad, step_size, num_steps
        )
        h1 = u_new + 0.5 * p_new.square().sum(-1)
        delta = _energy_error(h0, h1, eps_new)
        alpha = torch.exp(-delta).clamp(max=1.0)
        accept = torch.rand_like(alpha) < alpha
        keep = accept.unsqueeze(-1)
        diverging = delta > _MAX_ENERGY_ERROR
        out = {
            "eps": torch.where(keep, eps_new, eps),
            "u": torch.where(accept, u_new, u),
            "grad": torch.where(keep, grad_new, grad),
            "energy": torch.where(accept, h1, h0),
            "alpha": alpha,
            "diverging": diverging,
            "first_stage_diverging": diverging,
            "retried": torch.zeros_like(accept),
            "proposal": eps_new,
            "momentum": p_new,
        }
        if retry and self.retry_factor > 1:
            again = ~accept & (delta > self.retry_energy_error)
            if bool(again.any()):
                self._retry(potential, out, again, eps, p, grad, h0, step_size, num_steps)
        return out

    def _retry(
        self,
        potential: NeuTraPotential,
        out: dict[str, Tensor],
        again: Tensor,
        eps: Tensor,
        p: Tensor,
        grad: Tensor,
        h0: Tensor,
        step_size: float,
        num_steps: int,
    ) -> None:
        """Delayed rejection for the chains in ``again``: a second proposal, accepted with
        :meth:`_second_stage`'s probability (updates ``out`` in place)."""
        idx = again.nonzero().reshape(-1)
        x2, u2, g2, h2, alpha2, delta2 = self._second_stage(
            potential, eps[idx], p[idx], grad[idx], h0[idx], out["alpha"][idx], step_size, num_steps
        )
        accept = torch.rand_like(alpha2) < alpha2
        keep = accept.unsqueeze(-1)
        out["eps"][idx] = torch.where(keep, x2, out["eps"][idx])
        out["u"][idx] = torch.where(accept, u2, out["u"][idx])
        out["grad"][idx] = torch.where(keep, g2, out["grad"][idx])
        out["energy"][idx] = torch.where(accept, h2, out["energy"][idx])
        # a divergence is a transition whose every trajectory diverged
        out["diverging"] = out["diverging"].clone()
        out["diverging"][idx] = out["diverging"][idx] & (delta2 > _MAX_ENERGY_ERROR)
        out["retried"] = again

    def _second_stage(
        self,
        potential: NeuTraPotential,
        x0: Tensor,
        p0: Tensor,
        g0: Tensor,
        h0: Tensor,
        alpha1: Tensor,
        step_size: float,
        num_steps: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        r"""Delayed rejection's second proposal from states whose first was rejected: its
        position, potential, gradient and energy, its acceptance probability and its energy
        error.

        The second trajectory runs from the same state and momentum with step size
        :math:`h / r` for :math:`r n` steps (the same length). Write :math:`s_0` for the
        current state and momentum, :math:`s_2` for the second proposal (momentum negated),
        :math:`\alpha_1(s) = \min(1, e^{-\Delta H_1(s)})` for the first stage's acceptance from
        :math:`s` and :math:`\beta(s) = [\Delta H_1(s) > \delta]` for the rule that asks for a
        second proposal (:math:`\delta` = ``retry_energy_error``). The "ghost" is the first stage
        run from :math:`s_2`; :math:`s_2` is accepted with probability

        .. math::

            \alpha_2 = \min\Big(1, \frac{e^{-H(s_2)}\,(1 - \alpha_1(s_2))\,\beta(s_2)}
                {e^{-H(s_0)}\,(1 - \alpha_1(s_0))}\Big),

        which keeps detailed balance: both trajectories are reversible and volume-preserving,
        and the move from :math:`s_2` back to :math:`s_0` needs its own first proposal (the
        ghost) rejected and retried (Mira 2001; Modi, Barnett & Carpenter 2023)."""
        r = self.retry_factor
        x2, p2, u2, g2 = self._leapfrog(potential, x0, p0, g0, step_size / r, num_steps * r)
        h2 = u2 + 0.5 * p2.square().sum(-1)
        delta2 = _energy_error(h0, h2, x2)
        ok = torch.isfinite(delta2)
        # the ghost (a chain whose second proposal is not finite is rejected whatever its
        # ghost does: it starts from s_0 instead, to keep the batch finite)
        okd = ok.unsqueeze(-1)
        start_h = torch.where(ok, h2, h0)
        xg, pg, ug, _ = self._leapfrog(
            potential,
            torch.where(okd, x2, x0),
            torch.where(okd, -p2, p0),
            torch.where(okd, g2, g0),
            step_size,
            num_steps,
        )
        delta_g = _energy_error(start_h, ug + 0.5 * pg.square().sum(-1), xg)
        asks = delta_g > self.retry_energy_error  # beta(s_2)
        alpha_g = torch.exp(-delta_g).clamp(max=1.0)
        log_ratio = (h0 - start_h) + torch.log1p(-alpha_g) - torch.log1p(-alpha1)
        log_ratio = torch.where(ok & asks, log_ratio, torch.full_like(log_ratio, -math.inf))
        alpha2 = torch.exp(log_ratio.nan_to_num(nan=-math.inf)).clamp(max=1.0)
        return x2, u2, g2, h2, alpha2, delta2

    def _find_step_size(
        self, potential: NeuTraPotential, eps: Tensor, u: Tensor, grad: Tensor, step: float
    ) -> float:
        """Double or halve ``step`` until the harmonic-mean acceptance of one leapfrog step
        crosses 0.5 (as in Hoffman & Gelman 2014, Alg. 4, across chains)."""

        def accept_stat(h: float) -> float:
            out = self._transition(potential, eps, u, grad, h, 1, retry=False)
            return _harmonic_mean(out["alpha"], out["diverging"])

        direction = 1 if accept_stat(step) > 0.5 else -1
        for _ in range(40):
            new = step * 2.0**direction
            if not 1e-8 < new < 1e4:
                break
            if (accept_stat(new) > 0.5) != (direction == 1):
                break
            step = new
        return step

    # -- the run -------------------------------------------------------------------------------
    def run(self, *args: Any, **kwargs: Any) -> ManyChainHMC:
        """Sample the posterior of ``model(*args, **kwargs)``; returns ``self``."""
        start = time.perf_counter()
        potential = NeuTraPotential(self.model, self.guide, args, kwargs)
        chains, dim = self.num_chains, potential.dim
        with pyro.validation_enabled(False), poutine.block(), potential.frozen():
            self._check_vectorised(potential)
            if self.jit_compile:
                example = torch.zeros(chains, dim, device=potential.device, dtype=potential.dtype)
                potential.compile(example)
            eps = _initial_eps(potential, chains, batched=True)
            u, grad = self._grad(potential, eps)
            step = self.step_size if self.step_size is not None else 1.0
            if self.adapt_step_size and self.warmup_steps and self.step_size is None:
                step = self._find_step_size(potential, eps, u, grad, step)
            traj = float(self.trajectory_length)
            dual = _DualAveraging(step)
            adam = _Adam(self.learning_rate)
            log_traj = log_traj_avg = math.log(traj)
            warm_steps, total = self.warmup_steps, self.warmup_steps + self.num_samples
            self.adaptation = []
            draws: list[Tensor] = []
            records: list[dict[str, Tensor]] = []
            bar = _progress(total, self.progress, "NeuTra ManyChainHMC")
            try:
                for it in range(total):
                    if it == warm_steps and warm_steps:  # freeze the averaged iterates
                        if self.adapt_step_size:
                            step = math.exp(dual.log_x_avg)
                        if self.adapt_trajectory_length:
                            traj = _clip(math.exp(log_traj_avg), step, self.max_num_steps * step)
                    jitter = _van_der_corput(it + 1)
                    used_step = step
                    num_steps = min(self.max_num_steps, max(1, math.ceil(jitter * traj / step)))
                    out = self._transition(potential, eps, u, grad, step, num_steps)
                    if it < warm_steps:
                        if self.adapt_step_size:
                            accept = _harmonic_mean(out["alpha"], out["diverging"])
                            step = dual.update(self.target_accept_prob - accept)
                        if self.adapt_trajectory_length:
                            g = _chees_gradient(eps, out, jitter * traj)
                            if math.isfinite(g):
                                log_traj += _clip(adam.step(g), -0.35, 0.35)
                                # no lower clip at the step size: early dual-averaging steps
                                # are transiently large and would drag T up with them
                                log_traj = min(log_traj, math.log(self.max_num_steps * step))
                            w = (it + 1) ** -0.5
                            log_traj_avg = (1 - w) * log_traj_avg + w * log_traj
                            traj = math.exp(log_traj)
                        self.adaptation.append((step, traj))
                    eps, u, grad = out["eps"], out["u"], out["grad"]
                    draws.append(eps)
                    records.append(
                        {
                            "diverging": out["diverging"],
                            "first_stage_diverging": out["first_stage_diverging"],
                            "retried": out["retried"],
                            "acceptance_rate": out["alpha"],
                            "energy": out["energy"],
                            "step_size": torch.full_like(u, used_step),
                            "n_steps": torch.full(u.shape, num_steps, dtype=torch.long),
                            "lp": -u,
                        }
                    )
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(step_size=f"{step:.3g}", n_steps=num_steps, refresh=False)
            finally:
                if bar is not None:
                    bar.close()
        all_eps = torch.stack(draws, dim=1)  # (C, W + S, D)
        stats = {k: torch.stack([r[k].detach().cpu() for r in records], dim=1) for k in records[0]}
        keep, warm = slice(warm_steps, None), slice(0, warm_steps)
        self._sampler_info = {"step_size": step, "trajectory_length": traj}
        self._finish(
            potential,
            all_eps[:, keep],
            {k: v[:, keep] for k, v in stats.items()},
            all_eps[:, warm] if self.save_warmup else None,
            {k: v[:, warm] for k, v in stats.items()},
            start,
        )
        return self


def _energy_error(h0: Tensor, h1: Tensor, x1: Tensor) -> Tensor:
    r""":math:`H_1 - H_0` per chain, :math:`+\infty` where the energy or the end point is not
    finite."""
    delta = (h1 - h0).nan_to_num(nan=math.inf)
    finite = torch.isfinite(delta) & torch.isfinite(x1).all(-1)
    return torch.where(finite, delta, torch.full_like(delta, math.inf))


def _clip(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


def _harmonic_mean(alpha: Tensor, diverging: Tensor) -> float:
    """The harmonic mean of the chains' acceptance probabilities, a divergent chain counting as
    0 (so that the statistic, and with it the step size, drops when any chain struggles)."""
    a = torch.where(diverging, torch.zeros_like(alpha), alpha).double()
    if bool((a <= 0).any()):
        return 0.0
    return float(1.0 / (1.0 / a).mean())


def _chees_gradient(eps: Tensor, out: dict[str, Tensor], length: float) -> float:
    r"""The acceptance-weighted ChEES gradient with respect to :math:`\log T` (see
    :class:`ManyChainHMC`); ``length`` is the jittered trajectory length :math:`u_t T`."""
    proposal, momentum, alpha = out["proposal"], out["momentum"], out["alpha"]
    ok = (~out["diverging"]) & torch.isfinite(proposal).all(-1) & torch.isfinite(momentum).all(-1)
    w = torch.where(ok, alpha, torch.zeros_like(alpha)).double()
    if float(w.sum()) <= 1e-12:
        return math.nan
    prop = torch.where(ok.unsqueeze(-1), proposal, torch.zeros_like(proposal)).double()
    mom = torch.where(ok.unsqueeze(-1), momentum, torch.zeros_like(momentum)).double()
    prop_mean = (w.unsqueeze(-1) * prop).sum(0) / w.sum()
    centred = prop - prop_mean
    start = eps.double() - eps.double().mean(0)
    change = centred.square().sum(-1) - start.square().sum(-1)
    grads = length * change * (centred * mom).sum(-1)
    return float((w * grads).sum() / w.sum())
