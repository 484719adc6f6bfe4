"""NeuTra MCMC against plain NUTS: sampling efficiency and accuracy on hard geometries, in one run.

Targets:

* ``funnel-10d``: Neal's funnel, ``y ~ N(0, 3)``, ``x_i ~ N(0, exp(y / 2))`` for 9 x's; truth:
  every mean 0, ``sd(y) = 3``, ``sd(x_i) = exp(9 / 4)``;
* ``eight_schools-eight_schools_centered`` and ``gp_pois_regr-gp_pois_regr`` from posteriordb
  (``benchmarks/posteriordb.py``, data in ``--root``, default ``../shared/posteriordb`` beside the
  repository); truth: the posteriordb reference means and sds;
* ``ar1-gauss-100d``: a 100-D Gaussian ``MultivariateNormal(0, S)`` with the AR(1) covariance
  ``S_ij = rho^|i - j|``, ``rho = 0.95`` (marginal sds 1, condition number about 1500); truth in
  closed form (means 0, sds 1).

Methods, all with the same warm-up and draws, one chain each (except the many-chain sampler):

* ``pyro NUTS``: ``pyro.infer.MCMC(NUTS(model))`` with Pyro's defaults (diagonal mass matrix
  adaptation, target acceptance 0.8, tree depth at most ``--max-tree-depth``, default 10);
* ``NeuTra NUTS (AutoIAF)`` and ``NeuTra NUTS (AutoNeuralSpline)``: the guide (defaults) fitted
  with ``flowguide.fit`` (``--fit-steps`` steps, ``--particles`` particles, no early stopping),
  then ``flowguide.neutra.NeuTraMCMC(kernel="nuts")`` in its base space (Pyro's NUTS kernel with
  NeuTraMCMC's defaults: as above but target acceptance 0.95);
* ``ManyChainHMC (AutoIAF)`` and ``ManyChainHMC (AutoNeuralSpline)``:
  ``flowguide.neutra.ManyChainHMC`` in the base space of the same guide's fit, ``--chains``
  chains in lock-step with ChEES trajectory adaptation (``--mc-warmup`` warm-up transitions and
  ``--mc-samples`` draws per chain); the fit time is that fit's;
* ``pyro NeuTraReparam (AutoIAFNormal)``: Pyro's own route, ``AutoIAFNormal`` (defaults) fitted
  with ``Trace_ELBO`` (same steps, particles and learning-rate schedule through
  ``flowguide.fit``), then ``NUTS`` on ``poutine.reparam(model, NeuTraReparam(guide))`` and
  ``NeuTraReparam.transform_sample`` to get the draws back.

* ``numpyro NUTS`` and ``numpyro NeuTra (AutoIAFNormal)`` (only where ``numpyro`` and ``jax``
  are installed, and only on the targets with a NumPyro version of the model: the funnel, eight
  schools and gp_pois_regr, written here from the same definitions): NumPyro's NUTS with the same
  defaults, float64 (``numpyro.enable_x64()``), JAX on one CPU thread; and NumPyro's NeuTra route,
  ``numpyro.infer.autoguide.AutoIAFNormal`` (its defaults) fitted by ``numpyro.infer.SVI`` with
  ``Trace_ELBO`` (same steps and particles, Adam with the same learning-rate decay), then NUTS on
  ``NeuTraReparam(guide, params).reparam(model)`` and ``transform_sample`` to get the draws back.
  NumPyro's gradient evaluations are its NUTS's ``num_steps`` extra field (leapfrog steps per
  transition) summed over warm-up and draws (warm-up run with ``collect_warmup=True``); its
  initial gradient and step-size search are not in that count (a handful). NumPyro's seconds
  include JAX's compilation (a few seconds per warm-up, per sampling phase and per fit; a
  throwaway 2 + 2 iteration run before the first NumPyro method takes JAX's one-off start-up
  out of them, and its time is printed).

NumPyro is optional: install it with ``pip install numpyro jax jaxlib`` (not a dependency of
flowguide); without it those two methods are skipped with a note.

Per target, method and seed it reports the minimum bulk ESS over the reference coordinates
(``arviz.ess(..., method="bulk")`` on the draws grouped by chain), gradient evaluations (Pyro's
NUTS: counted by a hook on the kernel's potential function, every call with a gradient, set-up
and warm-up included; flowguide's samplers: ``.diagnostics()["num_grad_evals"]``, same
convention, for ``ManyChainHMC`` the chains of every batched call), the minimum ESS per gradient
evaluation, per second of sampling, and per second of fit plus sampling, the divergences after
warm-up (for ``ManyChainHMC``: the transitions that diverged on every try, then in parentheses
those whose first trajectory diverged, most of them saved by its delayed rejection), the worst
standardized error of the means ``max |mean - ref| / ref_sd`` and the range of
the sd ratios ``sd / ref_sd`` (and ``sd(y) / 3`` on the funnel). With several seeds a second table
gives the medians over seeds. A last block reads the funnel results against the NeuTra goals.
``--jit-compile`` runs flowguide's two samplers with ``jit_compile=True`` (the potential traced
by ``torch.jit.trace``), to measure what tracing saves.

Timings are wall-clock on whatever machine runs this; nothing about them is asserted.

Run: ``python benchmarks/neutra.py [--quick] [--root PATH] [--only NAME ...] [--methods NAME ...]
[--warmup N] [--samples N] [--fit-steps N] [--particles N] [--seeds S ...] [--output FILE]``.
``--quick`` is a smoke run (funnel only, 100 warm-up and 100 draws, 500 fit steps, NUTS tree
depth at most 6, ManyChainHMC 16 chains x (50 + 25); a couple of minutes on one thread).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal
from pyro.infer.reparam import NeuTraReparam
from torch import Tensor

import flowguide as fg
from flowguide.guides import constrain_latent
from flowguide.neutra import ManyChainHMC, NeuTraMCMC

__all__ = ["METHODS", "Target", "main", "targets"]

REPO = Path(__file__).resolve().parents[1]
DTYPE = torch.float64

METHODS = [
    "pyro NUTS",
    "NeuTra NUTS (AutoIAF)",
    "NeuTra NUTS (AutoNeuralSpline)",
    "ManyChainHMC (AutoIAF)",
    "ManyChainHMC (AutoNeuralSpline)",
    "pyro NeuTraReparam (AutoIAFNormal)",
    "numpyro NUTS",
    "numpyro NeuTra (AutoIAFNormal)",
]
NUMPYRO_METHODS = ("numpyro NUTS", "numpyro NeuTra (AutoIAFNormal)")


# ------------------------------------------------------------------------------------------------
# targets
# ------------------------------------------------------------------------------------------------
@dataclass
class Target:
    """A posterior with reference moments and a map from site draws to reference names."""

    name: str
    model: Callable[[], None]
    reference: dict[str, tuple[float, float]]
    # site name -> (N, *site_shape) draws  to  reference name -> (N,) draws
    extract: Callable[[dict[str, Tensor]], dict[str, Tensor]]
    # the NumPyro modules (see _numpyro) -> the same model written for NumPyro, same site names
    numpyro_model: Callable[[SimpleNamespace], Callable[[], None]] | None = None


def _funnel(dim: int = 10) -> Target:
    def model() -> None:
        y = pyro.sample("y", dist.Normal(torch.tensor(0.0, dtype=DTYPE), 3.0))
        # the unsqueeze lets x's scale broadcast over chains and particles
        pyro.sample(
            "x",
            dist.Normal(torch.zeros(dim - 1, dtype=DTYPE), torch.exp(y / 2).unsqueeze(-1)).to_event(
                1
            ),
        )

    # sd(x_i) = sqrt(E exp(y)) = sqrt(exp(9 / 2)) = exp(9 / 4)
    ref = {"y": (0.0, 3.0), **{f"x[{i + 1}]": (0.0, math.exp(9 / 4)) for i in range(dim - 1)}}

    def extract(s: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"y": s["y"], **{f"x[{i + 1}]": s["x"][:, i] for i in range(dim - 1)}}

    def numpyro_model(np_: SimpleNamespace) -> Callable[[], None]:
        def np_model() -> None:
            y = np_.numpyro.sample("y", np_.dist.Normal(0.0, 3.0))
            scale = np_.jnp.exp(y / 2)
            np_.numpyro.sample("x", np_.dist.Normal(np_.jnp.zeros(dim - 1), scale).to_event(1))

        return np_model

    return Target(f"funnel-{dim}d", model, ref, extract, numpyro_model)


def _ar1_gauss(dim: int = 100, rho: float = 0.95) -> Target:
    idx = torch.arange(dim, dtype=DTYPE)
    cov = rho ** (idx[:, None] - idx[None, :]).abs()
    scale_tril = torch.linalg.cholesky(cov)
    loc = torch.zeros(dim, dtype=DTYPE)

    def model() -> None:
        pyro.sample("x", dist.MultivariateNormal(loc, scale_tril=scale_tril))

    ref = {f"x[{i + 1}]": (0.0, 1.0) for i in range(dim)}

    def extract(s: dict[str, Tensor]) -> dict[str, Tensor]:
        return {f"x[{i + 1}]": s["x"][:, i] for i in range(dim)}

    return Target(f"ar1-gauss-{dim}d", model, ref, extract)


POSTERIORDB = ["eight_schools-eight_schools_centered", "gp_pois_regr-gp_pois_regr"]


def _np_eight_schools_centered(data: dict[str, Any]) -> Callable[[SimpleNamespace], Callable]:
    """Eight schools, centred (as ``benchmarks/posteriordb.py`` writes it for Pyro)."""

    def numpyro_model(np_: SimpleNamespace) -> Callable[[], None]:
        jnp, numpyro, d = np_.jnp, np_.numpyro, np_.dist
        y, sigma = jnp.asarray(data["y"], dtype=float), jnp.asarray(data["sigma"], dtype=float)

        def np_model() -> None:
            mu = numpyro.sample("mu", d.Normal(0.0, 5.0))
            tau = numpyro.sample("tau", d.HalfCauchy(5.0))
            with numpyro.plate("schools", int(data["J"])):
                theta = numpyro.sample("theta", d.Normal(mu, tau))
                numpyro.sample("y", d.Normal(theta, sigma), obs=y)

        return np_model

    return numpyro_model


def _np_gp_pois_regr(data: dict[str, Any]) -> Callable[[SimpleNamespace], Callable]:
    """The latent GP with a Poisson likelihood, noncentred (as in ``benchmarks/posteriordb.py``):
    ``rho ~ Gamma(25, 4)``, ``alpha ~ HalfNormal(2)``, ``f_tilde ~ N(0, I)``, ``f = L f_tilde``
    with ``L L^T = alpha^2 exp(-d^2 / (2 rho^2)) + 1e-10 I``, ``k ~ Poisson(exp(f))``."""

    def numpyro_model(np_: SimpleNamespace) -> Callable[[], None]:
        jnp, numpyro, d = np_.jnp, np_.numpyro, np_.dist
        x, k = jnp.asarray(data["x"], dtype=float), jnp.asarray(data["k"], dtype=float)
        n = x.shape[0]
        sq_dist = jnp.square(x[:, None] - x[None, :])

        def np_model() -> None:
            rho = numpyro.sample("rho", d.Gamma(25.0, 4.0))
            alpha = numpyro.sample("alpha", d.HalfNormal(2.0))
            f_tilde = numpyro.sample("f_tilde", d.Normal(jnp.zeros(n), 1.0).to_event(1))
            cov = alpha**2 * jnp.exp(-sq_dist / (2 * rho**2)) + 1e-10 * jnp.eye(n)
            f = jnp.linalg.cholesky(cov) @ f_tilde
            with numpyro.plate("points", n):
                numpyro.sample("k", d.Poisson(jnp.exp(f)), obs=k)

        return np_model

    return numpyro_model


NUMPYRO_MODELS = {
    "eight_schools-eight_schools_centered": _np_eight_schools_centered,
    "gp_pois_regr-gp_pois_regr": _np_gp_pois_regr,
}


def targets(root: Path | None, only: list[str] | None) -> list[Target]:
    """The targets whose name contains one of ``only`` (all when ``only`` is empty); the
    posteriordb ones only when ``root`` is a folder."""
    out = [_funnel(10)]
    if root is not None and root.is_dir():
        import posteriordb as pdb  # benchmarks/posteriordb.py: a script's folder is on sys.path

        for name in POSTERIORDB:
            post = pdb.load_posterior(name, root)
            data = json.loads((root / name / "data.json").read_text())
            np_model = NUMPYRO_MODELS[name](data) if name in NUMPYRO_MODELS else None
            out.append(Target(name, post.model, post.reference, post.extract, np_model))
    elif root is not None:
        print(f"note: no posteriordb folder at {root}; skipping its targets", file=sys.stderr)
    out.append(_ar1_gauss(100, 0.95))
    if only:
        out = [t for t in out if any(o in t.name for o in only)]
    return out


# ------------------------------------------------------------------------------------------------
# counting Pyro's gradient evaluations
# ------------------------------------------------------------------------------------------------
class CountingNUTS(NUTS):
    """Pyro's NUTS whose potential function counts its calls with a gradient (those made by
    ``potential_grad``, which sets ``requires_grad`` on the inputs first): one per leapfrog step,
    plus the set-up's and the step-size search's."""

    num_grad_evals: int = 0

    def _initialize_model_properties(self, model_args: Any, model_kwargs: Any) -> None:
        super()._initialize_model_properties(model_args, model_kwargs)
        inner = self.potential_fn

        def counted(params: dict[str, Tensor]) -> Tensor:
            if torch.is_grad_enabled() and any(v.requires_grad for v in params.values()):
                self.num_grad_evals += 1
            return inner(params)

        self.potential_fn = counted


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    log = logging.getLogger("arviz")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _arviz() -> Any:
    with _quiet():
        import arviz

    return arviz


def _grouped(target: Target, samples: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Site draws of shape ``(chains, draws, *site_shape)`` to reference-named
    ``(chains, draws)`` arrays."""
    chains, draws = next(iter(samples.values())).shape[:2]
    flat = {k: v.reshape(chains * draws, *v.shape[2:]) for k, v in samples.items()}
    with torch.no_grad():
        ref = target.extract(flat)
    return {
        name: ref[name].detach().double().reshape(chains, draws).cpu().numpy()
        for name in target.reference
    }


def _metrics(target: Target, samples: dict[str, Tensor]) -> dict[str, float]:
    az = _arviz()
    arrays = _grouped(target, samples)
    ess, mean_err, ratios = [], 0.0, []
    with _quiet():
        for name, (m, s) in target.reference.items():
            arr = arrays[name]
            ess.append(float(az.ess(arr, method="bulk")))
            flat = arr.reshape(-1)
            mean_err = max(mean_err, abs(flat.mean() - m) / s)
            ratios.append(flat.std(ddof=1) / s)
    out = {
        "min_ess": float(np.nanmin(ess)) if not all(math.isnan(e) for e in ess) else math.nan,
        "mean_err": float(mean_err),
        "sd_min": float(min(ratios)),
        "sd_max": float(max(ratios)),
        "draws": float(arrays[next(iter(arrays))].size),
    }
    if "y" in arrays and target.name.startswith("funnel"):
        out["sd_y_ratio"] = float(arrays["y"].reshape(-1).std(ddof=1) / 3.0)
    return out


# ------------------------------------------------------------------------------------------------
# the methods
# ------------------------------------------------------------------------------------------------
@dataclass
class Config:
    warmup: int
    samples: int
    fit_steps: int
    particles: int
    chains: int
    mc_warmup: int
    mc_samples: int
    max_tree_depth: int = 10
    target_accept: float | None = None  # NeuTraMCMC's NUTS (None: its default)
    mc_target_accept: float | None = None  # ManyChainHMC's (None: its default)
    mc_retry_factor: int | None = None  # ManyChainHMC's delayed rejection (None: its default)
    jit_compile: bool = False  # flowguide's samplers trace their potential


def _pyro_nuts(
    model: Callable[[], None], cfg: Config, seed: int
) -> tuple[dict[str, Tensor], int, int, float]:
    """Plain NUTS on ``model``: (draws grouped by chain, gradient evaluations, divergences,
    seconds)."""
    pyro.set_rng_seed(seed)
    kernel = CountingNUTS(model, max_tree_depth=cfg.max_tree_depth)
    mcmc = MCMC(kernel, num_samples=cfg.samples, warmup_steps=cfg.warmup, disable_progbar=True)
    start = time.perf_counter()
    mcmc.run()
    seconds = time.perf_counter() - start
    samples = mcmc.get_samples(group_by_chain=True)
    with _quiet():
        divergences = sum(len(v) for v in mcmc.diagnostics()["divergences"].values())
    return samples, kernel.num_grad_evals, divergences, seconds


def _fit_flow(
    target: Target, guide_cls: type[fg.AutoFlow], cfg: Config, seed: int
) -> tuple[fg.AutoFlow, float]:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = guide_cls(target.model)
    start = time.perf_counter()
    fg.fit(
        target.model,
        guide,
        num_steps=cfg.fit_steps,
        num_particles=cfg.particles,
        progress=False,
        seed=seed,
        patience=0,
    )
    return guide, time.perf_counter() - start


def _ours(
    sampler: NeuTraMCMC | ManyChainHMC, seed: int
) -> tuple[dict[str, Tensor], int, int, float, bool, dict[str, int]]:
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    sampler.run()
    seconds = time.perf_counter() - start
    with _quiet():
        diag = sampler.diagnostics()
    samples = sampler.get_samples(group_by_chain=True)
    return (
        samples,
        int(diag["num_grad_evals"]),
        int(diag["num_divergences"]),
        seconds,
        bool(diag["preconditioner"]["ok"]),
        {
            "first_stage_divergences": int(diag["num_first_stage_divergences"]),
            "retried": int(diag["num_retried"]),
        }
        if "num_first_stage_divergences" in diag
        else {},
    )


def _pyro_neutra(
    target: Target, cfg: Config, seed: int
) -> tuple[dict[str, Tensor], int, int, float, float]:
    """Pyro's route: fit AutoIAFNormal, NUTS on the NeuTraReparam'd model, map draws back.

    The models are float64 and Pyro's guide builds its networks in the default dtype when it
    first runs, so this runs with float64 as the default dtype (as flowguide's guides follow the
    model's dtype)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        return _pyro_neutra_float64(target, cfg, seed)
    finally:
        torch.set_default_dtype(default)


def _pyro_neutra_float64(
    target: Target, cfg: Config, seed: int
) -> tuple[dict[str, Tensor], int, int, float, float]:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoIAFNormal(target.model)
    start = time.perf_counter()
    fg.fit(
        target.model,
        guide,
        num_steps=cfg.fit_steps,
        loss=Trace_ELBO(num_particles=cfg.particles, vectorize_particles=True, max_plate_nesting=2),
        progress=False,
        seed=seed,
        patience=0,
    )
    fit_s = time.perf_counter() - start
    guide.requires_grad_(False)
    neutra = NeuTraReparam(guide)
    model = poutine.reparam(target.model, config=lambda _: neutra)
    pyro.set_rng_seed(seed)
    kernel = CountingNUTS(model, max_tree_depth=cfg.max_tree_depth)
    mcmc = MCMC(kernel, num_samples=cfg.samples, warmup_steps=cfg.warmup, disable_progbar=True)
    start = time.perf_counter()
    mcmc.run()
    sample_s = time.perf_counter() - start
    # the shared latent is named after the model's first latent site
    (latent,) = (
        v for k, v in mcmc.get_samples(group_by_chain=True).items() if k.endswith("_shared_latent")
    )
    chains, draws = latent.shape[:2]
    with torch.no_grad():  # NeuTraReparam.transform_sample, one draw at a time (plates)
        z = neutra.transform(latent.reshape(chains * draws, -1))
        per_draw = [constrain_latent(guide, row)[1] for row in z]
    samples = {
        k: torch.stack([d[k] for d in per_draw]).reshape(chains, draws, *per_draw[0][k].shape)
        for k in per_draw[0]
    }
    with _quiet():
        divergences = sum(len(v) for v in mcmc.diagnostics()["divergences"].values())
    return samples, kernel.num_grad_evals, divergences, sample_s, fit_s


_XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _numpyro() -> SimpleNamespace | None:
    """NumPyro and JAX (float64, CPU, one thread), or ``None`` where they are not installed."""
    if "jax" not in sys.modules:  # the flags count only before JAX starts
        flags = os.environ.get("XLA_FLAGS", "")
        if "intra_op_parallelism_threads" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {_XLA_ONE_THREAD}".strip()
    try:
        with _quiet():
            import jax
            import jax.numpy as jnp
            import numpyro
            import numpyro.distributions as ndist
            from numpyro import infer
            from numpyro.infer import autoguide, reparam
    except ImportError:
        return None
    numpyro.set_platform("cpu")
    numpyro.enable_x64()
    return SimpleNamespace(
        jax=jax,
        jnp=jnp,
        numpyro=numpyro,
        dist=ndist,
        infer=infer,
        autoguide=autoguide,
        reparam=reparam,
        version=f"numpyro {numpyro.__version__}, jax {jax.__version__}",
    )


def _np_to_torch(samples: dict[str, Any]) -> dict[str, Tensor]:
    """NumPyro's ``(draws, *site_shape)`` arrays to ``(1, draws, *site_shape)`` float64 tensors."""
    return {k: torch.tensor(np.array(v), dtype=DTYPE).unsqueeze(0) for k, v in samples.items()}


def _np_nuts_run(
    np_: SimpleNamespace, model: Callable[[], None], cfg: Config, key: Any
) -> tuple[Any, int, int, float]:
    """NumPyro's NUTS on ``model``: (the MCMC object, gradient evaluations, divergences after
    warm-up, seconds). Gradients: the ``num_steps`` extra field summed over the warm-up (run
    separately with ``collect_warmup=True``) and the draws."""
    kernel = np_.infer.NUTS(model, max_tree_depth=cfg.max_tree_depth)
    mcmc = np_.infer.MCMC(
        kernel, num_warmup=cfg.warmup, num_samples=cfg.samples, progress_bar=False
    )
    start = time.perf_counter()
    with _quiet():
        mcmc.warmup(key, extra_fields=("num_steps",), collect_warmup=True)
        grads = int(np.sum(np.asarray(mcmc.get_extra_fields()["num_steps"])))
        mcmc.run(mcmc.post_warmup_state.rng_key, extra_fields=("num_steps", "diverging"))
        extra = mcmc.get_extra_fields()
        np_.jax.block_until_ready(mcmc.get_samples())
    seconds = time.perf_counter() - start
    grads += int(np.sum(np.asarray(extra["num_steps"])))
    return mcmc, grads, int(np.sum(np.asarray(extra["diverging"]))), seconds


_NP_WARMED: list[bool] = []


def _np_warm_jax(np_: SimpleNamespace, model: Callable[[], None], seed: int) -> None:
    """Once per process, a throwaway 2 + 2 iteration NUTS run, so that JAX's one-off start-up
    is not charged to the NumPyro method that runs first; prints its seconds."""
    if _NP_WARMED:
        return
    small = Config(2, 2, 0, 1, 1, 0, 1, max_tree_depth=2)
    start = time.perf_counter()
    _np_nuts_run(np_, model, small, np_.jax.random.PRNGKey(seed + 10_000))
    _NP_WARMED.append(True)
    print(f"    NumPyro throwaway 2 + 2 run: {time.perf_counter() - start:.1f} s", file=sys.stderr)


def _numpyro_nuts(
    np_: SimpleNamespace, target: Target, cfg: Config, seed: int
) -> tuple[dict[str, Tensor], int, int, float]:
    assert target.numpyro_model is not None
    model = target.numpyro_model(np_)
    _np_warm_jax(np_, model, seed)
    mcmc, grads, divs, seconds = _np_nuts_run(np_, model, cfg, np_.jax.random.PRNGKey(seed))
    return _np_to_torch(mcmc.get_samples()), grads, divs, seconds


def _numpyro_neutra(
    np_: SimpleNamespace, target: Target, cfg: Config, seed: int
) -> tuple[dict[str, Tensor], int, int, float, float]:
    """NumPyro's route: AutoIAFNormal fitted by SVI, NUTS on the NeuTraReparam'd model."""
    assert target.numpyro_model is not None
    model = target.numpyro_model(np_)
    _np_warm_jax(np_, model, seed)
    jax = np_.jax
    guide = np_.autoguide.AutoIAFNormal(model)
    steps = cfg.fit_steps

    def schedule(t: Any) -> Any:  # flowguide.fit's: 0.01 decaying exponentially to 0.001
        return 0.01 * 0.1 ** (t / steps)

    svi = np_.infer.SVI(
        model, guide, np_.numpyro.optim.Adam(schedule), np_.infer.Trace_ELBO(cfg.particles)
    )
    start = time.perf_counter()
    with _quiet():
        fitted = svi.run(jax.random.PRNGKey(seed + 1), steps, progress_bar=False)
        jax.block_until_ready(fitted.params)
    fit_s = time.perf_counter() - start
    neutra = np_.reparam.NeuTraReparam(guide, fitted.params)
    mcmc, grads, divs, seconds = _np_nuts_run(
        np_, neutra.reparam(model), cfg, jax.random.PRNGKey(seed)
    )
    latent = mcmc.get_samples()["auto_shared_latent"]
    samples = neutra.transform_sample(latent)
    return _np_to_torch(dict(samples)), grads, divs, seconds, fit_s


def run_target(target: Target, methods: list[str], cfg: Config, seed: int) -> list[dict[str, Any]]:
    """Every method on one target with one seed; a failed method gives a row with ``error``."""
    rows: list[dict[str, Any]] = []
    fits: dict[type, tuple[fg.AutoFlow, float]] = {}

    def record(method: str, fn: Callable[[], tuple]) -> None:
        row: dict[str, Any] = {"target": target.name, "method": method, "seed": seed}
        t0 = time.perf_counter()
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {target.name} | {method} | seed {seed}", file=sys.stderr)
        try:
            samples, grads, divs, sample_s, fit_s, ok, *extra = fn()
            row.update(_metrics(target, samples), **(extra[0] if extra else {}))
            row.update(
                grad_evals=grads,
                divergences=divs,
                sample_s=sample_s,
                fit_s=fit_s,
                precond_ok=ok,
            )
        except Exception as error:  # report a failure in the table, never hide it
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
        print(f"    done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        rows.append(row)
        print(_fmt(row), flush=True)

    def nuts() -> tuple:
        samples, grads, divs, secs = _pyro_nuts(target.model, cfg, seed)
        return samples, grads, divs, secs, 0.0, None

    def neutra(guide_cls: type[fg.AutoFlow]) -> Callable[[], tuple]:
        def go() -> tuple:
            guide, fit_s = _fit_flow(target, guide_cls, cfg, seed)
            fits[guide_cls] = (guide, fit_s)
            sampler = NeuTraMCMC(
                target.model,
                guide,
                kernel="nuts",
                num_samples=cfg.samples,
                warmup_steps=cfg.warmup,
                progress=False,
                max_tree_depth=cfg.max_tree_depth,
                **({} if cfg.target_accept is None else {"target_accept_prob": cfg.target_accept}),
                jit_compile=cfg.jit_compile,
            )
            samples, grads, divs, secs, ok, extra = _ours(sampler, seed)
            return samples, grads, divs, secs, fit_s, ok, extra

        return go

    def many_chain(guide_cls: type[fg.AutoFlow]) -> Callable[[], tuple]:
        def go() -> tuple:
            if guide_cls not in fits:  # the same guide's NeuTra NUTS was not asked for
                fits[guide_cls] = _fit_flow(target, guide_cls, cfg, seed)
            guide, fit_s = fits[guide_cls]
            accept, retry = cfg.mc_target_accept, cfg.mc_retry_factor
            sampler = ManyChainHMC(
                target.model,
                guide,
                num_chains=cfg.chains,
                num_samples=cfg.mc_samples,
                warmup_steps=cfg.mc_warmup,
                progress=False,
                **({} if accept is None else {"target_accept_prob": accept}),
                **({} if retry is None else {"retry_factor": retry}),
                jit_compile=cfg.jit_compile,
            )
            samples, grads, divs, secs, ok, extra = _ours(sampler, seed)
            return samples, grads, divs, secs, fit_s, ok, extra

        return go

    def pyro_neutra() -> tuple:
        samples, grads, divs, sample_s, fit_s = _pyro_neutra(target, cfg, seed)
        return samples, grads, divs, sample_s, fit_s, None

    def numpyro_nuts() -> tuple:
        samples, grads, divs, secs = _numpyro_nuts(np_, target, cfg, seed)
        return samples, grads, divs, secs, 0.0, None

    def numpyro_neutra() -> tuple:
        samples, grads, divs, sample_s, fit_s = _numpyro_neutra(np_, target, cfg, seed)
        return samples, grads, divs, sample_s, fit_s, None

    # a guide's fit is shared by its NeuTra NUTS and its ManyChainHMC, so those two run back to
    # back (a later clear_param_store would orphan the fitted guide's parameters)
    plan: dict[str, Callable[[], tuple]] = {
        "pyro NUTS": nuts,
        "NeuTra NUTS (AutoIAF)": neutra(fg.AutoIAF),
        "ManyChainHMC (AutoIAF)": many_chain(fg.AutoIAF),
        "NeuTra NUTS (AutoNeuralSpline)": neutra(fg.AutoNeuralSpline),
        "ManyChainHMC (AutoNeuralSpline)": many_chain(fg.AutoNeuralSpline),
        "pyro NeuTraReparam (AutoIAFNormal)": pyro_neutra,
        "numpyro NUTS": numpyro_nuts,
        "numpyro NeuTra (AutoIAFNormal)": numpyro_neutra,
    }
    np_ = _numpyro() if set(NUMPYRO_METHODS) & set(methods) else None
    for method, fn in plan.items():
        if method not in methods:
            continue
        if method in NUMPYRO_METHODS and (np_ is None or target.numpyro_model is None):
            why = "NumPyro is not installed" if np_ is None else "no NumPyro version of the model"
            print(f"note: {method} skipped on {target.name}: {why}", file=sys.stderr)
            continue
        record(method, fn)
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda r: order[r["method"]])


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
HEADER = [
    "| target | method | seed | fit s | sample s | grad evals | min ESS | ESS/grad | ESS/s "
    "sampling | ESS/s fit+sampling | div | worst mean err (sd) | sd ratio range | sd(y)/3 |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- "
    "| ---: |",
]


def _derived(row: dict[str, Any]) -> dict[str, float]:
    if "ess_per_grad" in row:  # a row of medians carries its own
        return {k: row[k] for k in ("ess_per_grad", "ess_per_s", "ess_per_s_total")}
    ess, grads = row["min_ess"], row["grad_evals"]
    sample_s, fit_s = row["sample_s"], row["fit_s"]
    return {
        "ess_per_grad": ess / grads if grads else math.nan,
        "ess_per_s": ess / sample_s,
        "ess_per_s_total": ess / (sample_s + fit_s),
    }


def _fmt(row: dict[str, Any]) -> str:
    seed = row.get("seed", "median")
    if "error" in row:
        return f"| {row['target']} | {row['method']} | {seed} | failed: {row['error']} |"
    d = _derived(row)
    sd_y = f"{row['sd_y_ratio']:.3f}" if "sd_y_ratio" in row else ""
    fit = f"{row['fit_s']:.0f}" if row["fit_s"] else "-"
    return (
        f"| {row['target']} | {row['method']} | {seed} | {fit} | {row['sample_s']:.0f} | "
        f"{row['grad_evals']:.0f} | {row['min_ess']:.0f} | {d['ess_per_grad']:.2e} | "
        f"{d['ess_per_s']:.2f} | {d['ess_per_s_total']:.2f} | {_divergences(row)} | "
        f"{row['mean_err']:.3f} | {row['sd_min']:.2f} - {row['sd_max']:.2f} | {sd_y} |"
    )


def _divergences(row: dict[str, Any]) -> str:
    first = row.get("first_stage_divergences")
    return f"{row['divergences']:.0f}" + ("" if first is None else f" ({first:.0f})")


def _medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per target and method, the median over seeds of every number (failed seeds left out)."""
    out = []
    keys = list(dict.fromkeys((r["target"], r["method"]) for r in rows))
    for target, method in keys:
        good = [
            r for r in rows if (r["target"], r["method"]) == (target, method) and "error" not in r
        ]
        if not good:
            continue
        med: dict[str, Any] = {"target": target, "method": method, "seed": f"median of {len(good)}"}
        for k in ("fit_s", "sample_s", "grad_evals", "min_ess", "divergences", "mean_err"):
            med[k] = statistics.median(r[k] for r in good)
        med["sd_min"] = statistics.median(r["sd_min"] for r in good)
        med["sd_max"] = statistics.median(r["sd_max"] for r in good)
        if "first_stage_divergences" in good[0]:
            med["first_stage_divergences"] = statistics.median(
                r["first_stage_divergences"] for r in good
            )
        if "sd_y_ratio" in good[0]:
            med["sd_y_ratio"] = statistics.median(r["sd_y_ratio"] for r in good)
        for k in ("ess_per_grad", "ess_per_s", "ess_per_s_total"):
            med[k] = statistics.median(_derived(r)[k] for r in good)
        out.append(med)
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "not met"


def _goals(rows: list[dict[str, Any]]) -> list[str]:
    """The funnel results read against the NeuTra goals, per seed."""
    lines = []
    funnel = [r for r in rows if r["target"].startswith("funnel") and "error" not in r]
    ours = (
        "NeuTra NUTS (AutoIAF)",
        "NeuTra NUTS (AutoNeuralSpline)",
        "ManyChainHMC (AutoIAF)",
        "ManyChainHMC (AutoNeuralSpline)",
    )
    for seed in dict.fromkeys(r["seed"] for r in funnel):
        by = {r["method"]: r for r in funnel if r["seed"] == seed}
        nuts = by.get("pyro NUTS")
        pyro_route = by.get("pyro NeuTraReparam (AutoIAFNormal)")
        for method in ours:
            r = by.get(method)
            if r is None:
                continue
            d = _derived(r)
            parts = [f"funnel, seed {seed}, {method}:"]
            if nuts is not None:
                ratio = d["ess_per_grad"] / _derived(nuts)["ess_per_grad"]
                parts.append(
                    f"ESS/grad {ratio:.1f}x plain NUTS (goal >= 10x: {_verdict(ratio >= 10)});"
                )
            divs = r["divergences"]
            first = r.get("first_stage_divergences")
            parts.append(
                f"{divs:.0f} divergences (goal 0: {_verdict(divs == 0)}"
                + ("" if first is None else f"; {first:.0f} first trajectories diverged")
                + ");"
            )
            err = abs(r["sd_y_ratio"] - 1)
            parts.append(f"sd(y) off by {100 * err:.1f}% (goal <= 5%: {_verdict(err <= 0.05)});")
            if pyro_route is not None:
                speed = d["ess_per_s_total"] / _derived(pyro_route)["ess_per_s_total"]
                parts.append(
                    f"fit+sampling {speed:.1f}x Pyro's NeuTraReparam route in ESS per second "
                    f"(goal >= 5x: {_verdict(speed >= 5)});"
                )
            peer = by.get("numpyro NeuTra (AutoIAFNormal)")
            if peer is not None and method.startswith("ManyChainHMC"):
                p = _derived(peer)
                ahead = d["ess_per_s"] / p["ess_per_s"]
                ahead_total = d["ess_per_s_total"] / p["ess_per_s_total"]
                parts.append(
                    f"ESS per second {ahead:.2f}x NumPyro's NeuTra in sampling and "
                    f"{ahead_total:.2f}x with the fits (goal: ahead: {_verdict(ahead > 1)} and "
                    f"{_verdict(ahead_total > 1)})"
                )
            lines.append(" ".join(parts).rstrip(";"))
    return lines


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "posteriordb")
    parser.add_argument("--quick", action="store_true", help="a smoke run: funnel, short runs")
    parser.add_argument("--warmup", type=int, default=500, help="warm-up iterations per chain")
    parser.add_argument("--samples", type=int, default=1000, help="draws per chain")
    parser.add_argument("--fit-steps", type=int, default=2000, help="SVI steps per guide fit")
    parser.add_argument("--particles", type=int, default=16, help="ELBO particles per step")
    parser.add_argument("--chains", type=int, default=32, help="ManyChainHMC's chains")
    parser.add_argument("--mc-warmup", type=int, default=200, help="ManyChainHMC's warm-up")
    parser.add_argument("--mc-samples", type=int, default=100, help="ManyChainHMC's draws/chain")
    parser.add_argument(
        "--max-tree-depth", type=int, default=10, help="every NUTS run's (Pyro's default 10)"
    )
    parser.add_argument(
        "--target-accept", type=float, help="NeuTraMCMC's NUTS target acceptance (its default)"
    )
    parser.add_argument(
        "--mc-target-accept", type=float, help="ManyChainHMC's target acceptance (its default)"
    )
    parser.add_argument(
        "--mc-retry-factor",
        type=int,
        help="ManyChainHMC's retry_factor (1: no delayed rejection; default: its default)",
    )
    parser.add_argument(
        "--jit-compile",
        action="store_true",
        help="NeuTraMCMC and ManyChainHMC with jit_compile=True (their potential traced)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="*", help="targets whose name contains one of these")
    parser.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    parser.add_argument("--output", type=Path, help="also write the tables here (markdown)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        cfg = Config(100, 100, 500, args.particles, 16, 50, 25, max_tree_depth=6)
        only = args.only or ["funnel"]
    else:
        cfg = Config(
            args.warmup,
            args.samples,
            args.fit_steps,
            args.particles,
            args.chains,
            args.mc_warmup,
            args.mc_samples,
            args.max_tree_depth,
            args.target_accept,
            args.mc_target_accept,
            args.mc_retry_factor,
            jit_compile=args.jit_compile,
        )
        only = args.only
    chosen = targets(args.root, only)
    np_ = _numpyro() if set(NUMPYRO_METHODS) & set(args.methods) else None
    peer = np_.version + " (float64, 1 thread)" if np_ is not None else "NumPyro not compared"
    intro = [
        f"warm-up {cfg.warmup}, draws {cfg.samples} (one chain); fit {cfg.fit_steps} steps x "
        f"{cfg.particles} particles; ManyChainHMC {cfg.chains} chains x ({cfg.mc_warmup} warm-up "
        f"+ {cfg.mc_samples} draws); NUTS max tree depth {cfg.max_tree_depth}; target "
        f"acceptance {cfg.target_accept or 'default'} (NeuTra NUTS), "
        f"{cfg.mc_target_accept or 'default'} (ManyChainHMC), ManyChainHMC retry factor "
        f"{cfg.mc_retry_factor or 'default'}; jit_compile {cfg.jit_compile}; seeds "
        f"{args.seeds}; torch {torch.__version__}, pyro {pyro.__version__}, "
        f"{torch.get_num_threads()} thread; {peer}",
        "",
    ]
    print("\n".join(intro + HEADER), flush=True)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for target in chosen:
        for seed in args.seeds:
            rows.extend(run_target(target, args.methods, cfg, seed))
    lines = intro + HEADER + [_fmt(r) for r in rows]
    if len(args.seeds) > 1:
        lines += ["", "Medians over seeds:", "", *HEADER, *(_fmt(r) for r in _medians(rows))]
    goals = _goals(rows) + (_goals(_medians(rows)) if len(args.seeds) > 1 else [])
    if goals:
        lines += ["", "Funnel against the goals:", "", *(f"* {g}" for g in goals)]
    lines += ["", f"total wall time {time.perf_counter() - start:.0f} s"]
    print("\n" + "\n".join(lines), flush=True)
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
