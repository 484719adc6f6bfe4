"""Closed-form and family-specific checks of the flows and of MADE (float64 for the math).

The generic suite (``test_transforms.py``) runs every registry entry through shapes, log-dets,
round trips and so on; here each family's own promises are checked: planar and radial
invertibility constraints at their limits, bounded IAF log-scales, MADE's autoregressive masks,
conditioning, constructor validation, permutation signs and the elementwise affine map.
"""

from __future__ import annotations

import itertools
import math
import re

import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize
from pyro.distributions import TransformedDistribution
from torch import nn

from flowguide.nn import MADE, MLP, MaskedLinear, check_hidden, check_order
from flowguide.transforms import (
    AffineAutoregressive,
    Compose,
    ElementwiseAffine,
    Permute,
    Planar,
    Radial,
    SplineAutoregressive,
    SplineCoupling,
)

F64 = torch.float64
SHIFT = math.log(math.e - 1)  # softplus(SHIFT) = 1


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=gen(seed), dtype=F64)


def jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.jacobian(fn, x)


def inverse_softplus(v: float) -> float:
    """The a with softplus(a) = v > 0, without overflow for large v."""
    return v + math.log(-math.expm1(-v))


def named(name: str, shown: str) -> str:
    """A pattern for an error message that names ``name`` and then shows ``shown``; a leading
    ``^`` asks for the message to start with the name."""
    start = "^" if name.startswith("^") else r"(?<!\w)"
    return rf"{start}{re.escape(name.lstrip('^'))}(?!\w).*{re.escape(shown)}"


@pytest.fixture
def float64_default():
    """Build parameters in float64 (flows create theirs in the default dtype)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(old)


# == Planar ===================================================================================


def planar(u: torch.Tensor, w: torch.Tensor, b: float) -> Planar:
    flow = Planar(u.shape[-1]).double()
    with torch.no_grad():
        flow.params.raw.copy_(torch.cat([u, w, torch.tensor([b], dtype=F64)]))
    return flow


def planar_ladj(flow: Planar, x: torch.Tensor) -> torch.Tensor:
    """Closed form log(1 + (1 - h^2) w.u_hat) with 1 + w.u_hat = softplus(w.u + log(e - 1)),
    written as log(h^2 + (1 - h^2) (1 + w.u_hat)) so that it is exact near w.u_hat = -1."""
    d = flow.dim
    u, w, b = flow.params.raw.detach().split((d, d, 1))
    h = torch.tanh(x @ w + b.squeeze(-1))
    one_plus = F.softplus(w @ u + SHIFT)
    return torch.log(h * h + (1 - h * h) * one_plus)


def u_for(w: torch.Tensor, wu: float, seed: int) -> torch.Tensor:
    """A u with w.u = wu and a random component orthogonal to w."""
    v = randn(w.shape[0], seed=seed)
    v = v - (v @ w) / (w @ w) * w
    return v + wu * w / (w @ w)


@pytest.mark.parametrize("factor", [1.0, 10.0, 100.0, 1e4])
@pytest.mark.parametrize("dim", [1, 3])
def test_planar_constraint_holds_for_adversarial_parameters(dim, factor):
    """w.u_hat > -1 even for u = -factor * w: at the point where w.x + b = 0 the Jacobian's
    determinant is exactly 1 + w.u_hat, so its log-det is finite and given in closed form."""
    w = randn(dim, seed=dim)
    flow = planar(-factor * w, w, b=0.3)
    x_flat = -0.3 * w / (w @ w)  # tanh(w.x + b) = 0
    y, ladj = flow.with_cache(0).forward_and_log_abs_det(x_flat)
    assert ladj.isfinite() and y.isfinite().all()
    if factor <= 100:  # beyond that, 1 + w.u_hat underflows and is floored at the smallest normal
        torch.testing.assert_close(ladj, planar_ladj(flow, x_flat), atol=1e-10, rtol=1e-12)
    x = torch.cat([x_flat[None], randn(64, dim, seed=1, scale=2.0)])
    y, ladj = flow.with_cache(0).forward_and_log_abs_det(x)
    assert y.isfinite().all() and ladj.isfinite().all()
    torch.testing.assert_close(ladj[1:], planar_ladj(flow, x[1:]), atol=1e-10, rtol=0)
    # the inverse stays finite, and is exact wherever the map is not nearly flat
    x2, ladj2 = flow.with_cache(0).inverse_and_log_abs_det(y.detach())
    assert x2.isfinite().all() and ladj2.isfinite().all()
    steep = ladj > -3
    torch.testing.assert_close(x2[steep], x[steep], atol=1e-8, rtol=0)
    # gradients are finite too
    xg = x.clone().requires_grad_(True)
    yg, lg = flow.with_cache(0).forward_and_log_abs_det(xg)
    (yg.sum() + lg.sum()).backward()
    assert xg.grad.isfinite().all() and flow.params.raw.grad.isfinite().all()


@pytest.mark.parametrize("eta", [1e-2, 1e-4, 1e-6])
def test_planar_inverse_near_the_invertibility_limit(eta):
    """w.u_hat = -1 + eta: the map is almost flat along w near w.x + b = 0."""
    dim = 4
    w = randn(dim, seed=7)
    wu = inverse_softplus(eta) - SHIFT  # softplus(wu + SHIFT) = eta
    flow = planar(u_for(w, wu, seed=8), w, b=-0.4)
    x_flat = 0.4 * w / (w @ w)
    x = torch.cat(
        [
            x_flat[None],
            x_flat + 1e-3 * randn(16, dim, seed=9),
            x_flat + randn(16, dim, seed=10),
            randn(32, dim, seed=11, scale=3.0),
        ]
    )
    t = flow.with_cache(0)
    y, ladj = t.forward_and_log_abs_det(x)
    torch.testing.assert_close(ladj[0], torch.tensor(math.log(eta), dtype=F64), atol=1e-9, rtol=0)
    x2, ladj2 = t.inverse_and_log_abs_det(y)
    torch.testing.assert_close(x2, x, atol=1e-8, rtol=0)
    torch.testing.assert_close(ladj2, ladj, atol=1e-6, rtol=0)


def param_gradient_vs_finite_differences(flow, loss) -> None:
    """Compare autograd's gradient of ``loss()`` w.r.t. every parameter with central differences."""
    flow.zero_grad()
    loss().backward()
    h = 1e-6
    for name, p in flow.named_parameters():
        fd = torch.empty_like(p)
        with torch.no_grad():
            for i in range(p.numel()):
                old = p.view(-1)[i].item()
                p.view(-1)[i] = old + h
                up = loss()
                p.view(-1)[i] = old - h
                down = loss()
                p.view(-1)[i] = old
                fd.view(-1)[i] = (up - down) / (2 * h)
        torch.testing.assert_close(p.grad, fd, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["planar", "radial"])
def test_inverse_gradients_match_finite_differences(family):
    """The planar inverse runs its root-finding without autograd and takes one last Newton step
    with it: the implicit function theorem says that gives the exact gradient."""
    dim = 3
    torch.manual_seed(0)
    flow = (Planar(dim) if family == "planar" else Radial(dim)).double()
    randomize(flow, scale=1.5, seed=3)
    y = randn(10, dim, seed=4, scale=2.0)
    c = randn(10, dim, seed=5)
    t = flow.with_cache(0)

    def loss():
        x, ladj = t.inverse_and_log_abs_det(y)
        return (c * x).sum() + ladj.sum()

    param_gradient_vs_finite_differences(flow, loss)
    # and the Jacobian of the inverse is the inverse of the forward Jacobian
    x = t.inv(y[0]).detach()
    j_inv = jacobian(t.inv, y[0])
    j_fwd = jacobian(t, x)
    torch.testing.assert_close(j_inv @ j_fwd, torch.eye(dim, dtype=F64), atol=1e-10, rtol=0)


def test_planar_stack_second_derivatives_equal_the_layers():
    """The planar stack's hand-written backward is for first derivatives; under
    ``create_graph=True`` (Hessians) it must still give exact results, including the
    dependence of u_hat on w (partial, not total, derivatives of each input)."""
    from flowguide.transforms.planar import (
        PlanarParameters,
        planar_forward,
        planar_parameters,
        planar_stack_forward,
    )

    gen = torch.Generator().manual_seed(3)
    raw = torch.randn(3, 4, 7, generator=gen, dtype=torch.float64)  # 3 data, 4 layers, dim 3
    x = torch.randn(3, 3, generator=gen, dtype=torch.float64)

    def stacked(x, raw):
        y, ladj = planar_stack_forward(x, planar_parameters(raw))
        return y.square().sum() + ladj.sum()

    def layered(x, raw):
        p, total = planar_parameters(raw), 0.0
        for i in range(raw.shape[-2]):
            x, ladj = planar_forward(x, PlanarParameters(*(t.select(1, i) for t in p)))
            total = total + ladj.sum()
        return x.square().sum() + total

    got = torch.autograd.functional.hessian(stacked, (x, raw))
    want = torch.autograd.functional.hessian(layered, (x, raw))
    for i in range(2):
        for j in range(2):
            assert want[i][j].abs().max() > 0.1
            torch.testing.assert_close(got[i][j], want[i][j], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_planar_is_the_identity_at_u_zero_for_any_w(scale):
    dim = 5
    flow = planar(torch.zeros(dim, dtype=F64), randn(dim, seed=2, scale=scale), b=1.7)
    x = randn(30, dim, seed=3, scale=3.0)
    y, ladj = flow.forward_and_log_abs_det(x)
    torch.testing.assert_close(y, x, atol=1e-14, rtol=0)
    torch.testing.assert_close(ladj, torch.zeros(30, dtype=F64), atol=1e-14, rtol=0)
    torch.testing.assert_close(flow.with_cache(0).inv(x), x, atol=1e-14, rtol=0)


# == Radial ===================================================================================


def radial(x0: torch.Tensor, alpha: float, beta_over_alpha_plus_1: float) -> Radial:
    """A radial flow with the given centre, alpha and 1 + beta / alpha (both > 0)."""
    flow = Radial(x0.shape[-1]).double()
    a = inverse_softplus(alpha)
    b = inverse_softplus(alpha * beta_over_alpha_plus_1)  # softplus(b) = alpha + beta
    with torch.no_grad():
        flow.params.raw.copy_(torch.cat([x0, torch.tensor([a, b], dtype=F64)]))
    return flow


RADIAL_CASES = [(0.5, 2.0), (2.0, -1.5), (1.0, 50.0), (0.3, 1e3), (1.0, -1.0 + 1e-6)]


@pytest.mark.parametrize("alpha, beta", RADIAL_CASES, ids=str)
def test_radial_closed_form(alpha, beta):
    dim = 3
    x0 = randn(dim, seed=1)
    flow = radial(x0, alpha, 1 + beta / alpha)
    x = x0 + randn(20, dim, seed=2, scale=1.5)
    y, ladj = flow.with_cache(0).forward_and_log_abs_det(x)
    diff = x - x0
    r = diff.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(y, x + beta / (alpha + r) * diff, atol=1e-10, rtol=1e-10)
    r = r.squeeze(-1)
    formula = (dim - 1) * torch.log1p(beta / (alpha + r)) + torch.log1p(
        alpha * beta / (alpha + r) ** 2
    )
    torch.testing.assert_close(ladj, formula, atol=1e-9, rtol=1e-9)
    # the analytic Jacobian (1 + beta h) I + beta h'(r) (x - x0)(x - x0)^T / r, h' = -1/(alpha+r)^2
    for i in range(5):
        e = diff[i] / r[i]
        jac = (1 + beta / (alpha + r[i])) * torch.eye(dim, dtype=F64) - beta * r[i] / (
            alpha + r[i]
        ) ** 2 * torch.outer(e, e)
        sign, logdet = torch.linalg.slogdet(jac)
        assert sign.item() == 1.0
        torch.testing.assert_close(ladj[i], logdet, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("alpha, beta", RADIAL_CASES, ids=str)
def test_radial_round_trip_for_large_and_near_limit_beta(alpha, beta):
    dim = 4
    x0 = randn(dim, seed=3)
    flow = radial(x0, alpha, 1 + beta / alpha).with_cache(0)
    x = torch.cat([x0 + randn(20, dim, seed=4, scale=s) for s in (1e-4, 1e-1, 1.0, 30.0)])
    y, ladj = flow.forward_and_log_abs_det(x)
    x2, ladj2 = flow.inverse_and_log_abs_det(y)
    torch.testing.assert_close(x2, x, atol=1e-8, rtol=1e-10)
    # the inverse returns the forward log-det at the point it recovers; near the limit the
    # log-det varies like 1 / (alpha + beta + r), so it matches at x itself less tightly
    torch.testing.assert_close(ladj2, flow.forward_and_log_abs_det(x2)[1], atol=1e-10, rtol=0)
    torch.testing.assert_close(ladj2, ladj, atol=1e-6, rtol=1e-10)


@pytest.mark.parametrize("b", [-30.0, -100.0, -1e4])
def test_radial_beta_stays_above_minus_alpha(b):
    """At x = x0 the Jacobian is (1 + beta / alpha) I: the log-det is finite iff beta > -alpha,
    and equals dim * log(softplus(b) / softplus(a))."""
    dim = 3
    x0 = randn(dim, seed=5)
    flow = Radial(dim).double()
    with torch.no_grad():
        flow.params.raw.copy_(torch.cat([x0, torch.tensor([0.4, b], dtype=F64)]))
    t = flow.with_cache(0)
    y, ladj = t.forward_and_log_abs_det(x0)
    assert ladj.isfinite() and ladj < 0
    if b > -700:  # beyond that the softplus underflows and is floored
        ratio = F.softplus(torch.tensor(b, dtype=F64)) / F.softplus(torch.tensor(0.4, dtype=F64))
        torch.testing.assert_close(ladj, dim * torch.log(ratio), atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(y, x0, atol=0, rtol=0)
    x, ladj2 = t.inverse_and_log_abs_det(x0)
    assert x.isfinite().all() and ladj2.isfinite()
    torch.testing.assert_close(x, x0, atol=0, rtol=0)
    # away from the centre, all finite as well
    xs = x0 + randn(50, dim, seed=6, scale=2.0)
    ys, ls = t.forward_and_log_abs_det(xs)
    assert ys.isfinite().all() and ls.isfinite().all()
    assert t.inv(ys).isfinite().all()


def test_radial_inverse_at_the_centre_is_exact_with_finite_gradients():
    dim = 3
    torch.manual_seed(1)
    flow = randomize(Radial(dim).double(), scale=1.0, seed=2)
    x0 = flow.params.raw.detach()[:dim].clone()
    alpha = F.softplus(flow.params.raw.detach()[dim])
    beta = F.softplus(flow.params.raw.detach()[dim + 1]) - alpha
    y = x0.clone().requires_grad_(True)
    x, ladj = flow.with_cache(0).inverse_and_log_abs_det(y)
    torch.testing.assert_close(x, x0, atol=0, rtol=0)
    torch.testing.assert_close(ladj, dim * torch.log1p(beta / alpha), atol=1e-12, rtol=1e-12)
    (x.sum() + ladj).backward()
    assert y.grad.isfinite().all() and flow.params.raw.grad.isfinite().all()


# == AffineAutoregressive =====================================================================


@pytest.mark.parametrize("s", [-1e12, -1e6, -1e3, -7.0, 0.5, 1e3, 1e6, 1e12])
@pytest.mark.parametrize("bound", [0.5, 5.0])
def test_iaf_log_scale_is_bounded_in_closed_form(s, bound):
    flow = AffineAutoregressive(1, hidden=(4,), log_scale_bound=bound).double()
    with torch.no_grad():
        flow.made.output_layer.bias.copy_(torch.tensor([0.25, s], dtype=F64))
    x = randn(10, 1, seed=1)
    y, ladj = flow.forward_and_log_abs_det(x)
    s_tilde = s / (1 + abs(s) / bound)
    assert -bound < s_tilde < bound
    torch.testing.assert_close(ladj, torch.full((10,), s_tilde, dtype=F64), atol=0, rtol=1e-14)
    torch.testing.assert_close(y, 0.25 + math.exp(s_tilde) * x, atol=0, rtol=1e-13)
    assert (ladj.abs() < bound).all()
    # the gradient of the log-scale decays polynomially, never to zero: (S / (S + |s|))^2
    flow.zero_grad()
    ladj.sum().backward()
    slope = flow.made.output_layer.bias.grad[1] / 10
    torch.testing.assert_close(slope, torch.tensor((bound / (bound + abs(s))) ** 2, dtype=F64))
    assert slope > 0


def test_iaf_bounded_for_huge_conditioner_outputs():
    dim, bound = 4, 3.0
    torch.manual_seed(0)
    flow = AffineAutoregressive(dim, hidden=(16,), log_scale_bound=bound).double()
    randomize(flow, scale=1.0, seed=1)
    # huge log-scale outputs: rows dim, ..., 2 dim - 1 of the parameter-major output layer
    with torch.no_grad():
        for p in flow.made.output_layer.parameters():
            p[dim:].mul_(1e6)
    x = randn(100, dim, seed=2, scale=3.0)
    t = flow.with_cache(0)
    y, ladj = t.forward_and_log_abs_det(x)
    assert y.isfinite().all() and (ladj.abs() < dim * bound).all()
    torch.testing.assert_close(t.inv(y), x, atol=1e-6, rtol=0)
    # the Jacobian is triangular with diagonal exp(s_tilde_i): every log-scale lies in (-S, S),
    # and the huge conditioner outputs push many of them to the edge
    log_scales = torch.stack([jacobian(t, xi).diagonal().log() for xi in x[:10]])
    assert (log_scales.abs() < bound).all()
    assert (log_scales.abs() > 0.999 * bound).float().mean() > 0.5
    torch.testing.assert_close(log_scales.sum(-1), ladj[:10], atol=1e-9, rtol=0)


@pytest.mark.parametrize("context_dim", [0, 2])
@pytest.mark.parametrize(
    ("hidden", "activation"), [((5,), nn.ReLU), ((5, 4), nn.ReLU), ((5,), nn.Tanh)]
)
def test_iaf_fused_sampling_map_has_exact_first_and_second_derivatives(
    context_dim, hidden, activation
):
    """The forward map's hand-written backward (one fused function: the whole layer for a ReLU
    MADE, the affine map alone for another) against finite differences, for the input, the
    context and every parameter, with y alone, the log-det alone and both used; and its double
    backward (Hessians: create_graph) likewise."""
    dim = 3
    flow = AffineAutoregressive(
        dim, hidden=hidden, context_dim=context_dim, activation=activation
    ).double()
    randomize(flow, scale=1.5, seed=3)
    x = randn(4, dim, seed=4).requires_grad_()
    ctx = randn(4, 2, seed=5).requires_grad_() if context_dim else None
    params = tuple(flow.parameters())
    inputs = (x, *params) if ctx is None else (x, ctx, *params)

    def outputs(*_):
        y, ladj = flow._forward_ladj(x, ctx)
        return y, ladj

    for pick in (lambda o: o, lambda o: o[0], lambda o: o[1]):
        assert torch.autograd.gradcheck(lambda *a, pick=pick: pick(outputs(*a)), inputs)
    assert torch.autograd.gradgradcheck(lambda *a: outputs(*a), inputs)


@pytest.mark.parametrize("hidden", [(6,), (6, 5)])
def test_iaf_fused_layer_equals_its_made_and_affine_map(hidden):
    """The fused pass of a ReLU MADE's IAF layer gives what the MADE module and the bounded affine
    map give, with a context broadcast against a batch of samples, and the same gradients for
    the input, the context and every parameter (the masked-out weights' gradients zero)."""
    from flowguide.transforms.autoregressive import _bounded, _relu_made_layers

    dim = 4
    flow = AffineAutoregressive(dim, hidden=hidden, context_dim=3, order=[2, 0, 3, 1]).double()
    assert _relu_made_layers(flow.made) is not None  # the fused pass
    assert _relu_made_layers(MADE(dim, 2, hidden, activation=nn.Tanh)) is None
    randomize(flow, scale=1.0, seed=7)
    x = randn(5, 2, dim, seed=8).requires_grad_()  # 5 samples of 2 data
    ctx = randn(2, 3, seed=9).requires_grad_()
    y, ladj = flow._forward_ladj(x, ctx)
    out = flow.made(x, ctx.expand(5, 2, 3))  # (..., dim, 2): shifts and log-scales
    s = _bounded(out[..., 1], flow.log_scale_bound)
    want_y, want_ladj = out[..., 0] + s.exp() * x, s.sum(-1)
    assert y.shape == (5, 2, dim) and ladj.shape == (5, 2)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ladj, want_ladj, rtol=1e-12, atol=1e-12)
    weights = randn(5, 2, dim, seed=10)
    inputs = (x, ctx, *flow.parameters())
    got = torch.autograd.grad((y * weights).sum() + ladj.square().sum(), inputs)
    want = torch.autograd.grad((want_y * weights).sum() + want_ladj.square().sum(), inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    for layer in (m for m in flow.made.net if isinstance(m, MaskedLinear)):
        assert layer.weight.grad is None  # autograd.grad, not backward
    masks = [m.mask for m in flow.made.net if isinstance(m, MaskedLinear)]
    for g, mask in zip(got[2::2], masks, strict=True):
        assert g[mask == 0].abs().max() == 0 and g[mask == 1].abs().max() > 0


def _iaf_stack(context_dim: int, seed: int) -> list[AffineAutoregressive]:
    """Three double IAF layers of different MADE depths, orders and bounds, randomized."""
    dim = 4
    flows = [
        AffineAutoregressive(dim, hidden=(6,), context_dim=context_dim, order=[2, 0, 3, 1]),
        AffineAutoregressive(dim, hidden=(5, 7), context_dim=context_dim, log_scale_bound=2.0),
        AffineAutoregressive(dim, hidden=(8,), context_dim=context_dim, order=[3, 2, 1, 0]),
    ]
    return [randomize(f.double(), scale=1.0, seed=seed + i) for i, f in enumerate(flows)]


def _unfused(flow: AffineAutoregressive, x: torch.Tensor, ctx: torch.Tensor | None):
    """An IAF layer through its MADE module and the plain bounded affine map."""
    from flowguide.transforms.autoregressive import _bounded

    out = flow.made(x, None if ctx is None else ctx.expand(*x.shape[:-1], -1))
    s = _bounded(out[..., 1], flow.log_scale_bound)
    return out[..., 0] + s.exp() * x, s.sum(-1)


@pytest.mark.parametrize("context_dim", [0, 3])
def test_iaf_layers_in_a_row_run_as_one_node_with_the_layers_values_and_gradients(context_dim):
    """A Compose of IAF layers runs them as one fused autograd node (one backward function for
    y and the log-det); its values and the gradients of the input, the context and every
    parameter are those of the layers' MADEs and affine maps run one by one, with a context
    broadcast against a batch of samples."""
    flows = _iaf_stack(context_dim, seed=11)
    chain = Compose(flows)
    x = randn(5, 2, 4, seed=12).requires_grad_()
    ctx = randn(2, context_dim, seed=13).requires_grad_() if context_dim else None
    y, ladj = chain._forward_ladj(x, ctx)
    assert type(y.grad_fn).__name__ == "_MadeAffineBackward"
    assert y.grad_fn in [f for f, _ in ladj.grad_fn.next_functions]  # 0 + the node's log-det
    want_y, want_ladj = x, 0
    for flow in flows:
        want_y, part = _unfused(flow, want_y, ctx)
        want_ladj = want_ladj + part
    assert y.shape == (5, 2, 4) and ladj.shape == (5, 2)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ladj, want_ladj, rtol=1e-12, atol=1e-12)
    weights = randn(5, 2, 4, seed=14)
    inputs = (x, *(() if ctx is None else (ctx,)), *chain.parameters())
    got = torch.autograd.grad((y * weights).sum() + ladj.square().sum(), inputs)
    want_loss = (want_y * weights).sum() + want_ladj.square().sum()
    want = torch.autograd.grad(want_loss, inputs, retain_graph=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # only some inputs wanted: the backward skips the rest and still gets these right
    for wanted in ([x], [flows[2].made.output_layer.weight], list(flows[0].parameters())):
        y, ladj = chain._forward_ladj(x, ctx)
        got = torch.autograd.grad(y.sum() + ladj.sum(), wanted)
        want = torch.autograd.grad(want_y.sum() + want_ladj.sum(), wanted, retain_graph=True)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    if ctx is not None:
        y, ladj = chain._forward_ladj(x.detach(), ctx)
        (got,) = torch.autograd.grad(ladj.sum(), ctx)
        (want,) = torch.autograd.grad(want_ladj.sum(), ctx, retain_graph=True)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # x, the context and the upper layers fixed: the first layer's parameters' gradient still
    # passes down through the layers above
    for flow in flows[1:]:
        flow.requires_grad_(False)
    y, ladj = chain._forward_ladj(x.detach(), None if ctx is None else ctx.detach())
    first = list(flows[0].parameters())
    got = torch.autograd.grad(y.sum() + ladj.sum(), first)
    want = torch.autograd.grad(want_y.sum() + want_ladj.sum(), first, retain_graph=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_iaf_layers_in_a_row_have_exact_first_and_second_derivatives():
    """The fused run of IAF layers against finite differences (y, the log-det, both) and its
    double backward (create_graph), for the input, the context and every parameter."""
    chain = Compose(_iaf_stack(2, seed=21))
    x = randn(3, 4, seed=22).requires_grad_()
    ctx = randn(3, 2, seed=23).requires_grad_()
    inputs = (x, ctx, *chain.parameters())

    def outputs(*_):
        return chain._forward_ladj(x, ctx)

    for pick in (lambda o: o, lambda o: o[0], lambda o: o[1]):
        assert torch.autograd.gradcheck(lambda *a, pick=pick: pick(outputs(*a)), inputs)
    assert torch.autograd.gradgradcheck(lambda *a: outputs(*a), inputs)


def test_compose_fuses_only_runs_of_iaf_layers_and_keeps_every_value():
    """Runs of IAF layers fuse; a Permute, a planar layer, a Tanh MADE or a subclass that
    redefines the layer's pass split the runs or run alone, and the composition's values are
    the parts' one after another either way."""

    class Doubled(AffineAutoregressive):
        def _forward_ladj(self, x, context):
            y, ladj = super()._forward_ladj(x, context)
            return 2 * y, ladj + self.dim * math.log(2)

    torch.manual_seed(0)
    parts = [
        *_iaf_stack(0, seed=31),
        Permute(4, [1, 3, 0, 2]),
        AffineAutoregressive(4, hidden=(6,), activation=nn.Tanh),
        AffineAutoregressive(4, hidden=(6,)),
        Planar(4),
        Doubled(4, hidden=(5,)),
        Doubled(4, hidden=(5,)),
    ]
    parts = [randomize(p.double(), scale=1.0, seed=40 + i) for i, p in enumerate(parts)]
    x = randn(6, 4, seed=32)
    y, ladj = Compose(parts)._forward_ladj(x, None)
    want_y, want_ladj = x, torch.zeros(6, dtype=F64)
    for part in parts:
        want_y, part_ladj = part._forward_ladj(want_y, None)
        want_ladj = want_ladj + part_ladj
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ladj, want_ladj, rtol=1e-12, atol=1e-12)
    # the Doubled layers ran their own pass: y = 2 (IAF layer's y), twice
    assert Doubled._chain_forward_ladj(parts[-2:], x, None) is None
    assert AffineAutoregressive._chain_forward_ladj(parts[4:6], x, None) is None  # a Tanh MADE


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), -float("inf")])
def test_iaf_log_scale_bound_must_be_positive(bad):
    with pytest.raises(ValueError, match=named("log_scale_bound", repr(bad))):
        AffineAutoregressive(3, log_scale_bound=bad)


# == MADE =====================================================================================


def made_jacobians(made: MADE, x: torch.Tensor, ctx: torch.Tensor | None):
    """d out[i, k] / d x[j] of shape (dim, ppd, dim), and w.r.t. the context if any."""
    jx = jacobian(lambda v: made(v, ctx), x)
    jc = None if ctx is None else jacobian(lambda c: made(x, c), ctx)
    return jx, jc


MADE_CASES = [
    # dim, params_per_dim, hidden, context_dim
    (1, 2, (4,), 0),
    (1, 3, (4, 4), 2),
    (2, 1, (1,), 0),
    (3, 2, (2,), 0),
    (5, 3, (3, 2), 0),
    (5, 2, (16, 16), 0),
    (6, 2, (4,), 3),
    (4, 3, (12, 12), 2),
    (7, 1, (7, 20), 1),
]


@pytest.mark.parametrize("dim, ppd, hidden, context_dim", MADE_CASES, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_made_is_autoregressive(dim, ppd, hidden, context_dim, seed):
    order = torch.randperm(dim, generator=gen(seed)).tolist()
    torch.manual_seed(seed)
    made = MADE(dim, ppd, hidden, context_dim, order, activation=nn.Tanh).double()
    randomize(made, scale=1.0, seed=seed)
    assert made.order.tolist() == order
    rank = torch.empty(dim, dtype=torch.long)
    rank[made.order] = torch.arange(dim)
    allowed = (rank[None, :] < rank[:, None])[:, None, :].expand(dim, ppd, dim)
    for trial in range(3):
        x = randn(dim, seed=10 * seed + trial, scale=2.0)
        ctx = randn(context_dim, seed=100 + trial) if context_dim else None
        jx, jc = made_jacobians(made, x, ctx)
        assert jx.shape == (dim, ppd, dim)
        # output i never depends on x_j unless j comes strictly before i in the order
        assert (jx[~allowed] == 0).all()
        if min(hidden) >= dim:  # wide enough for every allowed connection to exist
            assert (jx[allowed] != 0).all()
        if context_dim:
            # the first output in the order depends on the context (so does every other one)
            assert jc.shape == (dim, ppd, context_dim)
            assert (jc[made.order[0]].abs().sum(-1) > 0).all()
            assert (jc.abs().sum(-1) > 0).all()


def test_made_output_starts_at_zero_and_broadcasts_context():
    made = MADE(3, 2, (8,), context_dim=2).double()
    x, ctx = randn(4, 5, 3, seed=1), randn(5, 2, seed=2)
    out = made(x, ctx)
    assert out.shape == (4, 5, 3, 2) and (out == 0).all()
    randomize(made, seed=3)
    torch.testing.assert_close(made(x, ctx), made(x, ctx.expand(4, 5, 2)), atol=0, rtol=0)


@pytest.mark.parametrize(
    "hidden, shown",
    [
        ([], "()"),
        ((), "()"),
        ((0,), "(0,)"),
        ((8, -1), "(8, -1)"),
        ((True,), "(True,)"),
        (True, "(True,)"),
        ((2.5,), "(2.5,)"),
    ],
)
def test_check_hidden_errors_name_the_argument(hidden, shown):
    with pytest.raises(ValueError, match=named("hidden", shown)):
        check_hidden(hidden)
    with pytest.raises(ValueError, match=named("widths", shown)):
        check_hidden(hidden, name="widths")
    with pytest.raises(ValueError, match=named("hidden", shown)):
        MADE(3, 2, hidden)
    with pytest.raises(ValueError, match=named("hidden", shown)):
        MLP(3, 2, hidden)


def test_check_hidden_accepts_an_int_and_sequences():
    assert check_hidden(5) == (5,)
    assert check_hidden([3, 4]) == (3, 4)


@pytest.mark.parametrize(
    "order, dim, shown",
    [
        ([0, 0, 1], 3, "[0, 0, 1]"),
        ([1, 2, 3], 3, "[1, 2, 3]"),
        ([0, 1], 3, "[0, 1]"),
        ([2, 1, 0, 3], 3, "[2, 1, 0, 3]"),
        ([-1, 0, 1], 3, "[-1, 0, 1]"),
        ([0.5, 1.5, 2.5], 3, "[0.5, 1.5, 2.5]"),  # not integers (once silently truncated)
        ([True, False], 2, "[True, False]"),
    ],
)
def test_check_order_errors_name_the_argument(order, dim, shown):
    with pytest.raises(ValueError, match=named("order", shown)):
        check_order(order, dim)
    with pytest.raises(ValueError, match=named("order", shown)):
        MADE(dim, 2, (8,), order=order)
    with pytest.raises(ValueError, match=named("^permutation", shown)):
        Permute(dim, order)


def test_check_order_accepts_permutations():
    assert check_order(None, 3).tolist() == [0, 1, 2]
    assert check_order([2, 0, 1], 3).tolist() == [2, 0, 1]
    assert check_order(torch.tensor([1, 0]), 2).tolist() == [1, 0]


# == conditional flows ========================================================================

CONDITIONAL = {
    "planar": lambda: Planar(3, context_dim=2, hidden=(8,)),
    "radial": lambda: Radial(3, context_dim=2, hidden=(8,)),
    "iaf": lambda: AffineAutoregressive(3, hidden=(16,), context_dim=2),
    "nsf-ar": lambda: SplineAutoregressive(3, bins=5, hidden=(16,), context_dim=2),
    "nsf-coupling": lambda: SplineCoupling(4, bins=5, hidden=(16,), context_dim=2),
}


def conditional(name: str):
    torch.manual_seed(0)
    return randomize(CONDITIONAL[name]().double(), scale=0.7, seed=1)


@pytest.mark.parametrize("name", sorted(CONDITIONAL))
def test_batched_contexts_equal_one_context_at_a_time(name):
    flow = conditional(name)
    x, ctx = randn(6, flow.dim, seed=2, scale=1.5), randn(6, 2, seed=3)
    y, ladj = flow.condition(ctx).with_cache(0).forward_and_log_abs_det(x)
    x2, ladj2 = flow.condition(ctx).with_cache(0).inverse_and_log_abs_det(x)
    for i in range(6):
        t = flow.condition(ctx[i]).with_cache(0)
        yi, ladj_i = t.forward_and_log_abs_det(x[i])
        torch.testing.assert_close(y[i], yi, atol=1e-12, rtol=0)
        torch.testing.assert_close(ladj[i], ladj_i, atol=1e-12, rtol=0)
        xi, ladj2_i = t.inverse_and_log_abs_det(x[i])
        torch.testing.assert_close(x2[i], xi, atol=1e-12, rtol=0)
        torch.testing.assert_close(ladj2[i], ladj2_i, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", sorted(CONDITIONAL))
def test_context_broadcasts_against_sample_dimensions(name):
    flow = conditional(name)
    S, B = 4, 3
    x, ctx = randn(S, B, flow.dim, seed=4, scale=1.5), randn(B, 2, seed=5)
    t = flow.condition(ctx).with_cache(0)
    full = flow.condition(ctx.expand(S, B, 2)).with_cache(0)
    y, ladj = t.forward_and_log_abs_det(x)
    assert y.shape == (S, B, flow.dim) and ladj.shape == (S, B)
    y_ref, ladj_ref = full.forward_and_log_abs_det(x)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, ladj_ref, atol=1e-12, rtol=0)
    x2, ladj2 = t.inverse_and_log_abs_det(y)
    assert x2.shape == x.shape and ladj2.shape == (S, B)
    torch.testing.assert_close(x2, x, atol=1e-8, rtol=0)
    torch.testing.assert_close(ladj2, ladj, atol=1e-8, rtol=0)
    # one context for a whole batch of inputs
    y1, ladj1 = flow.condition(ctx[1]).with_cache(0).forward_and_log_abs_det(x[:, 1])
    torch.testing.assert_close(y1, y[:, 1], atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj1, ladj[:, 1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", sorted(CONDITIONAL))
def test_different_contexts_give_different_transforms(name):
    flow = conditional(name)
    x = randn(8, flow.dim, seed=6, scale=1.0)
    ctx_a, ctx_b = randn(2, seed=7), randn(2, seed=8)
    y_a, ladj_a = flow.condition(ctx_a).forward_and_log_abs_det(x)
    y_b, ladj_b = flow.condition(ctx_b).forward_and_log_abs_det(x)
    assert ((y_a - y_b).abs().amax(-1) > 1e-6).all()
    assert ((ladj_a - ladj_b).abs() > 1e-9).all()
    # and the output is differentiable w.r.t. the context (amortised inference needs that)
    ctx = ctx_a.clone().requires_grad_(True)
    y, ladj = flow.condition(ctx).forward_and_log_abs_det(x)
    (y.sum() + ladj.sum()).backward()
    assert ctx.grad.isfinite().all() and ctx.grad.abs().sum() > 0


# == constructor validation ===================================================================

BAD_CONSTRUCTORS = [
    # (builder, exception, the argument's name, the offending value as shown)
    *[
        (lambda cls=cls, v=v: cls(v), ValueError, "dim", repr(v))
        for cls in (Planar, Radial, AffineAutoregressive, SplineAutoregressive, ElementwiseAffine)
        for v in (0, -1, 2.5, True)
    ],
    (lambda: Permute(0), ValueError, "dim", "0"),
    (lambda: Permute(2.5), ValueError, "dim", "2.5"),
    (lambda: SplineAutoregressive(3, bins=1), ValueError, "bins", "1"),
    (lambda: SplineCoupling(4, bins=0), ValueError, "bins", "0"),
    (lambda: SplineAutoregressive(3, bound=0.0), ValueError, "bound", "0.0"),
    (lambda: SplineCoupling(4, bound=-2.0), ValueError, "bound", "-2.0"),
    (lambda: SplineAutoregressive(3, bins=4, min_width=0.25), ValueError, "min_width", "0.25"),
    (lambda: SplineCoupling(4, bins=10, min_height=0.1), ValueError, "min_height", "0.1"),
    (lambda: SplineCoupling(4, min_derivative=1.0), ValueError, "min_derivative", "1.0"),
    (lambda: AffineAutoregressive(3, hidden=[]), ValueError, "hidden", "()"),
    (lambda: SplineAutoregressive(3, hidden=(-4,)), ValueError, "hidden", "(-4,)"),
    (lambda: SplineCoupling(4, hidden=(8, 0)), ValueError, "hidden", "(8, 0)"),
    (lambda: Planar(3, context_dim=2, hidden=()), ValueError, "hidden", "()"),
    (lambda: Radial(3, context_dim=2, hidden=(-1,)), ValueError, "hidden", "(-1,)"),
    (lambda: Planar(3, context_dim=-1), ValueError, "context_dim", "-1"),
    (lambda: Radial(3, context_dim=1.5), ValueError, "context_dim", "1.5"),
    (lambda: AffineAutoregressive(3, context_dim=-2), ValueError, "context_dim", "-2"),
    (lambda: SplineAutoregressive(3, context_dim=True), ValueError, "context_dim", "True"),
    (lambda: SplineCoupling(4, context_dim=-1), ValueError, "context_dim", "-1"),
    (lambda: AffineAutoregressive(3, order=[0, 0, 1]), ValueError, "order", "[0, 0, 1]"),
    (lambda: SplineCoupling(1), ValueError, "dim", "1"),
    (lambda: SplineCoupling(0), ValueError, "dim", "0"),
    (lambda: SplineCoupling(2.5), ValueError, "dim", "2.5"),
    (lambda: SplineCoupling(True), ValueError, "dim", "True"),
    (lambda: SplineCoupling(4, split=0), ValueError, "split", "0"),
    (lambda: SplineCoupling(4, split=4), ValueError, "split", "4"),
    (lambda: SplineCoupling(4, split=-1), ValueError, "split", "-1"),
    (lambda: SplineCoupling(4, split=1.5), ValueError, "split", "1.5"),
    (lambda: SplineCoupling(4, split=True), ValueError, "split", "True"),
    (lambda: Compose([]), ValueError, "flows", "empty"),
    (lambda: Compose([Planar(2), Radial(3)]), ValueError, "dim", "[2, 3]"),
    (lambda: Compose([Planar(2), nn.Linear(2, 2)]), TypeError, "flows[1]", "Linear"),
    (lambda: Compose([Planar(2), "planar"]), TypeError, "flows[1]", "str"),
    (
        lambda: Compose([Planar(2, context_dim=2), Radial(2, context_dim=3)]),
        ValueError,
        "context_dim",
        "[2, 3]",
    ),
    (lambda: Permute(3, [0, 0, 1]), ValueError, "^permutation", "[0, 0, 1]"),
    (lambda: Permute(3, [0, 1]), ValueError, "^permutation", "[0, 1]"),
    (lambda: Permute(3, [1, 2, 3]), ValueError, "^permutation", "[1, 2, 3]"),
    (lambda: ElementwiseAffine(3, loc=torch.zeros(2)), ValueError, "loc", "(2,)"),
    (lambda: ElementwiseAffine(3, loc=torch.zeros(3, 1)), ValueError, "loc", "(3, 1)"),
    (lambda: ElementwiseAffine(3, scale=torch.ones(4)), ValueError, "scale", "(4,)"),
    (lambda: ElementwiseAffine(2, scale=0.0), ValueError, "scale", "[0.0, 0.0]"),
    (lambda: ElementwiseAffine(2, scale=[1.0, -2.0]), ValueError, "scale", "[1.0, -2.0]"),
    (lambda: ElementwiseAffine(1, scale=float("inf")), ValueError, "scale", "[inf]"),
    (lambda: ElementwiseAffine(1, scale=float("nan")), ValueError, "scale", "[nan]"),
]


@pytest.mark.parametrize(
    "build, error, name, shown",
    BAD_CONSTRUCTORS,
    ids=[f"{i}-{case[2]}={case[3]}" for i, case in enumerate(BAD_CONSTRUCTORS)],
)
def test_bad_constructor_input_names_the_argument_and_value(build, error, name, shown):
    with pytest.raises(error, match=named(name, shown)):
        build()


# == signs, Permute, Compose ==================================================================


def permutation_matrix_det(perm: list[int]) -> int:
    # y = x[perm] is y = P x with P[i, perm[i]] = 1
    return round(torch.linalg.det(torch.eye(len(perm), dtype=F64)[perm]).item())


def test_permute_sign_is_the_parity_for_every_permutation_of_four():
    signs = []
    for perm in itertools.permutations(range(4)):
        flow = Permute(4, list(perm))
        assert flow.sign == permutation_matrix_det(list(perm))
        signs.append(flow.sign)
    assert signs.count(1) == signs.count(-1) == 12


@pytest.mark.parametrize("dim", [1, 2, 5, 8])
@pytest.mark.parametrize("seed", range(4))
def test_permute_sign_and_action(dim, seed):
    perm = torch.randperm(dim, generator=gen(seed)).tolist()
    flow = Permute(dim, perm)
    assert flow.sign == permutation_matrix_det(perm)
    x = randn(dim, seed=seed)
    sign, logdet = torch.linalg.slogdet(jacobian(flow.with_cache(0), x))
    assert sign.item() == flow.sign and logdet.item() == 0.0
    torch.testing.assert_close(flow(x), x[perm], atol=0, rtol=0)
    # the default is the reversal, whose parity is that of dim * (dim - 1) / 2 transpositions
    assert Permute(dim).sign == (-1) ** (dim * (dim - 1) // 2)


def test_compose_sign_is_the_product():
    odd, even = [1, 0, 2, 3], [1, 2, 0, 3]
    torch.manual_seed(0)
    for parts, expected in [
        ([Permute(4, odd)], -1),
        ([Permute(4, odd), Planar(4), Permute(4, odd)], 1),
        ([Permute(4, even), Radial(4), Permute(4, odd)], -1),
        ([Permute(4, odd), Permute(4, odd), Permute(4, odd)], -1),
        ([Planar(4), AffineAutoregressive(4, hidden=(8,))], 1),
    ]:
        flow = randomize(Compose(parts).double(), seed=1)
        assert flow.sign == math.prod(p.sign for p in parts) == expected
        x = randn(4, seed=2)
        sign, logdet = torch.linalg.slogdet(jacobian(flow.with_cache(0), x))
        assert sign.item() == expected
        torch.testing.assert_close(logdet, flow.forward_and_log_abs_det(x)[1], atol=1e-9, rtol=0)
        # a conditioned view keeps the sign
        assert flow.with_cache(0).sign == expected


# == ElementwiseAffine ========================================================================


def test_elementwise_affine_closed_form_and_initial_values(float64_default):
    loc, scale = torch.tensor([1.3, -2.0, 0.1]), torch.tensor([2.0, 0.17, 3.0])
    flow = ElementwiseAffine(3, loc=loc, scale=scale)
    torch.testing.assert_close(flow.loc.detach(), loc, atol=0, rtol=0)
    torch.testing.assert_close(flow.log_scale.detach(), scale.log(), atol=0, rtol=0)
    x = randn(7, 3, seed=1)
    y, ladj = flow.forward_and_log_abs_det(x)
    torch.testing.assert_close(y, loc + scale * x, atol=1e-14, rtol=0)
    expected = torch.full((7,), math.log(2.0 * 0.17 * 3.0), dtype=F64)
    torch.testing.assert_close(ladj, expected, atol=1e-14, rtol=0)
    x2, ladj2 = flow.with_cache(0).inverse_and_log_abs_det(y)
    torch.testing.assert_close(x2, x, atol=1e-14, rtol=0)
    torch.testing.assert_close(ladj2, expected, atol=1e-14, rtol=0)


def test_elementwise_affine_scalar_arguments_broadcast(float64_default):
    flow = ElementwiseAffine(4, loc=2.3, scale=0.7)
    x = randn(3, 4, seed=2)
    y, ladj = flow.forward_and_log_abs_det(x)
    torch.testing.assert_close(y, 2.3 + 0.7 * x, atol=1e-15, rtol=0)
    torch.testing.assert_close(ladj, torch.full((3,), 4 * math.log(0.7), dtype=F64))
    # the default is the identity; the given values are copied, not aliased
    plain = ElementwiseAffine(2)
    torch.testing.assert_close(plain(x[:, :2]), x[:, :2], atol=0, rtol=0)
    loc = torch.zeros(2)
    made = ElementwiseAffine(2, loc=loc)
    with torch.no_grad():
        made.loc.add_(1.0)
    assert (loc == 0).all()


# == exactness at initialisation and the cache under no_grad ==================================


@pytest.mark.parametrize(
    "make",
    [
        lambda: Planar(4),
        lambda: Radial(4),
        lambda: Planar(4, context_dim=2, hidden=(8,)),
        lambda: Radial(4, context_dim=2, hidden=(8,)),
    ],
    ids=["planar", "radial", "planar-ctx", "radial-ctx"],
)
def test_planar_and_radial_start_exactly_at_the_identity(make):
    """In float32 too: the stable log-det forms must not cost the exact identity at init."""
    torch.manual_seed(0)
    flow = make()
    x = randn(50, 4, seed=1, scale=3.0).float()
    t = flow.condition(torch.randn(50, 2)) if flow.context_dim else flow
    y, ladj = t.forward_and_log_abs_det(x)
    assert torch.equal(y, x) and (ladj == 0).all()
    x2, ladj2 = t.with_cache(0).inverse_and_log_abs_det(x)
    assert torch.equal(x2, x) and (ladj2 == 0).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda: Planar(3),
        lambda: AffineAutoregressive(3, hidden=(8,)),
        lambda: Compose([SplineCoupling(3, hidden=(8,)), Permute(3), Radial(3)]),
        lambda: SplineAutoregressive(3, hidden=(8,), context_dim=2),
    ],
    ids=["planar", "iaf", "compose", "nsf-ar-ctx"],
)
def test_a_value_cached_under_no_grad_is_not_reused_with_grad(make):
    torch.manual_seed(0)
    flow = randomize(make().double(), seed=1)
    x = randn(5, 3, seed=2)
    t = flow.condition(randn(5, 2, seed=3)) if flow.context_dim else flow
    for method in ("forward_and_log_abs_det", "inverse_and_log_abs_det"):
        with torch.no_grad():
            out0, ladj0 = getattr(t, method)(x)
        out, ladj = getattr(t, method)(x)
        assert out.requires_grad and ladj.requires_grad, method
        torch.testing.assert_close(out, out0, atol=0, rtol=0)
        torch.testing.assert_close(ladj, ladj0, atol=0, rtol=0)
        # the cache still hits within one grad mode
        assert getattr(t, method)(x)[0] is out
    # the same through a TransformedDistribution: log_prob under no_grad, then with grad
    base = dist.Normal(torch.zeros(3, dtype=F64), 1.0).to_event(1)
    d = TransformedDistribution(base, [t])
    with torch.no_grad():
        d.log_prob(x)
    lp = d.log_prob(x)
    assert lp.requires_grad
    lp.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())
