r"""The SVI loop: ``flowguide.fit(model, guide, *args, **kwargs)``.

One call fits a guide with sensible defaults: Adam with an exponentially decaying learning rate,
early stopping once the smoothed loss stops improving, a progress bar, a guard against
non-finite losses and gradients, clean Ctrl-C, and atomic, resumable checkpoints.

For a flowguide :class:`~flowguide.guides.AutoFlow` the default loss is a direct ELBO estimate
that skips Pyro's guide trace: it draws :math:`\varepsilon \sim \mathcal{N}(0, I)` for all
particles at once, pushes them through the flow with its fused log-det,

.. math::

    \widehat{\mathrm{ELBO}} = \frac{1}{S} \sum_{s=1}^{S} \Big[
        \log p\big(x, T(z_s)\big) + \log |\det J_T(z_s)| - \log q(z_s) \Big],
    \qquad z_s = g(\varepsilon_s),

(:math:`T` the ``biject_to`` maps to the sites' supports), and evaluates the model once for all
particles, their draws on a batch dim left of the model's plates. It is the same estimator as
``Trace_ELBO`` with ``vectorize_particles=True``. Any Pyro ELBO with a ``differentiable_loss``
can be passed as ``loss`` instead, for any guide.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_sample
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

from .diagnostics import VectorizationWarning
from .guides import AutoFlow, constrain_latent, robust_init

__all__ = [
    "CHECKPOINT_FORMAT",
    "FitResult",
    "MapInit",
    "NoModeError",
    "default_optimizer",
    "fit",
    "flow_elbo_loss",
    "load_checkpoint",
    "map_init",
]

CHECKPOINT_FORMAT = "flowguide-checkpoint-v1"

#: ``fit(init="auto")`` tries a MAP start up to this latent dimension (its Hessian has D^2 entries)
AUTO_MAP_MAX_DIM = 1000
#: ``fit(init="auto")`` compares the two starts' ELBOs with this many draws
AUTO_MAP_PARTICLES = 256
#: ``fit(init="auto")``'s MAP searches from prior draws after the one from the guide's start
AUTO_MAP_RESTARTS = 4
#: ``fit``'s particles per step for flowguide's own ELBO (one vectorised model call for all)
DEFAULT_FLOW_PARTICLES = 16


class NoModeError(ValueError):
    """:func:`map_init` found no proper mode of the posterior in the unconstrained space (a
    funnel, an improper posterior), so there is no Laplace approximation to start from.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from torch.distributions import constraints
        >>> from flowguide import AutoIAF
        >>> def model():  # b's density is flat: no mode
        ...     pyro.sample("a", dist.Normal(0.0, 1.0))
        ...     pyro.sample("b", dist.ImproperUniform(constraints.real, (), ()))
        >>> pyro.clear_param_store()
        >>> try:
        ...     map_init(model, AutoIAF(model))
        ... except NoModeError as error:
        ...     print(str(error)[:47])
        map_init found no mode of the model's posterior
    """


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        losses: the loss (negative ELBO) at every step taken, skipped steps excluded.
        num_steps: the number of the last step (counting from 0, so ``len`` of the run).
        stopped: why it stopped: ``"budget"``, ``"plateau"``, ``"callback"`` or
            ``"interrupted"``.
        skipped_steps: steps whose loss or gradient was not finite, so no update was made.
        seconds: wall time of this call (a MAP start included).
        init: what :func:`map_init` found, when the fit started from it (else None).
        init_skipped: with ``init="auto"``, why the fit did not start from a MAP start (the
            posterior has no proper mode, the Laplace start's ELBO is the lower, the latent
            dimension is too large), else None.
        compile_seconds: wall time spent compiling the loss (``jit``), checks included.
        num_particles: the particles per step of the default loss (1 where ``fit`` fell back
            from its default because the model could not take them at once).

    Example:
        >>> result = FitResult(losses=[float(k) for k in range(20, 0, -1)], num_steps=20)
        >>> result.final_loss  # the mean of the last 10% of the losses: (2 + 1) / 2
        1.5
        >>> result.stopped, result.skipped_steps
        ('budget', [])
    """

    losses: list[float] = field(default_factory=list)
    num_steps: int = 0
    stopped: str = "budget"
    skipped_steps: list[int] = field(default_factory=list)
    seconds: float = 0.0
    init: MapInit | None = None
    init_skipped: str | None = None
    compile_seconds: float = 0.0
    num_particles: int = 1

    @property
    def final_loss(self) -> float:
        """The mean loss over the last 10% of the steps (at least one)."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail) if tail else math.nan


def flow_elbo_loss(
    model: Callable[..., Any],
    guide: AutoFlow,
    *args: Any,
    num_particles: int = 1,
    register_params: bool = True,
    **kwargs: Any,
) -> Tensor:
    r"""The negative ELBO of an :class:`AutoFlow`, differentiable, estimated with
    ``num_particles`` draws evaluated in one vectorised model call.

    With :math:`S` = ``num_particles`` reparameterised draws :math:`z_s = g(\varepsilon_s)`,
    :math:`\varepsilon_s \sim \mathcal{N}(0, I)`, from the guide's packed unconstrained space
    and :math:`T` the ``biject_to`` maps to the sites' supports, it returns

    .. math::

        -\widehat{\mathrm{ELBO}} = -\frac{1}{S} \sum_{s=1}^{S} \Big[
            \log p\big(x, T(z_s)\big) + \log |\det J_T(z_s)| - \log q(z_s) \Big],

    an unbiased estimate of :math:`-\log p(x) + \mathrm{KL}(q \,\|\, p(\cdot \mid x))`
    whose gradient flows through :math:`z_s` (the reparameterisation gradient). Model sites
    keep their plates, scales (subsampling) and masks. ``register_params=False`` skips
    registering the guide's parameters with Pyro's param store (see
    :meth:`AutoFlow.rsample_unconstrained`).

    Reference: Kingma & Welling 2014, "Auto-Encoding Variational Bayes", arXiv:1312.6114;
    Ranganath et al. 2014, "Black Box Variational Inference", arXiv:1401.0118.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from flowguide.transforms import Planar
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> pyro.clear_param_store()
        >>> pyro.set_rng_seed(0)
        >>> # started at the mean with scale 1, the guide is N(0, 1), the posterior itself:
        >>> # every draw gives -log Z = 0
        >>> from pyro.infer.autoguide import init_to_mean
        >>> exact = AutoFlow(model, Planar, init_loc_fn=init_to_mean, init_scale=1.0)
        >>> loss = flow_elbo_loss(model, exact, num_particles=8)
        >>> loss.requires_grad, abs(loss.item()) < 1e-5
        (True, True)
        >>> # a narrower start, N(0, 0.1^2): the loss estimates KL(q || p) = 1.81 nats
        >>> pyro.clear_param_store()
        >>> narrow = AutoFlow(model, Planar, init_loc_fn=init_to_mean, init_scale=0.1)
        >>> round(flow_elbo_loss(model, narrow, num_particles=4000).item(), 1)
        1.8
    """
    if guide.prototype_trace is None:
        guide._setup_prototype(*args, **kwargs)
    z, log_q = guide.rsample_unconstrained(
        num_particles if num_particles > 1 else None, register=register_params
    )
    return _negative_elbo(model, guide, z, log_q, args, kwargs)


def _negative_elbo(
    model: Callable[..., Any],
    guide: AutoFlow,
    z: Tensor,
    log_q: Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    plates: list[tuple[str, int, int]] | None = None,
) -> Tensor:
    r""":func:`flow_elbo_loss` for given draws ``z`` (``(D,)`` or ``(S, D)``) and their
    :math:`\log q`; ``plates`` collects the model's plates as ``(name, size, subsample size)``."""
    particles = z.shape[0] if z.dim() == 2 else 1
    nesting = guide.max_plate_nesting
    _refuse_unbatched(guide, particles)
    values, _, log_jac = constrain_latent(guide, z, nesting)
    with _LogJoint(values, particles, nesting, plates) as joint:
        model(*args, **kwargs)
    return -(joint.total() + (log_jac - log_q).sum()) / particles


def _refuse_unbatched(guide: AutoFlow, particles: int) -> None:
    """A ``ValueError`` naming a site with batch dims in no plate, where ``particles > 1`` draws
    would go (:func:`~flowguide.guides.unbatched_sites`)."""
    unbatched = getattr(guide, "_unbatched", ())
    if particles > 1 and unbatched:
        name, shape = unbatched[0]
        raise ValueError(
            f"site {name!r} has batch shape {shape}, with dims left of the model's "
            f"{guide.max_plate_nesting} plate dim(s) that no pyro.plate declares, where the "
            f"{particles} particles go: put those dims in a pyro.plate (or to_event) to "
            "evaluate several particles at once, or use num_particles=1"
        )


def _check_batched(
    model: Callable[..., Any],
    guide: AutoFlow,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    k: int = 3,
) -> None:
    """Raise ``ValueError`` unless the model's log joint at ``k`` draws, evaluated in one model
    call on a batch dim left of its plates, equals the ``k`` values of one draw at a time.

    A model valid for one draw can be wrong for a batch with no error: a sum over all dims (a
    ``pyro.factor`` of ``(z ** 2).sum()``) adds the draws together, Python control flow on a
    latent value takes one branch for all, data in no plate pair up with the draws. The draws
    come from a private generator and each model call gets the same seeded random state (the
    same subsample of a subsampled plate), restored after, so the check leaves the fit's own
    random stream alone.
    """
    if guide.prototype_trace is None:
        guide._setup_prototype(*args, **kwargs)
    _refuse_unbatched(guide, k)
    loc = guide.affine.loc
    gen = torch.Generator().manual_seed(0)
    eps = 0.5 * torch.randn(k, guide.latent_dim, generator=gen, dtype=torch.float64).to(loc)
    nesting = guide.max_plate_nesting
    devices = [loc.device] if loc.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices), poutine.block():
        z = guide._push(eps)[0]

        def log_joint(values: dict[str, Tensor], particles: int, nesting: int) -> Tensor:
            torch.random.default_generator.manual_seed(0)  # not torch.manual_seed: it would
            if devices:  # queue a reseeding of CUDA devices not yet in use
                with torch.cuda.device(loc.device):
                    torch.cuda.manual_seed(0)
            with _LogJoint(values, particles, nesting, per_particle=particles > 1) as joint:
                model(*args, **kwargs)
            return joint.total()

        batched = log_joint(constrain_latent(guide, z, nesting)[0], k, nesting).reshape(-1)
        single = torch.stack([log_joint(constrain_latent(guide, z[i])[0], 1, 0) for i in range(k)])
    tol = 1e-4 if loc.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-8
    scale = 1.0 + float(single.abs().nan_to_num(posinf=0.0, neginf=0.0).max())
    if batched.shape != single.shape or not torch.allclose(
        batched, single, rtol=tol, atol=tol * scale, equal_nan=True
    ):
        raise ValueError(
            f"the model's log density at {k} draws evaluated in one model call is "
            f"{batched.tolist()}, one draw at a time {single.tolist()}: the model does not "
            "broadcast over a batch of draws left of its plates (a sum over all dims, Python "
            "control flow on a latent value, data in no pyro.plate)"
        )


class _StaticLoss:
    """:func:`flow_elbo_loss` compiled once for a model of static structure: a pure function of
    the base noise and the parameters, so one compiled program serves every step. Subclasses
    compile it (:meth:`_compile`); this class checks the model and the result (the gradient
    too with ``check_gradients``). See :func:`fit`'s ``jit``."""

    mode = ""
    check_gradients = False

    def __init__(
        self,
        model: Callable[..., Any],
        guide: AutoFlow,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        num_particles: int,
        params: dict[str, Tensor],
    ) -> None:
        loc = guide.affine.loc
        self.params = list(params.values())
        self.shape = (guide.latent_dim,)
        if num_particles > 1:
            self.shape = (num_particles, guide.latent_dim)
        self.like = {"dtype": loc.dtype, "device": loc.device}

        def loss(eps: Tensor, *_: Tensor, plates: list | None = None) -> Tensor:
            z, log_q = guide._push(eps)
            return _negative_elbo(model, guide, z, log_q, args, kwargs, plates)

        # fixed draws from a generator of their own: Pyro's random state is left as it is, so
        # the run's draws (and losses) are those of jit=False
        gen = torch.Generator(device=loc.device).manual_seed(0)
        probe, check = (torch.randn(self.shape, generator=gen, **self.like) for _ in range(2))
        plates: list[tuple[str, int, int]] = []
        plain, plain_grads = self._evaluate(lambda: loss(check, plates=plates))
        for name, size, subsample_size in plates:
            if subsample_size is not None and size is not None and subsample_size < size:
                raise ValueError(
                    f"jit={self.mode!r} cannot compile a model that subsamples: plate {name!r} "
                    f"draws {subsample_size} of {size} indices at every call, and a trace would "
                    "freeze them; use jit=False"
                )
        with pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            # TorchInductor's own deprecation notices (torch._inductor.lowering) are not the user's
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
            self._compile(loss, probe, guide, params)
            compiled, grads = self._evaluate(lambda: self.compiled(check, *self.params))
        if not torch.allclose(compiled, plain, rtol=1e-4, atol=1e-6):
            raise ValueError(
                f"jit={self.mode!r}: the compiled loss differs from the model's own at a test "
                f"draw ({compiled.item():.6g} against {plain.item():.6g}): the model's "
                "structure depends on its values (Python control flow on sampled values, "
                ".item(), random numbers of its own), which a trace freezes; use jit=False"
            )
        if grads is None or plain_grads is None:
            return
        for name, g, want in zip(params, grads, plain_grads, strict=True):
            if not torch.allclose(g, want, rtol=1e-3, atol=1e-5 * float(want.abs().max()) + 1e-8):
                raise ValueError(
                    f"jit={self.mode!r}: the compiled loss's gradient for parameter {name!r} "
                    f"differs from the model's own at a test draw (largest difference "
                    f"{(g - want).abs().max().item():.3g}); use jit=False"
                )

    def _evaluate(self, loss: Callable[[], Tensor]) -> tuple[Tensor, list[Tensor] | None]:
        """A loss's value, with its gradients when they are checked (else None). A trace is
        checked without them: after a check with gradients, the next run of a traced IAF with
        one particle failed in TorchScript's executor ("a view of a leaf Variable that requires
        grad is being used in an in-place operation")."""
        if self.check_gradients:
            return _value_and_grads(loss, self.params)
        with torch.no_grad():
            return loss(), None

    def _compile(
        self, loss: Callable[..., Tensor], probe: Tensor, guide: AutoFlow, params: dict[str, Tensor]
    ) -> None:
        raise NotImplementedError

    def __call__(self) -> Tensor:
        return self.compiled(torch.randn(self.shape, **self.like), *self.params)


class _TracedLoss(_StaticLoss):
    """:func:`flow_elbo_loss` compiled by ``torch.jit.trace`` into one TorchScript graph (the
    tracer follows the parameter tensors wherever the guide and the model use them)."""

    mode = "trace"

    def _compile(
        self, loss: Callable[..., Tensor], probe: Tensor, guide: AutoFlow, params: dict[str, Tensor]
    ) -> None:
        self.compiled = torch.jit.trace(loss, (probe, *self.params), check_trace=False)


class _GuideLoss(torch.nn.Module):
    """The loss as a module holding the guide, so that ``torch.func.functional_call`` can run
    it with the guide's parameters replaced (by a tracer's placeholders)."""

    def __init__(self, guide: AutoFlow, loss: Callable[..., Tensor]) -> None:
        super().__init__()
        self.guide = guide
        self.loss = loss

    def forward(self, eps: Tensor) -> Tensor:
        return self.loss(eps)


class _InductorLoss(_StaticLoss):
    """:func:`flow_elbo_loss` traced to one graph of ATen operations (``make_fx``), then
    compiled with ``torch.compile`` (TorchInductor): the forward and the backward become a few
    fused kernels (C++ on a CPU, Triton on a GPU) instead of hundreds of small ones."""

    mode = "compile"
    # a parameter that the tracer missed would be a constant of the graph, with no gradient
    check_gradients = True

    def _compile(
        self, loss: Callable[..., Tensor], probe: Tensor, guide: AutoFlow, params: dict[str, Tensor]
    ) -> None:
        from torch.fx.experimental.proxy_tensor import make_fx

        # the guide's parameters are swapped for the tracer's placeholders by functional_call,
        # the model's own (pyro.param sites) in Pyro's param store, where pyro.param reads them
        names = {id(p): "guide." + n for n, p in guide.named_parameters()}
        store = pyro.get_param_store()
        module = _GuideLoss(guide, loss)
        keys = [names.get(id(p)) for p in self.params]
        for name, key in zip(params, keys, strict=True):
            if key is None and store._params.get(name) is not params[name]:
                raise ValueError(
                    f"jit='compile' cannot follow parameter {name!r}: it is neither the guide's "
                    "nor in Pyro's param store; use jit='trace'"
                )

        def pure(eps: Tensor, *values: Tensor) -> Tensor:
            ours, theirs = {}, {}
            for name, key, value in zip(params, keys, values, strict=True):
                if key is None:
                    theirs[name] = value
                else:
                    ours[key] = value
            held = {name: store._params[name] for name in theirs}
            store._params.update(theirs)
            try:
                return torch.func.functional_call(module, ours, (eps,))
            finally:
                store._params.update(held)

        try:
            with torch.no_grad():
                graph = make_fx(pure)(probe, *(p.detach() for p in self.params))
        except RuntimeError as error:  # make_fx refuses to read a traced value (.item())
            raise ValueError(
                f"jit='compile' could not trace the loss ({_first_line(error)}): the model's "
                "structure depends on its values (Python control flow on sampled values, "
                ".item(), random numbers of its own), which a trace freezes; use jit=False"
            ) from error
        self.compiled = torch.compile(graph, fullgraph=True, dynamic=False)
        try:  # compile now, with the backward, so that a failure surfaces here
            _value_and_grads(lambda: self.compiled(probe, *self.params), self.params)
        except Exception as error:
            raise RuntimeError(
                f"jit='compile': torch.compile failed ({_first_line(error)}); it "
                "needs a working C++ compiler on a CPU (Triton on a GPU). jit='trace' needs "
                "neither"
            ) from error


def _first_line(error: BaseException) -> str:
    """An exception's type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _value_and_grads(
    loss: Callable[[], Tensor], params: list[Tensor]
) -> tuple[Tensor, list[Tensor]]:
    """A loss's value and its gradients for ``params`` (zeros where it does not depend on one),
    leaving the parameters' ``.grad`` alone."""
    with torch.enable_grad():
        value = loss()
        grads = torch.autograd.grad(value, params, allow_unused=True)
    return value.detach(), [
        torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
    ]


class _LogJoint(Messenger):
    r"""Condition a model's latent sites on ``values`` and sum its sample sites' scaled and
    masked log-densities as the model runs: :math:`\log p(x, z)` without building a trace.

    ``values`` may hold ``particles`` draws at dim ``-nesting - 1``, left of the model's
    ``nesting`` plate dims (as :func:`~flowguide.guides.constrain_latent` puts them); with
    ``per_particle`` the total is one log joint per draw, of shape ``(particles,)``. No plate
    broadcasts the model's distributions over that dim: a site whose log-density depends on
    the draws has it there already, and one that does not (data under fixed parameters, a prior
    with constant parameters) has the same log-density for every draw and counts ``particles``
    times. The sum is the one ``Trace.log_prob_sum`` gives for the model traced inside a plate
    of the draws, less that plate's per-site broadcasting and the trace's bookkeeping, which
    were a tenth of a training step on small models. Unlike ``log_prob_sum`` under validation
    it hangs no NaN/inf warning hook on every site: the fit loop checks the loss and the
    gradients itself.
    """

    def __init__(
        self,
        values: dict[str, Tensor],
        particles: int,
        nesting: int,
        plates: list[tuple[str, int, int]] | None = None,
        per_particle: bool = False,
    ) -> None:
        super().__init__()
        self.plates = plates
        self.per_particle = per_particle
        self.values = values
        self.particles = particles
        self.dim = -nesting - 1
        self._total: Tensor | float = 0.0

    def total(self) -> Tensor:
        return torch.as_tensor(self._total)

    def _pyro_sample(self, msg: Message) -> None:
        value = self.values.get(msg["name"])  # type: ignore[arg-type]
        if value is not None:  # as poutine.condition does
            msg["value"] = value
            msg["is_observed"] = True

    def _pyro_post_sample(self, msg: Message) -> None:
        if (msg["infer"] or {}).get("_do_not_trace"):  # auxiliary sites, as Pyro's trace skips
            return
        if self.plates is not None and site_is_subsample(msg):  # type: ignore[arg-type]
            plate = msg["fn"]
            self.plates.append((msg["name"], plate.size, plate.subsample_size))  # type: ignore
        name, fn, value = msg["name"], msg["fn"], msg["value"]
        try:
            log_p = fn.log_prob(value, *msg["args"], **msg["kwargs"])  # type: ignore[union-attr]
        except ValueError as error:
            raise ValueError(
                f"the log-density of site {name!r} failed: {error} (value shape "
                f"{tuple(getattr(value, 'shape', ()))}, batch shape {tuple(fn.batch_shape)}, "  # type: ignore[union-attr]
                f"event shape {tuple(fn.event_shape)})"  # type: ignore[union-attr]
            ) from error
        log_p = torch.as_tensor(scale_and_mask(log_p, msg["scale"], msg["mask"]))
        term = log_p.sum()
        if self.particles > 1:
            size = log_p.shape[self.dim] if log_p.dim() >= -self.dim else 1
            if self.per_particle:  # one sum per draw, over everything but the draws' dim
                if size == 1:
                    term = term.expand(self.particles)
                else:
                    term = log_p.movedim(self.dim, 0).reshape(size, -1).sum(-1)
            elif size == 1:
                term = term * self.particles
            if size not in (1, self.particles) or log_p.shape[: self.dim].numel() > 1:
                raise ValueError(
                    f"site {name!r} has a log-density of shape {tuple(log_p.shape)}, whose dim "
                    f"{self.dim} should hold the {self.particles} draws (or 1), with nothing "
                    f"left of it: the model must broadcast over a batch dim left of its "
                    f"{-self.dim - 1} plate dim(s)"
                )
        self._total = self._total + term


@dataclass
class MapInit:
    r"""What :func:`map_init` found: the mode of the posterior density in the guide's packed
    unconstrained space and the Laplace scales there.

    Attributes:
        loc: the mode :math:`z^\star`, shape ``(D,)``.
        scale: :math:`\sqrt{\operatorname{diag}(H^{-1})}` at the mode, shape ``(D,)``.
        scale_tril: the Cholesky factor of :math:`H^{-1}` with ``covariance="full"``, else
            None.
        log_density: :math:`\log p(x, T(z^\star)) + \log|\det J_T(z^\star)|`.
        decrement: half the squared Newton decrement :math:`\tfrac12 g^\top H^{-1} g` at
            :math:`z^\star` (how far below the mode's value it still is, in nats, to second
            order).
        num_evaluations: evaluations of the log density (L-BFGS and Newton steps, every
            search).
        seconds: wall time.
        start: which search found it: 0 from the guide's start, k from the k-th prior draw
            (``restarts``).

    Reference: MacKay 2003, "Information Theory, Inference, and Learning Algorithms",
    chapter 27 (the Laplace approximation :math:`\mathcal{N}(z^\star, H^{-1})`).

    Example:
        >>> found = MapInit(torch.zeros(2), torch.ones(2), None, -1.8, 0.0, 12, 0.01)
        >>> found.loc.shape, found.log_density
        (torch.Size([2]), -1.8)
    """

    loc: Tensor
    scale: Tensor
    scale_tril: Tensor | None
    log_density: float
    decrement: float
    num_evaluations: int
    seconds: float
    start: int = 0


def map_init(
    model: Callable[..., Any],
    guide: AutoFlow,
    *args: Any,
    covariance: str = "full",
    max_evals: int = 2000,
    tol: float = 1e-3,
    restarts: int = 0,
    **kwargs: Any,
) -> MapInit:
    r"""Warm-start a flow guide at the posterior mode with Laplace scales (a MAP start).

    In the guide's packed unconstrained space (the ``biject_to`` maps :math:`T` to the sites'
    supports) it finds the mode of the density the guide approximates,

    .. math::

        z^\star = \arg\max_z \; \ell(z), \qquad
        \ell(z) = \log p\big(x, T(z)\big) + \log\lvert\det J_T(z)\rvert ,

    by L-BFGS (strong Wolfe line search) from the guide's initial location, polished by Newton
    steps :math:`z \leftarrow z - t H^{-1} g` (:math:`g, H` the gradient and Hessian of
    :math:`-\ell`, :math:`t` halved until :math:`\ell` rises) until they stop gaining; half the
    squared Newton decrement :math:`\tfrac12 g^\top H^{-1} g` must then be below ``tol`` nats
    (:math:`\ell(z^\star)` within about ``tol`` of the maximum). It then moves the guide's
    base, the elementwise affine map :math:`z = \mu + \sigma \odot f(\varepsilon)`, to
    :math:`\mu = z^\star` and :math:`\sigma_i = \sqrt{(H^{-1})_{ii}}`, the marginal standard
    deviations of the Laplace approximation :math:`\mathcal{N}(z^\star, H^{-1})`. The flow
    :math:`f` is left as it is (the identity in a fresh guide).

    With ``covariance="diag"`` that is all: the guide starts as the diagonal of the Laplace
    approximation. With ``covariance="full"`` (default) a fixed, untrained linear map :math:`y =
    z^\star + L (x - z^\star)`, :math:`L = D C D^{-1}` (:math:`D` = diag of :math:`\sigma`,
    :math:`C` the Cholesky factor of the Laplace correlation matrix, :math:`\log|\det L| = \sum_i
    \log C_{ii}`), is appended after the base, so the guide starts as the full Laplace approximation
    :math:`\mathcal{N}(z^\star, H^{-1})` and the flow and base learn the posterior's departure from
    it in decorrelated, standardised coordinates. On a nearly singular posterior (a regression on
    strongly correlated, unscaled predictors) that matters: a diagonal start with the marginal sds
    puts its draws far off the ridge, and the first steps of SVI blow the scales up (kilpisjarvi in
    ``docs/benchmarks/accuracy.md``). Calling it again replaces the map (``"diag"`` removes it).
    ``flowguide.fit(..., init="map")`` (full) or ``init="map-diag"`` calls it before the first step.

    A posterior without a proper mode in the unconstrained space (a funnel such as a centred
    hierarchical model, whose density grows without bound as the group scale goes to 0) has no
    positive definite Hessian where the search ends, or never gets the decrement below ``tol``:
    that raises :class:`NoModeError` (a ``ValueError``) saying which, and the guide is left
    untouched. A non-finite log
    density or Hessian at the start or at the mode raises ``FloatingPointError``. Points where the
    log density is not finite during the search (a line search overshooting into an
    impossible region) are never taken: the search keeps the best finite point.

    Reference: Nocedal & Wright 2006, "Numerical Optimization" (L-BFGS: chapter 7; Newton
    decrement and backtracking: Boyd & Vandenberghe 2004, "Convex Optimization", section 9.5);
    Laplace approximation: MacKay 2003, "Information Theory, Inference, and Learning
    Algorithms", chapter 27; Kucukelbir et al. 2017, "Automatic Differentiation Variational
    Inference", arXiv:1603.00788 (the unconstrained space).

    Args:
        model, guide: the Pyro model and a flowguide :class:`~flowguide.guides.AutoFlow`.
        *args, **kwargs: the model's arguments.
        covariance: ``"full"`` (a fixed linear map carries the Laplace correlations) or
            ``"diag"`` (the base's scales only).
        max_evals: the most log-density evaluations of the L-BFGS search.
        tol: the largest accepted :math:`\tfrac12 g^\top H^{-1} g` at the mode, in nats.
        restarts: after the search from the guide's start (whose failure raises), this many
            more from draws of the model's prior (Pyro's ``init_to_sample``), each with a tenth
            of ``max_evals`` for its L-BFGS part; the mode with
            the highest log density wins, and searches that fail are passed over. For a
            posterior with local modes: an ODE model's (posteriordb's lotka_volterra) search
            from the prior median ends in one 40 nats below the posterior's.

    Returns:
        a :class:`MapInit`.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from flowguide import AutoIAF
        >>> def model():  # x ~ N(0, 10^2) observed once as 3.0 with sd 1: the mode is 3 / 1.01
        ...     x = pyro.sample("x", dist.Normal(0.0, 10.0))
        ...     pyro.sample("y", dist.Normal(x, 1.0), obs=torch.tensor(3.0))
        >>> pyro.clear_param_store()
        >>> guide = AutoIAF(model)
        >>> found = map_init(model, guide)
        >>> round(found.loc.item(), 4), round(found.scale.item(), 4)  # 3 / 1.01, 1 / sqrt(1.01)
        (2.9703, 0.995)
        >>> round(guide.affine.loc.item(), 4), round(guide.affine.log_scale.exp().item(), 4)
        (2.9703, 0.995)
    """
    if not isinstance(guide, AutoFlow):
        raise TypeError(
            f"guide must be a flowguide AutoFlow (AutoNeuralSpline, AutoIAF, ...) for a MAP "
            f"start, got {type(guide).__name__}"
        )
    if covariance not in ("full", "diag"):
        raise ValueError(f"covariance must be 'full' or 'diag', got {covariance!r}")
    if not isinstance(max_evals, int) or isinstance(max_evals, bool) or max_evals < 1:
        raise ValueError(f"max_evals must be an integer >= 1, got {max_evals!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a number > 0, got {tol!r}")
    if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 0:
        raise ValueError(f"restarts must be an integer >= 0, got {restarts!r}")
    start = time.perf_counter()
    if guide.prototype_trace is None:
        guide._setup_prototype(*args, **kwargs)
    affine = guide.affine
    evals = [0]

    def negative_log_density(z: Tensor) -> Tensor:
        evals[0] += 1
        values, _, log_jac = constrain_latent(guide, z)
        with poutine.block(), _LogJoint(values, 1, 0) as joint:
            model(*args, **kwargs)
        return -(joint.total() + log_jac)

    def value_and_grad(z: Tensor) -> tuple[Tensor, Tensor]:
        z = z.detach().requires_grad_(True)
        try:
            u = negative_log_density(z)
        except ValueError as error:  # a distribution's parameter validation saw a NaN
            if "invalid values" not in str(error):
                raise
            return z.new_tensor(math.nan), torch.full_like(z, math.nan)
        (g,) = torch.autograd.grad(u, z)
        return u.detach(), g

    def search(z0: Tensor, max_evals: int) -> tuple[Tensor, Tensor, Tensor, float]:
        """L-BFGS then Newton from ``z0``: the mode, -log density there, the Hessian's Cholesky
        factor and the decrement; NoModeError or FloatingPointError where there is none."""
        u0, g0 = value_and_grad(z0)
        if not (bool(torch.isfinite(u0)) and bool(torch.isfinite(g0).all())):
            raise FloatingPointError(
                f"map_init: the log density at the guide's initial location is not finite "
                f"(-log density {u0.item()}, gradient finite: {bool(torch.isfinite(g0).all())}); "
                "give the guide another init_loc_fn"
            )
        best = [u0, z0]

        # L-BFGS: the closure reports every evaluation; the best finite point is kept. It stops
        # near the dtype's rounding (Newton's steps below polish the rest): asked for a gradient
        # below 1e-12 in float32, it ran to max_evals on a 2-D model
        eps = torch.finfo(z0.dtype).eps
        z = z0.clone().requires_grad_(True)
        lbfgs = torch.optim.LBFGS(
            [z],
            lr=1.0,
            max_iter=max_evals,
            max_eval=max_evals,
            tolerance_grad=1e3 * eps,
            tolerance_change=10 * eps * max(1.0, abs(u0.item())),
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            u, g = value_and_grad(z)
            if bool(torch.isfinite(u)) and bool(torch.isfinite(g).all()) and u < best[0]:
                best[0], best[1] = u, z.detach().clone()
            z.grad = g
            return u

        try:
            lbfgs.step(closure)
        except RuntimeError as error:  # a non-finite value inside its line search overflowed a step
            if "overflow" not in str(error):
                raise

        # Newton polishing with backtracking, from the best finite point; where the Hessian is not
        # positive definite (L-BFGS stopped short, near a saddle) the step uses the Hessian shifted
        # to be so, a descent direction, until the search reaches a region where it is
        z = best[1]
        u = best[0]
        for _ in range(50):
            hess, chol, g, shifted = _hessian(negative_log_density, z)
            step = torch.cholesky_solve(g.unsqueeze(-1), chol).squeeze(-1)
            decrement = 0.5 * float(g @ step)
            if not shifted and decrement <= 1e-12 * max(1.0, abs(u.item())):  # polished to rounding
                break
            t = 1.0
            while t > 1e-10:
                candidate = z - t * step
                u_new, _ = value_and_grad(candidate)
                if bool(torch.isfinite(u_new)) and u_new <= u - 0.5 * t * decrement:
                    z, u = candidate, u_new
                    break
                t *= 0.5
            else:
                break  # no decrease along the Newton direction: rounding, or no mode nearby
        else:
            hess, chol, g, shifted = _hessian(negative_log_density, z)
            step = torch.cholesky_solve(g.unsqueeze(-1), chol).squeeze(-1)
            decrement = 0.5 * float(g @ step)
        if shifted:  # the Hessian at the point where the search ended (z) is not positive definite
            smallest = torch.linalg.eigvalsh(hess)[0].item()
            raise NoModeError(
                f"map_init found no mode of the model's posterior: the Hessian of -log density "
                f"at the point the search ended ({u.item():.6g}) is not positive definite "
                f"(smallest eigenvalue {smallest:.3g}); the posterior may have no proper mode "
                "in the unconstrained space (a funnel, an improper posterior). Fit without "
                "init='map'"
            )
        if decrement > tol:
            raise NoModeError(
                f"map_init found no mode of the model's posterior: after {evals[0]} evaluations "
                f"half the squared Newton decrement is {decrement:.3g} nats (tol {tol:g}) at "
                f"-log density {u.item():.6g}; the posterior may have no proper mode in the "
                "unconstrained space (a funnel, an improper posterior) or need more max_evals. "
                "Fit without init='map'"
            )
        return z, u, chol, decrement

    with torch.no_grad():  # where the guide maps eps = 0: its loc, for a fresh guide
        z0 = guide.transform._forward_ladj(torch.zeros_like(affine.loc), None)[0].detach()
    z, u, chol, decrement = search(z0, max_evals)
    won = 0
    for k in range(restarts):  # more searches from prior draws; the highest mode wins
        try:
            z1 = _prior_draw(model, guide, *args, **kwargs)
            candidate = search(z1, max(1, max_evals // 10))
        except (NoModeError, FloatingPointError, ValueError, RuntimeError):
            continue  # a start where the density is not finite, or a search that found no mode
        if bool(candidate[1] < u):
            z, u, chol, decrement = candidate
            won = k + 1
    cov = torch.cholesky_inverse(chol)
    scale = cov.diagonal().sqrt()
    scale_tril = tril = None
    if covariance == "full":
        scale_tril = torch.linalg.cholesky(cov)  # = D C, C the correlation's Cholesky factor
        tril = scale_tril / scale  # L = D C D^-1
    with torch.no_grad():
        affine.loc.copy_(z.to(affine.loc))
        affine.log_scale.copy_(scale.log().to(affine.log_scale))
    guide._set_laplace_correlation(z if tril is not None else None, tril)
    return MapInit(
        loc=z.detach().clone(),
        scale=scale.detach().clone(),
        scale_tril=scale_tril,
        log_density=-u.item(),
        decrement=decrement,
        num_evaluations=evals[0],
        seconds=time.perf_counter() - start,
        start=won,
    )


def _prior_draw(model: Callable[..., Any], guide: AutoFlow, *args: Any, **kwargs: Any) -> Tensor:
    """A draw of the latent sites from the model's prior, packed as the guide packs them (in
    the unconstrained space); a site that cannot be sampled gets its ``T(0)``."""
    drawn = InitMessenger(robust_init(init_to_sample))(model)
    trace = poutine.block(poutine.trace(drawn).get_trace)(*args, **kwargs)
    parts = []
    for name, _ in guide.prototype_trace.iter_stochastic_nodes():
        value = trace.nodes[name]["value"].detach()
        parts.append(biject_to(trace.nodes[name]["fn"].support).inv(value).reshape(-1))
    loc = guide.affine.loc
    return torch.cat(parts).to(device=loc.device, dtype=loc.dtype)


def _auto_init(
    model: Callable[..., Any], guide: AutoFlow, batched: bool, *args: Any, **kwargs: Any
) -> tuple[MapInit | None, str | None]:
    """``fit(init="auto")``: the MAP start where there is a mode and it has the higher ELBO.
    ``batched``: whether the model scores a batch of draws right (:func:`_check_batched`)."""

    def elbo() -> float:
        with torch.no_grad():
            value = None
            if batched:  # all draws in one vectorised model call
                try:
                    value = -flow_elbo_loss(
                        model,
                        guide,
                        *args,
                        num_particles=AUTO_MAP_PARTICLES,
                        register_params=False,
                        **kwargs,
                    )
                except (RuntimeError, ValueError):  # a model that cannot be vectorised
                    pass
            if value is None:  # one draw per model call
                draws = [
                    -flow_elbo_loss(model, guide, *args, register_params=False, **kwargs)
                    for _ in range(AUTO_MAP_PARTICLES // 8)
                ]
                value = torch.stack(draws).mean()
        return value.item() if bool(torch.isfinite(value)) else -math.inf

    own = elbo()
    loc, log_scale = guide.affine.loc.detach().clone(), guide.affine.log_scale.detach().clone()
    try:
        found = map_init(model, guide, *args, restarts=AUTO_MAP_RESTARTS, **kwargs)
    except (NoModeError, FloatingPointError) as error:
        return None, str(error)
    laplace = elbo()
    if laplace >= own:
        return found, None
    with torch.no_grad():  # back to the guide's own start
        guide.affine.loc.copy_(loc)
        guide.affine.log_scale.copy_(log_scale)
    guide._set_laplace_correlation(None, None)
    return None, (
        f"the guide's own start has the higher ELBO ({own:.6g} against {laplace:.6g} at the "
        "Laplace approximation at the mode): a mode far from the bulk, as deep in a funnel's neck"
    )


def _hessian(
    negative_log_density: Callable[[Tensor], Tensor], z: Tensor
) -> tuple[Tensor, Tensor, Tensor, bool]:
    r"""The Hessian :math:`H` of ``negative_log_density`` at ``z``; the Cholesky factor of
    :math:`H` or, where :math:`H` is not positive definite, of the shifted
    :math:`H + (\delta - \lambda_{min}) I` (:math:`\delta` a thousandth of the largest
    :math:`|\lambda|`: a descent direction for Newton's step); the gradient; and whether it was
    shifted. A non-finite Hessian raises ``FloatingPointError``."""
    z = z.detach().requires_grad_(True)
    u = negative_log_density(z)
    (g,) = torch.autograd.grad(u, z, create_graph=True)
    rows = [
        torch.autograd.grad(g[i], z, retain_graph=True, allow_unused=True)[0]
        for i in range(z.shape[0])
    ]
    hess = torch.stack([torch.zeros_like(z) if r is None else r for r in rows]).detach()
    hess = 0.5 * (hess + hess.T)
    if not bool(torch.isfinite(hess).all()):
        raise FloatingPointError(
            f"map_init: the Hessian of the log density is not finite at -log density "
            f"{u.item():.6g} ({int((~torch.isfinite(hess)).sum())} non-finite entries)"
        )
    chol, info = torch.linalg.cholesky_ex(hess)
    if int(info) != 0:
        eig = torch.linalg.eigvalsh(hess)
        shift = 1e-3 * float(eig.abs().max()) - float(eig[0])
        eye = torch.eye(len(eig), dtype=hess.dtype, device=hess.device)
        return hess, torch.linalg.cholesky(hess + shift * eye), g.detach(), True
    return hess, chol, g.detach(), False


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint written by :func:`fit`, safely (``weights_only``): a file that is not a
    flowguide checkpoint raises ``ValueError`` saying so.

    The checkpoint is a dict with the keys ``format`` (``CHECKPOINT_FORMAT``), ``step``,
    ``params`` (the unconstrained parameters by name, on the CPU), ``optimizer``, ``losses``,
    ``skipped_steps``, ``rng`` (torch's random state), ``average`` (the parameter average's
    count and values, else None), ``loc_scale`` (the Laplace sds that
    scale the location's updates after ``init="map"``, else None) and ``laplace`` (the fixed
    linear map's centre and factor after ``init="map"``, else None).

    Example:
        >>> import tempfile
        >>> import pyro, pyro.distributions as dist
        >>> from flowguide import AutoIAF
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> pyro.clear_param_store()
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "fit.pt"
        ...     _ = fit(model, AutoIAF(model), num_steps=20, progress=False, checkpoint=path)
        ...     state = load_checkpoint(path)
        ...     _ = (path.parent / "notes.txt").write_text("not a checkpoint")
        ...     load_checkpoint(path.parent / "notes.txt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ...notes.txt is not a readable flowguide checkpoint: ...
        >>> state["format"], state["step"], len(state["losses"])
        ('flowguide-checkpoint-v1', 20, 20)
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors, zip errors, unsafe globals ...
        raise ValueError(f"{path} is not a readable flowguide checkpoint: {error}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a flowguide checkpoint (expected format {CHECKPOINT_FORMAT!r})"
        )
    return state


def _params(run: Callable[[], Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    with poutine.trace(param_only=True) as tape:
        loss = run()
    params = {name: site["value"].unconstrained() for name, site in tape.trace.nodes.items()}
    return loss, params


def fit(
    model: Callable[..., Any],
    guide: AutoGuide,
    *args: Any,
    num_steps: int = 5000,
    lr: float = 0.01,
    lr_decay: float = 0.01,
    optim: Callable[..., torch.optim.Optimizer] | None = None,
    loss: ELBO | None = None,
    num_particles: int | None = None,
    patience: int = 3,
    window: int = 200,
    min_steps: int = 500,
    progress: bool = True,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 500,
    resume: bool = True,
    max_bad_steps: int = 25,
    seed: int | None = None,
    init: str | None = "auto",
    average: int = 500,
    jit: bool | str = False,
    callback: Callable[[int, float], Any] | None = None,
    **kwargs: Any,
) -> FitResult:
    r"""Fit ``guide`` to ``model(*args, **kwargs)`` by stochastic variational inference.

    It maximises the evidence lower bound over the guide's (and the model's) parameters
    :math:`\phi`,

    .. math::

        \mathrm{ELBO}(\phi) = \mathbb{E}_{q_\phi(z)}\big[\log p(x, z) - \log q_\phi(z)\big]
            = \log p(x) - \mathrm{KL}\big(q_\phi(z) \,\|\, p(z \mid x)\big),

    by stochastic gradient steps on a Monte Carlo estimate of :math:`-\mathrm{ELBO}`
    (:func:`flow_elbo_loss` for an :class:`AutoFlow`, else ``loss``), with Adam (by default) at
    the learning rate :math:`\eta_t = \eta \, \gamma^{t / T}` at step :math:`t` (:math:`\eta` =
    ``lr``, :math:`\gamma` = ``lr_decay``, :math:`T` = ``num_steps``).

    It returns with the parameters set to an average of the iterates, not the last iterate:
    a stochastic gradient's noise keeps the iterates wandering around the optimum, and on
    posteriordb's reference posteriors that wander alone moved the guide's means by 0.09 to 0.23
    posterior sds (``docs/benchmarks/accuracy.md``). After the :math:`n`-th update
    :math:`\theta_n` the average is

    .. math::

        \bar\theta_n = \bar\theta_{n-1} + w_n (\theta_n - \bar\theta_{n-1}), \qquad
        w_n = \max\Big(\frac{1}{A}, \frac{4}{n + 3}\Big)

    (:math:`A` = ``average``): early on a polynomial-decay average that weights the
    :math:`k`-th iterate about as :math:`k^3`, so mostly the last half of the run (Shamir &
    Zhang 2013), and from :math:`n \approx 4A` an exponential moving average over about the
    last :math:`A` steps (Polyak & Juditsky 1992 for averaging's effect).

    Reference: Kingma & Welling 2014, "Auto-Encoding Variational Bayes", arXiv:1312.6114;
    Ranganath et al. 2014, "Black Box Variational Inference", arXiv:1401.0118; Kingma & Ba 2015,
    "Adam: A Method for Stochastic Optimization", arXiv:1412.6980; Polyak & Juditsky 1992,
    "Acceleration of Stochastic Approximation by Averaging", SIAM J. Control Optim. 30(4);
    Shamir & Zhang 2013, "Stochastic Gradient Descent for Non-smooth Optimization", ICML,
    arXiv:1212.1824.

    Args:
        model, guide: the Pyro model and guide.
        *args, **kwargs: the model's arguments.
        num_steps: the most steps (the budget).
        lr, lr_decay: Adam's initial learning rate; it decays exponentially to
            ``lr * lr_decay`` at the budget. The default hundredfold decay (to 1e-4) quiets
            the iterates' noise over the last steps, where a posterior's tails and sds settle
            (see the accuracy benchmark in the docs).
        optim: a torch optimiser class or factory ``params -> Optimizer`` (default Adam).
        loss: a Pyro ELBO (``Trace_ELBO()``, ``RenyiELBO()``, ...); default: the direct flow
            ELBO for an :class:`AutoFlow` (:func:`flow_elbo_loss`), ``Trace_ELBO`` otherwise.
        num_particles: particles for the default loss (a Pyro ELBO passed as ``loss`` has its
            own); default ``DEFAULT_FLOW_PARTICLES`` (16) for an :class:`AutoFlow`, whose ELBO
            evaluates them in one vectorised model call, and 1 for another guide, whose
            ``Trace_ELBO`` runs the model once per particle. With fewer, the gradient's noise
            leaves funnels and heavy tails short of their sds when the fit ends (see the
            accuracy benchmark in the docs). On a small model they cost little, sharing one
            model call; where the likelihood's arithmetic dominates a step (much data, no
            subsampling) a step's cost grows with them, and fewer may pay. Before the first
            step ``fit`` checks that the model scores a batch of three draws as it scores each
            alone; where it does not (a sum over all dims, Python control flow on a latent
            value, data outside any ``pyro.plate``) the default falls back to one particle
            with a :class:`~flowguide.diagnostics.VectorizationWarning` saying why, and an
            explicit ``num_particles`` above one raises ``ValueError``;
            ``result.num_particles`` says what ran.
        patience, window, min_steps: early stopping: after ``min_steps``, stop when the mean
            loss of ``patience`` successive windows of ``window`` steps each improved by less
            than half its standard error. ``patience=0`` disables it.
        progress: show a progress bar with the running loss.
        checkpoint: a file to write every ``checkpoint_every`` steps (atomically) and at the end;
            with ``resume=True`` an existing one is loaded first, and the run continues where it
            stopped (the same seed gives the same losses as an uninterrupted run).
        max_bad_steps: stop with ``FloatingPointError`` after this many consecutive steps with a
            non-finite loss or gradient (such steps never change the parameters).
        seed: seeds Pyro's random state first.
        init: ``"auto"`` (default): for a flowguide :class:`AutoFlow` with at most
            ``AUTO_MAP_MAX_DIM`` latent dimensions, start as with ``"map"`` (with
            ``AUTO_MAP_RESTARTS`` more searches from prior draws, the highest mode winning)
            where the posterior has a proper mode and the Laplace approximation's ELBO
            (``AUTO_MAP_PARTICLES`` draws) beats the guide's own start's; else from the
            guide's own initialisation, with the reason in ``result.init_skipped`` (a funnel
            or an improper posterior: :class:`NoModeError`; a non-finite density at the start;
            a mode deep in a funnel's neck, whose Laplace approximation is far too narrow).
            Any other guide starts from its own. ``None``: the guide's own initialisation.
            ``"map"``: first start a flowguide guide at the full Laplace approximation at the
            posterior mode; ``"map-diag"``: at its diagonal (:func:`map_init` with
            ``covariance="full"`` or ``"diag"``; a warm start for badly scaled or strongly
            correlated posteriors, where SVI from the guide's own start converges slowly or not
            at all). A MAP start is skipped when resuming from a checkpoint, which keeps what it
            found. What it found is in ``result.init``. The optimiser's update of the base
            location is then
            multiplied coordinatewise by the Laplace marginal sds :math:`\sigma^\star`: for
            Adam (whose step does not depend on the gradient's scale) that is Adam on the
            standardised location :math:`(\mu - z^\star) / \sigma^\star`, so ``lr`` is in
            posterior sds on every coordinate, not in the model's units (a coordinate with
            posterior sd 0.001 would otherwise jump 10 sds per step at ``lr=0.01``).
        average: the horizon :math:`A` of the parameter average above, in steps; ``0``
            returns the last iterate. The losses in the result are the iterates' (the average
            is never trained on); a checkpoint holds both, so a resumed run averages on.
        jit: compile the default loss of an :class:`AutoFlow` after the first step, so that
            the flow, the ``biject_to`` maps and the model's log density run as one program with
            no Python, Pyro handlers or argument validation per step. The losses are the same
            as without it (the same draws, the same seed), to float rounding.

            * ``True`` or ``"trace"``: ``torch.jit.trace`` into a TorchScript graph, built in
              well under a second (0.6 to 0.8 of the step time on small models:
              ``docs/benchmarks/svi.md``);
            * ``"compile"``: traced to one graph of ATen operations and compiled with
              ``torch.compile`` (TorchInductor), which fuses the forward and the backward into
              a few kernels: several times faster per step than ``"trace"`` on small models,
              but the compilation takes seconds to minutes (a C++ compiler on a CPU, Triton on
              a GPU; longest for models with Python loops over their data, whose trace unrolls
              them), so it pays on long fits.

            The model must have a static structure: no Python control flow on sampled values,
            no ``.item()``, fixed arguments, no subsampled plate (refused: its indices would be
            frozen). The compiled loss and its gradient are checked once against the plain
            ones at a fixed draw, and a model whose trace differs is refused with a
            ``ValueError``. (Pyro's ``JitTrace_ELBO`` fails with Pyro's own flow guides,
            pyro#3132.) ``result.compile_seconds`` says how long the compilation took.
        callback: called as ``callback(step, loss)`` after every step (``loss`` is NaN for a
            skipped one), for logging or a stopping rule of your own: a return value of
            ``True`` stops the fit (``result.stopped == "callback"``).

    Returns:
        a :class:`FitResult`.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from flowguide import AutoIAF
        >>> def model():
        ...     pyro.sample("x", dist.Normal(3.0, 2.0))
        >>> pyro.clear_param_store()  # a new guide: drop any earlier guide's parameters
        >>> result = fit(model, AutoIAF(model), num_steps=300, progress=False, seed=0)
        >>> result.stopped, len(result.losses)
        ('budget', 300)
    """
    defaulted = num_particles is None
    if defaulted:
        num_particles = (
            DEFAULT_FLOW_PARTICLES if loss is None and isinstance(guide, AutoFlow) else 1
        )
    for name, value, low in (
        ("num_steps", num_steps, 1),
        ("num_particles", num_particles, 1),
        ("window", window, 2),
        ("checkpoint_every", checkpoint_every, 1),
        ("max_bad_steps", max_bad_steps, 1),
        ("average", average, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not 0 < lr_decay <= 1:
        raise ValueError(f"lr_decay must lie in (0, 1], got {lr_decay!r}")
    if jit not in (False, True, "trace", "compile"):
        raise ValueError(f"jit must be False, True, 'trace' or 'compile', got {jit!r}")
    if init not in (None, "auto", "map", "map-diag"):
        raise ValueError(f"init must be 'auto', None, 'map' or 'map-diag', got {init!r}")
    if init in ("map", "map-diag") and not isinstance(guide, AutoFlow):
        raise TypeError(
            f"init={init!r} needs a flowguide AutoFlow guide (AutoNeuralSpline, AutoIAF, ...), "
            f"got {type(guide).__name__}"
        )
    if seed is not None:
        pyro.set_rng_seed(seed)
    start = time.perf_counter()
    path = Path(checkpoint) if checkpoint is not None else None
    found = skipped = None
    resuming = path is not None and resume and path.exists()
    auto = init == "auto" and isinstance(guide, AutoFlow) and not resuming
    # does the model score a batch of draws as each draw alone? Checked once, where the default
    # loss or the automatic start would batch them (see _check_batched)
    batch_error: Exception | None = None
    if isinstance(guide, AutoFlow) and (auto or (loss is None and num_particles > 1)):
        try:
            _check_batched(model, guide, args, kwargs)
        except (RuntimeError, ValueError) as error:
            batch_error = error
    if auto:
        if guide.prototype_trace is None:
            guide._setup_prototype(*args, **kwargs)
        if guide.latent_dim > AUTO_MAP_MAX_DIM:
            skipped = (
                f"the latent dimension {guide.latent_dim} is above AUTO_MAP_MAX_DIM "
                f"({AUTO_MAP_MAX_DIM}); pass init='map' to start from the MAP anyway"
            )
        else:
            found, skipped = _auto_init(model, guide, batch_error is None, *args, **kwargs)
    elif init in ("map", "map-diag") and not resuming:
        covariance = "full" if init == "map" else "diag"
        found = map_init(model, guide, *args, covariance=covariance, **kwargs)  # type: ignore[arg-type]

    compiler = {True: _TracedLoss, "trace": _TracedLoss, "compile": _InductorLoss}.get(jit)
    if jit and not (loss is None and isinstance(guide, AutoFlow)):
        raise ValueError(
            f"jit={jit!r} compiles flowguide's own loss for an AutoFlow guide (loss=None), got "
            f"guide {type(guide).__name__} and loss {type(loss).__name__}: for Pyro's ELBOs "
            "use Pyro's JitTrace_ELBO as loss"
        )
    if loss is None and isinstance(guide, AutoFlow):
        registered = [False]
        traced: list[_StaticLoss] = []

        def run() -> Tensor:
            if compiler is not None and registered[0]:
                if not traced:
                    began = time.perf_counter()
                    traced.append(compiler(model, guide, args, kwargs, num_particles, params))
                    result.compile_seconds = time.perf_counter() - began
                return traced[0]()
            if not registered[0] and num_particles > 1 and batch_error is not None:
                raise batch_error  # a batch of draws would be scored wrong
            # the guide's parameters are registered (and found) once; the optimiser holds them
            loss = flow_elbo_loss(
                model,
                guide,
                *args,
                num_particles=num_particles,
                register_params=not registered[0],
                **kwargs,
            )
            registered[0] = True
            return loss
    else:
        elbo = loss if loss is not None else pyro.infer.Trace_ELBO(num_particles=num_particles)

        def run() -> Tensor:
            return elbo.differentiable_loss(model, guide, *args, **kwargs)

    # one evaluation sets up every parameter (guide and model) before the optimiser is made; a
    # fresh run takes it as its first step's loss (a resumed one restores other parameters)
    # with a checkpoint, the random state at the start of the current step: a Ctrl-C saves it, so
    # that a resumed run redoes the interrupted step with the draws of an uninterrupted one
    step_rng = torch.get_rng_state() if path is not None else None
    first: Tensor | None
    try:
        first, params = _params(run)
    except (RuntimeError, ValueError) as error:
        if not (defaulted and num_particles > 1):
            raise
        # a model not written for a batch of draws (data outside any pyro.plate): the default's
        # particles cannot share one model call, so fit with one, and say so
        warnings.warn(
            VectorizationWarning(
                f"fit: the model could not be evaluated for {num_particles} particles at once "
                f"({_first_line(error)}); fitting with num_particles=1. Put the model's batch "
                "dimensions in pyro.plate to fit with the default, or pass num_particles=1"
            ),
            stacklevel=2,
        )
        num_particles = 1
        first, params = _params(run)
    params = _unique(params)
    _check_own_parameters(guide, params)
    optimizer = (optim or default_optimizer)(list(params.values()), lr=lr)
    gamma = lr_decay ** (1.0 / num_steps)
    result = FitResult(init=found, init_skipped=skipped, num_particles=num_particles)
    step = 0
    averaged = _ParameterAverage(average) if average else None
    # init="map": the location's updates are scaled by the Laplace sds (see the docstring)
    loc_scale = found.scale if found is not None else None
    if path is not None and resume and path.exists():
        state = load_checkpoint(path)
        _restore(state, params, optimizer)
        first = None
        result.losses = list(state["losses"])
        result.skipped_steps = list(state["skipped_steps"])
        step = int(state["step"])
        if init is not None and state.get("loc_scale") is not None:
            loc_scale = state["loc_scale"]
        if isinstance(guide, AutoFlow) and state.get("laplace") is not None:
            guide._set_laplace_correlation(*state["laplace"])
        if averaged is not None and state.get("average") is not None:
            averaged.load(state["average"], params)
    preconditioned = None
    if loc_scale is not None:
        loc = guide.affine.loc  # type: ignore[union-attr]
        preconditioned = (loc, loc_scale.to(device=loc.device, dtype=loc.dtype))

    def save() -> None:
        if path is not None:
            _atomic_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "step": step,
                    "params": {k: v.detach().cpu() for k, v in params.items()},
                    "optimizer": optimizer.state_dict(),
                    "losses": result.losses,
                    "skipped_steps": result.skipped_steps,
                    "rng": torch.get_rng_state(),
                    "loc_scale": None if loc_scale is None else loc_scale.detach().cpu(),
                    "laplace": _laplace_state(guide),
                    "average": None if averaged is None else averaged.state(),
                },
                path,
            )

    bar = _progress(num_steps, step, progress)
    bad = 0
    try:
        while step < num_steps:
            if path is not None and first is None:  # step 0's draws came with the set-up
                step_rng = torch.get_rng_state()
            for group in optimizer.param_groups:  # the schedule is a function of the step alone
                group["lr"] = lr * gamma**step
            try:
                if first is not None:
                    value, new, first = first, params, None
                else:
                    value, new = _params(run)
            except ValueError as error:
                # Pyro's and torch's argument validation reports a NaN in a distribution's
                # parameters as a ValueError: that is a non-finite step like any other
                if "invalid values" not in str(error):
                    raise
                value, new, why = torch.tensor(math.nan), params, str(error).splitlines()[0]
            else:
                why = ""
            if not new.keys() <= params.keys():  # parameters created lazily, after set-up
                held = {id(p) for p in params.values()}
                for p in _unique(new).values():
                    if id(p) not in held:
                        optimizer.add_param_group({"params": [p]})
                params = _unique({**params, **new})
            finite = bool(torch.isfinite(value))
            if finite:
                value.backward()
                finite = _grads_finite(params.values())
            if finite:
                if preconditioned is None:
                    optimizer.step()
                else:
                    loc, scale = preconditioned
                    before = loc.detach().clone()
                    optimizer.step()
                    with torch.no_grad():
                        loc.copy_(before + scale * (loc - before))
                if averaged is not None:
                    averaged.update(params)
                result.losses.append(value.item())
                bad = 0
            else:
                result.skipped_steps.append(step)
                bad += 1
                if bad >= max_bad_steps:
                    raise FloatingPointError(
                        f"fit stopped at step {step}: the loss or its gradient was not finite "
                        f"for {bad} steps in a row (last loss {value.item()}{why and ': ' + why}); "
                        "the parameters "
                        "hold their last finite values. Try a smaller lr, a smaller init_scale, "
                        "more num_particles, or check the model for impossible values"
                    )
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if bar is not None:
                bar.update(1)
                if result.losses and step % 10 == 0:
                    bar.set_postfix(loss=f"{result.losses[-1]:.4g}")
            if callback is not None and callback(step - 1, value.item()) is True:
                result.stopped = "callback"
                break
            if path is not None and step % checkpoint_every == 0:
                save()
            if patience and step >= min_steps and step % window == 0:
                if _plateaued(result.losses, window, patience):
                    result.stopped = "plateau"
                    break
    except KeyboardInterrupt:
        result.stopped = "interrupted"
        if step_rng is not None:
            torch.set_rng_state(step_rng)
    finally:
        if bar is not None:
            bar.close()
    save()  # the iterate, with the average beside it: a resumed run continues the same run
    if averaged is not None:
        averaged.apply(params)
    result.num_steps = step
    result.seconds = time.perf_counter() - start
    return result


class _ParameterAverage:
    """The running average of :func:`fit`'s iterates (see its docstring), by parameter name."""

    def __init__(self, horizon: int) -> None:
        self.horizon = horizon
        self.count = 0
        self.values: dict[str, Tensor] = {}
        self._pairs: tuple[list[Tensor], list[Tensor]] | None = None  # (averages, parameters)

    def update(self, params: dict[str, Tensor]) -> None:
        self.count += 1
        weight = max(1.0 / self.horizon, 4.0 / (self.count + 3))
        if self._pairs is None or len(self._pairs[1]) != len(params):
            for name, p in params.items():  # the first update, or parameters created lazily
                if name not in self.values:
                    self.values[name] = p.detach().clone()
            self._pairs = ([self.values[n] for n in params], list(params.values()))
        with torch.no_grad():
            torch._foreach_lerp_(self._pairs[0], self._pairs[1], weight)

    def apply(self, params: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, p in params.items():
                if name in self.values:
                    p.copy_(self.values[name])

    def state(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "values": {name: v.detach().cpu() for name, v in self.values.items()},
        }

    def load(self, state: dict[str, Any], params: dict[str, Tensor]) -> None:
        self._pairs = None
        self.count = int(state["count"])
        self.values = {
            name: v.to(device=params[name].device, dtype=params[name].dtype)
            for name, v in state["values"].items()
            if name in params
        }


def _laplace_state(guide: AutoGuide) -> tuple[Tensor, Tensor] | None:
    """The fixed linear map that ``map_init(covariance="full")`` appended, for a checkpoint."""
    if not isinstance(guide, AutoFlow) or guide.prototype_trace is None:
        return None
    laplace = guide._laplace_correlation()
    if laplace is None:
        return None
    return laplace.center.detach().cpu(), laplace.tril.detach().cpu()


def default_optimizer(params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    """:func:`fit`'s optimiser: Adam, with torch's fused kernel (one call for all parameters,
    the same updates as the per-parameter loop) where torch has one for them.

    Reference: Kingma & Ba 2015, "Adam: A Method for Stochastic Optimization",
    arXiv:1412.6980.

    Example:
        >>> optimizer = default_optimizer([torch.zeros(3, requires_grad=True)], lr=0.01)
        >>> type(optimizer).__name__, optimizer.defaults["lr"]
        ('Adam', 0.01)
    """
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or an unsupported device
        return torch.optim.Adam(params, lr=lr)


def _grads_finite(params: Iterable[Tensor]) -> bool:
    """Whether every gradient is finite: one fused check over all of them (the one torch's
    gradient scaler uses) where it applies, else a check per gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    try:
        found = torch.zeros((), device=grads[0].device)
        one = torch.ones((), device=grads[0].device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
        return not bool(found)
    except (AttributeError, RuntimeError, TypeError):  # mixed devices or dtypes, sparse, ...
        return all(bool(g.isfinite().all()) for g in grads)


def _check_own_parameters(guide: AutoGuide, params: dict[str, Tensor]) -> None:
    """Refuse to train when Pyro's param store answered the guide's parameter names with other
    tensors (left there by an earlier guide of the same name): the optimiser would train those
    while the guide kept using its own, and the fit would silently do nothing."""
    held = {id(p) for p in params.values()}
    stale = [name for name, p in guide.named_parameters() if id(p) not in held]
    if stale:
        raise ValueError(
            f"Pyro's param store already holds parameters under this guide's names "
            f"({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}), left by an earlier "
            "guide: call pyro.clear_param_store() before fitting a new guide"
        )


def _unique(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop parameters that are the same tensor as an earlier one (Pyro's ``AutoIAFNormal``
    registers its first weight twice); torch's optimisers refuse duplicates."""
    seen: set[int] = set()
    unique = {}
    for name, p in params.items():
        if id(p) not in seen:
            seen.add(id(p))
            unique[name] = p
    return unique


def _restore(
    state: dict[str, Any],
    params: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
) -> None:
    saved = state["params"]
    if saved.keys() != params.keys():
        raise ValueError(
            "the checkpoint's parameters do not match this model and guide: "
            f"missing {sorted(params.keys() - saved.keys())}, "
            f"unexpected {sorted(saved.keys() - params.keys())}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])


def _plateaued(losses: list[float], window: int, patience: int) -> bool:
    """Whether each of the last ``patience`` windows improved on the one before by less than half
    the standard error of a window mean."""
    if len(losses) < (patience + 1) * window:
        return False
    t = torch.tensor(losses[-(patience + 1) * window :], dtype=torch.float64).view(patience + 1, -1)
    means = t.mean(1)
    se = t.std(1).max() / math.sqrt(window)
    return bool(((means[:-1] - means[1:]) < 0.5 * se).all())


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="fit", unit="step", dynamic_ncols=True)
