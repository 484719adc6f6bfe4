"""Diagnostics: importance weights against closed forms, Pareto k-hat readings, resampling,
ArviZ output, constrained and plated sites, and the one-draw-at-a-time fallback."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_value,
)

import flowguide as fg
from flowguide import diagnostics as D

# -- a conjugate model with a closed-form posterior and marginal likelihood --------------------
Y = torch.tensor(
    [
        *([0.3, 1.2], [1.5, 0.8], [0.9, 2.1], [1.1, 1.4], [0.2, 0.9]),
        *([1.8, 1.0], [0.7, 1.6], [1.3, 0.5], [0.4, 1.2], [1.0, 1.9]),
    ],
    dtype=torch.float64,
)
TAU = 2.0  # prior sd of mu; the likelihood sd is 1


def conjugate(y: torch.Tensor = Y) -> None:
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2, dtype=y.dtype), TAU).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)


_PRECISION = 1 / TAU**2 + Y.shape[0]
POST_MEAN = Y.sum(0) / _PRECISION
POST_SD = _PRECISION**-0.5
_COV = torch.eye(Y.shape[0], dtype=torch.float64) + TAU**2
LOG_Z = sum(
    float(dist.MultivariateNormal(torch.zeros(Y.shape[0], dtype=torch.float64), _COV).log_prob(c))
    for c in Y.T
)

GUIDES = {
    "planar": lambda m, **kw: fg.AutoPlanar(m, num_flows=2, **kw),
    "radial": lambda m, **kw: fg.AutoRadial(m, num_flows=2, **kw),
    "iaf": lambda m, **kw: fg.AutoIAF(m, num_flows=2, hidden=(16,), **kw),
    "nsf": lambda m, **kw: fg.AutoNeuralSpline(m, num_flows=2, hidden=(16,), **kw),
}


@pytest.fixture(autouse=True)
def _clean():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: a second intra-op thread only costs (badly so on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def at_zero(name: str):
    """Pyro's init strategy putting site ``name`` at 0."""
    return init_to_value(values={name: torch.tensor(0.0)})


def set_posterior(guide: fg.AutoFlow, loc: torch.Tensor, scale: torch.Tensor | float) -> None:
    """Set an AutoFlow's diagonal Normal (its flow is the identity until trained)."""
    if guide.prototype_trace is None:
        guide(Y)
    with torch.no_grad():
        guide.affine.loc.copy_(loc)
        guide.affine.log_scale.copy_(torch.as_tensor(scale, dtype=torch.float64).log())


# -- weights against closed forms --------------------------------------------------------------
def test_exact_guide_weighs_every_draw_by_the_evidence():
    guide = GUIDES["iaf"](conjugate)
    set_posterior(guide, POST_MEAN, POST_SD)
    draws, log_w = D.log_importance_weights(conjugate, guide, num_samples=300, batch_size=128)
    assert draws["mu"].shape == (300, 2) and log_w.shape == (300,)
    # q = p(mu | y) exactly, so log w = log p(y) for every draw
    torch.testing.assert_close(log_w, torch.full_like(log_w, LOG_Z), atol=1e-9, rtol=0)
    check = D.check_fit(conjugate, guide, num_samples=300)
    assert check.khat == -math.inf and check.reading == "good"
    assert check.ess == pytest.approx(300)
    assert check.log_marginal_likelihood == pytest.approx(LOG_Z, abs=1e-9)
    assert check.elbo == pytest.approx(LOG_Z, abs=1e-9)


def prior_only() -> None:
    pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    pyro.sample("loc", dist.Normal(torch.zeros(2), 1.0).to_event(1))


@pytest.mark.parametrize(
    "make",
    [
        lambda m, **kw: fg.AutoIAF(m, hidden=(8,), **kw),
        lambda m, **kw: fg.AutoPlanar(m, num_flows=2, **kw),
        AutoDiagonalNormal,
        AutoMultivariateNormal,
    ],
    ids=["AutoIAF", "AutoPlanar", "AutoDiagonalNormal", "AutoMultivariateNormal"],
)
def test_jacobian_accounting_on_constrained_sites(make):
    # the guide's start is the prior itself in unconstrained space (log scale ~ N(0, 1)), so with
    # the biject_to Jacobian counted, p / q = 1: any guide family, flowguide's or Pyro's
    start = init_to_value(values={"scale": torch.tensor(1.0), "loc": torch.zeros(2)})
    guide = make(prior_only, init_loc_fn=start, init_scale=1.0)
    draws, log_w = D.log_importance_weights(prior_only, guide, num_samples=200)
    assert (draws["scale"] > 0).all() and draws["loc"].shape == (200, 2)
    torch.testing.assert_close(log_w, torch.zeros_like(log_w), atol=1e-5, rtol=0)


def test_guide_near_the_truth_is_good_and_estimates_the_evidence():
    guide = GUIDES["iaf"](conjugate)
    set_posterior(guide, POST_MEAN + 0.2 * POST_SD, 1.2 * POST_SD)
    check = D.check_fit(conjugate, guide, num_samples=2000)
    assert check.khat < 0.5 and check.reading == "good"
    assert check.log_marginal_likelihood == pytest.approx(LOG_Z, abs=0.02)
    assert LOG_Z - 0.2 < check.elbo < LOG_Z  # the KL is about 0.1 here
    assert 0.5 * 2000 < check.ess < 2000
    assert check.num_nonfinite == 0
    assert "good" in str(check) and "non-finite log weights   none" in str(check)


def test_fitted_guide_is_good_and_estimates_the_evidence():
    guide = GUIDES["planar"](conjugate)
    fg.fit(conjugate, guide, num_steps=300, lr=0.05, progress=False, seed=0)
    check = D.check_fit(conjugate, guide, num_samples=2000)
    assert check.khat < 0.5 and check.reading == "good"
    assert check.log_marginal_likelihood == pytest.approx(LOG_Z, abs=0.03)
    assert LOG_Z - 0.1 < check.elbo <= check.log_marginal_likelihood  # Jensen, on the sample


@pytest.mark.parametrize("kind", sorted(GUIDES))
def test_every_flow_guide(kind):
    # a flow moved off the identity around the exact posterior: the IS estimate of log p(y) is
    # only right when the flow's log-det enters the weights correctly
    guide = GUIDES[kind](conjugate)
    set_posterior(guide, POST_MEAN, POST_SD)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in guide.flow.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    _, log_w = D.log_importance_weights(conjugate, guide, num_samples=2000)
    assert log_w.std() > 1e-3  # the flow does something
    check = D._summarise(log_w)
    assert check.reading != "bad", check
    assert check.log_marginal_likelihood == pytest.approx(LOG_Z, abs=0.05)
    # and the mean by importance resampling is the posterior mean
    pyro.set_rng_seed(2)
    mu = D.importance_resample(conjugate, guide, num_samples=2000)["mu"]
    torch.testing.assert_close(mu.mean(0), POST_MEAN, atol=0.05, rtol=0)


def wide() -> None:
    pyro.sample("x", dist.Normal(0.0, 10.0))


def test_far_too_narrow_guide_reads_bad():
    guide = fg.AutoIAF(wide, init_scale=0.01)
    check = D.check_fit(wide, guide, num_samples=1000)
    assert check.khat >= 0.7 and check.reading == "bad"
    assert check.ess < 100
    assert "bad" in str(check) and "misses posterior mass" in str(check)
    with pytest.warns(D.ImportanceWeightWarning, match="bad"):
        D.importance_resample(wide, guide, num_samples=500)


# -- PSIS and the readings ---------------------------------------------------------------------
@pytest.mark.parametrize("k", [0.2, 0.5, 0.8])
def test_psis_khat_recovers_a_pareto_tail(k):
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert D.psis_khat(-k * u.log()) == pytest.approx(k, abs=0.15)


def test_psis_smooth_matches_arviz_and_handles_zero_weights():
    lw = torch.randn(1000, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2
    smoothed, khat = D.psis_smooth(lw)
    ref, ref_k = D._arviz().psislw(lw.numpy(), reff=1.0)
    np.testing.assert_allclose(smoothed.numpy(), ref)
    assert khat == pytest.approx(float(ref_k))
    # draws outside the support (-inf) are zero weights, not errors
    lw[:50] = -math.inf
    smoothed, khat = D.psis_smooth(lw)
    assert math.isfinite(khat) and (smoothed[:50] == -math.inf).all()
    assert float(smoothed.logsumexp(0)) == pytest.approx(0.0, abs=1e-12)
    # equal weights: nothing to smooth
    smoothed, khat = D.psis_smooth(torch.full((10,), 3.0))
    assert khat == -math.inf
    torch.testing.assert_close(smoothed, torch.full((10,), -math.log(10), dtype=torch.float64))


@pytest.mark.parametrize(
    "bad", [[0.0, math.nan, 1.0], [0.0, math.inf], [-math.inf, -math.inf], [], [[0.0]]]
)
def test_psis_rejects_what_it_cannot_smooth(bad):
    with pytest.raises(ValueError):
        D.psis_khat(bad)


def test_khat_readings_and_threshold():
    assert D.khat_threshold() == 0.7
    assert D.khat_threshold(100) == pytest.approx(0.5)
    assert D.khat_threshold(1000) == pytest.approx(2 / 3)
    assert D.khat_threshold(10_000) == 0.7
    assert [D.khat_reading(k) for k in (-math.inf, 0.49, 0.5, 0.69, 0.7, 3.0, math.nan)] == [
        "good",
        "good",
        "ok",
        "ok",
        "bad",
        "bad",
        "bad",
    ]
    assert D.khat_reading(0.68, num_samples=1000) == "bad"
    assert D.khat_reading(0.68, num_samples=5000) == "ok"
    with pytest.raises(ValueError):
        D.khat_threshold(1)


# -- non-finite weights are counted, not masked ------------------------------------------------
def truncated() -> None:
    x = pyro.sample("x", dist.Normal(0.0, 1.0))
    pyro.factor("cut", torch.where(x > 1.0, -math.inf, 0.0))


def broken() -> None:
    x = pyro.sample("x", dist.Normal(0.0, 1.0))
    pyro.factor("cut", torch.where(x > 1.0, math.nan, 0.0))


def test_draws_outside_the_support_are_reported():
    guide = fg.AutoIAF(truncated, init_loc_fn=at_zero("x"), init_scale=1.0)
    check = D.check_fit(truncated, guide, num_samples=2000)
    assert 200 < check.num_neginf < 450 and check.num_nan == check.num_posinf == 0
    assert check.elbo == -math.inf  # q has mass where p has none
    # the evidence is P(x < 1) under N(0, 1)
    assert check.log_marginal_likelihood == pytest.approx(math.log(0.8413), abs=0.03)
    # the finite weights are all equal (q is the prior): a bounded tail
    assert check.khat == -math.inf and check.reading == "good"
    assert check.ess == pytest.approx(2000 - check.num_neginf)
    assert f"{check.num_neginf} of 2000 ({check.num_neginf} -inf)" in str(check)


def test_nan_weights_are_reported():
    guide = fg.AutoIAF(broken, init_loc_fn=at_zero("x"), init_scale=1.0)
    with pyro.validation_enabled(False):  # else Pyro warns about the NaN itself
        check = D.check_fit(broken, guide, num_samples=500)
    assert check.num_nan > 0 and math.isnan(check.khat) and check.reading == "bad"
    assert math.isnan(check.log_marginal_likelihood) and math.isnan(check.ess)
    assert "NaN" in str(check) and "not usable" in str(check)
    with pyro.validation_enabled(False), pytest.raises(ValueError, match="NaN"):
        D.importance_resample(broken, guide, num_samples=100)


# -- constrained sites, plates, ArviZ ----------------------------------------------------------
YG = torch.tensor(
    [[0.1, 1.2, -0.8], [0.4, 0.9, -1.1], [-0.2, 1.5, -0.5], [0.3, 1.1, -0.9], [0.0, 0.7, -1.3]]
)
COUNTS = torch.tensor([3.0, 2.0, 4.0, 1.0])


def hierarchical(y: torch.Tensor = YG) -> None:
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    probs = pyro.sample("probs", dist.Dirichlet(torch.ones(4)))
    with pyro.plate("groups", 3):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("obs", y.shape[0], dim=-2):
            pyro.sample("y", dist.Normal(mu, sigma), obs=y)
    pyro.sample("counts", dist.Multinomial(10, probs), obs=COUNTS)


def hierarchical_scalar(y: torch.Tensor = YG) -> None:
    """The same model, written so that it cannot be vectorised (float() of a sampled value)."""
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    probs = pyro.sample("probs", dist.Dirichlet(torch.ones(4)))
    with pyro.plate("groups", 3):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("obs", y.shape[0], dim=-2):
            pyro.sample("y", dist.Normal(mu, float(sigma)), obs=y)
    pyro.sample("counts", dist.Multinomial(10, probs), obs=COUNTS)


@pytest.fixture(scope="module")
def hierarchical_guide() -> fg.AutoFlow:
    pyro.clear_param_store()
    guide = GUIDES["iaf"](hierarchical)
    fg.fit(hierarchical, guide, num_steps=300, progress=False, seed=0)
    return guide


def test_constrained_and_plated_sites(hierarchical_guide):
    draws, log_w = D.log_importance_weights(
        hierarchical, hierarchical_guide, num_samples=300, batch_size=64
    )
    assert {k: tuple(v.shape) for k, v in draws.items()} == {
        "sigma": (300,),
        "probs": (300, 4),
        "mu": (300, 3),
    }
    assert (draws["sigma"] > 0).all()
    assert (draws["probs"] >= 0).all()
    torch.testing.assert_close(draws["probs"].sum(-1), torch.ones(300))
    assert torch.isfinite(log_w).all()


def test_fallback_agrees_with_the_vectorised_path(hierarchical_guide):
    pyro.set_rng_seed(5)
    draws, log_w = D.log_importance_weights(
        hierarchical, hierarchical_guide, num_samples=120, batch_size=50
    )
    pyro.set_rng_seed(5)
    with pytest.warns(D.VectorizationWarning, match="one draw at a time"):
        draws_loop, log_w_loop = D.log_importance_weights(
            hierarchical_scalar, hierarchical_guide, num_samples=120, batch_size=50
        )
    torch.testing.assert_close(log_w_loop, log_w, rtol=1e-5, atol=1e-4)
    for name, value in draws.items():
        torch.testing.assert_close(draws_loop[name], value)


def branching() -> None:
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    if z > 0:  # Python control flow on a sampled value: cannot be vectorised
        pyro.sample("obs", dist.Normal(1.0, 1.0), obs=torch.tensor(0.5))
    else:
        pyro.sample("obs", dist.Normal(-1.0, 1.0), obs=torch.tensor(0.5))


def test_fallback_for_a_model_with_control_flow():
    # q is the prior N(0, 1), so log w is the log-likelihood of the branch taken
    guide = fg.AutoIAF(branching, init_loc_fn=at_zero("z"), init_scale=1.0)
    with pytest.warns(D.VectorizationWarning, match="one draw at a time"):
        draws, log_w = D.log_importance_weights(branching, guide, num_samples=20, batch_size=7)
    z = draws["z"]
    assert z.shape == (20,) and log_w.shape == (20,)
    expected = dist.Normal(torch.where(z > 0, 1.0, -1.0), 1.0).log_prob(torch.tensor(0.5))
    torch.testing.assert_close(log_w, expected, atol=1e-5, rtol=0)


def test_inference_data(hierarchical_guide):
    idata = D.to_inference_data(hierarchical, hierarchical_guide, num_samples=400)
    post = idata.posterior
    assert set(post.data_vars) == {"sigma", "probs", "mu"}
    assert post["sigma"].dims == ("chain", "draw") and post["sigma"].shape == (1, 400)
    assert post["mu"].dims == ("chain", "draw", "groups") and post["mu"].shape == (1, 400, 3)
    assert post["probs"].dims == ("chain", "draw", "probs_dim_0")
    assert post["probs"].shape == (1, 400, 4)
    assert (post["sigma"] > 0).all() and np.allclose(post["probs"].sum("probs_dim_0"), 1.0)
    log_w = idata.sample_stats["log_weight"]
    assert log_w.dims == ("chain", "draw") and log_w.shape == (1, 400)
    assert np.isfinite(log_w).all()
    attrs = idata.attrs
    assert attrs["khat_reading"] == D.khat_reading(attrs["khat"], 400)
    assert attrs["num_samples"] == 400 and attrs["guide"] == "AutoIAF"
    assert attrs["num_nonfinite_log_weights"] == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = D._arviz().summary(idata)
    assert not caught, [str(w.message) for w in caught]
    probs = [f"probs[{i}]" for i in range(4)]
    assert list(summary.index) == ["sigma", *probs, "mu[0]", "mu[1]", "mu[2]"]


# -- resampling and errors ---------------------------------------------------------------------
def test_importance_resampling_corrects_a_biased_guide():
    guide = GUIDES["iaf"](conjugate)
    set_posterior(guide, POST_MEAN + POST_SD, 1.5 * POST_SD)  # shifted by one sd, too wide
    draws = D.importance_resample(conjugate, guide, num_samples=4000, num_draws=3000)
    assert draws["mu"].shape == (3000, 2)
    guide_error = (guide.affine.loc.detach() - POST_MEAN).abs()
    error = (draws["mu"].mean(0) - POST_MEAN).abs()
    assert (error < 0.2 * guide_error).all(), (error, guide_error)
    # the raw (unsmoothed) weights work too
    raw = D.importance_resample(conjugate, guide, num_samples=4000, smooth=False)["mu"]
    assert ((raw.mean(0) - POST_MEAN).abs() < 0.2 * guide_error).all()


def test_subsampling_is_flagged():
    def subsampled():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 100, subsample_size=10):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=torch.zeros(10))

    guide = fg.AutoIAF(subsampled, hidden=(8,))
    with pytest.warns(UserWarning, match="subsamples the plate"):
        D.log_importance_weights(subsampled, guide, num_samples=10)


def test_errors():
    with pytest.raises(TypeError, match="AutoContinuous"):
        D.check_fit(conjugate, AutoNormal(conjugate))
    guide = GUIDES["iaf"](conjugate)
    with pytest.raises(ValueError, match="num_samples"):
        D.log_importance_weights(conjugate, guide, num_samples=0)
    with pytest.raises(ValueError, match="batch_size"):
        D.log_importance_weights(conjugate, guide, batch_size=1.5)

    def bigger():
        conjugate()
        pyro.sample("extra", dist.Normal(0.0, 1.0))

    guide(Y)
    with pytest.raises(ValueError, match="does not cover"):
        D.log_importance_weights(bigger, guide, num_samples=10)
