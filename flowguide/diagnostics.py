r"""Did the fit work? Importance weights, Pareto :math:`\hat k` and ArviZ output for a guide.

A guide :math:`q` is only an approximation of the posterior :math:`p(z \mid x)`, and a low loss
does not say how good it is. Importance sampling with the guide as proposal does: draw
:math:`u_s \sim q` (the guide's unconstrained latent vector), map it to the sites' supports with
the ``biject_to`` maps :math:`T`, and weigh it by

.. math::

    \log w_s = \log p\big(x, T(u_s)\big) + \log\left|\det J_T(u_s)\right| - \log q(u_s),
    \qquad s = 1, \dots, S,

the same accounting as the ELBO in :func:`flowguide.train.flow_elbo_loss`. Then

* :math:`\frac1S \sum_s \log w_s` estimates the ELBO, and
  :math:`\log \hat Z = \operatorname{logsumexp}_s \log w_s - \log S` estimates the log marginal
  likelihood :math:`\log p(x)`; :math:`\hat Z` is unbiased for :math:`p(x)`, so
  :math:`\mathbb{E} \log \hat Z \le \log p(x)` (Jensen), a bound that tightens as :math:`S`
  grows and is never looser than the ELBO in expectation.
* The weights :math:`w = p / q` are heavy-tailed exactly where :math:`q` misses posterior mass.
  Pareto smoothed importance sampling (PSIS; Vehtari, Simpson, Gelman, Yao & Gabry 2015/2024)
  fits a generalized Pareto distribution to the :math:`M = \lceil \min(S/5, 3\sqrt S) \rceil`
  largest weights; its shape :math:`\hat k` estimates the tail index (the weights have about
  :math:`1/k` finite moments). Yao, Vehtari, Simpson & Gelman (2018) use :math:`\hat k` as a
  diagnostic of variational inference:

  ==============================================  ===========  ================================
  :math:`\hat k`                                  reading      meaning
  ==============================================  ===========  ================================
  :math:`< 0.5`                                   ``"good"``   the guide is close to the
                                                               posterior; the weights have
                                                               finite variance
  :math:`0.5 \le \hat k < \tau(S)`                ``"ok"``     PSIS-weighted estimates are
                                                               reliable; raw guide draws less so
  :math:`\ge \tau(S) = \min(1 - 1/\log_{10} S,`   ``"bad"``    the guide misses posterior mass:
  :math:`0.7)`                                                 neither its draws nor importance
                                                               sampling can be trusted
  ==============================================  ===========  ================================

  The threshold :math:`\tau(S)` depends on the number of draws (Vehtari et al. 2024, section
  3.2.4): 0.7 from :math:`S \approx 2200` on, 0.67 at :math:`S = 1000`, 0.5 at :math:`S = 100`
  (where "ok" is empty). Weights that are all equal (an exact guide) have no tail; their
  :math:`\hat k` is reported as :math:`-\infty`.
* The PSIS effective sample size is :math:`1 / \sum_s \tilde w_s^2`, with :math:`\tilde w` the
  smoothed weights normalised to sum to one.

The posterior can be improved by resampling the guide's draws by their smoothed weights
(:func:`importance_resample`, sampling/importance resampling), which helps when :math:`\hat k` is
"good" or "ok".

Entry points: :func:`check_fit` (a readable :class:`FitCheck`), :func:`to_inference_data` (an
``arviz.InferenceData`` for ``arviz.summary`` and plots), :func:`importance_resample`, and the
building blocks :func:`log_importance_weights`, :func:`psis_smooth`, :func:`psis_khat`,
:func:`khat_reading`, :func:`khat_threshold`.

The model is evaluated for a whole batch of draws in one call, inside a ``pyro.plate`` to the
left of the model's own plates (as for vectorised ELBO particles). A model that cannot be
vectorised that way (Python control flow on sampled values, say) is evaluated one draw at a time
instead, with a :class:`VectorizationWarning`.

References:
    * A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry (2015, revised 2024). Pareto Smoothed
      Importance Sampling. JMLR 25(72). arXiv:1507.02646.
    * Y. Yao, A. Vehtari, D. Simpson, A. Gelman (2018). Yes, but Did It Work?: Evaluating
      Variational Inference. ICML. arXiv:1802.02538.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoContinuous
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from .guides import AutoFlow, constrain_latent, plate_nesting

if TYPE_CHECKING:
    import arviz

__all__ = [
    "FitCheck",
    "ImportanceWeightWarning",
    "VectorizationWarning",
    "check_fit",
    "importance_resample",
    "khat_reading",
    "khat_threshold",
    "log_importance_weights",
    "psis_khat",
    "psis_smooth",
    "to_inference_data",
]

_PARTICLES = "_flowguide_diagnostics_draws"
_READINGS = {
    "good": "the guide is close to the posterior: its draws, and importance-weighted "
    "estimates from them, are reliable",
    "ok": "the guide is usable but imperfect: prefer importance-weighted estimates "
    "(importance_resample) to raw guide draws",
    "bad": "the guide misses posterior mass: neither its draws nor importance-weighted "
    "estimates are reliable; fit longer, use a more expressive flow, or check against MCMC "
    "(e.g. NeuTra)",
}


class VectorizationWarning(UserWarning):
    """The model could not be evaluated for a batch of draws at once, so it is evaluated one draw
    at a time (correct, but slower).

    Example:
        A model that turns a sampled value into a Python float cannot take a batch of draws:

        >>> import warnings
        >>> import pyro, pyro.distributions as dist
        >>> from flowguide import AutoIAF
        >>> def model():
        ...     x = pyro.sample("x", dist.Normal(0.0, 1.0))
        ...     pyro.factor("penalty", torch.tensor(-abs(float(x))))
        >>> pyro.clear_param_store()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _, log_w = log_importance_weights(model, AutoIAF(model), num_samples=5)
        >>> log_w.shape, any(issubclass(w.category, VectorizationWarning) for w in caught)
        (torch.Size([5]), True)
    """


class ImportanceWeightWarning(UserWarning):
    r"""The importance weights are too heavy-tailed (Pareto :math:`\hat k` "bad", that is
    :math:`\hat k \ge` :func:`khat_threshold`) for the result to be trusted.

    Example:
        A guide far narrower than the posterior gives weights with a very heavy tail:

        >>> import warnings
        >>> import pyro, pyro.distributions as dist
        >>> from flowguide import AutoIAF
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 10.0))
        >>> pyro.clear_param_store()
        >>> pyro.set_rng_seed(0)
        >>> guide = AutoIAF(model, init_scale=0.1)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = importance_resample(model, guide, num_samples=200)
        >>> any(issubclass(w.category, ImportanceWeightWarning) for w in caught)
        True
    """


def _arviz() -> Any:
    """Import ArviZ lazily (it is slow to import), without its once-a-day ``FutureWarning``
    about its coming refactor (which a warnings-as-errors test suite would turn into an error)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning)
        import arviz
    return arviz


def _check_count(value: Any, name: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


# -- drawing from the guide and weighing -------------------------------------------------------
def _draw(
    guide: AutoContinuous, num: int, args: tuple, kwargs: dict[str, Any]
) -> tuple[Tensor, Tensor]:
    """``num`` packed unconstrained draws ``(num, D)`` from the guide, with ``log q`` ``(num,)``."""
    if isinstance(guide, AutoFlow):
        return guide.rsample_unconstrained(num)  # fused: no inverse pass
    posterior = guide.get_posterior(*args, **kwargs)
    z = posterior.sample((num,))
    return z, posterior.log_prob(z)


def _constrain(
    guide: AutoContinuous, z: Tensor, nesting: int | None
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """:func:`~flowguide.guides.constrain_latent` for one draw (``nesting=None``) or a batch."""
    return constrain_latent(guide, z, 0 if nesting is None else nesting)


def _trace_model(
    model: Callable[..., Any],
    values: dict[str, Tensor],
    args: tuple,
    kwargs: dict[str, Any],
    plate: tuple[int, int] | None = None,
) -> poutine.Trace:
    """Trace the model conditioned on ``values``, optionally inside a plate ``(size, dim)`` of
    draws, checking that the values cover every latent site."""
    with ExitStack() as stack:
        if plate is not None:
            stack.enter_context(pyro.plate(_PARTICLES, plate[0], dim=plate[1]))
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
    uncovered = [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    ]
    if uncovered:
        raise ValueError(
            f"the model has latent sites that the guide does not cover: {uncovered} (was the "
            "guide built for another model?)"
        )
    return trace


def _plate_nesting(trace: poutine.Trace) -> int:
    return plate_nesting(trace, ignore=(_PARTICLES,))


def _warn_if_subsampled(trace: poutine.Trace) -> None:
    plates = sorted(
        {
            frame.name
            for site in trace.nodes.values()
            if site["type"] == "sample"
            for frame in site["cond_indep_stack"]
            if frame.full_size is not None and frame.size != frame.full_size
        }
    )
    if plates:
        warnings.warn(
            f"the model subsamples the plate(s) {plates}: log p(x, z) is then a noisy estimate "
            "and so are the weights and k-hat; pass the full data for a diagnosis",
            UserWarning,
            stacklevel=4,
        )


def _log_p_vectorised(
    model: Callable[..., Any],
    values: dict[str, Tensor],
    num: int,
    nesting: int,
    args: tuple,
    kwargs: dict[str, Any],
) -> Tensor:
    """``log p(x, z)`` for ``num`` draws in one model call; raises if the shapes do not work."""
    trace = _trace_model(model, values, args, kwargs, plate=(num, -nesting - 1))
    trace.compute_log_prob()
    total: Tensor | None = None
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        lp = torch.as_tensor(site["log_prob"])
        if lp.dim() > nesting + 1:
            raise ValueError(
                f"site {name!r} has log_prob shape {tuple(lp.shape)}, more batch dims than the "
                f"{nesting} plate(s) and the draw dim"
            )
        per_draw = (
            lp.reshape(lp.shape[0], -1).sum(-1) if lp.dim() == nesting + 1 else lp.sum()[None]
        )
        if per_draw.shape[0] not in (1, num):
            raise ValueError(f"site {name!r} has log_prob shape {tuple(lp.shape)}")
        total = per_draw.expand(num) if total is None else total + per_draw
    assert total is not None  # the conditioned latent sites are sample sites
    return total


def _agree(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)


def _check_guide(guide: Any) -> AutoContinuous:
    if not isinstance(guide, AutoContinuous):
        raise TypeError(
            "the guide must be an AutoContinuous guide (any flowguide guide, or Pyro's "
            "AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal, "
            f"AutoIAFNormal, ...), got {type(guide).__name__}"
        )
    return guide


@torch.no_grad()
def log_importance_weights(
    model: Callable[..., Any],
    guide: AutoContinuous,
    *args: Any,
    num_samples: int = 1000,
    batch_size: int = 256,
    **kwargs: Any,
) -> tuple[dict[str, Tensor], Tensor]:
    r"""Draw from the guide and weigh the draws by the model: the importance weights of the guide
    as a proposal for the posterior,

    .. math::

        \log w_s = \log p\big(x, T(u_s)\big) + \log\left|\det J_T(u_s)\right| - \log q(u_s),
        \qquad u_s \sim q, \quad s = 1, \dots, S,

    with :math:`u_s` the guide's unconstrained latent vector and :math:`T` the ``biject_to`` maps
    to the sites' supports. Their mean estimates the ELBO; their tail is what :func:`psis_khat`
    reads.

    Args:
        model: the Pyro model.
        guide: an :class:`~pyro.infer.autoguide.AutoContinuous` guide for it (every flowguide
            guide; also Pyro's ``AutoDiagonalNormal``, ``AutoMultivariateNormal``, ...). One that
            was never called is set up first (untrained).
        *args, **kwargs: the model's arguments (so ``num_samples`` and ``batch_size`` cannot be
            model keywords).
        num_samples: the number of draws :math:`S`.
        batch_size: the number of draws per vectorised model call (bounds memory).

    Returns:
        ``(draws, log_weights)``: the draws keyed by the model's latent site names, each of shape
        ``(num_samples, *site_shape)`` and in the site's support, and
        :math:`\log w_s = \log p(x, T(u_s)) + \log|\det J_T(u_s)| - \log q(u_s)`, shape
        ``(num_samples,)``, not normalised; non-finite values are kept as they are.

    A model that fails for a batch of draws, or gives the first draw a different log density
    than when it is evaluated alone, is evaluated one draw at a time, with a
    :class:`VectorizationWarning`. A model error that also happens for a single draw is raised.

    Reference: Yao, Vehtari, Simpson & Gelman 2018, "Yes, but Did It Work?: Evaluating
    Variational Inference", ICML, arXiv:1802.02538 (these weights as a check of a variational fit).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import init_to_value
        >>> from flowguide import AutoIAF
        >>> def model():
        ...     pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        >>> start = init_to_value(values={"scale": torch.tensor(1.0)})
        >>> guide = AutoIAF(model, init_loc_fn=start, init_scale=1.0)  # exact: log(scale) ~ N(0, 1)
        >>> draws, log_w = log_importance_weights(model, guide, num_samples=100)
        >>> draws["scale"].shape, bool((draws["scale"] > 0).all())
        (torch.Size([100]), True)
        >>> bool(log_w.abs().max() < 1e-5)  # p / q = 1 for every draw
        True
    """
    guide = _check_guide(guide)
    _check_count(num_samples, "num_samples")
    _check_count(batch_size, "batch_size")
    if guide.prototype_trace is None:
        guide._setup_prototype(*args, **kwargs)
    draws: list[dict[str, Tensor]] = []
    log_ws: list[Tensor] = []
    nesting: int | None = None
    reference = math.nan
    vectorise = True
    with poutine.block():  # hide the internal traces (and param sites) from outer handlers
        for start in range(0, num_samples, batch_size):
            num = min(batch_size, num_samples - start)
            z, log_q = _draw(guide, num, args, kwargs)
            if nesting is None:
                # the first draw alone: surfaces genuine model errors, finds the plate nesting,
                # and gives a reference value for the vectorised evaluation
                values, _, log_jac = _constrain(guide, z[0], None)
                trace = _trace_model(model, values, args, kwargs)
                reference = float(trace.log_prob_sum() + log_jac - log_q[0])
                nesting = max(_plate_nesting(trace), getattr(guide, "max_plate_nesting", 0) or 0)
                _warn_if_subsampled(trace)
            if vectorise:
                try:
                    values, batch, log_jac = _constrain(guide, z, nesting)
                    log_p = _log_p_vectorised(model, values, num, nesting, args, kwargs)
                    log_w = log_p + log_jac - log_q
                    if start == 0 and not _agree(float(log_w[0]), reference):
                        raise ValueError(
                            f"the first draw's log weight is {float(log_w[0])} evaluated in a "
                            f"batch but {reference} evaluated alone"
                        )
                except Exception as error:
                    warnings.warn(
                        f"the model could not be evaluated for {num} draws at once "
                        f"({type(error).__name__}: {error}); evaluating one draw at a time "
                        "instead, which is slower. To vectorise, let the model broadcast over a "
                        "batch dim left of its plates (no Python control flow on sampled values)",
                        VectorizationWarning,
                        stacklevel=3,
                    )
                    vectorise = False
            if not vectorise:
                one: list[dict[str, Tensor]] = []
                one_w: list[Tensor] = []
                for i in range(num):
                    values, draw, log_jac = _constrain(guide, z[i], None)
                    log_p = _trace_model(model, values, args, kwargs).log_prob_sum()
                    one_w.append(log_p + log_jac - log_q[i])
                    one.append(draw)
                batch = {name: torch.stack([d[name] for d in one]) for name in one[0]}
                log_w = torch.stack(one_w)
            draws.append(batch)
            log_ws.append(log_w)
    names = draws[0].keys()
    return {name: torch.cat([d[name] for d in draws]) for name in names}, torch.cat(log_ws)


# -- PSIS --------------------------------------------------------------------------------------
def _as_numpy(log_weights: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(log_weights, Tensor):
        log_weights = log_weights.detach().cpu().double().numpy()
    lw = np.array(log_weights, dtype=np.float64)
    if lw.ndim != 1 or lw.size == 0:
        raise ValueError(f"log_weights must be a non-empty vector, got shape {lw.shape}")
    return lw


def psis_smooth(log_weights: Tensor | np.ndarray | Sequence[float]) -> tuple[Tensor, float]:
    r"""Pareto smoothed importance sampling (ArviZ's ``psislw``, for independent draws).

    The :math:`M = \lceil \min(S/5, 3\sqrt S) \rceil` largest of the :math:`S` weights are fitted
    by a generalized Pareto distribution above the threshold :math:`u`, the largest weight not
    among them,

    .. math::

        F(w) = 1 - \left(1 + \hat k\, \frac{w - u}{\hat\sigma}\right)^{-1/\hat k},

    and replaced, in order, by its quantiles :math:`F^{-1}((m - \tfrac12) / M)`,
    :math:`m = 1, \dots, M`, capped at the largest raw weight. The shape :math:`\hat k` estimates
    the tail index of the weights: they have about :math:`1 / \hat k` finite moments.

    Args:
        log_weights: unnormalised log importance weights, a vector. ``-inf`` entries are weights
            of zero (draws outside the model's support); NaN and ``+inf`` raise ``ValueError``.

    Returns:
        ``(smoothed, khat)``: the smoothed log weights normalised to ``logsumexp = 0``, as a
        float64 tensor, and the Pareto shape estimate :math:`\hat k` (``inf`` when the tail is
        too short to fit; ``-inf`` when the weights are all equal, to a relative ``1e-6``).

    Reference: Vehtari, Simpson, Gelman, Yao & Gabry 2024, "Pareto Smoothed Importance
    Sampling", JMLR 25(72), arXiv:1507.02646.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> log_w = -0.3 * torch.rand(4000, generator=g, dtype=torch.float64).log()
        >>> smoothed, khat = psis_smooth(log_w)  # Pareto weights with tail index 0.3
        >>> round(float(smoothed.logsumexp(0)), 6), abs(khat - 0.3) < 0.15
        (0.0, True)
    """
    lw = _as_numpy(log_weights)
    num_nan, num_posinf = int(np.isnan(lw).sum()), int(np.isposinf(lw).sum())
    if num_nan or num_posinf:
        raise ValueError(
            f"log_weights has {num_nan} NaN and {num_posinf} +inf entries of {lw.size}: "
            "importance weights are not defined there"
        )
    finite = np.isfinite(lw)
    if not finite.any():
        raise ValueError(
            "every log weight is -inf: the guide puts no mass where the model has density"
        )
    if lw[finite].max() - lw[finite].min() <= 1e-6:
        # equal weights (an exact guide): no tail to fit, nothing to smooth
        out = np.where(finite, -np.log(finite.sum()), -np.inf)
        return torch.from_numpy(out), -math.inf
    with np.errstate(all="ignore"):
        smoothed, khat = _arviz().psislw(lw, reff=1.0)
    khat = float(khat)
    return torch.from_numpy(np.asarray(smoothed, dtype=np.float64)), (
        math.inf if math.isnan(khat) else khat
    )


def psis_khat(log_weights: Tensor | np.ndarray | Sequence[float]) -> float:
    r"""The Pareto shape estimate :math:`\hat k` of importance weights (see :func:`psis_smooth`
    and the module docstring for how to read it).

    :math:`\hat k` is the shape of the generalized Pareto distribution fitted to the largest
    weights; weights with :math:`P(W > w) \sim w^{-1/k}` have finite moments of order below
    :math:`1/k`. Below 0.5 their variance is finite ("good"); from :func:`khat_threshold` on
    (0.7 for large :math:`S`) importance sampling is unreliable ("bad"), see
    :func:`khat_reading`.

    References: Vehtari, Simpson, Gelman, Yao & Gabry 2024, "Pareto Smoothed Importance
    Sampling", JMLR 25(72), arXiv:1507.02646; Yao, Vehtari, Simpson & Gelman 2018, "Yes, but Did
    It Work?: Evaluating Variational Inference", ICML, arXiv:1802.02538.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> u = torch.rand(4000, generator=g, dtype=torch.float64)
        >>> khat = psis_khat(-0.9 * u.log())  # Pareto weights with tail index 0.9
        >>> abs(khat - 0.9) < 0.15, khat_reading(khat, num_samples=4000)
        (True, 'bad')
    """
    return psis_smooth(log_weights)[1]


def khat_threshold(num_samples: int | None = None) -> float:
    r"""The :math:`\hat k` from which PSIS is unreliable:
    :math:`\min(1 - 1/\log_{10} S, 0.7)` for :math:`S` draws (Vehtari et al. 2024), 0.7 when
    :math:`S` is not given.

    Example:
        >>> round(khat_threshold(1000), 3), khat_threshold(100), khat_threshold()
        (0.667, 0.5, 0.7)
    """
    if num_samples is None:
        return 0.7
    _check_count(num_samples, "num_samples", 2)
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7)


def khat_reading(khat: float, num_samples: int | None = None) -> str:
    r"""Read a Pareto :math:`\hat k`: ``"good"`` below 0.5, ``"bad"`` from
    :func:`khat_threshold` ``(num_samples)`` on (0.7 when ``num_samples`` is not given), ``"ok"``
    in between; NaN reads ``"bad"``.

    Example:
        >>> khat_reading(0.3), khat_reading(0.6), khat_reading(0.6, num_samples=100)
        ('good', 'ok', 'bad')
    """
    if math.isnan(khat) or khat >= khat_threshold(num_samples):
        return "bad"
    return "good" if khat < 0.5 else "ok"


# -- summaries ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitCheck:
    r"""What :func:`check_fit` finds; ``str()`` of it is a short report.

    Attributes:
        khat: the Pareto shape :math:`\hat k` of the importance weights (NaN when any log
            weight is NaN or ``+inf``, or all are ``-inf``; ``-inf`` for equal weights).
        reading: ``"good"``, ``"ok"`` or ``"bad"`` (:func:`khat_reading` at ``num_samples``).
        num_samples: the number of draws :math:`S`.
        ess: the PSIS effective sample size :math:`1/\sum_s \tilde w_s^2` (NaN when
            :math:`\hat k` is).
        log_marginal_likelihood: :math:`\operatorname{logsumexp}_s \log w_s - \log S`, from the
            raw weights.
        elbo: the mean log weight, a Monte Carlo estimate of the ELBO.
        num_nan, num_posinf, num_neginf: how many log weights are NaN, ``+inf``, ``-inf``
            (``-inf``: a draw outside the model's support); they enter the estimates as they
            are, never masked.

    Example:
        >>> check = FitCheck(khat=0.2, reading="good", num_samples=1000, ess=950.0,
        ...                  log_marginal_likelihood=-3.2, elbo=-math.inf, num_neginf=12)
        >>> check.num_nonfinite, round(check.khat_threshold, 2)
        (12, 0.67)
        >>> print(str(check).splitlines()[5])
          non-finite log weights   12 of 1000 (12 -inf)
    """

    khat: float
    reading: str
    num_samples: int
    ess: float
    log_marginal_likelihood: float
    elbo: float
    num_nan: int = 0
    num_posinf: int = 0
    num_neginf: int = 0

    @property
    def num_nonfinite(self) -> int:
        """The number of log weights that are not finite."""
        return self.num_nan + self.num_posinf + self.num_neginf

    @property
    def khat_threshold(self) -> float:
        """The :math:`\\hat k` from which the reading is "bad", at ``num_samples`` draws."""
        return khat_threshold(self.num_samples) if self.num_samples >= 2 else math.nan

    def __str__(self) -> str:
        s = self.num_samples
        ess = "n/a" if math.isnan(self.ess) else f"{self.ess:.1f} ({self.ess / s:.0%} of {s})"
        if self.num_nonfinite:
            kinds = ", ".join(
                f"{n} {kind}"
                for n, kind in (
                    (self.num_nan, "NaN"),
                    (self.num_posinf, "+inf"),
                    (self.num_neginf, "-inf"),
                )
                if n
            )
            nonfinite = f"{self.num_nonfinite} of {s} ({kinds})"
        else:
            nonfinite = "none"
        lines = [
            f"Importance-sampling check of the guide ({s} draws)",
            f"  Pareto k-hat             {self.khat:.3g}  {self.reading} "
            f"(good < 0.5, bad >= {self.khat_threshold:.2f} at {s} draws)",
            f"  PSIS effective samples   {ess}",
            f"  log marginal likelihood  {self.log_marginal_likelihood:.6g}",
            f"  ELBO                     {self.elbo:.6g}",
            f"  non-finite log weights   {nonfinite}",
        ]
        verdicts = [_READINGS[self.reading]]
        if self.num_nan or self.num_posinf:
            verdicts.append(
                "NaN or +inf log weights: the model's or the guide's density failed for some "
                "draws; the estimates above are not usable"
            )
        lines += [
            textwrap.fill(v, 96, initial_indent="  => ", subsequent_indent="     ")
            for v in verdicts
        ]
        return "\n".join(lines)


def _summarise(log_weights: Tensor) -> FitCheck:
    lw = log_weights.detach().double()
    num = lw.numel()
    num_nan = int(lw.isnan().sum())
    num_posinf = int(lw.isposinf().sum())
    num_neginf = int(lw.isneginf().sum())
    if num_nan or num_posinf or num_neginf == num:
        khat, ess = math.nan, math.nan
    else:
        smoothed, khat = psis_smooth(lw)
        ess = float(1.0 / smoothed.mul(2).exp().sum())
    return FitCheck(
        khat=khat,
        reading=khat_reading(khat, num) if num >= 2 else "bad",
        num_samples=num,
        ess=ess,
        log_marginal_likelihood=float(lw.logsumexp(0) - math.log(num)),
        elbo=float(lw.mean()),
        num_nan=num_nan,
        num_posinf=num_posinf,
        num_neginf=num_neginf,
    )


def check_fit(
    model: Callable[..., Any],
    guide: AutoContinuous,
    *args: Any,
    num_samples: int = 1000,
    batch_size: int = 256,
    **kwargs: Any,
) -> FitCheck:
    r"""Check a fitted guide by importance sampling: Pareto :math:`\hat k` and its reading, the
    PSIS effective sample size, and estimates of the log marginal likelihood and the ELBO.

    Arguments as for :func:`log_importance_weights`. From its weights :math:`\log w_s`:

    .. math::

        \widehat{\mathrm{ELBO}} = \frac1S \sum_s \log w_s, \qquad
        \log \hat Z = \log \frac1S \sum_s w_s, \qquad
        \mathrm{ESS} = \Big(\sum_s \tilde w_s^2\Big)^{-1},

    with :math:`\tilde w` the PSIS-smoothed weights normalised to sum to one, and :math:`\hat k`
    read by :func:`khat_reading`.

    References: Yao, Vehtari, Simpson & Gelman 2018, "Yes, but Did It Work?: Evaluating
    Variational Inference", ICML, arXiv:1802.02538; Vehtari, Simpson, Gelman, Yao & Gabry 2024,
    "Pareto Smoothed Importance Sampling", JMLR 25(72), arXiv:1507.02646.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from flowguide import AutoIAF
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 10.0))
        >>> check = check_fit(model, AutoIAF(model, init_scale=0.1))  # far too narrow
        >>> check.reading, check.khat > 0.7
        ('bad', True)
        >>> print(check)  # doctest: +ELLIPSIS
        Importance-sampling check of the guide (1000 draws)
          Pareto k-hat ... bad (good < 0.5, bad >= 0.67 at 1000 draws)
        ...
    """
    _, log_weights = log_importance_weights(
        model, guide, *args, num_samples=num_samples, batch_size=batch_size, **kwargs
    )
    return _summarise(log_weights)


def importance_resample(
    model: Callable[..., Any],
    guide: AutoContinuous,
    *args: Any,
    num_samples: int = 1000,
    num_draws: int | None = None,
    smooth: bool = True,
    batch_size: int = 256,
    **kwargs: Any,
) -> dict[str, Tensor]:
    r"""Posterior draws by sampling/importance resampling: ``num_samples`` guide draws, resampled
    with replacement in proportion to their (PSIS-smoothed, with ``smooth=True``) weights.

    This corrects a guide that is close but biased (:math:`\hat k` "good" or "ok"); with a
    "bad" :math:`\hat k` it warns (:class:`ImportanceWeightWarning`), as a few draws then carry
    nearly all the weight. NaN or ``+inf`` log weights raise ``ValueError``. Each returned draw
    is guide draw :math:`s` with probability

    .. math::

        \pi_s = \frac{\tilde w_s}{\sum_{j=1}^S \tilde w_j},

    :math:`\tilde w` the PSIS-smoothed (or, with ``smooth=False``, raw) weights of
    :func:`log_importance_weights`; as :math:`S` grows the draws' distribution tends to the
    posterior.

    Args:
        num_samples: guide draws to weigh.
        num_draws: draws to return (default ``num_samples``).
        smooth: resample by the PSIS-smoothed weights (lower variance) rather than the raw ones.
        others: as for :func:`log_importance_weights`.

    Returns:
        the draws keyed by site name, each of shape ``(num_draws, *site_shape)``.

    References: Rubin 1988, "Using the SIR algorithm to simulate posterior distributions",
    Bayesian Statistics 3 (sampling/importance resampling); Vehtari, Simpson, Gelman, Yao & Gabry
    2024, "Pareto Smoothed Importance Sampling", JMLR 25(72), arXiv:1507.02646.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from flowguide import AutoIAF
        >>> def model():
        ...     pyro.sample("x", dist.Normal(1.0, 1.0))
        >>> guide = AutoIAF(model, init_loc_fn=lambda site: torch.tensor(0.0), init_scale=1.5)
        >>> pyro.set_rng_seed(0)
        >>> x = importance_resample(model, guide, num_samples=2000)["x"]
        >>> x.shape, abs(x.mean().item() - 1.0) < 0.1  # the guide's mean is 0
        (torch.Size([2000]), True)
    """
    num_draws = num_samples if num_draws is None else _check_count(num_draws, "num_draws")
    draws, log_weights = log_importance_weights(
        model, guide, *args, num_samples=num_samples, batch_size=batch_size, **kwargs
    )
    normalised, khat = psis_smooth(log_weights)
    if not smooth:
        lw = log_weights.double()
        normalised = (lw - lw.logsumexp(0)).cpu()
    if khat_reading(khat, num_samples if num_samples >= 2 else None) == "bad":
        warnings.warn(
            f"Pareto k-hat is {khat:.3g} (bad): the importance weights are too heavy-tailed for "
            "the resampled draws to be trusted",
            ImportanceWeightWarning,
            stacklevel=2,
        )
    index = torch.multinomial(normalised.exp(), num_draws, replacement=True)
    return {name: value[index.to(value.device)] for name, value in draws.items()}


def _dims(guide: AutoContinuous) -> dict[str, list[str]]:
    """ArviZ dims for each latent site: its plates' names where a plate indexes a dim, else
    ``{site}_dim_{i}`` (ArviZ's own default)."""
    sites = list(guide.prototype_trace.iter_stochastic_nodes())
    names = {name for name, _ in sites}
    dims: dict[str, list[str]] = {}
    for name, site in sites:
        shape = site["value"].shape
        batch_dims = len(shape) - site["fn"].event_dim
        out = [f"{name}_dim_{i}" for i in range(len(shape))]
        for frame in site["cond_indep_stack"]:
            i = batch_dims + frame.dim
            if (
                frame.vectorized
                and 0 <= i < batch_dims
                and shape[i] == frame.size
                and frame.name not in names | {"chain", "draw"}
            ):
                out[i] = frame.name
        dims[name] = out
    return dims


def to_inference_data(
    model: Callable[..., Any],
    guide: AutoContinuous,
    *args: Any,
    num_samples: int = 1000,
    batch_size: int = 256,
    **kwargs: Any,
) -> arviz.InferenceData:
    r"""The guide's draws as an ``arviz.InferenceData``, with their importance weights.

    * ``posterior``: one chain of ``num_samples`` guide draws, one variable per latent site
      with dims ``(chain, draw, *site_shape)``; a dim indexed by a ``pyro.plate`` is named after
      it, others ``{site}_dim_{i}``. These are the guide's draws, unweighted: reweight with
      ``exp(log_weight)``, or use :func:`importance_resample`.
    * ``sample_stats``: ``log_weight`` per draw, :math:`\log w_s` as in
      :func:`log_importance_weights`.
    * ``attrs``: ``khat``, ``khat_reading``, ``khat_threshold``, ``num_samples``, ``ess``,
      ``log_marginal_likelihood``, ``elbo``, ``num_nonfinite_log_weights`` (as in
      :class:`FitCheck`), and ``guide``.

    Arguments as for :func:`log_importance_weights`.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from flowguide import AutoIAF
        >>> def model():
        ...     with pyro.plate("groups", 3):
        ...         pyro.sample("mu", dist.Normal(0.0, 1.0))
        >>> idata = to_inference_data(model, AutoIAF(model, init_scale=1.0), num_samples=200)
        >>> idata.posterior["mu"].dims, idata.posterior["mu"].shape
        (('chain', 'draw', 'groups'), (1, 200, 3))
        >>> idata.attrs["khat_reading"]
        'good'
    """
    draws, log_weights = log_importance_weights(
        model, guide, *args, num_samples=num_samples, batch_size=batch_size, **kwargs
    )
    check = _summarise(log_weights)
    attrs = {
        "khat": check.khat,
        "khat_reading": check.reading,
        "khat_threshold": check.khat_threshold,
        "num_samples": check.num_samples,
        "ess": check.ess,
        "log_marginal_likelihood": check.log_marginal_likelihood,
        "elbo": check.elbo,
        "num_nonfinite_log_weights": check.num_nonfinite,
        "guide": type(guide).__name__,
    }
    return _arviz().from_dict(
        posterior={name: value.cpu().numpy()[None] for name, value in draws.items()},
        sample_stats={"log_weight": log_weights.cpu().numpy()[None]},
        dims=_dims(guide),
        attrs=attrs,
    )
