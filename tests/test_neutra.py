"""NeuTra: the reparameterised potential, NUTS/HMC in the flow's base space, the many-chain
sampler, their diagnostics and ArviZ output, and bad inputs."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import randomize
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro import poutine
from pyro.infer.mcmc.util import initialize_model

import flowguide as fg
from flowguide import neutra
from flowguide.neutra import ManyChainHMC, NeuTraMCMC, NeuTraPotential

F64 = torch.float64
MU = torch.tensor([1.0, -2.0])
SD = torch.tensor([1.0, 2.0])
RHO = 0.8
COV = torch.tensor([[1.0, RHO * 2.0], [RHO * 2.0, 4.0]])  # sds SD, correlation RHO
Y = torch.tensor([0.3, -0.5, 1.2, 0.1], dtype=F64)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP spinning on busy shared cores (25x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)


def gaussian():
    """A 2-D correlated Gaussian with known mean MU, sds SD and correlation RHO."""
    pyro.sample("x", dist.MultivariateNormal(MU, COV))


def supports(y=Y):
    """Sites with constrained supports, plates and an event dim, in float64; vectorisable."""
    one = torch.ones((), dtype=F64)
    scale = pyro.sample("scale", dist.LogNormal(0 * one, 0.5 * one))
    pyro.sample("probs", dist.Dirichlet(torch.ones(3, dtype=F64)))
    with pyro.plate("groups", 2):
        w = pyro.sample("w", dist.Normal(0 * one, one))
        pyro.sample("u", dist.Beta(2 * one, 2 * one))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(w.mean(-1, keepdim=True), scale), obs=y)


def small_iaf(model, **kwargs):
    return fg.AutoIAF(model, num_flows=2, hidden=(16,), **kwargs)


@pytest.fixture(scope="module")
def gauss_guide():
    """An IAF fitted to the Gaussian (it can represent it exactly)."""
    pyro.clear_param_store()  # fit registers the guide's parameters by name
    guide = small_iaf(gaussian)
    fg.fit(gaussian, guide, num_steps=200, num_particles=4, progress=False, seed=0)
    pyro.clear_param_store()
    return guide


@pytest.fixture(scope="module")
def supports_guide():
    """An IAF for ``supports`` moved off its initialisation (not fitted: NeuTra is exact anyway)."""
    torch.manual_seed(0)
    guide = small_iaf(supports, init_scale=0.5)  # about the posterior's scale
    guide(Y)
    randomize(guide.transform, scale=0.1)
    return guide


@pytest.fixture(scope="module")
def nuts_run(gauss_guide):
    pyro.set_rng_seed(1)
    mcmc = NeuTraMCMC(
        gaussian, gauss_guide, num_samples=300, warmup_steps=150, save_warmup=True, progress=False
    )
    return mcmc.run()


def check_moments(samples, ess):
    """Mean and sd of ``x`` within 5 Monte Carlo standard errors (from ArviZ's bulk ESS)."""
    x = samples["x"].double()
    mean, sd = x.mean(0), x.std(0)
    n = ess["x"]
    assert ((mean - MU.double()).abs() < 5 * SD / n.sqrt()).all(), (mean, n)
    assert ((sd / SD - 1).abs() < 5 / (2 * n).sqrt()).all(), (sd, n)


# -- the potential -----------------------------------------------------------------------------
def test_potential_is_the_neutra_identity(supports_guide):
    r"""U(eps) = -log p(x, c(z)) - log|J_c(z)| - log|det dT/deps| at z = T(eps), against Pyro's own
    unconstrained potential and an autograd Jacobian, in float64."""
    guide = supports_guide
    potential = NeuTraPotential(supports, guide, (Y,))
    _, pyro_potential, _, _ = initialize_model(supports, (Y,))
    transform = guide.get_transform().with_cache(0)
    eps = torch.randn(4, guide.latent_dim, dtype=F64)
    expected = []
    for e in eps:
        z = transform(e)
        jacobian = torch.autograd.functional.jacobian(transform, e)
        params = {site["name"]: value for site, value in guide._unpack_latent(z)}
        expected.append(pyro_potential(params) - torch.linalg.slogdet(jacobian)[1])
    expected = torch.stack(expected).detach()
    assert potential(eps[0]).dtype == F64
    torch.testing.assert_close(torch.stack([potential(e) for e in eps]), expected)
    torch.testing.assert_close(potential(eps), expected)  # one vectorised model run
    torch.testing.assert_close(potential(eps.reshape(2, 2, -1)), expected.reshape(2, 2))
    torch.testing.assert_close(potential.log_density(eps), -expected)


def test_potential_counts_gradient_calls(supports_guide):
    potential = NeuTraPotential(supports, supports_guide, (Y,))
    eps = torch.randn(5, supports_guide.latent_dim, dtype=F64)
    potential(eps)  # no gradient: not counted
    u, grad = potential.potential_and_grad(eps)
    assert u.shape == (5,) and grad.shape == eps.shape
    assert (potential.num_grad_calls, potential.num_grad_evals) == (1, 5)
    with pytest.raises(ValueError, match="shape"):
        potential(torch.zeros(3))


# -- NeuTraMCMC --------------------------------------------------------------------------------
def test_samples_under_model_names_shapes_and_supports(supports_guide):
    mcmc = NeuTraMCMC(
        supports,
        supports_guide,
        num_samples=15,
        warmup_steps=15,
        num_chains=2,
        max_tree_depth=3,  # a kernel option, passed to Pyro's NUTS
        progress=False,
    )
    mcmc.run(Y)
    samples = mcmc.get_samples()
    shapes = {"scale": (), "probs": (3,), "w": (2,), "u": (2,)}
    assert {k: tuple(v.shape[1:]) for k, v in samples.items()} == shapes
    assert all(v.shape[0] == 30 for v in samples.values())
    for name, value in samples.items():
        support = supports_guide.prototype_trace.nodes[name]["fn"].support
        assert support.check(value).all(), name
    grouped = mcmc.get_samples(group_by_chain=True)
    assert grouped["probs"].shape == (2, 15, 3)
    assert mcmc.get_base_samples(group_by_chain=True).shape == (2, 15, supports_guide.latent_dim)
    assert mcmc.get_samples(num_samples=7)["w"].shape == (7, 2)
    assert int(mcmc.get_sample_stats()["tree_depth"].max()) <= 3
    # the draws feed Pyro's Predictive as MCMC's do
    predictive = pyro.infer.Predictive(supports, posterior_samples=samples)
    assert predictive(Y)["y"].shape == (30, 4)


def test_nuts_recovers_the_gaussian(nuts_run):
    diag = nuts_run.diagnostics()
    check_moments(nuts_run.get_samples(), diag["ess_bulk"])
    assert diag["ess_bulk"]["x"].min() > 100  # a fitted flow: nearly independent draws


def test_hmc_recovers_the_gaussian(gauss_guide):
    mcmc = NeuTraMCMC(
        gaussian, gauss_guide, kernel="hmc", num_samples=300, warmup_steps=150, progress=False
    )
    # 300 correlated HMC draws estimate the base-space variances to about +-0.15, so the
    # preconditioner check gets bounds wider than its defaults (its warning is not under test)
    diag = mcmc.run().diagnostics(var_bounds=(0.3, 3.0))
    check_moments(mcmc.get_samples(), diag["ess_bulk"])
    assert "tree_depth" not in mcmc.get_sample_stats()


def test_diagnostics(nuts_run):
    diag = nuts_run.diagnostics()
    assert {
        "ess_bulk",
        "ess_tail",
        "r_hat",
        "divergences",
        "num_divergences",
        "acceptance_rate",
        "step_size",
        "bfmi",
        "num_grad_evals",
        "num_grad_calls",
        "wall_time",
        "preconditioner",
    } <= diag.keys()
    assert diag["ess_tail"]["x"].shape == (2,)
    assert abs(float(diag["r_hat"]["x"].max()) - 1) < 0.05  # one chain: its two halves
    assert diag["divergences"] == {"chain 0": []} and diag["num_divergences"] == 0
    stats = nuts_run.get_sample_stats()
    # one gradient at set-up, the rest counted per transition (n_steps), step-size search aside
    assert diag["num_grad_evals"] >= int(stats["n_steps"].sum()) + 1
    assert diag["num_grad_evals"] == diag["num_grad_calls"]
    assert diag["wall_time"] > 0 and 0 < diag["acceptance_rate"]["chain 0"] <= 1
    pre = diag["preconditioner"]
    assert pre["ok"] and pre["mean"].shape == pre["var"].shape == (2,)
    depth = torch.tensor([int(n).bit_length() for n in stats["n_steps"].reshape(-1)])
    assert (stats["tree_depth"].reshape(-1) == depth).all()


def test_bad_preconditioner_warns(gauss_guide):
    """A flow that is off by a factor 3 in scale leaves base-space variances near 9."""
    with torch.no_grad():
        gauss_guide.affine.log_scale.sub_(math.log(3))
    try:
        mcmc = NeuTraMCMC(gaussian, gauss_guide, num_samples=60, warmup_steps=60, progress=False)
        mcmc.run()
    finally:
        with torch.no_grad():
            gauss_guide.affine.log_scale.add_(math.log(3))
    with pytest.warns(UserWarning, match="preconditions poorly"):
        diag = mcmc.diagnostics()
    assert not diag["preconditioner"]["ok"] and diag["preconditioner"]["max_var"] > 2


def test_to_inference_data_and_summary(nuts_run, capsys):
    import arviz as az

    idata = nuts_run.to_inference_data(khat_samples=200)
    assert idata.posterior["x"].shape == (1, 300, 2)
    stats = idata.sample_stats
    for name in ("diverging", "step_size", "tree_depth", "n_steps", "energy", "acceptance_rate"):
        assert name in stats, name
    assert stats["diverging"].dtype == bool
    assert idata.warmup_posterior["x"].shape == (1, 150, 2)
    assert "step_size" in idata.warmup_sample_stats
    assert idata.attrs["num_grad_evals"] > 0
    pytest.importorskip("flowguide.diagnostics")
    assert idata.attrs["guide_khat"] < 0.7  # a fitted exact-family guide
    table = az.summary(idata)
    assert list(table.index) == ["x[0]", "x[1]"]
    assert float(az.bfmi(idata)[0]) > 0.3
    summary = nuts_run.summary(prob=0.8)
    assert {"mean", "sd", "10%", "median", "90%", "ess_bulk", "ess_tail", "r_hat"} <= set(
        summary.columns
    )
    assert "Number of divergences: 0" in capsys.readouterr().out


def test_several_chains_and_hmc_gradient_count(gauss_guide):
    """Chains run one after another, each with its own kernel; with a fixed number of leapfrog
    steps and no adaptation every chain costs exactly 1 + (warm-up + samples) * steps."""
    mcmc = NeuTraMCMC(
        gaussian,
        gauss_guide,
        kernel="hmc",
        num_samples=20,
        warmup_steps=10,
        num_chains=3,
        step_size=0.5,
        num_steps=3,
        adapt_step_size=False,
        adapt_mass_matrix=False,
        progress=False,
    )
    diag = mcmc.run().diagnostics(var_bounds=(0.2, 5.0))  # 60 draws: wide bounds
    assert mcmc.get_samples(group_by_chain=True)["x"].shape == (3, 20, 2)
    assert diag["num_grad_evals"] == 3 * (1 + 30 * 3)
    assert set(diag["r_hat"]) == {"x"} and torch.isfinite(diag["r_hat"]["x"]).all()
    assert (mcmc.get_sample_stats()["n_steps"] == 3).all()


def test_jit_compile_gives_the_same_chain(supports_guide):
    """The traced potential matches the Python one (float64, so the chains agree too)."""
    potential = NeuTraPotential(supports, supports_guide, (Y,))
    eps = torch.randn(supports_guide.latent_dim, dtype=F64)
    plain = potential.potential_and_grad(eps)
    with potential.frozen():
        potential.compile(eps)
        for _ in range(3):  # TorchScript optimises the graph after a first profiling run
            traced = potential.potential_and_grad(eps)
    torch.testing.assert_close(traced, plain)
    runs = []
    for jit in (False, True):
        pyro.set_rng_seed(3)
        mcmc = NeuTraMCMC(
            supports,
            supports_guide,
            num_samples=10,
            warmup_steps=10,
            jit_compile=jit,
            progress=False,
        )
        runs.append(mcmc.run(Y))
    torch.testing.assert_close(runs[0].get_base_samples(), runs[1].get_base_samples())
    assert runs[0]._num_grad_evals == runs[1]._num_grad_evals
    # the guide's parameters are trainable again afterwards
    assert all(p.requires_grad for p in supports_guide.parameters())
    with pytest.raises(RuntimeError, match="frozen"):
        potential.compile(eps)


# -- ManyChainHMC ------------------------------------------------------------------------------
def test_many_chain_recovers_the_gaussian(gauss_guide):
    sampler = ManyChainHMC(
        gaussian, gauss_guide, num_chains=32, num_samples=60, warmup_steps=120, progress=False
    )
    diag = sampler.run().diagnostics()
    check_moments(sampler.get_samples(), diag["ess_bulk"])
    assert sampler.get_samples(group_by_chain=True)["x"].shape == (32, 60, 2)
    # every call covers all 32 chains but delayed rejection's, which cover the retried ones
    assert 0 < diag["num_grad_evals"] <= 32 * diag["num_grad_calls"]
    assert diag["preconditioner"]["ok"] and diag["r_hat"]["x"].max() < 1.05
    assert 0.5 < sampler.adaptation[-1][1] < 5  # ChEES: about a quarter period of N(0, 1)
    idata = sampler.to_inference_data(khat_samples=0)
    assert idata.posterior["x"].shape == (32, 60, 2)
    assert {"diverging", "acceptance_rate", "energy", "step_size", "n_steps"} <= set(
        idata.sample_stats.data_vars
    )


def test_many_chain_supports_plates_and_jit(supports_guide):
    runs = []
    for jit in (False, True):
        pyro.set_rng_seed(4)
        sampler = ManyChainHMC(
            supports,
            supports_guide,
            num_chains=6,
            num_samples=5,
            warmup_steps=5,
            jit_compile=jit,
            save_warmup=True,
            progress=False,
        )
        runs.append(sampler.run(Y))
    samples = runs[0].get_samples(group_by_chain=True)
    assert {k: tuple(v.shape) for k, v in samples.items()} == {
        "scale": (6, 5),
        "probs": (6, 5, 3),
        "w": (6, 5, 2),
        "u": (6, 5, 2),
    }
    assert runs[0].get_warmup_samples()["u"].shape == (30, 2)
    torch.testing.assert_close(runs[0].get_base_samples(), runs[1].get_base_samples())


def test_many_chain_device_and_dtype_follow_the_guide(supports_guide):
    sampler = ManyChainHMC(
        supports, supports_guide, num_chains=4, num_samples=3, warmup_steps=3, progress=False
    )
    sampler.run(Y)
    assert sampler.get_base_samples().dtype == F64
    assert all(v.device.type == "cpu" for v in sampler.get_samples().values())


@pytest.mark.cuda
def test_many_chain_runs_on_cuda():
    loc, cov = MU.cuda(), COV.cuda()

    def model():
        pyro.sample("x", dist.MultivariateNormal(loc, cov))

    pyro.clear_param_store()
    guide = small_iaf(model)
    fg.fit(model, guide, num_steps=50, lr=0.1, progress=False, seed=0)
    sampler = ManyChainHMC(
        model, guide, num_chains=16, num_samples=10, warmup_steps=10, progress=False
    )
    sampler.run()
    assert sampler.get_base_samples().device.type == "cuda"
    assert sampler.get_samples()["x"].device.type == "cuda"
    assert sampler.to_inference_data(khat_samples=0).posterior["x"].shape == (16, 10, 2)


def test_many_chain_rejects_a_model_that_does_not_vectorise(gauss_guide):
    def branching():
        x = pyro.sample("x", dist.MultivariateNormal(MU, COV))
        if x[..., 0] > 0:  # Python control flow on a latent value
            pyro.factor("bonus", torch.tensor(0.0))

    with pytest.raises(ValueError, match=r"(?s)cannot be vectorised.*NeuTraMCMC"):
        ManyChainHMC(branching, gauss_guide, num_chains=4, progress=False).run()

    def summing():  # mixes the chains: the same values one by one, different in a batch
        x = pyro.sample("x", dist.MultivariateNormal(MU, COV))
        pyro.factor("penalty", -0.1 * x.square().sum())

    with pytest.raises(ValueError, match=r"(?s)cannot be vectorised.*NeuTraMCMC"):
        ManyChainHMC(summing, gauss_guide, num_chains=4, progress=False).run()


# -- bad input ---------------------------------------------------------------------------------
def test_unfitted_guide_warns():
    guide = small_iaf(gaussian)  # never fitted (nor set up)
    with pytest.warns(UserWarning, match="looks unfitted"):
        NeuTraMCMC(gaussian, guide, num_samples=2, warmup_steps=2, progress=False).run()


def test_guide_of_another_model_is_an_error(gauss_guide):
    def other():
        pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        pyro.sample("extra", dist.LogNormal(0.0, 1.0))

    mcmc = NeuTraMCMC(other, gauss_guide, num_samples=2, warmup_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"does not match.*'extra'.*'x' has shape \(3,\)"):
        mcmc.run()


def test_discrete_latent_is_an_error(gauss_guide):
    def mixture():
        pyro.sample("x", dist.MultivariateNormal(MU, COV))
        pyro.sample("k", dist.Categorical(torch.ones(3)))

    with pytest.raises(ValueError, match="discrete latent sites: 'k'"):
        NeuTraMCMC(mixture, gauss_guide, num_samples=2, warmup_steps=2, progress=False).run()


def test_bad_arguments(gauss_guide):
    from pyro.infer.autoguide import AutoDiagonalNormal

    with pytest.raises(ValueError, match="kernel must be one of"):
        NeuTraMCMC(gaussian, gauss_guide, kernel="mala")
    with pytest.raises(TypeError, match="invalid kernel option"):
        NeuTraMCMC(gaussian, gauss_guide, max_tree_depht=5)
    with pytest.raises(TypeError, match=r"sets .*potential_fn"):
        NeuTraMCMC(gaussian, gauss_guide, potential_fn=lambda p: 0)
    with pytest.raises(TypeError, match="NeuTraReparam"):
        NeuTraMCMC(gaussian, AutoDiagonalNormal(gaussian))
    with pytest.raises(ValueError, match="num_samples"):
        ManyChainHMC(gaussian, gauss_guide, num_samples=0)
    with pytest.raises(RuntimeError, match=r"call \.run"):
        NeuTraMCMC(gaussian, gauss_guide).get_samples()


def test_nuts_targets_a_higher_acceptance_by_default(gauss_guide):
    """NeuTraMCMC's NUTS adapts to 0.95 unless told otherwise (the base space's far tails, where
    the flow extrapolates, diverge at Pyro's 0.8); HMC keeps Pyro's default."""

    def target(mcmc):
        return mcmc._make_kernel(lambda params: torch.zeros(()))._adapter.target_accept_prob

    assert target(NeuTraMCMC(gaussian, gauss_guide)) == 0.95
    assert target(NeuTraMCMC(gaussian, gauss_guide, target_accept_prob=0.8)) == 0.8
    hmc = NeuTraMCMC(gaussian, gauss_guide, kernel="hmc")
    assert "target_accept_prob" not in hmc.kernel_options


def test_outer_handlers_do_not_see_the_sampler(gauss_guide):
    with poutine.trace() as tape:
        NeuTraMCMC(gaussian, gauss_guide, num_samples=3, warmup_steps=3, progress=False).run()
    assert not tape.trace.nodes


# -- ManyChainHMC's delayed rejection ----------------------------------------------------------
def funnel2():
    """A 2-D Neal's funnel: y ~ N(0, 1.5), x ~ N(0, exp(y / 2))."""
    y = pyro.sample("y", dist.Normal(0.0, 1.5))
    pyro.sample("x", dist.Normal(0.0, torch.exp(y / 2)))


def _funnel_sampler(**kwargs):
    """Fixed HMC (no adaptation) with a step too large for the funnel's neck, on a guide at its
    start with unit scale (the base space is the model's own, shifted)."""
    guide = fg.AutoIAF(funnel2, num_flows=1, hidden=(4,), init_scale=1.0)
    guide()
    with pytest.warns(UserWarning, match="fitted"):
        return ManyChainHMC(
            funnel2,
            guide,
            num_chains=256,
            num_samples=150,
            warmup_steps=50,  # burn-in only: nothing adapts
            step_size=1.2,
            trajectory_length=2.4,
            adapt_step_size=False,
            adapt_trajectory_length=False,
            progress=False,
            **kwargs,
        ).run()


def _quiet_diagnostics(sampler):
    with pytest.warns(UserWarning, match="preconditions poorly"):  # the guide is not fitted
        return sampler.diagnostics()


def test_delayed_rejection_keeps_the_funnel_exact():
    """With a step size that fails below y = -1.4 (leapfrog is unstable once the step exceeds
    twice x's sd) and retries on any energy error above 0.5, close to half of the transitions
    ask for a second proposal; the draws must still follow the funnel: y's mean, second moment
    and tail mass within 5 standard errors of the truth, the errors from the spread of the 256
    independent chains' own averages. Dropping the ghost's factor from the acceptance (a wrong
    second-stage ratio) fails this test."""
    sampler = _funnel_sampler(retry_factor=4, retry_energy_error=0.5)
    y = sampler.get_samples(group_by_chain=True)["y"].double()  # (chains, draws)
    stats = sampler.get_sample_stats()
    assert stats["retried"].double().mean() > 0.1
    diag = _quiet_diagnostics(sampler)
    assert diag["num_retried"] == int(stats["retried"].sum()) > 0
    assert diag["num_first_stage_divergences"] >= diag["num_divergences"]
    norm = torch.distributions.Normal(0.0, 1.5)
    for name, per_chain, truth in (
        ("mean", y.mean(1), 0.0),
        ("second moment", y.square().mean(1), 2.25),
        ("P(y < -1.5)", (y < -1.5).double().mean(1), float(norm.cdf(torch.tensor(-1.5)))),
    ):
        se = float(per_chain.std() / math.sqrt(per_chain.numel()))
        assert abs(float(per_chain.mean()) - truth) < 5 * se, (name, float(per_chain.mean()), se)


def test_delayed_rejection_reaches_the_neck():
    """The same sampler without retries (``retry_factor=1``) sticks in the neck, with
    divergences and far fewer moves there; with them the chains move through it."""
    plain = _funnel_sampler(retry_factor=1)
    retried = _funnel_sampler(retry_factor=4, retry_energy_error=0.5)
    assert not plain.get_sample_stats()["retried"].any()
    plain_diag, retried_diag = _quiet_diagnostics(plain), _quiet_diagnostics(retried)
    assert plain_diag["num_retried"] == 0
    assert plain_diag["num_grad_evals"] == 256 * plain_diag["num_grad_calls"]
    assert retried_diag["num_grad_evals"] < 256 * retried_diag["num_grad_calls"]

    def moves_in_neck(sampler):
        y = sampler.get_samples(group_by_chain=True)["y"]
        neck = y[:, :-1] < -2.0
        moved = y[:, 1:] != y[:, :-1]
        return float((neck & moved).sum()) / max(1, int(neck.sum()))

    assert moves_in_neck(retried) > 2 * moves_in_neck(plain)
    assert retried_diag["num_divergences"] < plain_diag["num_divergences"]


def test_delayed_rejection_arguments(gauss_guide):
    for bad in (0, 1.5, "4"):
        with pytest.raises(ValueError, match="retry_factor"):
            ManyChainHMC(gaussian, gauss_guide, retry_factor=bad)
    for bad in (0.0, -1.0, "10"):
        with pytest.raises(ValueError, match="retry_energy_error"):
            ManyChainHMC(gaussian, gauss_guide, retry_energy_error=bad)


def funnel2_f64():
    """``funnel2`` in float64."""
    y = pyro.sample("y", dist.Normal(torch.zeros((), dtype=F64), 1.5))
    pyro.sample("x", dist.Normal(torch.zeros((), dtype=F64), torch.exp(y / 2)))


def _second_stage_both_ways(threshold, retry_factor, num_steps, step_size, seed):
    """Second proposals from 2,000 random float64 states of the 2-D funnel that ask for a retry,
    and from each second proposal back: (the states, their energies, first-stage acceptances and
    second-stage acceptances both ways, where the way back lands, whether it asks for a retry,
    the energy recomputed at the second proposal)."""
    guide = fg.AutoIAF(funnel2_f64, num_flows=1, hidden=(4,), init_scale=1.0)
    guide()
    randomize(guide.transform, scale=0.1)  # a flow that is not the identity
    sampler = ManyChainHMC(
        funnel2_f64,
        guide,
        retry_factor=retry_factor,
        retry_energy_error=threshold,
        progress=False,
    )
    potential = NeuTraPotential(funnel2_f64, guide)
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2000, 2, generator=gen, dtype=F64) * torch.tensor([1.5, 1.0], dtype=F64)
    p0 = torch.randn(2000, 2, generator=gen, dtype=F64)
    h, n, r = step_size, num_steps, retry_factor

    def stage1(x, p):
        u, g = potential.potential_and_grad(x)
        h_start = u + 0.5 * p.square().sum(-1)
        x1, p1, u1, _ = sampler._leapfrog(potential, x, p, g, h, n)
        delta = neutra._energy_error(h_start, u1 + 0.5 * p1.square().sum(-1), x1)
        return g, h_start, torch.exp(-delta).clamp(max=1.0), delta > threshold

    with pyro.validation_enabled(False), poutine.block(), potential.frozen():
        g0, h0, a0, asks0 = stage1(x0, p0)
        x0, p0, g0, h0, a0 = (t[asks0] for t in (x0, p0, g0, h0, a0))
        x2, _, g2, h2, alpha2, _ = sampler._second_stage(potential, x0, p0, g0, h0, a0, h, n)
        _, p2, _, _ = sampler._leapfrog(potential, x0, p0, g0, h / r, n * r)
        fine = torch.isfinite(h2)
        x2, p2, g2, h2, x0, h0, a0, alpha2 = (
            t[fine] for t in (x2, -p2, g2, h2, x0, h0, a0, alpha2)
        )
        _, h2_again, a2, asks2 = stage1(x2, p2)
        back, _, _, _, alpha2_back, _ = sampler._second_stage(potential, x2, p2, g2, h2, a2, h, n)
    return x0, h0, a0, alpha2, h2, a2, alpha2_back, back, asks2, h2_again


@settings(max_examples=20, deadline=None)
@given(
    threshold=st.sampled_from([0.5, 1.0, 3.0, 10.0]),
    retry_factor=st.integers(2, 5),
    num_steps=st.integers(1, 3),
    step_size=st.floats(1.1, 1.6),
    seed=st.integers(0, 2**16),
)
def test_second_stage_satisfies_detailed_balance(
    threshold, retry_factor, num_steps, step_size, seed
):
    r"""For states :math:`s_0` whose first proposal asks for a retry, the second proposal
    :math:`s_2` and the move back satisfy
    :math:`\pi(s_0)(1 - \alpha_1(s_0))\,\alpha_2(s_0) = \pi(s_2)(1 - \alpha_1(s_2))\,\alpha_2(s_2)`
    (zero on both sides when :math:`s_2`'s own first proposal would not ask for a retry), and
    the second trajectory from :math:`s_2` comes back to :math:`s_0`: in float64, over
    thresholds, retry factors, step sizes (all too large for the funnel's neck) and numbers of
    steps."""
    x0, h0, a0, alpha2, h2, a2, alpha2_back, back, asks2, h2_again = _second_stage_both_ways(
        threshold, retry_factor, num_steps, step_size, seed
    )
    assert x0.shape[0] > 10  # retried states
    assert torch.allclose(h2_again, h2)
    assert (alpha2[~asks2] == 0).all()  # no way back: no way there
    # pairs with a way there and back (above 1e-200: the logs of subnormal numbers lose digits)
    both = asks2 & (alpha2 > 1e-200) & (alpha2_back > 1e-200)
    assert int(both.sum()) > 5  # pairs to compare
    assert torch.allclose(back[both], x0[both], atol=1e-8)
    forward = -h0 + torch.log1p(-a0) + alpha2.log()
    backward = -h2 + torch.log1p(-a2) + alpha2_back.log()
    assert torch.allclose(forward[both], backward[both], atol=1e-8)


@pytest.mark.parametrize("threshold", [0.5, 3.0])
def test_second_stage_meets_both_cases(threshold):
    """At these settings the property above is checked on both kinds of second proposal: many
    whose way back asks for a retry, and some whose way back does not (accepted with
    probability 0)."""
    *_, alpha2, _, _, _, _, asks2, _ = _second_stage_both_ways(threshold, 4, 2, 1.2, 0)
    assert alpha2.numel() > 500
    assert 0 < int((~asks2).sum()) and int(asks2.sum()) > 500
    assert (alpha2[~asks2] == 0).all() and (alpha2[asks2] > 0).float().mean() > 0.9
