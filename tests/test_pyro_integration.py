"""flowguide's flows inside Pyro's own machinery: as the ``init_transform_fn`` of
``pyro.infer.autoguide.AutoNormalizingFlow``, and in a ``TransformedDistribution`` in a model."""

from __future__ import annotations

import functools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow

from flowguide.transforms import (
    AffineAutoregressive,
    Compose,
    ElementwiseAffine,
    Permute,
    SplineAutoregressive,
    SplineCoupling,
)


@pytest.fixture(autouse=True)
def fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


LOC = torch.tensor([1.0, -2.0, 0.5])
COV = torch.tensor([[1.0, 0.6, 0.0], [0.6, 2.0, -0.3], [0.0, -0.3, 0.5]])


def gaussian_model():
    pyro.sample("z", dist.MultivariateNormal(LOC, COV))


def kl_standard_normal_to(loc: torch.Tensor, cov: torch.Tensor) -> float:
    """KL(N(0, I) || N(loc, cov)) in closed form."""
    k = loc.shape[0]
    prec = torch.linalg.inv(cov)
    return 0.5 * (prec.trace() + loc @ prec @ loc - k + torch.logdet(cov)).item()


def make_flow(dim: int, hidden: tuple[int, ...]) -> Compose:
    return Compose(
        [
            SplineAutoregressive(dim, bins=4, hidden=hidden),
            Permute(dim),
            AffineAutoregressive(dim, hidden=hidden),
        ]
    )


def negative_elbo(model, guide, particles: int = 4000) -> float:
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=0)
    with torch.no_grad():
        return elbo.loss(model, guide)


def test_auto_normalizing_flow_with_flowguide_flows():
    guide = AutoNormalizingFlow(gaussian_model, functools.partial(make_flow, hidden=(16,)))
    # the flow starts as the identity: q = N(0, I), and -ELBO = KL(q || p) (p is normalised)
    initial = negative_elbo(gaussian_model, guide)
    kl0 = kl_standard_normal_to(LOC, COV)
    assert abs(initial - kl0) < 0.1
    flow = guide.transform
    assert isinstance(flow, Compose)
    # every flow parameter is in Pyro's param store, as the very tensor the flow uses
    store = {id(p) for _, p in pyro.get_param_store().named_parameters()}
    params = dict(flow.named_parameters())
    assert params and all(id(p) in store for p in params.values())
    before = {name: p.detach().clone() for name, p in params.items()}

    optim = pyro.optim.ClippedAdam({"lr": 0.03, "lrd": 0.995})
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0)
    svi = SVI(gaussian_model, guide, optim, elbo)
    losses = [svi.step() for _ in range(200)]
    assert all(math.isfinite(loss) for loss in losses)
    final = negative_elbo(gaussian_model, guide)
    assert -0.05 < final < 0.15 * initial
    # and the optimiser moved every one of them
    for name, p in flow.named_parameters():
        assert not torch.equal(p.detach(), before[name]), name
    # the fitted posterior's mean approaches the target's (Mahalanobis distance, from 2.2)
    gap = guide.get_posterior().sample((4000,)).mean(0) - LOC
    assert (gap @ torch.linalg.solve(COV, gap)).sqrt() < 0.5


def test_density_estimation_with_a_transformed_distribution_in_a_model():
    torch.manual_seed(0)
    mean = torch.tensor([1.0, -1.0])
    cov = torch.tensor([[2.0, 1.2], [1.2, 1.5]])
    truth = dist.MultivariateNormal(mean, cov)
    train, held_out = truth.sample((1000,)), truth.sample((4000,))
    flow = Compose(
        [
            ElementwiseAffine(2),
            AffineAutoregressive(2, hidden=(16,)),
            Permute(2),
            SplineCoupling(2, bins=4, hidden=(16,)),
        ]
    )
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)

    def model(data):
        pyro.module("flow", flow)
        with pyro.plate("data", len(data)):
            pyro.sample("obs", dist.TransformedDistribution(base, [flow]), obs=data)

    def guide(data):
        pass

    def mean_log_lik(data) -> float:
        with torch.no_grad():
            return dist.TransformedDistribution(base, [flow]).log_prob(data).mean().item()

    true_ll = truth.log_prob(held_out).mean().item()
    initial_ll = mean_log_lik(held_out)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    # evaluate_loss runs under no_grad on the very data tensor training then uses: that must not
    # leave a graph-less cached log-det behind (it once silently froze training)
    initial_loss = svi.evaluate_loss(train)
    assert initial_loss == pytest.approx(-base.log_prob(train).sum().item(), rel=1e-5)
    losses = [svi.step(train) for _ in range(200)]
    assert losses[-1] < 0.75 * initial_loss
    fitted_ll = mean_log_lik(held_out)
    # improves, closes most of the gap, and (Gibbs' inequality) cannot beat the truth on
    # held-out data beyond sampling noise
    assert fitted_ll > initial_ll + 0.9 * (true_ll - initial_ll)
    assert true_ll - 0.1 < fitted_ll < true_ll + 0.02
