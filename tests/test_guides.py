"""Flow autoguides: the AutoContinuous contract, supports, errors, and SVI with Pyro's ELBOs."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints as pyro_constraints
from pyro.infer import SVI, Predictive, RenyiELBO, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, init_to_mean
from pyro.infer.reparam import NeuTraReparam
from torch.distributions import constraints

import flowguide as fg

GUIDES = {
    "planar": lambda m, **kw: fg.AutoPlanar(m, num_flows=4, **kw),
    "radial": lambda m, **kw: fg.AutoRadial(m, num_flows=4, **kw),
    "iaf": lambda m, **kw: fg.AutoIAF(m, num_flows=2, hidden=(16,), **kw),
    "nsf": lambda m, **kw: fg.AutoNeuralSpline(m, num_flows=2, hidden=(16,), **kw),
    "nsf-coupling": lambda m, **kw: fg.AutoNeuralSpline(
        m, num_flows=2, hidden=(16,), coupling=True, **kw
    ),
}


@pytest.fixture(autouse=True)
def _clean():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def regression(x=None, y=None):
    """A badly scaled model: the slope lives near 1000, the noise near 0.01."""
    x = torch.linspace(-1, 1, 30, dtype=torch.float64) if x is None else x
    slope = pyro.sample("slope", dist.Normal(torch.tensor(1000.0, dtype=torch.float64), 100.0))
    noise = pyro.sample("noise", dist.LogNormal(torch.tensor(-4.0, dtype=torch.float64), 1.0))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal(slope * x, noise), obs=y)


def supports_model():
    """One site per constrained support that biject_to covers."""
    pyro.sample("pos", dist.LogNormal(0.0, 1.0))
    pyro.sample("unit", dist.Beta(2.0, 3.0))
    pyro.sample("interval", dist.Uniform(-2.0, 5.0))
    pyro.sample("simplex", dist.Dirichlet(torch.ones(4)))
    pyro.sample("corr", dist.LKJCholesky(3, 1.0))
    pyro.sample("improper", dist.ImproperUniform(constraints.positive, (), (2,)))
    pyro.sample("ordered", dist.ImproperUniform(pyro_constraints.ordered_vector, (), (3,)))
    with pyro.plate("p", 2):
        pyro.sample("lower", dist.Exponential(1.0))


@pytest.mark.parametrize("kind", sorted(GUIDES))
def test_starts_at_autodiagonalnormal(kind):
    """At step 0 the guide is the diagonal Normal at the model's init values with init_scale."""
    guide = GUIDES[kind](regression, init_scale=0.05, init_loc_fn=init_to_mean)
    guide()
    ref = AutoDiagonalNormal(regression, init_scale=0.05, init_loc_fn=init_to_mean)
    ref()
    z = ref.get_posterior().sample((50,))
    torch.testing.assert_close(
        guide.get_posterior().log_prob(z), ref.get_posterior().log_prob(z), atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(guide.affine.loc, ref.loc, atol=1e-12, rtol=0)
    assert guide.affine.loc.dtype == torch.float64  # dtype follows the model


@pytest.mark.parametrize("kind", sorted(GUIDES))
def test_samples_land_in_every_support(kind):
    guide = GUIDES[kind](supports_model)
    draws = guide.sample_constrained(200)
    for name, value in draws.items():
        support = guide.prototype_trace.nodes[name]["fn"].support
        ok = support.check(value)
        assert bool(ok.all()), name
    assert draws["lower"].shape == (200, 2)
    assert draws["improper"].shape == (200, 2)


@pytest.mark.parametrize(
    "loss",
    [
        Trace_ELBO(),
        Trace_ELBO(num_particles=4, vectorize_particles=True),
        RenyiELBO(alpha=0.5, num_particles=3),
    ],
    ids=["trace", "vectorized", "renyi"],
)
@pytest.mark.parametrize("kind", sorted(GUIDES))
def test_svi_with_pyro_elbos(kind, loss):
    x = torch.linspace(-1, 1, 30, dtype=torch.float64)
    y = 1000.0 * x + 0.02 * torch.randn(30, dtype=torch.float64)
    guide = GUIDES[kind](regression)
    svi = SVI(regression, guide, pyro.optim.Adam({"lr": 0.01}), loss)
    losses = [svi.step(x, y) for _ in range(30)]
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("kind", sorted(GUIDES))
def test_predictive_median_quantiles(kind):
    guide = GUIDES[kind](regression)
    x = torch.linspace(-1, 1, 30, dtype=torch.float64)
    y = 1000.0 * x + 0.02 * torch.randn(30, dtype=torch.float64)
    guide(x, y)
    pred = Predictive(regression, guide=guide, num_samples=7)(x)
    ref_guide = AutoDiagonalNormal(regression)
    ref_guide(x, y)
    ref = Predictive(regression, guide=ref_guide, num_samples=7)(x)
    assert pred["slope"].shape == ref["slope"].shape and pred["y"].shape == (7, 30)
    med = guide.median(x, y)
    q = guide.quantiles([0.1, 0.5, 0.9], x, y)
    assert q["slope"].shape == (3,)
    assert q["slope"][0] < q["slope"][1] < q["slope"][2]
    # the median is repeatable (seeded) and leaves the global RNG alone
    state = torch.get_rng_state()
    assert torch.equal(guide.median(x, y)["slope"], med["slope"])
    assert torch.equal(torch.get_rng_state(), state)
    # at init the guide is N(loc, 0.1): its quantiles are close to the closed form
    torch.testing.assert_close(med["slope"], guide.affine.loc[0], atol=0.02 * 100, rtol=0)


@pytest.mark.parametrize("kind", sorted(GUIDES))
def test_pyro_neutra_reparam_works_with_our_guides(kind):
    guide = GUIDES[kind](regression)
    x = torch.linspace(-1, 1, 30, dtype=torch.float64)
    y = 1000.0 * x + 0.02 * torch.randn(30, dtype=torch.float64)
    guide(x, y)
    neutra = NeuTraReparam(guide.requires_grad_(False))
    model = poutine.reparam(regression, config=lambda _: neutra)
    tr = poutine.trace(model).get_trace(x, y)
    assert any(name.endswith("_shared_latent") for name in tr.nodes)
    latent = tr.nodes[next(n for n in tr.nodes if n.endswith("_shared_latent"))]["value"]
    samples = neutra.transform_sample(latent)
    assert set(samples) == {"slope", "noise"}


def test_factor_shifts_loss_by_its_value():
    """Pyro's invariant: a pyro.factor adds exactly its value to the loss."""

    def plain():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def with_factor():
        pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("f", torch.tensor(-3.25))

    guide = fg.AutoIAF(plain, hidden=(8,))
    guide()
    from flowguide.train import flow_elbo_loss

    pyro.set_rng_seed(1)
    a = flow_elbo_loss(plain, guide, num_particles=5)
    pyro.set_rng_seed(1)
    b = flow_elbo_loss(with_factor, guide, num_particles=5)
    torch.testing.assert_close(b - a, torch.tensor(3.25), atol=1e-5, rtol=0)


def test_flow_elbo_matches_trace_elbo():
    """The direct flow ELBO and Pyro's Trace_ELBO estimate the same quantity."""
    x = torch.linspace(-1, 1, 30, dtype=torch.float64)
    y = 1000.0 * x + 0.02 * torch.randn(30, dtype=torch.float64)
    guide = fg.AutoNeuralSpline(regression, hidden=(16,))
    guide(x, y)
    from flowguide.train import flow_elbo_loss

    ours = flow_elbo_loss(regression, guide, x, y, num_particles=4000).item()
    theirs = Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1).loss(
        regression, guide, x, y
    )
    assert abs(ours - theirs) < 0.02 * abs(theirs) + 0.5


def test_errors_name_the_problem():
    def discrete():
        pyro.sample("k", dist.Poisson(3.0))
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="site 'k' is discrete"):
        fg.AutoIAF(discrete)()

    def nothing():
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.3))

    with pytest.raises(ValueError, match="no latent sample site"):
        fg.AutoPlanar(nothing)()

    def local(data):
        with pyro.plate("data", 100, subsample_size=10) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data[idx])

    with pytest.raises(ValueError, match=r"subsampled plate 'data'.*amortized"):
        fg.AutoIAF(local)(torch.zeros(100))

    def two():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    with pytest.raises(ValueError, match="dim=3 but the model's latent dimension is 2"):
        fg.AutoFlow(two, flow=fg.Planar(3))()
    with pytest.raises(TypeError, match="flow must be"):
        fg.AutoFlow(two, flow="planar")
    with pytest.raises(ValueError, match="init_scale must be"):
        fg.AutoIAF(two, init_scale=0.0)
    with pytest.raises(ValueError, match="num_flows must be"):
        fg.AutoPlanar(two, num_flows=0)


def test_coupling_falls_back_to_autoregressive_in_one_dimension():
    guide = fg.AutoNeuralSpline(lambda: pyro.sample("z", dist.Normal(0.0, 1.0)), coupling=True)
    guide()
    kinds = {type(f).__name__ for f in guide.flow.flows}
    assert "SplineAutoregressive" in kinds and "SplineCoupling" not in kinds


def test_flow_guide_fixes_a_badly_scaled_model():
    """Pyro's flow guides start at N(0, 1) and fail on a model with slope ~ 1000; ours start at
    the model's init values and recover the slope."""
    x = torch.linspace(-1, 1, 30, dtype=torch.float64)
    y = 1000.0 * x + 0.02 * torch.randn(30, dtype=torch.float64)
    guide = fg.AutoIAF(regression, hidden=(16,), init_loc_fn=init_to_mean)
    result = fg.fit(regression, guide, x, y, num_steps=1500, progress=False, seed=0, init=None)
    assert result.losses[-1] < result.losses[0]
    ols = (x * y).sum() / (x * x).sum()
    draws = guide.sample_constrained(4000, x, y)
    # posterior sd of the slope is about 0.02 / sqrt(sum x^2) ~ 0.006
    assert abs(draws["slope"].mean() - ols) < 0.01
    assert 0.01 < draws["noise"].median() < 0.04


def schools():
    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def test_particles_with_plated_latents():
    """Latents inside plates keep their shapes with vectorised particles, and the direct ELBO
    agrees with Pyro's for such a model."""
    from flowguide.train import flow_elbo_loss

    guide = fg.AutoNeuralSpline(schools, hidden=(16,))
    guide()
    draws = guide.sample_constrained(5)
    assert draws["theta"].shape == (5, 8) and draws["tau"].shape == (5,)
    ours = flow_elbo_loss(schools, guide, num_particles=4000).item()
    theirs = Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1).loss(
        schools, guide
    )
    assert abs(ours - theirs) < 0.02 * abs(theirs) + 0.5


@pytest.mark.cuda
@pytest.mark.parametrize("jit", [False, True, "compile"])
@pytest.mark.parametrize("kind", sorted(GUIDES))
def test_a_model_on_cuda_gets_a_guide_on_cuda(kind, jit):
    x = torch.linspace(-1, 1, 30, dtype=torch.float64, device="cuda")
    y = 1000.0 * x + 0.02 * torch.randn(30, dtype=torch.float64, device="cuda")

    def model(x, y):
        slope = pyro.sample("slope", dist.Normal(torch.tensor(1000.0, device="cuda"), 100.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(slope * x, 0.02), obs=y)

    guide = GUIDES[kind](model)
    fg.fit(model, guide, x, y, num_steps=20, num_particles=4, progress=False, seed=0, jit=jit)
    assert all(p.device.type == "cuda" for p in guide.parameters())
    assert guide.median(x, y)["slope"].device.type == "cuda"
