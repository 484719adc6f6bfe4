"""posteriordb reference posteriors written as Pyro models, for accuracy benchmarks.

Sixteen posteriors from `posteriordb <https://github.com/stan-dev/posteriordb>`_ come with a
long, well-diagnosed Stan reference run. This module restates each of them as a Pyro model
so that an approximate posterior (a normalizing-flow guide, say) can be compared with the
reference. The data are not part of this repository: every entry point takes the path of a
posteriordb folder laid out as ``<root>/<data>-<model>/{data.json, reference_summary.json,
reference_draws.json.zip}``, and the mathematical statement each model follows is that
folder's ``MODEL.md``.

Conventions shared by all models:

* Data and every distribution parameter are ``torch.float64``.
* Latent sites are continuous and sampled on the declared (constrained) parameter space with
  a distribution whose ``support`` is that space, so an autoguide's ``biject_to`` reproduces
  Stan's unconstrained parameterisation and its dimension. Log densities match Stan's up to
  an additive constant (with respect to Lebesgue measure on the constrained parameters).
* Improper flat priors are :class:`~pyro.distributions.ImproperUniform` sites, which cannot be
  sampled: initialise guides with :func:`init_to_unconstrained_uniform` (or ``init_to_value``)
  rather than Pyro's default ``init_to_median``.
* A density restricted to a smaller support without renormalisation (Stan's
  ``real<lower=0> x; x ~ normal(m, s);``) is a :class:`Restricted` distribution.
* Models broadcast over a leading batch of draws in the way
  ``Trace_ELBO(vectorize_particles=True)`` and :func:`batch_log_density` require.

Typical use::

    post = load_posterior("eight_schools-eight_schools_noncentered", root)
    guide = AutoNormal(post.model, init_loc_fn=init_to_unconstrained_uniform)
    ...  # fit the guide, then draw from it
    samples = ...  # latent site name -> tensor of shape (num_draws, *site_shape)
    approx = post.extract(samples)  # {"theta[1]": shape (num_draws,), ..., "tau": ...}
    mean, sd = post.reference["tau"]

Run ``python benchmarks/posteriordb.py --root PATH`` to load all sixteen posteriors and
print their unconstrained dimensions and the log density at the reference mean.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import sys
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide.initialization import InitMessenger
from torch import Tensor

__all__ = [
    "POSTERIORS",
    "ModelSpec",
    "Posterior",
    "PosteriorCheck",
    "Restricted",
    "batch_log_density",
    "check_posterior",
    "init_to_unconstrained_uniform",
    "load_posterior",
    "load_reference_draws",
    "log_density",
    "main",
    "unconstrained_dim",
]

Sites = dict[str, Tensor]
DTYPE = torch.float64


# --------------------------------------------------------------------------------------
# Small building blocks
# --------------------------------------------------------------------------------------


def _f64(value: Any) -> Tensor:
    """``value`` (a number or nested list from data.json) as a float64 tensor."""
    return torch.as_tensor(value, dtype=DTYPE)


def _dot(matrix: Tensor, vector: Tensor) -> Tensor:
    """``matrix @ vector`` written as a broadcasting product, so that it batches.

    For a parameter vector of shape ``(d,)`` this is the usual product. Under a particle
    plate of a model with one observation plate (``dim=-1``) the vector has shape
    ``(P, 1, d)``: its singleton plate dimension lines up with the rows of the matrix and the
    result has the observation plate's shape ``(P, n)``.
    """
    return (matrix * vector).sum(-1)


class Restricted(TorchDistribution):
    """The density of ``base`` restricted to ``support``, without renormalising.

    This is what Stan does for ``real<lower=0> x; x ~ normal(m, s);``: the density is the
    base density on the smaller support and the truncation constant, which does not depend
    on any parameter here, is dropped. ``log_prob`` is therefore unnormalised. ``sample``
    draws from the (normalised) truncated distribution by rejection, which is exact and
    fast for the supports used here (acceptance rate 50% or more).

    :param base: the distribution whose density is used.
    :param support: a constraint on values of ``base``'s event shape, contained in the
        base support.
    """

    arg_constraints: dict[str, constraints.Constraint] = {}  # noqa: RUF012
    max_tries = 1000

    def __init__(
        self,
        base: TorchDistribution,
        support: constraints.Constraint,
        validate_args: bool | None = None,
    ) -> None:
        # (Not checked against base.event_dim: pyro's positive_ordered_vector reports
        # event_dim 0 although it constrains vectors.)
        self.base = base
        self._support = support
        super().__init__(base.batch_shape, base.event_shape, validate_args=validate_args)

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        return self._support

    def expand(self, batch_shape: Any, _instance: Any = None) -> Restricted:
        new = self._get_checked_instance(Restricted, _instance)
        new.base = self.base.expand(batch_shape)
        new._support = self._support
        super(Restricted, new).__init__(new.base.batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return self.base.log_prob(value)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:  # noqa: B008
        with torch.no_grad():
            value = self.base.sample(sample_shape)
            for _ in range(self.max_tries):
                inside = self._support.check(value)
                if bool(inside.all()):
                    return value
                inside = inside.reshape(inside.shape + (1,) * self.event_dim)
                value = torch.where(inside, value, self.base.sample(sample_shape))
        raise RuntimeError("Restricted.sample: rejection sampling did not finish")


def _improper(
    support: constraints.Constraint, event_shape: tuple[int, ...] = ()
) -> dist.ImproperUniform:
    """Stan's implicit flat prior on ``support`` (log density 0)."""
    return dist.ImproperUniform(support, (), event_shape)


def _time_grid(
    t0: float,
    times: Tensor,
    steps: int,
    first_steps: int | None = None,
    first_power: float = 1.0,
) -> tuple[list[float], list[int]]:
    """Step times from ``t0`` through the output ``times`` for :func:`_rk4`.

    Every interval between consecutive output times gets ``steps`` equal steps, except the
    first, which may instead get ``first_steps`` steps at ``t0 + (t1 - t0) (i / n)^first_power``
    (finer near ``t0`` for ``first_power > 1``). Returns the grid and the grid indices of
    the output times.
    """
    grid, outputs = [t0], []
    t_start = t0
    for j, t_end in enumerate(times.tolist()):
        n, power = (first_steps, first_power) if j == 0 and first_steps else (steps, 1.0)
        grid += [t_start + (t_end - t_start) * (i / n) ** power for i in range(1, n + 1)]
        outputs.append(len(grid) - 1)
        t_start = t_end
    return grid, outputs


def _rk4(
    rhs: Callable[[float, Tensor], Tensor],
    state: Tensor,
    grid: list[float],
    outputs: list[int],
) -> Tensor:
    """Classical Runge-Kutta solution of ``d state / dt = rhs(t, state)`` on a fixed grid.

    Starts from ``state`` at ``grid[0]``, steps through ``grid`` and returns the states at the
    grid indices ``outputs``, stacked along a new leading axis. ``state`` may carry any batch
    dimensions; the solver is differentiable by autograd.
    """
    wanted = set(outputs)
    states = []
    for i in range(1, len(grid)):
        t, h = grid[i - 1], grid[i] - grid[i - 1]
        k1 = rhs(t, state)
        k2 = rhs(t + h / 2, state + (h / 2) * k1)
        k3 = rhs(t + h / 2, state + (h / 2) * k2)
        k4 = rhs(t + h, state + h * k3)
        state = state + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        if i in wanted:
            states.append(state)
    return torch.stack(states)


def _reject_failed_solution(name: str, solution: Tensor, event_dim: int) -> Tensor:
    """Give log density -inf to draws whose ODE solution is not finite and positive.

    The fixed-step solver is accurate over the posterior and far beyond it, but it becomes
    unstable at extreme parameter values (where the exact log density is hundreds of units
    below the posterior's), as explicit solvers do. Such draws are rejected, as Stan rejects
    a draw whose solver fails, through a factor site ``name``; the returned solution has
    those draws replaced by ones so that the remaining terms stay finite.
    """
    valid = (torch.isfinite(solution) & (solution > 0)).flatten(-event_dim).all(-1)
    pyro.factor(name, torch.where(valid, _f64(0.0), _f64(-math.inf)))
    valid = valid.reshape(valid.shape + (1,) * event_dim)
    return torch.where(valid, solution, torch.ones_like(solution))


def _se_cov(sq_dist: Tensor, alpha: Tensor, rho: Tensor) -> Tensor:
    """Squared-exponential kernel ``alpha^2 exp(-d^2 / (2 rho^2))``.

    ``alpha`` and ``rho`` must broadcast against the trailing matrix dimensions.
    """
    return alpha.square() * torch.exp(-sq_dist / (2 * rho.square()))


def _flatten(values: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]]) -> Sites:
    """Split each ``(*batch, *shape)`` tensor into Stan's flattened 1-based names."""
    out: Sites = {}
    for name, shape in shapes.items():
        value = values[name]
        if not shape:
            out[name] = value
            continue
        for index in itertools.product(*(range(n) for n in shape)):
            label = ",".join(str(i + 1) for i in index)
            out[f"{name}[{label}]"] = value[(..., *index)]
    return out


def _unflatten(values: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]]) -> Sites:
    """Inverse of :func:`_flatten`: gather ``name[i,j]`` entries into ``(*batch, *shape)``."""
    out: Sites = {}
    for name, shape in shapes.items():
        if not shape:
            out[name] = _f64(values[name])
            continue
        parts = [
            _f64(values[f"{name}[{','.join(str(i + 1) for i in index)}]"])
            for index in itertools.product(*(range(n) for n in shape))
        ]
        stacked = torch.stack(parts, dim=-1)
        out[name] = stacked.reshape(stacked.shape[:-1] + tuple(shape))
    return out


# --------------------------------------------------------------------------------------
# Model specifications
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """What a builder in :data:`POSTERIORS` returns for one data set.

    :param model: the Pyro model, with the data bound in; it takes no arguments.
    :param params: the reference parameters (Stan names before flattening) and their
        shapes.
    :param unconstrained_dim: the number of free real coordinates stated in MODEL.md.
    :param to_params: maps latent site values (each with one leading batch dimension, or
        any number) to the reference parameters; ``None`` when the sites are the
        parameters.
    :param to_sites: the inverse of ``to_params``.
    """

    model: Callable[[], None]
    params: dict[str, tuple[int, ...]]
    unconstrained_dim: int
    to_params: Callable[[Sites], Sites] | None = None
    to_sites: Callable[[Sites], Sites] | None = None


def _ark(data: Mapping[str, Any]) -> ModelSpec:
    """AR(K) regression, likelihood conditional on the first K values (arK-arK)."""
    K, T = int(data["K"]), int(data["T"])
    y = _f64(data["y"])
    # Column k-1 holds the lag-k value y_{t-k} for t = K+1..T (1-based).
    lags = torch.stack([y[K - k : T - k] for k in range(1, K + 1)], dim=-1)

    def model() -> None:
        alpha = pyro.sample("alpha", dist.Normal(_f64(0.0), _f64(10.0)))
        beta = pyro.sample("beta", dist.Normal(_f64(0.0), _f64(10.0)).expand([K]).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfCauchy(_f64(2.5)))
        with pyro.plate("time", T - K, dim=-1):
            pyro.sample("y", dist.Normal(alpha + _dot(lags, beta), sigma), obs=y[K:])

    return ModelSpec(model, {"alpha": (), "beta": (K,), "sigma": ()}, unconstrained_dim=7)


def _arma11(data: Mapping[str, Any]) -> ModelSpec:
    """ARMA(1, 1) by the one-step prediction-error recursion (arma-arma11)."""
    T = int(data["T"])
    y = _f64(data["y"])

    def model() -> None:
        mu = pyro.sample("mu", dist.Normal(_f64(0.0), _f64(10.0)))
        phi = pyro.sample("phi", dist.Normal(_f64(0.0), _f64(2.0)))
        theta = pyro.sample("theta", dist.Normal(_f64(0.0), _f64(2.0)))
        sigma = pyro.sample("sigma", dist.HalfCauchy(_f64(2.5)))
        # AR part of y_t - nu_t; the value before the series is taken as mu.
        resid = torch.cat([y[:1] - mu * (1 + phi), y[1:] - mu - phi * y[:-1]], dim=-1)
        # e_t = resid_t - theta * e_{t-1}, with e_0 = 0. Slices t:t+1 keep the time axis last,
        # so the recursion also batches under a particle plate.
        errors = [resid[..., :1]]
        for t in range(1, T):
            errors.append(resid[..., t : t + 1] - theta * errors[-1])
        nu = y - torch.cat(errors, dim=-1)  # one-step predictions
        with pyro.plate("time", T, dim=-1):
            pyro.sample("y", dist.Normal(nu, sigma), obs=y)

    return ModelSpec(model, {"mu": (), "phi": (), "theta": (), "sigma": ()}, unconstrained_dim=4)


def _diamonds(data: Mapping[str, Any]) -> ModelSpec:
    """brms linear regression with centred predictors (diamonds-diamonds)."""
    X = _f64(data["X"])
    Y = _f64(data["Y"])
    prior_only = bool(data.get("prior_only", 0))
    Xc = X[:, 1:] - X[:, 1:].mean(dim=0)  # drop the intercept column, centre the rest
    N, Kc = Xc.shape

    def model() -> None:
        b = pyro.sample("b", dist.Normal(_f64(0.0), _f64(1.0)).expand([Kc]).to_event(1))
        intercept = pyro.sample("Intercept", dist.StudentT(_f64(3.0), _f64(8.0), _f64(10.0)))
        sigma = pyro.sample(
            "sigma",
            Restricted(dist.StudentT(_f64(3.0), _f64(0.0), _f64(10.0)), constraints.positive),
        )
        if not prior_only:
            with pyro.plate("data", N, dim=-1):
                pyro.sample("Y", dist.Normal(intercept + _dot(Xc, b), sigma), obs=Y)

    return ModelSpec(model, {"b": (Kc,), "Intercept": (), "sigma": ()}, unconstrained_dim=26)


def _eight_schools_centered(data: Mapping[str, Any]) -> ModelSpec:
    """Eight schools, centred form (eight_schools-eight_schools_centered)."""
    J = int(data["J"])
    y, sigma = _f64(data["y"]), _f64(data["sigma"])

    def model() -> None:
        mu = pyro.sample("mu", dist.Normal(_f64(0.0), _f64(5.0)))
        tau = pyro.sample("tau", dist.HalfCauchy(_f64(5.0)))
        with pyro.plate("schools", J, dim=-1):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    return ModelSpec(model, {"theta": (J,), "mu": (), "tau": ()}, unconstrained_dim=10)


def _eight_schools_noncentered(data: Mapping[str, Any]) -> ModelSpec:
    """Eight schools, noncentred form; the reference reports theta (…_noncentered)."""
    J = int(data["J"])
    y, sigma = _f64(data["y"]), _f64(data["sigma"])

    def model() -> None:
        mu = pyro.sample("mu", dist.Normal(_f64(0.0), _f64(5.0)))
        tau = pyro.sample("tau", dist.HalfCauchy(_f64(5.0)))
        with pyro.plate("schools", J, dim=-1):
            theta_trans = pyro.sample("theta_trans", dist.Normal(_f64(0.0), _f64(1.0)))
            theta = pyro.deterministic("theta", mu + tau * theta_trans)
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    def to_params(s: Sites) -> Sites:
        theta = s["mu"][..., None] + s["tau"][..., None] * s["theta_trans"]
        return {"theta": theta, "mu": s["mu"], "tau": s["tau"]}

    def to_sites(p: Sites) -> Sites:
        theta_trans = (p["theta"] - p["mu"][..., None]) / p["tau"][..., None]
        return {"theta_trans": theta_trans, "mu": p["mu"], "tau": p["tau"]}

    return ModelSpec(
        model, {"theta": (J,), "mu": (), "tau": ()}, 10, to_params=to_params, to_sites=to_sites
    )


def _garch11(data: Mapping[str, Any]) -> ModelSpec:
    """GARCH(1, 1) with flat priors and beta1 < 1 - alpha1 (garch-garch11).

    Stan maps beta1 to ``(1 - alpha1) * inv_logit(x)``. Pyro's guides cannot follow a
    support that depends on another site, so the model samples the fraction
    ``beta1_frac = beta1 / (1 - alpha1)`` in (0, 1) (whose ``biject_to`` is the same
    logistic map) and adds the Jacobian ``log(1 - alpha1)`` of ``beta1_frac -> beta1``; the
    density on (alpha1, beta1) is then flat on the triangle, as in Stan.
    """
    T = int(data["T"])
    y = _f64(data["y"])
    sigma1 = float(data["sigma1"])

    def model() -> None:
        mu = pyro.sample("mu", _improper(constraints.real))
        alpha0 = pyro.sample("alpha0", _improper(constraints.positive))
        alpha1 = pyro.sample("alpha1", dist.Uniform(_f64(0.0), _f64(1.0)))
        beta1_frac = pyro.sample("beta1_frac", dist.Uniform(_f64(0.0), _f64(1.0)))
        beta1 = pyro.deterministic("beta1", (1 - alpha1) * beta1_frac)
        pyro.factor("beta1_jacobian", torch.log1p(-alpha1))
        # s_t^2 = alpha0 + alpha1 (y_{t-1} - mu)^2 + beta1 s_{t-1}^2, s_1 = sigma1.
        shock = alpha0 + alpha1 * (y[:-1] - mu).square()
        variances = [torch.full_like(shock[..., :1], sigma1**2)]
        for t in range(1, T):
            variances.append(shock[..., t - 1 : t] + beta1 * variances[-1])
        scale = torch.cat(variances, dim=-1).sqrt()
        with pyro.plate("time", T, dim=-1):
            pyro.sample("y", dist.Normal(mu, scale), obs=y)

    def to_params(s: Sites) -> Sites:
        beta1 = (1 - s["alpha1"]) * s["beta1_frac"]
        return {"mu": s["mu"], "alpha0": s["alpha0"], "alpha1": s["alpha1"], "beta1": beta1}

    def to_sites(p: Sites) -> Sites:
        frac = p["beta1"] / (1 - p["alpha1"])
        return {"mu": p["mu"], "alpha0": p["alpha0"], "alpha1": p["alpha1"], "beta1_frac": frac}

    shapes: dict[str, tuple[int, ...]] = {"mu": (), "alpha0": (), "alpha1": (), "beta1": ()}
    return ModelSpec(model, shapes, 4, to_params=to_params, to_sites=to_sites)


_GP_JITTER = 1e-10


def _gp_pois_regr(data: Mapping[str, Any]) -> ModelSpec:
    """Latent GP (noncentred) with a Poisson likelihood; reports f (gp_pois_regr-…)."""
    x, k = _f64(data["x"]), _f64(data["k"])
    N = x.shape[0]
    sq_dist = (x[:, None] - x[None, :]).square()
    jitter = _GP_JITTER * torch.eye(N, dtype=DTYPE)

    def cholesky(alpha: Tensor, rho: Tensor) -> Tensor:
        # alpha, rho broadcast against the trailing (N, N) dimensions
        return torch.linalg.cholesky(_se_cov(sq_dist, alpha, rho) + jitter)

    def model() -> None:
        rho = pyro.sample("rho", dist.Gamma(_f64(25.0), _f64(4.0)))
        alpha = pyro.sample("alpha", dist.HalfNormal(_f64(2.0)))
        f_tilde = pyro.sample("f_tilde", dist.Normal(_f64(0.0), _f64(1.0)).expand([N]).to_event(1))
        # Scalars carry the observation plate's singleton dimension when batched, so a
        # single unsqueeze places them against the (N, N) kernel in both cases.
        L = cholesky(alpha.unsqueeze(-1), rho.unsqueeze(-1))
        f = _dot(L, f_tilde)
        with pyro.plate("points", N, dim=-1):
            pyro.deterministic("f", f)
            pyro.sample("k", dist.Poisson(f.exp()), obs=k)

    def to_params(s: Sites) -> Sites:
        L = cholesky(s["alpha"][..., None, None], s["rho"][..., None, None])
        f = (L @ s["f_tilde"][..., None]).squeeze(-1)
        return {"rho": s["rho"], "alpha": s["alpha"], "f": f}

    def to_sites(p: Sites) -> Sites:
        L = cholesky(p["alpha"][..., None, None], p["rho"][..., None, None])
        f_tilde = torch.linalg.solve_triangular(L, p["f"][..., None], upper=False).squeeze(-1)
        return {"rho": p["rho"], "alpha": p["alpha"], "f_tilde": f_tilde}

    shapes: dict[str, tuple[int, ...]] = {"rho": (), "alpha": (), "f": (N,)}
    return ModelSpec(model, shapes, 13, to_params=to_params, to_sites=to_sites)


def _gp_regr(data: Mapping[str, Any]) -> ModelSpec:
    """GP regression with the latent function integrated out (gp_pois_regr-gp_regr)."""
    x, y = _f64(data["x"]), _f64(data["y"])
    N = x.shape[0]
    sq_dist = (x[:, None] - x[None, :]).square()
    eye = torch.eye(N, dtype=DTYPE)

    def model() -> None:
        rho = pyro.sample("rho", dist.Gamma(_f64(25.0), _f64(4.0)))
        alpha = pyro.sample("alpha", dist.HalfNormal(_f64(2.0)))
        sigma = pyro.sample("sigma", dist.HalfNormal(_f64(1.0)))
        # sigma itself, not sigma^2, is added to the diagonal (as in the Stan program)
        cov = _se_cov(sq_dist, alpha[..., None, None], rho[..., None, None])
        cov = cov + sigma[..., None, None] * eye
        loc = torch.zeros(N, dtype=DTYPE)
        scale_tril = torch.linalg.cholesky(cov)
        pyro.sample("y", dist.MultivariateNormal(loc, scale_tril=scale_tril), obs=y)

    return ModelSpec(model, {"rho": (), "alpha": (), "sigma": ()}, unconstrained_dim=3)


def _hmm_example(data: Mapping[str, Any]) -> ModelSpec:
    """Two-state Gaussian HMM, states summed out by the forward algorithm (hmm_example-…)."""
    if int(data["K"]) != 2:
        raise ValueError("hmm_example is written for K = 2 states")
    y = _f64(data["y"])
    N = y.shape[0]

    def model() -> None:
        theta1 = pyro.sample("theta1", dist.Dirichlet(torch.ones(2, dtype=DTYPE)))
        theta2 = pyro.sample("theta2", dist.Dirichlet(torch.ones(2, dtype=DTYPE)))
        mu = pyro.sample(
            "mu",
            Restricted(
                dist.Normal(_f64([3.0, 10.0]), _f64(1.0)).to_event(1),
                constraints.positive_ordered_vector,
            ),
        )
        # log_A[..., j, k] = log P(z_t = k | z_{t-1} = j): row j is theta_j.
        log_A = torch.stack([theta1, theta2], dim=-2).log()
        log_emit = dist.Normal(mu.unsqueeze(-2), _f64(1.0)).log_prob(y.unsqueeze(-1))  # (…, N, 2)
        # Forward recursion; the first state has equal weights (no initial-state term).
        log_alpha = log_emit[..., 0, :]
        for t in range(1, N):
            log_alpha = (log_alpha.unsqueeze(-1) + log_A).logsumexp(-2) + log_emit[..., t, :]
        pyro.factor("y", log_alpha.logsumexp(-1))

    return ModelSpec(model, {"theta1": (2,), "theta2": (2,), "mu": (2,)}, unconstrained_dim=4)


#: RK4 steps per year for the Lotka-Volterra model (step 0.05). Against a 20 times finer
#: grid, the log density at all 10,000 reference draws changes by at most 6e-6.
LOTKA_VOLTERRA_STEPS_PER_YEAR = 20


def _lotka_volterra(data: Mapping[str, Any]) -> ModelSpec:
    """Lotka-Volterra ODE with lognormal errors (hudson_lynx_hare-lotka_volterra)."""
    ts = _f64(data["ts"])
    y_init = _f64(data["y_init"])
    y = _f64(data["y"])  # (N, 2): column 0 hare (prey), column 1 lynx (predator)
    if not torch.equal(ts, torch.arange(1, ts.shape[0] + 1, dtype=DTYPE)):
        raise ValueError("expected ts = 1, 2, ..., N")

    def solve(theta: Tensor, z_init: Tensor) -> Tensor:
        alpha, beta, gamma, delta = theta.unbind(-1)

        def rhs(t: float, z: Tensor) -> Tensor:
            u, v = z.unbind(-1)
            return torch.stack([(alpha - beta * v) * u, (-gamma + delta * u) * v], dim=-1)

        grid, outputs = _time_grid(0.0, ts, LOTKA_VOLTERRA_STEPS_PER_YEAR)
        z = _rk4(rhs, z_init, grid, outputs)
        return z.movedim(0, -2)  # (…, N, 2)

    def model() -> None:
        # Normal(1, 0.5) on alpha, gamma and Normal(0.05, 0.05) on beta, delta, truncated at 0
        prior = dist.Normal(_f64([1.0, 0.05, 1.0, 0.05]), _f64([0.5, 0.05, 0.5, 0.05]))
        theta = pyro.sample(
            "theta",
            Restricted(prior.to_event(1), constraints.independent(constraints.positive, 1)),
        )
        z_init = pyro.sample(
            "z_init", dist.LogNormal(_f64(math.log(10.0)), _f64(1.0)).expand([2]).to_event(1)
        )
        sigma = pyro.sample("sigma", dist.LogNormal(_f64(-1.0), _f64(1.0)).expand([2]).to_event(1))
        z = _reject_failed_solution("ode_failure", solve(theta, z_init), event_dim=2)
        pyro.sample("y_init", dist.LogNormal(z_init.log(), sigma).to_event(1), obs=y_init)
        pyro.sample("y", dist.LogNormal(z.log(), sigma.unsqueeze(-2)).to_event(2), obs=y)

    return ModelSpec(model, {"theta": (4,), "z_init": (2,), "sigma": (2,)}, unconstrained_dim=8)


def _kidscore_interaction(data: Mapping[str, Any]) -> ModelSpec:
    """Uncentred interaction regression with a flat prior on beta (kidiq-…)."""
    score = _f64(data["kid_score"])
    hs, iq = _f64(data["mom_hs"]), _f64(data["mom_iq"])
    X = torch.stack([torch.ones_like(hs), hs, iq, hs * iq], dim=-1)
    N = X.shape[0]

    def model() -> None:
        beta = pyro.sample("beta", _improper(constraints.real_vector, (4,)))
        sigma = pyro.sample("sigma", dist.HalfCauchy(_f64(2.5)))
        with pyro.plate("children", N, dim=-1):
            pyro.sample("kid_score", dist.Normal(_dot(X, beta), sigma), obs=score)

    return ModelSpec(model, {"beta": (4,), "sigma": ()}, unconstrained_dim=5)


def _kilpisjarvi(data: Mapping[str, Any]) -> ModelSpec:
    """Linear trend with an uncentred year and a flat prior on sigma (kilpisjarvi_mod-…)."""
    x, y = _f64(data["x"]), _f64(data["y"])
    N = x.shape[0]
    alpha_prior = dist.Normal(_f64(data["pmualpha"]), _f64(data["psalpha"]))
    beta_prior = dist.Normal(_f64(data["pmubeta"]), _f64(data["psbeta"]))

    def model() -> None:
        alpha = pyro.sample("alpha", alpha_prior)
        beta = pyro.sample("beta", beta_prior)
        sigma = pyro.sample("sigma", _improper(constraints.positive))
        with pyro.plate("years", N, dim=-1):
            pyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)

    return ModelSpec(model, {"alpha": (), "beta": (), "sigma": ()}, unconstrained_dim=3)


def _low_dim_gauss_mix(data: Mapping[str, Any]) -> ModelSpec:
    """Two-component normal mixture with ordered means (low_dim_gauss_mix-…)."""
    y = _f64(data["y"])
    N = y.shape[0]

    def model() -> None:
        mu = pyro.sample(
            "mu",
            Restricted(
                dist.Normal(_f64(0.0), _f64(2.0)).expand([2]).to_event(1),
                constraints.ordered_vector,
            ),
        )
        sigma = pyro.sample("sigma", dist.HalfNormal(_f64(2.0)).expand([2]).to_event(1))
        theta = pyro.sample("theta", dist.Beta(_f64(5.0), _f64(5.0)))
        # theta weighs component 1, the one with the smaller mean
        weights = torch.stack([theta, 1 - theta], dim=-1)
        mixture = dist.MixtureSameFamily(dist.Categorical(probs=weights), dist.Normal(mu, sigma))
        with pyro.plate("data", N, dim=-1):
            pyro.sample("y", mixture, obs=y)

    return ModelSpec(model, {"mu": (2,), "sigma": (2,), "theta": ()}, unconstrained_dim=5)


def _accel_gp(data: Mapping[str, Any]) -> ModelSpec:
    """brms heteroscedastic approximate-GP regression (mcycle_gp-accel_gp)."""
    Y = _f64(data["Y"])
    basis, freq = _f64(data["Xgp_1"]), _f64(data["slambda_1"]).reshape(-1)
    basis_s, freq_s = _f64(data["Xgp_sigma_1"]), _f64(data["slambda_sigma_1"]).reshape(-1)
    prior_only = bool(data.get("prior_only", 0))
    N, M, M_s = Y.shape[0], freq.shape[0], freq_s.shape[0]
    sqrt_2pi = math.sqrt(2 * math.pi)

    def approx_gp(basis: Tensor, freq: Tensor, sd: Tensor, lscale: Tensor, z: Tensor) -> Tensor:
        # basis (sqrt(S(freq)) .* z) with the squared-exponential spectral density
        # S(w) = sd^2 sqrt(2 pi) lscale exp(-lscale^2 w^2 / 2)
        sd, lscale = sd.unsqueeze(-1), lscale.unsqueeze(-1)
        spd = sd.square() * sqrt_2pi * lscale * torch.exp(-0.5 * (lscale * freq).square())
        return _dot(basis, spd.sqrt() * z)

    def half_t() -> Restricted:
        return Restricted(dist.StudentT(_f64(3.0), _f64(0.0), _f64(36.0)), constraints.positive)

    def lscale_prior() -> dist.InverseGamma:
        return dist.InverseGamma(_f64(1.124909), _f64(0.0177))

    def model() -> None:
        intercept = pyro.sample("Intercept", dist.StudentT(_f64(3.0), _f64(-13.0), _f64(36.0)))
        sdgp = pyro.sample("sdgp_1", half_t())
        lscale = pyro.sample("lscale_1", lscale_prior())
        zgp = pyro.sample("zgp_1", dist.Normal(_f64(0.0), _f64(1.0)).expand([M]).to_event(1))
        intercept_s = pyro.sample(
            "Intercept_sigma", dist.StudentT(_f64(3.0), _f64(0.0), _f64(10.0))
        )
        sdgp_s = pyro.sample("sdgp_sigma_1", half_t())
        lscale_s = pyro.sample("lscale_sigma_1", lscale_prior())
        zgp_s = pyro.sample(
            "zgp_sigma_1", dist.Normal(_f64(0.0), _f64(1.0)).expand([M_s]).to_event(1)
        )
        if not prior_only:
            mean = intercept + approx_gp(basis, freq, sdgp, lscale, zgp)
            log_sd = intercept_s + approx_gp(basis_s, freq_s, sdgp_s, lscale_s, zgp_s)
            with pyro.plate("data", N, dim=-1):
                pyro.sample("Y", dist.Normal(mean, log_sd.exp()), obs=Y)

    shapes: dict[str, tuple[int, ...]] = {
        "Intercept": (),
        "sdgp_1": (),
        "lscale_1": (),
        "zgp_1": (M,),
        "Intercept_sigma": (),
        "sdgp_sigma_1": (),
        "lscale_sigma_1": (),
        "zgp_sigma_1": (M_s,),
    }
    return ModelSpec(model, shapes, unconstrained_dim=66)


#: RK4 grid of the pharmacokinetic model: steps per later measurement interval (0.5 days),
#: and steps in the first interval, graded as t0 + 0.5 (i / n)^3. When K_m is small the
#: elimination rate switches from linear to saturated as C crosses K_m just after t0, a kink
#: that makes equal steps first-order accurate; the graded start restores RK4's accuracy.
#: Against a 2000 + 19 x 400 step grid, the log density at all 10,000 reference draws
#: changes by at most 2e-5 (equal steps of 0.05 would give errors up to 0.03).
ONE_COMP_STEPS_PER_INTERVAL = 5
ONE_COMP_FIRST_INTERVAL_STEPS = 20


def _one_comp_mm_elim_abs(data: Mapping[str, Any]) -> ModelSpec:
    """One-compartment PK ODE, first-order absorption, Michaelis-Menten elimination."""
    t0 = float(data["t0"])
    dose, volume = float(data["D"]), float(data["V"])
    times, C_hat = _f64(data["times"]), _f64(data["C_hat"])

    def model() -> None:
        k_a = pyro.sample("k_a", dist.HalfCauchy(_f64(1.0)))
        K_m = pyro.sample("K_m", dist.HalfCauchy(_f64(1.0)))
        V_m = pyro.sample("V_m", dist.HalfCauchy(_f64(1.0)))
        sigma = pyro.sample("sigma", dist.HalfCauchy(_f64(1.0)))

        def rhs(t: float, C: Tensor) -> Tensor:
            absorption = (dose * k_a / volume) * torch.exp(-k_a * (t - t0))
            return absorption - (V_m / volume) * C / (K_m + C)

        # C(t0) = 0; the state has the parameters' batch shape.
        grid, outputs = _time_grid(
            t0, times, ONE_COMP_STEPS_PER_INTERVAL, ONE_COMP_FIRST_INTERVAL_STEPS, 3.0
        )
        C = _rk4(rhs, torch.zeros_like(k_a), grid, outputs)
        C = _reject_failed_solution("ode_failure", C.movedim(0, -1), event_dim=1)  # (…, N_t)
        pyro.sample("C_hat", dist.LogNormal(C.log(), sigma.unsqueeze(-1)).to_event(1), obs=C_hat)

    return ModelSpec(model, {"k_a": (), "K_m": (), "V_m": (), "sigma": ()}, unconstrained_dim=4)


def _blr(data: Mapping[str, Any]) -> ModelSpec:
    """Bayesian linear regression without intercept (sblrc-blr)."""
    X, y = _f64(data["X"]), _f64(data["y"])
    N, D = X.shape

    def model() -> None:
        beta = pyro.sample("beta", dist.Normal(_f64(0.0), _f64(10.0)).expand([D]).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(_f64(10.0)))
        with pyro.plate("data", N, dim=-1):
            pyro.sample("y", dist.Normal(_dot(X, beta), sigma), obs=y)

    return ModelSpec(model, {"beta": (D,), "sigma": ()}, unconstrained_dim=6)


#: Builders ``data.json contents -> ModelSpec``, keyed by posteriordb folder name.
POSTERIORS: dict[str, Callable[[Mapping[str, Any]], ModelSpec]] = {
    "arK-arK": _ark,
    "arma-arma11": _arma11,
    "diamonds-diamonds": _diamonds,
    "eight_schools-eight_schools_centered": _eight_schools_centered,
    "eight_schools-eight_schools_noncentered": _eight_schools_noncentered,
    "garch-garch11": _garch11,
    "gp_pois_regr-gp_pois_regr": _gp_pois_regr,
    "gp_pois_regr-gp_regr": _gp_regr,
    "hmm_example-hmm_example": _hmm_example,
    "hudson_lynx_hare-lotka_volterra": _lotka_volterra,
    "kidiq-kidscore_interaction": _kidscore_interaction,
    "kilpisjarvi_mod-kilpisjarvi": _kilpisjarvi,
    "low_dim_gauss_mix-low_dim_gauss_mix": _low_dim_gauss_mix,
    "mcycle_gp-accel_gp": _accel_gp,
    "one_comp_mm_elim_abs-one_comp_mm_elim_abs": _one_comp_mm_elim_abs,
    "sblrc-blr": _blr,
}


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Posterior:
    """One posteriordb posterior as a Pyro model plus its reference summary.

    :param name: the posteriordb name, ``<data>-<model>``.
    :param model: the Pyro model (no arguments; data bound in as float64 tensors).
    :param reference: Stan's flattened 1-based names (``theta[1]``) to the reference
        posterior ``(mean, sd)``.
    :param quantiles: the same names to the reference ``(q05, q50, q95)``, or ``None``
        where the reference has no quantiles (mcycle_gp-accel_gp).
    :param unconstrained_dim: the unconstrained dimension stated in MODEL.md.
    :param spec: the model specification behind this posterior.
    """

    name: str
    model: Callable[[], None]
    reference: dict[str, tuple[float, float]]
    quantiles: dict[str, tuple[float, float, float] | None]
    unconstrained_dim: int
    spec: ModelSpec = field(repr=False)

    def extract(self, samples: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Map Pyro latent site samples onto the reference names.

        :param samples: site name to a tensor of shape ``(num_draws, *site_shape)``
            (extra sites, such as deterministic ones, are ignored).
        :returns: reference name to a tensor of shape ``(num_draws,)``, computing
            transformed parameters (``theta``, ``f``, ``beta1``) where the reference reports
            those.
        """
        spec = self.spec
        params = spec.to_params(dict(samples)) if spec.to_params else dict(samples)
        return _flatten(params, spec.params)

    def sites_from_reference(self, values: Mapping[str, Any]) -> dict[str, Tensor]:
        """The inverse of :meth:`extract`: reference-named values to latent site values.

        ``values`` maps every reference name to a number or a tensor with any common batch
        shape ``B``; the result has site values of shape ``(*B, *site_shape)``.
        """
        params = _unflatten(values, self.spec.params)
        return self.spec.to_sites(params) if self.spec.to_sites else params

    def reference_mean_sites(self) -> dict[str, Tensor]:
        """The reference posterior mean, mapped onto the model's latent sites."""
        return self.sites_from_reference({k: mean for k, (mean, _) in self.reference.items()})


def _posterior_dir(name: str, root: str | Path) -> Path:
    if name not in POSTERIORS:
        raise KeyError(f"unknown posterior {name!r}; known: {sorted(POSTERIORS)}")
    folder = Path(root) / name
    if not folder.is_dir():
        raise FileNotFoundError(f"no posteriordb folder {folder}")
    return folder


def load_posterior(name: str, root: str | Path) -> Posterior:
    """Build the Pyro model for ``name`` from ``<root>/<name>/data.json`` and its reference."""
    folder = _posterior_dir(name, root)
    data = json.loads((folder / "data.json").read_text())
    summary = json.loads((folder / "reference_summary.json").read_text())
    spec = POSTERIORS[name](data)
    reference: dict[str, tuple[float, float]] = {}
    quantiles: dict[str, tuple[float, float, float] | None] = {}
    for entry in summary["params"]:
        reference[entry["param"]] = (float(entry["mean"]), float(entry["sd"]))
        qs = [entry.get(key) for key in ("q05", "q50", "q95")]
        quantiles[entry["param"]] = None if None in qs else (qs[0], qs[1], qs[2])
    return Posterior(name, spec.model, reference, quantiles, spec.unconstrained_dim, spec)


def load_reference_draws(name: str, root: str | Path) -> dict[str, Tensor] | None:
    """The reference draws (all chains concatenated, float64), or ``None`` if absent."""
    path = _posterior_dir(name, root) / "reference_draws.json.zip"
    if not path.is_file():
        return None
    with zipfile.ZipFile(path) as archive:
        chains = json.loads(archive.read(archive.namelist()[0]))
    return {key: _f64([x for chain in chains for x in chain[key]]) for key in chains[0]}


# --------------------------------------------------------------------------------------
# Evaluating the models
# --------------------------------------------------------------------------------------


def init_to_unconstrained_uniform(site: dict | None = None, radius: float = 2.0) -> Any:
    """Initialise a site uniformly in ``(-radius, radius)`` on its unconstrained scale.

    Like Pyro's ``init_to_uniform``, but never calls ``site["fn"].sample()``, so it also
    works for :class:`~pyro.distributions.ImproperUniform` (flat-prior) sites. Use it as the
    ``init_loc_fn`` of an autoguide.
    """
    if site is None:
        return functools.partial(init_to_unconstrained_uniform, radius=radius)
    fn = site["fn"]
    transform = biject_to(fn.support)
    shape = transform.inverse_shape(fn.shape())
    unconstrained = (2 * torch.rand(shape, dtype=DTYPE) - 1) * radius
    return transform(unconstrained).detach()


def _init_to_prior_draw(site: dict) -> Tensor:
    """A prior draw; a uniform unconstrained point for improper (flat-prior) sites."""
    try:
        return site["fn"].sample().detach()
    except NotImplementedError:
        return init_to_unconstrained_uniform(site)


def _latent_sites(trace: poutine.Trace) -> list[dict]:
    return [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not poutine.util.site_is_subsample(site)
    ]


def unconstrained_dim(model: Callable[[], None]) -> int:
    """The number of free real coordinates of ``model``'s latent sites (after biject_to)."""
    with torch.no_grad(), torch.random.fork_rng():
        trace = poutine.trace(InitMessenger(init_to_unconstrained_uniform)(model)).get_trace()
    total = 0
    for site in _latent_sites(trace):
        transform = biject_to(site["fn"].support)
        total += transform.inverse_shape(site["value"].shape).numel()
    return total


def log_density(model: Callable[[], None], sites: Mapping[str, Tensor]) -> Tensor:
    """The model's joint log density (a scalar) with its latent sites set to ``sites``."""
    trace = poutine.trace(poutine.condition(model, data=dict(sites))).get_trace()
    return trace.log_prob_sum()


def _max_plate_nesting(trace: poutine.Trace) -> int:
    dims = [
        -frame.dim
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


def batch_log_density(model: Callable[[], None], sites: Mapping[str, Tensor]) -> Tensor:
    """Joint log densities at a batch of draws, in one vectorised model run.

    :param sites: latent site name to a tensor of shape ``(num_draws, *site_shape)``.
    :returns: a tensor of shape ``(num_draws,)``. The model runs once under a plate of size
        ``num_draws`` placed left of its own plates, as ``vectorize_particles`` does.
    """
    sites = dict(sites)
    num_draws = next(iter(sites.values())).shape[0]
    first = {name: value[0] for name, value in sites.items()}
    with torch.no_grad():
        trace = poutine.trace(poutine.condition(model, data=first)).get_trace()
    nesting = _max_plate_nesting(trace)
    padded = {}
    for name, value in sites.items():
        site_shape = trace.nodes[name]["value"].shape
        batch_dims = len(site_shape) - trace.nodes[name]["fn"].event_dim
        pad = (1,) * (nesting - batch_dims)
        padded[name] = value.reshape((num_draws, *pad, *site_shape))

    def batched() -> None:
        with pyro.plate("_draws", num_draws, dim=-(nesting + 1)):
            model()

    trace = poutine.trace(poutine.condition(batched, data=padded)).get_trace()
    trace.compute_log_prob()
    total = torch.zeros(num_draws, dtype=DTYPE)
    for site in trace.nodes.values():
        if site["type"] != "sample" or poutine.util.site_is_subsample(site):
            continue
        lp = site["log_prob"]
        lp = lp.reshape((1,) * (nesting + 1 - lp.dim()) + lp.shape)
        total = total + lp.reshape(lp.shape[0], -1).sum(-1)
    return total


@dataclass(frozen=True)
class PosteriorCheck:
    """Result of :func:`check_posterior`.

    :param name: the posterior.
    :param unconstrained_dim: the dimension traced from the model.
    :param expected_dim: the dimension stated in MODEL.md.
    :param log_density_at_mean: log density at the reference mean mapped onto the sites.
    :param log_density_at_prior_draw: log density at a seeded prior draw (a uniform
        unconstrained point for flat-prior sites).
    :param draw_log_densities: log densities at ``num_draws`` reference draws, evaluated
        one at a time (``None`` without reference draws).
    :param batch_mismatch: largest absolute difference between those and the vectorised
        :func:`batch_log_density` (``None`` without reference draws).
    :param roundtrip_error: largest absolute error of ``extract(sites_from_reference(d))``
        against the draws ``d`` (``None`` without reference draws).
    :param seconds: wall time of the check.
    """

    name: str
    unconstrained_dim: int
    expected_dim: int
    log_density_at_mean: float
    log_density_at_prior_draw: float
    draw_log_densities: Tensor | None
    batch_mismatch: float | None
    roundtrip_error: float | None
    seconds: float

    @property
    def mean_beats_prior_draw(self) -> bool:
        """Whether the reference mean has a higher log density than the prior draw.

        A NaN at the prior draw (a numerically failed evaluation there) counts as lower.
        """
        prior = self.log_density_at_prior_draw
        return math.isnan(prior) or self.log_density_at_mean > prior


def check_posterior(
    name: str, root: str | Path, num_draws: int = 20, seed: int = 0
) -> PosteriorCheck:
    """Sanity checks of one model against its reference (no Stan needed).

    Traces the model's unconstrained dimension, evaluates the log density at the reference
    mean, at a seeded prior draw, and (where reference draws exist) at ``num_draws`` draws
    spread evenly over the chains, both one at a time and vectorised, and checks that the
    mapping between reference names and sites round-trips on those draws.
    """
    start = time.perf_counter()
    posterior = load_posterior(name, root)
    model = posterior.model
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        dim = unconstrained_dim(model)
        with torch.no_grad():
            at_mean = float(log_density(model, posterior.reference_mean_sites()))
            prior_trace = poutine.trace(InitMessenger(_init_to_prior_draw)(model)).get_trace()
            at_prior = float(prior_trace.log_prob_sum())

            draw_lds = batch_mismatch = roundtrip = None
            draws = load_reference_draws(name, root)
            if draws is not None and num_draws > 0:
                total = next(iter(draws.values())).shape[0]
                index = torch.linspace(0, total - 1, num_draws).round().long()
                subset = {key: draws[key][index] for key in posterior.reference}
                sites = posterior.sites_from_reference(subset)
                back = posterior.extract(sites)
                roundtrip = max(float((back[k] - subset[k]).abs().max()) for k in subset)
                draw_lds = torch.stack(
                    [
                        log_density(model, {k: v[i] for k, v in sites.items()})
                        for i in range(num_draws)
                    ]
                )
                batched = batch_log_density(model, sites)
                batch_mismatch = float((batched - draw_lds).abs().max())
    return PosteriorCheck(
        name=name,
        unconstrained_dim=dim,
        expected_dim=posterior.unconstrained_dim,
        log_density_at_mean=at_mean,
        log_density_at_prior_draw=at_prior,
        draw_log_densities=draw_lds,
        batch_mismatch=batch_mismatch,
        roundtrip_error=roundtrip,
        seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Load every posterior and print its dimension and log density at the reference mean."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        default=os.environ.get("FLOWGUIDE_POSTERIORDB"),
        help="posteriordb folder (default: $FLOWGUIDE_POSTERIORDB)",
    )
    parser.add_argument("names", nargs="*", help="posteriors to load (default: all)")
    args = parser.parse_args(argv)
    if args.root is None:
        parser.error("give --root or set FLOWGUIDE_POSTERIORDB")
    names = args.names or list(POSTERIORS)
    print(f"{'posterior':45s} {'dim':>4s} {'MODEL.md':>8s} {'log density at ref. mean':>26s}")
    failures = 0
    for name in names:
        posterior = load_posterior(name, args.root)
        dim = unconstrained_dim(posterior.model)
        with torch.no_grad():
            value = float(log_density(posterior.model, posterior.reference_mean_sites()))
        ok = dim == posterior.unconstrained_dim and math.isfinite(value)
        failures += not ok
        status = "" if ok else "  <-- check"
        print(f"{name:45s} {dim:4d} {posterior.unconstrained_dim:8d} {value:26.4f}{status}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
