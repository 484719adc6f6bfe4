"""Amortized flow posteriors: the building block, the autoguide, importance weighting, DReG, the
errors, and a smoke run of examples/vae.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import load_vae_example
from pyro.infer import SVI, Trace_ELBO
from torch import nn

import flowguide as fg
from flowguide.amortized import (
    AmortizedFlowPosterior,
    AmortizedPlanar,
    AutoAmortizedFlow,
    build_conditional_flow,
    dreg_loss,
    importance_weighted_log_likelihood,
    iwae_bound,
)
from flowguide.transforms.planar import (
    PlanarParameters,
    planar_forward,
    planar_parameters,
    planar_stack_forward,
    planar_stack_inverse,
)

FLOWS = ["planar", "radial", "iaf", "nsf", None]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def make_posterior(flow, data_dim=10, latent_dim=2, dtype=torch.float64, **kwargs):
    encoder = nn.Sequential(nn.Linear(data_dim, 16), nn.Tanh())
    options = dict(num_flows=2, hidden=(16,), context_dim=4) | kwargs
    return AmortizedFlowPosterior(encoder, latent_dim, flow, data_shape=(data_dim,), **options).to(
        dtype
    )


def randomize_flow(posterior, scale=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in posterior.flow.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.add_(scale * noise / (p.shape[1] ** 0.5 if p.dim() == 2 else 1.0))
    return posterior


# -- the building block ------------------------------------------------------------------------
@pytest.mark.parametrize("flow", FLOWS)
def test_starts_as_the_diagonal_gaussian_encoder(flow):
    posterior = make_posterior(flow)
    x = torch.randn(7, 10, dtype=torch.float64)
    loc, scale, _ = posterior.encode(x)
    base = dist.Normal(loc, scale).to_event(1)
    q = posterior(x)
    z = base.sample((3,))
    assert torch.allclose(q.log_prob(z), base.log_prob(z), atol=1e-10)
    z, log_q = posterior.rsample_and_log_prob(x, 4)
    assert torch.allclose(log_q, base.log_prob(z), atol=1e-10)


@pytest.mark.parametrize("affine", [True, False])
def test_nsf_splines_sit_between_affine_layers_that_read_the_context(affine):
    flow = build_conditional_flow("nsf", 3, context_dim=4, num_flows=2, affine=affine).double()
    kinds = [type(layer).__name__ for layer in flow.flows]
    wrap = ["AffineAutoregressive"] * affine
    assert kinds == wrap + ["SplineAutoregressive"] * 2 + wrap
    assert all(layer.context_dim == 4 for layer in flow.flows)
    # the orders alternate through the affine layers too
    orders = [layer.order.tolist() for layer in flow.flows]
    assert orders == [[0, 1, 2], [2, 1, 0]] * (len(orders) // 2)
    if affine:  # each affine layer alone moves the output once its MADE is not zero
        x, h = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
        before = flow.condition(h)(x)
        for layer in (flow.flows[0], flow.flows[-1]):
            with torch.no_grad():
                layer.made.output_layer.bias.normal_()
            after = flow.condition(h)(x)
            assert not torch.allclose(after, before)
            before = after


@pytest.mark.parametrize("flow", FLOWS)
def test_shapes(flow):
    posterior = make_posterior(flow, latent_dim=3)
    q = posterior(torch.randn(5, 10, dtype=torch.float64))
    assert q.batch_shape == (5,) and q.event_shape == (3,)
    z = q.rsample((4,))
    assert z.shape == (4, 5, 3) and z.requires_grad
    assert q.log_prob(z).shape == (4, 5)
    # several batch dims, and the fused draw
    q = posterior(torch.randn(2, 6, 10, dtype=torch.float64))
    assert q.batch_shape == (2, 6) and q.rsample().shape == (2, 6, 3)
    z, log_q = posterior.rsample_and_log_prob(torch.randn(5, 10, dtype=torch.float64))
    assert z.shape == (5, 3) and log_q.shape == (5,)


@pytest.mark.parametrize("flow", ["planar", "radial", "iaf", "nsf"])
def test_log_prob_is_base_minus_log_det(flow):
    posterior = randomize_flow(make_posterior(flow))
    x = torch.randn(6, 10, dtype=torch.float64)
    loc, scale, context = posterior.encode(x)
    base = dist.Normal(loc, scale).to_event(1)
    z0 = base.sample((3,))
    z, ladj = posterior.flow.condition(context).forward_and_log_abs_det(z0)
    assert ladj.abs().max() > 1e-3  # the flow is not the identity any more
    # a fresh distribution (no cache): log_prob inverts the flow
    fresh = posterior.distribution(loc, scale, context)
    assert torch.allclose(fresh.log_prob(z), base.log_prob(z0) - ladj, atol=1e-6)

    # the same density by the change of variables on the autograd Jacobian of eps -> z
    def push(e):
        u, _ = posterior.flow.condition(context[0]).forward_and_log_abs_det(loc[0] + scale[0] * e)
        return u

    eps = (z0[0, 0] - loc[0]) / scale[0]
    jac = torch.autograd.functional.jacobian(push, eps)
    by_jacobian = dist.Normal(0.0, 1.0).log_prob(eps).sum() - torch.linalg.slogdet(jac)[1]
    assert torch.allclose(fresh.log_prob(z)[0, 0], by_jacobian, atol=1e-8)
    # the stopped-gradient density of the DReG estimator agrees
    stopped = posterior.log_prob_stopped(z, (loc, scale, context))
    assert torch.allclose(stopped, base.log_prob(z0) - ladj, atol=1e-6)
    # the fused draw agrees with log_prob
    z, log_q = posterior.rsample_and_log_prob(x, 3)
    assert torch.allclose(posterior(x).log_prob(z), log_q, atol=1e-6)


def test_user_flow_and_pyro_sample_in_a_subsampled_plate():
    flow = fg.Compose([fg.Planar(2, context_dim=3, hidden=(8,)), fg.Radial(2, context_dim=3)])
    posterior = AmortizedFlowPosterior(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU()), 2, flow, data_shape=4
    )
    assert posterior.context_dim == 3
    x_all = torch.randn(50, 4)

    def guide():
        pyro.module("posterior", posterior)
        with pyro.plate("data", 50, subsample_size=8) as idx:
            return pyro.sample("z", posterior(x_all[idx]))

    assert guide().shape == (8, 2)
    assert any(name.startswith("posterior$$$") for name in pyro.get_param_store().keys())


# -- a tiny synthetic VAE ----------------------------------------------------------------------
def synthetic(n=256, latent_dim=2, data_dim=10, seed=0, decoder=False):
    """Binary data from a fixed random decoder (returned too with ``decoder=True``)."""
    g = torch.Generator().manual_seed(seed)
    w = 2.0 * torch.randn(latent_dim, data_dim, generator=g)
    b = torch.randn(data_dim, generator=g)
    z = torch.randn(n, latent_dim, generator=g)
    x = torch.bernoulli(torch.sigmoid(z @ w + b), generator=g)
    return (x, lambda z: z @ w + b) if decoder else x


def vae(latent_dim=2, data_dim=10, subsample_size=64):
    decoder = nn.Sequential(nn.Linear(latent_dim, 16), nn.Tanh(), nn.Linear(16, data_dim))

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x[idx])

    def log_joint(x, z):
        prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        return prior + dist.Bernoulli(logits=decoder(z)).log_prob(x).sum(-1)

    return model, log_joint, decoder


@pytest.mark.parametrize("flow", FLOWS)
def test_each_flow_trains_a_tiny_vae(flow):
    x = synthetic()
    model, log_joint, _ = vae()
    encoder = nn.Sequential(nn.Linear(10, 16), nn.Tanh())
    guide = AutoAmortizedFlow(
        model, encoder, flow=flow, num_flows=2, hidden=(16,), context_dim=4
    ).setup(x)

    def elbo() -> float:
        torch.manual_seed(1)
        estimate = importance_weighted_log_likelihood(log_joint, guide.posterior, x, num_samples=4)
        return estimate.mean().item()

    before = elbo()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    for _ in range(150):
        svi.step(x)
    after = elbo()
    assert after > before + 1.0, (before, after)


def test_iwae_is_above_the_elbo_and_grows_with_k():
    x, true_decoder = synthetic(n=200, decoder=True)

    def log_joint(x, z):  # the true model, whose posteriors are sharp
        prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        return prior + dist.Bernoulli(logits=true_decoder(z)).log_prob(x).sum(-1)

    torch.manual_seed(0)
    posterior = make_posterior("iaf", dtype=torch.float32)
    estimates = {}
    for k in (1, 10, 100):
        torch.manual_seed(k)
        estimates[k] = importance_weighted_log_likelihood(
            log_joint, posterior, x, num_samples=k, batch_size=1000
        ).mean()
    assert estimates[1] + 0.5 < estimates[10] < estimates[100] - 0.2, estimates
    # the differentiable bound is the estimator on the same draws (one chunk)
    torch.manual_seed(3)
    bound = iwae_bound(log_joint, posterior, x, num_samples=10)
    torch.manual_seed(3)
    same = importance_weighted_log_likelihood(log_joint, posterior, x, num_samples=10)
    assert bound.requires_grad and torch.allclose(bound, same, atol=1e-5)


# -- a linear-Gaussian model, where log p(x) is known ------------------------------------------
def linear_gaussian(d=2, p=3, noise=0.5, seed=0, n=40):
    """z ~ N(0, I_d), x | z ~ N(W z + c, noise^2 I_p), with orthogonal columns in W so that the
    exact posterior is a diagonal Gaussian. Returns log_joint, log p(x), and the exact posterior
    (an AmortizedFlowPosterior set to it)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, d, generator=g, dtype=torch.float64))
    lam = torch.tensor([2.0, 0.7], dtype=torch.float64)[:d]
    w = q * lam  # (p, d), W^T W = diag(lam^2)
    c = torch.randn(p, generator=g, dtype=torch.float64)

    def log_joint(x, z):
        prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        return prior + dist.Normal(z @ w.T + c, noise).log_prob(x).sum(-1)

    def log_marginal(x):
        cov = w @ w.T + noise**2 * torch.eye(p, dtype=torch.float64)
        return dist.MultivariateNormal(c, cov).log_prob(x)

    var = 1.0 / (1.0 + lam**2 / noise**2)
    posterior = AmortizedFlowPosterior(nn.Identity(), d, None, feature_dim=p, min_scale=0.0)
    posterior = posterior.double()
    with torch.no_grad():
        posterior.loc_head.weight.copy_(var[:, None] * w.T / noise**2)
        posterior.loc_head.bias.copy_(-(var[:, None] * w.T / noise**2) @ c)
        posterior.scale_head.weight.zero_()
        posterior.scale_head.bias.copy_(torch.log(torch.expm1(var.sqrt())))
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) @ w.T) + c
    x = x + noise * torch.randn(n, p, generator=g, dtype=torch.float64)
    return log_joint, log_marginal, posterior, x


def test_iwae_with_the_exact_posterior_is_log_p():
    log_joint, log_marginal, posterior, x = linear_gaussian()
    exact = log_marginal(x)
    for k in (1, 7):
        estimate = importance_weighted_log_likelihood(log_joint, posterior, x, num_samples=k)
        assert torch.allclose(estimate, exact, atol=1e-9)


def test_iwae_with_an_approximate_posterior_approaches_log_p():
    log_joint, log_marginal, posterior, x = linear_gaussian(n=400)
    with torch.no_grad():  # too wide and shifted
        posterior.scale_head.bias.add_(0.6)
        posterior.loc_head.bias.add_(0.4)
    exact = log_marginal(x)
    gaps = []
    for k in (1, 10, 100, 1000):
        torch.manual_seed(k)
        estimate = importance_weighted_log_likelihood(log_joint, posterior, x, num_samples=k)
        gaps.append((exact - estimate).mean().item())
    # the ELBO is well below log p(x); the gap shrinks with K, to within the noise of the mean
    # over 400 data at K = 1000 (the estimate is a lower bound only in expectation)
    assert gaps[0] > 1.0 and 0.02 < gaps[1] < 0.5 * gaps[0], gaps
    assert abs(gaps[2]) < 0.3 * gaps[1] and abs(gaps[3]) < 0.01, gaps


# -- DReG --------------------------------------------------------------------------------------
def dreg_setup():
    torch.manual_seed(0)
    posterior = randomize_flow(make_posterior("planar", data_dim=3))
    decoder = nn.Linear(2, 3).double()

    def log_joint(x, z):
        prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        return prior + dist.Normal(decoder(z), 0.5).log_prob(x).sum(-1)

    return posterior, decoder, log_joint


def grads(loss, modules):
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.grad = None
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in params])


def test_dreg_value_and_the_analytic_gradient():
    posterior, _, log_joint = dreg_setup()
    x = torch.randn(3, 3, dtype=torch.float64)
    k = 4
    torch.manual_seed(5)
    loss = dreg_loss(log_joint, posterior, x, k)
    g_phi = grads(loss, [posterior])
    # the value is minus the IWAE bound
    torch.manual_seed(5)
    assert torch.allclose(loss, -iwae_bound(log_joint, posterior, x, k).mean())
    # the gradient: sum_k w_k^2 dlog w_k / dz_k dz_k / dphi, with phi fixed inside log q
    torch.manual_seed(5)
    loc, scale, context = posterior.encode(x)
    z0 = loc + scale * torch.randn(k, *loc.shape, dtype=loc.dtype)
    z = posterior.flow.condition(context).forward_and_log_abs_det(z0)[0]
    zd = z.detach().requires_grad_()
    fixed = posterior.distribution(loc.detach(), scale.detach(), context.detach())
    log_w = log_joint(x, zd) - fixed.log_prob(zd)
    (dz,) = torch.autograd.grad(log_w.sum(), zd)
    w = torch.softmax(log_w.detach(), 0)
    params = list(posterior.parameters())
    expected = torch.autograd.grad(
        z, params, grad_outputs=-(w**2).unsqueeze(-1) * dz / x.shape[0], allow_unused=True
    )
    expected = torch.cat(
        [
            torch.zeros_like(p).reshape(-1) if e is None else e.reshape(-1)
            for p, e in zip(params, expected, strict=True)
        ]
    )
    assert torch.allclose(g_phi, expected, atol=1e-8)


def test_dreg_is_unbiased_for_the_iwae_gradient():
    posterior, decoder, log_joint = dreg_setup()
    x = torch.randn(1, 3, dtype=torch.float64).expand(1000, 3)
    diffs = []
    for group in range(12):
        torch.manual_seed(100 + group)
        loss = dreg_loss(log_joint, posterior, x, 8)
        g_dreg = grads(loss, [posterior, decoder])
        torch.manual_seed(100 + group)  # the same draws
        g_iwae = grads(-iwae_bound(log_joint, posterior, x, 8).mean(), [posterior, decoder])
        n_phi = sum(p.numel() for p in posterior.parameters())
        # the decoder's gradient is the IWAE one exactly
        assert torch.allclose(g_dreg[n_phi:], g_iwae[n_phi:], atol=1e-10)
        diffs.append(g_dreg[:n_phi] - g_iwae[:n_phi])
    d = torch.stack(diffs)
    mean, se = d.mean(0), d.std(0) / math.sqrt(d.shape[0])
    active = se > 1e-12
    assert active.sum() > 10
    t = mean[active] / se[active]
    assert t.abs().max() < 5.0, t.abs().max()


# -- the autoguide -----------------------------------------------------------------------------
def test_autoguide_with_svi_subsampling_and_a_global_site():
    x = synthetic(n=200)
    decoder = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 10))

    def model(x):
        pyro.module("decoder", decoder)
        temperature = pyro.sample("temperature", dist.LogNormal(0.0, 0.5))
        with pyro.plate("data", len(x), subsample_size=32) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            logits = decoder(z) / temperature
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x[idx])

    guide = AutoAmortizedFlow(model, nn.Sequential(nn.Linear(10, 16), nn.Tanh()), flow="planar")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(120)]
    assert sum(losses[-20:]) < sum(losses[:20])
    assert isinstance(guide.global_guide, fg.AutoIAF)
    assert guide.local_sites == ["z"] and guide.plate_name == "data"
    draw = guide(x)
    assert draw["z"].shape == (32, 2) and draw["temperature"].shape == ()
    # log p(x | temperature) per datum, for every datum of the plate (chunks of 32, padded)
    ll = importance_weighted_log_likelihood(model, guide, x, num_samples=5)
    assert ll.shape == (200,) and bool(ll.isfinite().all()) and bool((ll < 0).all())
    # the same guide serves a data set of another size
    assert guide(x[:50])["z"].shape == (32, 2)


def test_autoguide_constrained_sites_nested_plates_and_vectorized_particles():
    x = synthetic(n=96)
    decoder = nn.Linear(2, 10)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(x), subsample_size=16, dim=-2) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
            with pyro.plate("pixels", 10, dim=-1):
                logits = (decoder(z) * s.unsqueeze(-1)).squeeze(-2)
                pyro.sample("x", dist.Bernoulli(logits=logits), obs=x[idx])

    guide = AutoAmortizedFlow(model, nn.Linear(10, 8), flow="iaf", hidden=(16,))
    elbo = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=2)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    for _ in range(5):
        assert math.isfinite(svi.step(x))
    assert guide.latent_dim == 3 and sorted(guide.local_sites) == ["s", "z"]
    draw = guide(x)
    assert draw["z"].shape == (16, 1, 2) and draw["s"].shape == (16, 1)
    assert bool((draw["s"] > 0).all())

    # the Pyro form of the IWAE estimator equals the tensor form on the same draws
    def log_joint(xb, u):
        z, log_s = u[..., :2], u[..., 2]
        s = log_s.exp()
        prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + dist.LogNormal(0.0, 1.0).log_prob(s)
        logits = decoder(z) * s.unsqueeze(-1)
        # log q of s is on the log scale: add the Jacobian of exp to the joint instead
        return prior + log_s + dist.Bernoulli(logits=logits).log_prob(xb).sum(-1)

    torch.manual_seed(7)
    pyro_form = importance_weighted_log_likelihood(model, guide, x, num_samples=6, batch_size=96)
    torch.manual_seed(7)
    tensor_form = importance_weighted_log_likelihood(
        log_joint, guide.posterior, x, num_samples=6, batch_size=96
    )
    assert torch.allclose(pyro_form, tensor_form, atol=1e-4)


def test_autoguide_full_plate_and_a_model_handed_its_minibatch():
    x = synthetic(n=60)
    decoder = nn.Linear(2, 10)

    def full(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(x)) as idx:  # no subsampling: name the local sites
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x[idx])

    def log_joint(xb, z):
        prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        return prior + dist.Bernoulli(logits=decoder(z)).log_prob(xb).sum(-1)

    guide = AutoAmortizedFlow(full, nn.Linear(10, 8), local_sites="z", flow="radial")
    assert guide(x)["z"].shape == (60, 2)
    torch.manual_seed(0)
    pyro_form = importance_weighted_log_likelihood(full, guide, x, num_samples=4, batch_size=120)
    torch.manual_seed(0)
    tensor_form = importance_weighted_log_likelihood(
        log_joint, guide.posterior, x, num_samples=4, batch_size=120
    )
    assert pyro_form.shape == (60,) and torch.allclose(pyro_form, tensor_form, atol=1e-4)

    # a model handed its minibatch and indices: create_plates and data say so
    def minibatch(x_batch, idx):
        pyro.module("decoder", decoder)
        with pyro.plate("data", 60, subsample=idx):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x_batch)

    guide = AutoAmortizedFlow(
        minibatch,
        nn.Linear(10, 8),
        data=lambda idx, x_batch, indices: x_batch,
        create_plates=lambda x_batch, idx: pyro.plate("data", 60, subsample=idx),
    )
    svi = SVI(minibatch, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    idx = torch.arange(10, 20)
    assert math.isfinite(svi.step(x[idx], idx))
    assert guide(x[idx], idx)["z"].shape == (10, 2)


# -- the amortized planar stack ----------------------------------------------------------------
def planar_layer_by_layer(x, raw):
    """The reference: ``planar_forward`` one layer at a time, autograd all the way."""
    p = planar_parameters(raw)
    total = 0
    for layer in range(raw.shape[-2]):
        vectors = (p.w.select(-2, layer), p.u_hat.select(-2, layer))
        scalars = (t.select(-1, layer) for t in (p.b, p.wu_hat, p.one_plus))
        x, ladj = planar_forward(x, PlanarParameters(*vectors, *scalars))
        total = total + ladj
    return x, total


@pytest.mark.parametrize(
    ("x_shape", "raw_shape"),
    [((5, 3), (5, 4, 7)), ((2, 5, 3), (5, 4, 7)), ((5, 3), (4, 7)), ((3,), (2, 4, 7))],
    ids=["per-datum", "samples-first", "shared-parameters", "broadcast-x"],
)
def test_planar_stack_equals_the_layers_and_its_backward_is_exact(x_shape, raw_shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g, dtype=torch.float64, requires_grad=True)
    raw = torch.randn(raw_shape, generator=g, dtype=torch.float64, requires_grad=True)

    def stack(x, raw):
        return planar_stack_forward(x, planar_parameters(raw))

    y, ladj = stack(x, raw)
    y_ref, ladj_ref = planar_layer_by_layer(x, raw)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, ladj_ref, atol=1e-12, rtol=0)
    # the hand-written backward against finite differences, with and without the log-dets
    assert torch.autograd.gradcheck(stack, (x, raw))
    assert torch.autograd.gradcheck(lambda x, raw: stack(x, raw)[0], (x, raw))
    # and against autograd through the reference, for one random cotangent
    gy, gl = torch.randn_like(y_ref), torch.randn_like(ladj_ref)
    grads = torch.autograd.grad((y * gy).sum() + (ladj * gl).sum(), (x, raw))
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (ladj_ref * gl).sum(), (x, raw))
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    # the inverse
    x_back, ladj_back = planar_stack_inverse(y, planar_parameters(raw))
    torch.testing.assert_close(x_back, x.expand_as(x_back), atol=1e-9, rtol=0)
    torch.testing.assert_close(ladj_back, ladj, atol=1e-9, rtol=0)


@pytest.mark.parametrize("hidden", [(), (8,)], ids=["linear", "mlp"])
def test_amortized_planar_is_a_planar_compose_with_one_parameter_network(hidden):
    torch.manual_seed(0)
    flow = AmortizedPlanar(3, context_dim=4, num_flows=5, hidden=hidden).double()
    h = torch.randn(6, 4, dtype=torch.float64)
    z0 = torch.randn(2, 6, 3, dtype=torch.float64)  # samples first, as in importance sampling
    # the identity at initialisation, exactly, whatever the context
    z, ladj = flow.condition(h).forward_and_log_abs_det(z0)
    assert torch.equal(z, z0) and torch.equal(ladj, torch.zeros(2, 6, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in flow.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=g, dtype=param.dtype))
    bound = flow.condition(h)
    z, ladj = bound.forward_and_log_abs_det(z0)
    # the same as Planar layers fed the network's output, layer by layer
    raw = flow.net(h).unflatten(-1, (5, 7))
    z_ref, ladj_ref = planar_layer_by_layer(z0, raw)
    torch.testing.assert_close(z, z_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, ladj_ref, atol=1e-12, rtol=0)
    # the inverse, and the log-det against autograd's Jacobian for one datum
    x, ladj_inv = flow.condition(h).with_cache(0).inverse_and_log_abs_det(z)
    torch.testing.assert_close(x, z0, atol=1e-9, rtol=0)
    torch.testing.assert_close(ladj_inv, ladj, atol=1e-9, rtol=0)
    jac = torch.autograd.functional.jacobian(lambda v: flow.condition(h[0])(v), z0[0, 0])
    torch.testing.assert_close(ladj[0, 0], torch.linalg.slogdet(jac)[1], atol=1e-10, rtol=0)
    # every parameter gets a gradient
    (z.sum() + ladj.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())
    assert len(flow) == 5


def test_amortized_planar_errors():
    with pytest.raises(ValueError, match="context_dim must be an integer >= 1, got 0"):
        AmortizedPlanar(3, context_dim=0)
    with pytest.raises(ValueError, match="num_flows must be an integer >= 1, got 0"):
        AmortizedPlanar(3, context_dim=2, num_flows=0)
    flow = AmortizedPlanar(3, context_dim=2, num_flows=2)
    with pytest.raises(ValueError, match=r"context of shape \(\.\.\., 2\), got \(5, 4\)"):
        flow.condition(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"raw must have shape \(\.\.\., 2 \* dim \+ 1\)"):
        planar_parameters(torch.randn(5, 4))


# -- errors ------------------------------------------------------------------------------------
def test_errors_of_the_posterior():
    posterior = make_posterior("planar", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"expects data of shape \(batch, \*\(10,\)\).*\(5, 12\)"):
        posterior(torch.randn(5, 12))
    loc, scale, context = posterior.encode(torch.randn(5, 10))
    with pytest.raises(ValueError, match=r"context must have shape \(5, 4\).*\(5, 3\)"):
        posterior.distribution(loc, scale, context[:, :3])
    with pytest.raises(ValueError, match="context of size context_dim=3 but context_dim=4"):
        AmortizedFlowPosterior(
            nn.Linear(10, 8), 2, fg.Planar(2, context_dim=3), data_shape=10, context_dim=4
        )
    with pytest.raises(ValueError, match=r"returned \(2, 8, 1\)"):
        AmortizedFlowPosterior(nn.Unflatten(1, (8, 1)), 2, data_shape=8)
    with pytest.raises(ValueError, match=r"data_shape .* or feature_dim"):
        AmortizedFlowPosterior(nn.Linear(10, 8), 2)
    with pytest.raises(ValueError, match="flow must be one of"):
        AmortizedFlowPosterior(nn.Linear(10, 8), 2, "sylvester", feature_dim=8)
    bare = AmortizedFlowPosterior(nn.Linear(10, 8), 2, feature_dim=8)
    with pytest.raises(ValueError, match=r"encoder failed on data of shape \(5, 12\)"):
        bare(torch.randn(5, 12))
    log_joint = lambda x, z: z.sum()  # noqa: E731
    with pytest.raises(ValueError, match=r"must return log p\(x, z\) of shape"):
        iwae_bound(log_joint, posterior, torch.randn(5, 10))


def test_errors_of_the_autoguide():
    x = torch.randn(40, 3)

    def unplated(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", len(x), subsample_size=8) as idx:
            pyro.sample("x", dist.Normal(z.sum(), 1.0).expand([8, 3]).to_event(1), obs=x[idx])

    with pytest.raises(ValueError, match="found no latent site inside a subsampled plate"):
        AutoAmortizedFlow(unplated, nn.Linear(3, 4)).setup(x)
    with pytest.raises(ValueError, match=r"local site 'z' is not inside any pyro\.plate"):
        AutoAmortizedFlow(unplated, nn.Linear(3, 4), local_sites=["z"]).setup(x)
    with pytest.raises(ValueError, match=r"local_sites \['w'\] are not latent"):
        AutoAmortizedFlow(unplated, nn.Linear(3, 4), local_sites=["w"]).setup(x)

    def model(x):
        with pyro.plate("data", len(x), subsample_size=8) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x[idx])

    wrong_rows = AutoAmortizedFlow(model, nn.Linear(3, 4), data=lambda idx, x: x[:5])
    with pytest.raises(ValueError, match=r"subsample of 8 data .* batch of shape \(5, 3\)"):
        wrong_rows(x)

    def fixed_size(x):
        with pyro.plate("data", 40, subsample_size=8):
            pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"full size 40 .* first argument .* 30 rows"):
        AutoAmortizedFlow(fixed_size, nn.Linear(3, 4)).setup(x[:30])
    wrong_encoder = AutoAmortizedFlow(model, nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"probe batch of shape \(2, 3\)"):
        wrong_encoder(x)
    ready = make_posterior(None, data_dim=3, latent_dim=5, dtype=torch.float32)
    with pytest.raises(ValueError, match="latent_dim=5 but the local sites"):
        AutoAmortizedFlow(model, ready)(x)


# -- the example -------------------------------------------------------------------------------
def test_vae_example_smoke(tmp_path):
    out = tmp_path / "vae"
    cmd = [sys.executable, str(ROOT / "examples" / "vae.py"), "--smoke", "--synthetic"]
    cmd += ["--output", str(out), "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "results.md").read_text()
    for name in ("diagonal", "planar", "radial", "iaf", "nsf"):
        assert name in table
    for figure in ("samples.png", "reconstructions.png", "training_curves.png"):
        assert (out / figure).stat().st_size > 0
    # every pair of posteriors compared on the same images: antisymmetric, and the diagonal
    # column agrees with the table's per-posterior paired column
    assert "Paired NLL differences" in table
    saved = json.loads((out / "results.json").read_text())
    pairs, results = saved["paired_nll_differences"], saved["results"]
    assert len(pairs) == 5 * 4
    for key, value in pairs.items():
        a, b = key.split(" - ")
        assert value["mean"] == pytest.approx(-pairs[f"{b} - {a}"]["mean"], abs=1e-9)
        assert value["se"] == pytest.approx(pairs[f"{b} - {a}"]["se"], abs=1e-9)
    assert pairs["iaf - diagonal"]["mean"] == pytest.approx(
        results["iaf"]["nll_minus_diagonal"], abs=1e-9
    )


def test_vae_example_flow_options():
    """--flow-layers, --made-hidden and --spline-bins reach the flows the example builds; bad
    values exit."""
    example = load_vae_example()
    args = example.parse(
        ["--smoke", "--flow-layers", "iaf=3,nsf=1", "--made-hidden", "24,16", "--spline-bins", "5"]
    )
    assert args.num_flows == {"planar": 2, "radial": 2, "iaf": 3, "nsf": 1}
    assert args.made_hidden == {"iaf": (24, 16), "nsf": (24, 16)}
    assert "3 IAF and 1 neural-spline autoregressive layers (5 bins on [-3, 3])" in (
        example.flow_settings(args)
    )
    nsf = example.VAE("nsf", 64, args).guide
    nsf.setup(example.make_synthetic()[0]["train"], 1.0)
    splines = [m for m in nsf.posterior.flow.modules() if isinstance(m, fg.SplineAutoregressive)]
    assert [m.bins for m in splines] == [5]
    data, _ = example.make_synthetic()
    pyro.clear_param_store()
    vae = example.VAE("iaf", data["train"].shape[1], args)
    vae.guide.setup(data["train"], 1.0)
    layers = [
        m
        for m in vae.guide.posterior.flow.modules()
        if isinstance(m, fg.transforms.AffineAutoregressive)
    ]
    assert len(layers) == 3
    widths = [m.out_features for m in layers[0].made.net if isinstance(m, nn.Linear)]
    assert widths[:2] == [24, 16]
    for bad in (["--flow-layers", "iaf=0"], ["--flow-layers", "maf=2"], ["--made-hidden", "8,x"]):
        with pytest.raises(SystemExit):
            example.parse(bad)


def test_vae_example_made_widths_per_family():
    """--made-hidden takes widths for both autoregressive families or for each; the IAF and the
    spline get their own, the results' sentence names them, and bad lists exit."""
    example = load_vae_example()
    parse = example.parse_made_hidden
    assert parse("") == {"iaf": None, "nsf": None}
    assert parse("640") == {"iaf": (640,), "nsf": (640,)}
    assert parse("iaf=320,nsf=640") == {"iaf": (320,), "nsf": (640,)}
    assert parse("iaf=128,128,nsf=640") == {"iaf": (128, 128), "nsf": (640,)}
    assert parse("640,iaf=320") == {"iaf": (320,), "nsf": (640,)}
    assert parse("nsf=40") == {"iaf": None, "nsf": (40,)}
    for bad, named in (("maf=3", "'maf=3'"), ("iaf=3,iaf=4", "'iaf=4'"), ("iaf=0", "'iaf=0'")):
        with pytest.raises(ValueError, match=named):
            parse(bad)
    for bad in ("iaf=", "3,x"):
        with pytest.raises(ValueError, match="positive widths"):
            parse(bad)
    args = example.parse(["--smoke", "--made-hidden", "iaf=24,nsf=40"])
    assert "MADE hidden widths 24 for the IAF and 40 for the spline" in example.flow_settings(args)
    data, _ = example.make_synthetic()
    for flow, width in (("iaf", 24), ("nsf", 40)):
        pyro.clear_param_store()
        vae = example.VAE(flow, data["train"].shape[1], args)
        vae.guide.setup(data["train"], 1.0)
        mades = [m.made for m in vae.guide.posterior.flow.modules() if hasattr(m, "made")]
        assert mades and all(made.net[0].out_features == width for made in mades)
    with pytest.raises(SystemExit):
        example.parse(["--made-hidden", "iaf=24,flow=3"])


def test_vae_example_context_width_per_family():
    """--context-dim sets the width of the context the encoder hands a flow, for every family or
    per family; the others keep flowguide's default, and bad values exit."""
    example = load_vae_example()
    assert example.parse(["--context-dim", "48"]).context_dims == dict.fromkeys(
        ["planar", "radial", "iaf", "nsf"], 48
    )
    args = example.parse(["--smoke", "--context-dim", "iaf=6"])
    assert args.context_dims == {"iaf": 6}
    assert "contexts of 16 (planar), 16 (radial), 6 (iaf), 16 (nsf) features" in (
        example.flow_settings(args)
    )
    assert "a context of 16 features" in example.flow_settings(example.parse(["--smoke"]))
    data, _ = example.make_synthetic()
    for flow, width in (("iaf", 6), ("planar", 16)):  # 16: the default for latent dim 4
        pyro.clear_param_store()
        vae = example.VAE(flow, data["train"].shape[1], args)
        vae.guide.setup(data["train"], 1.0)
        assert vae.guide.posterior.context_dim == width
        assert vae.guide.posterior.context_head.out_features == width
    for bad in ("maf=3", "iaf=0", "x", "iaf=3.5"):
        with pytest.raises(SystemExit):
            example.parse(["--context-dim", bad])


def test_vae_example_learning_rate_decays_to_the_given_fraction(tmp_path):
    """--lr-decay: after the warm-up, Adam's learning rate falls exponentially to lr x decay at
    the last step (read from the checkpoint's optimizer); a bad fraction exits."""
    out = tmp_path / "vae"
    cmd = [sys.executable, str(ROOT / "examples" / "vae.py"), "--smoke", "--synthetic"]
    cmd += ["--posteriors", "diagonal", "--epochs", "1", "--lr", "0.002", "--lr-decay", "0.25"]
    cmd += ["--lr-warmup-steps", "3", "--timing-rounds", "0", "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(out / "checkpoints" / "diagonal.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.002 * 0.25, rel=1e-9)
    assert state["config"]["lr_decay"] == 0.25 and state["config"]["epochs"] == 1
    table = (out / "results.md").read_text()  # no timing paragraph for a run without timing
    assert "No interleaved timing" in table and "median over 0 rounds" not in table
    example = load_vae_example()
    assert example.parse(["--smoke"]).lr_decay == 1.0  # constant by default
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(SystemExit):
            example.parse(["--lr-decay", bad])
