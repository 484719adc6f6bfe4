"""The generic suite every registered transform passes (see ``conftest.REGISTRY``)."""

from __future__ import annotations

import copy
import io

import pyro.distributions as dist
import pytest
import torch
from conftest import REGISTRY, bind, build

NAMES = sorted(REGISTRY)
BATCHES = [(), (5,), (2, 3)]


def inputs(name: str, batch: tuple[int, ...], dtype=torch.float64, device="cpu", seed=1, scale=1.5):
    entry = REGISTRY[name]
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(*batch, entry.dim, generator=g, dtype=torch.float64)
    ctx = None
    if entry.context_dim:
        ctx = torch.randn(*batch, entry.context_dim, generator=g, dtype=torch.float64)
        ctx = ctx.to(device=device, dtype=dtype)
    return x.to(device=device, dtype=dtype), ctx


def jacobian(t, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.jacobian(lambda v: t.with_cache(0)(v), x)


@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_shapes(name, batch):
    flow = build(name)
    x, ctx = inputs(name, batch)
    t = bind(flow, ctx)
    y, ladj = t.forward_and_log_abs_det(x)
    assert y.shape == x.shape
    assert ladj.shape == batch
    x2, ladj2 = t.inverse_and_log_abs_det(y.detach())
    assert x2.shape == x.shape and ladj2.shape == batch


@pytest.mark.parametrize("name", NAMES)
def test_log_det_matches_autograd_jacobian(name):
    flow = build(name)
    x, ctx = inputs(name, (6,))
    _, ladj = bind(flow, ctx).forward_and_log_abs_det(x)
    for i in range(x.shape[0]):
        t = bind(flow, None if ctx is None else ctx[i])
        sign, logabsdet = torch.linalg.slogdet(jacobian(t, x[i]))
        assert sign.item() == flow.sign
        torch.testing.assert_close(ladj[i], logabsdet, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_second_derivatives_of_the_forward_map(name):
    """The Hessian of a function of the output and the log-det (``create_graph=True`` through
    the fused autograd nodes) equals central differences of its gradient, in float64."""
    flow = build(name)
    x, ctx = inputs(name, (1,))
    t = bind(flow, None if ctx is None else ctx[0]).with_cache(0)

    def f(v):
        y, ladj = t.forward_and_log_abs_det(v)
        return y.sin().sum() + ladj.sum()

    def grad(v):
        return torch.autograd.functional.jacobian(f, v)

    hess = torch.autograd.functional.hessian(f, x[0])
    step = 1e-6 * torch.eye(x.shape[-1], dtype=x.dtype)
    diff = torch.stack([(grad(x[0] + h) - grad(x[0] - h)) / 2e-6 for h in step])
    torch.testing.assert_close(hess, diff, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_torch_func_transforms(name):
    """``torch.func``'s ``jacrev``, ``vmap`` and ``grad`` run every flow and agree with plain
    autograd (the fused autograd functions, which they do not support, step aside)."""
    flow = build(name)
    x, ctx = inputs(name, (4,))
    t = bind(flow, None if ctx is None else ctx[0]).with_cache(0)
    jac = torch.func.jacrev(t)(x[0])
    torch.testing.assert_close(jac, jacobian(t, x[0]), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(torch.func.vmap(t)(x), t(x), atol=1e-12, rtol=0)

    def loss(v):
        y, ladj = t.forward_and_log_abs_det(v)
        return y.square().sum() + ladj.sum()

    v = x[0].clone().requires_grad_()
    (want,) = torch.autograd.grad(loss(v), v)
    torch.testing.assert_close(torch.func.grad(loss)(x[0]), want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_inverse_round_trip(name, dtype, tol):
    flow = build(name, dtype=dtype)
    x, ctx = inputs(name, (50,), dtype=dtype)
    t = bind(flow, ctx)
    y, ladj = t.with_cache(0).forward_and_log_abs_det(x)
    x2, ladj2 = t.with_cache(0).inverse_and_log_abs_det(y)
    torch.testing.assert_close(x2, x, atol=tol, rtol=tol)
    torch.testing.assert_close(ladj2, ladj, atol=10 * tol, rtol=10 * tol)
    # the inverse transform's log-det is minus the forward's
    torch.testing.assert_close(t.inv.log_abs_det_jacobian(y, x), -ladj, atol=10 * tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_far_inputs_are_finite_and_invert(name, dtype):
    """Inputs far outside the spline bound (|x| up to 1e4): finite values and gradients."""
    flow = build(name, dtype=dtype)
    x, ctx = inputs(name, (40,), dtype=dtype, seed=3)
    x = x * torch.logspace(0, 4, 40, dtype=dtype).unsqueeze(-1)
    x.requires_grad_(True)
    t = bind(flow, ctx).with_cache(0)
    y, ladj = t.forward_and_log_abs_det(x)
    assert y.isfinite().all() and ladj.isfinite().all()
    (y.sum() + ladj.sum()).backward()
    assert x.grad.isfinite().all()
    assert all(p.grad.isfinite().all() for p in flow.parameters() if p.grad is not None)
    x2 = t.inv(y.detach())
    assert x2.isfinite().all()
    if dtype == torch.float64:
        # in float32, coordinates of size 1e4 fed to a conditioner make its parameters extreme
        # enough that the round trip is limited by conditioning, not by the algorithm
        torch.testing.assert_close(x2, x.detach(), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_fused_equals_separate(name):
    flow = build(name)
    x, ctx = inputs(name, (7,))
    t = bind(flow, ctx)
    y, ladj = t.forward_and_log_abs_det(x)
    plain = t.with_cache(0)
    torch.testing.assert_close(plain(x), y, atol=1e-12, rtol=0)
    torch.testing.assert_close(plain.log_abs_det_jacobian(x, y), ladj, atol=1e-12, rtol=0)


def expected_zero_pattern(flow, entry) -> torch.Tensor:
    """True where d y_i / d x_j must vanish."""
    d = entry.dim
    if entry.pattern == "autoregressive":
        rank = torch.empty(d, dtype=torch.long)
        rank[flow.order] = torch.arange(d)
        # y_i may depend on x_j only when j comes no later than i in the order
        return rank[None, :] > rank[:, None]
    if entry.pattern == "coupling":
        zero = torch.zeros(d, d, dtype=torch.bool)
        s = flow.split
        zero[:s, s:] = True
        zero[s:, s:] = ~torch.eye(d - s, dtype=torch.bool)
        zero[:s, :s] = ~torch.eye(s, dtype=torch.bool)
        return zero
    if entry.pattern == "diagonal":
        return ~torch.eye(d, dtype=torch.bool)
    if entry.pattern == "permutation":
        return ~torch.eye(d, dtype=torch.bool)[flow.permutation]
    return torch.zeros(d, d, dtype=torch.bool)


@pytest.mark.parametrize("name", NAMES)
def test_jacobian_pattern(name):
    entry = REGISTRY[name]
    flow = build(name)
    x, ctx = inputs(name, ())
    jac = jacobian(bind(flow, ctx), x)
    zero = expected_zero_pattern(flow, entry)
    assert (jac[zero] == 0).all()
    if entry.pattern != "dense":
        assert (jac[~zero] != 0).all()  # the pattern is no sparser than expected


@pytest.mark.parametrize("name", NAMES)
def test_identity_at_initialisation(name):
    if not REGISTRY[name].identity:
        pytest.skip("a permutation is not the identity")
    flow = build(name, random=False)
    x, ctx = inputs(name, (20,))
    y, ladj = bind(flow, ctx).forward_and_log_abs_det(x)
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
    torch.testing.assert_close(ladj, torch.zeros_like(ladj), atol=1e-6, rtol=0)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name, direction):
    flow = build(name)
    if not list(flow.parameters()):
        pytest.skip("no parameters")
    x, ctx = inputs(name, (16,))
    t = bind(flow, ctx).with_cache(0)
    if direction == "forward":
        y, ladj = t.forward_and_log_abs_det(x)
    else:
        y, ladj = t.inverse_and_log_abs_det(x)
    (y.pow(2).sum() + ladj.sum()).backward()
    masks = {f"{n}.weight": m.mask for n, m in flow.named_modules() if hasattr(m, "mask")}
    for pname, p in flow.named_parameters():
        if pname in masks and not masks[pname].any():
            continue  # a MADE of one input and no context: its first layer sees nothing
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", NAMES)
def test_save_load_and_deepcopy(name, tmp_path):
    flow = build(name)
    x, ctx = inputs(name, (4,))
    y = bind(flow, ctx)(x)  # fills the cache with non-leaf tensors: copies must drop it
    clone = copy.deepcopy(flow)
    torch.testing.assert_close(bind(clone, ctx)(x), y, atol=0, rtol=0)
    buffer = io.BytesIO()
    torch.save(flow, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(bind(loaded, ctx)(x), y, atol=0, rtol=0)
    # state_dict round trip into a fresh instance
    torch.save(flow.state_dict(), tmp_path / "state.pt")
    fresh = build(name, random=False, seed=123)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    torch.testing.assert_close(bind(fresh, ctx)(x), y, atol=0, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_cache_never_stale_after_optimiser_step(name):
    flow = build(name)
    params = list(flow.parameters())
    if not params:
        pytest.skip("no parameters")
    x, ctx = inputs(name, (8,))
    t = bind(flow, ctx)
    y, ladj = t.forward_and_log_abs_det(x)
    assert t(x) is y  # a cache hit while nothing changed
    opt = torch.optim.SGD(params, lr=0.1)
    (y.pow(2).sum() - ladj.sum()).backward()
    opt.step()
    y_new, ladj_new = t.forward_and_log_abs_det(x)
    y_ref, ladj_ref = t.with_cache(0).forward_and_log_abs_det(x)
    torch.testing.assert_close(y_new, y_ref, atol=0, rtol=0)
    torch.testing.assert_close(ladj_new, ladj_ref, atol=0, rtol=0)
    assert not torch.equal(y_new, y)
    # the inverse of the old output is recomputed with the new parameters too
    torch.testing.assert_close(t.inv(y), t.with_cache(0).inv(y), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_transformed_distribution(name):
    flow = build(name)
    entry = REGISTRY[name]
    _, ctx = inputs(name, (10,))
    base = dist.Normal(torch.zeros(entry.dim, dtype=torch.float64), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, [bind(flow, ctx)])
    y = d.rsample(() if ctx is not None else (10,))
    assert y.shape == (10, entry.dim)
    x, ladj = bind(flow, ctx).with_cache(0).inverse_and_log_abs_det(y)
    torch.testing.assert_close(d.log_prob(y), base.log_prob(x) - ladj, atol=1e-8, rtol=0)
    # a value not just sampled (no cache) gives the same density
    torch.testing.assert_close(d.log_prob(y.clone()), d.log_prob(y), atol=1e-8, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_dtype_follows_parameters(name):
    flow = build(name, dtype=torch.float32)
    x, ctx = inputs(name, (3,), dtype=torch.float32)
    assert bind(flow, ctx)(x).dtype == torch.float32
    flow.double()
    x, ctx = inputs(name, (3,), dtype=torch.float64)
    y, ladj = bind(flow, ctx).forward_and_log_abs_det(x)
    assert y.dtype == ladj.dtype == torch.float64


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_cuda(name):
    flow = build(name).to("cuda")
    x, ctx = inputs(name, (9,), device="cuda")
    t = bind(flow, ctx)
    y, ladj = t.forward_and_log_abs_det(x)
    assert y.device.type == ladj.device.type == "cuda"
    torch.testing.assert_close(t.with_cache(0).inv(y), x, atol=1e-8, rtol=1e-8)
    cpu = build(name)
    _, ctx_cpu = inputs(name, (9,))
    y_cpu = bind(cpu, ctx_cpu)(x.cpu())
    torch.testing.assert_close(y.cpu(), y_cpu, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_repr_names_the_family(name):
    flow = build(name)
    text = repr(flow)
    assert type(flow).__name__ in text and f"dim={REGISTRY[name].dim}" in text


@pytest.mark.parametrize("name", NAMES)
def test_wrong_trailing_shape_is_a_value_error(name):
    entry = REGISTRY[name]
    flow = build(name)
    _, ctx = inputs(name, (2,))
    t = bind(flow, ctx)
    bad = torch.zeros(2, entry.dim + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"\(\.\.\., {entry.dim}\).*\(2, {entry.dim + 1}\)"):
        t(bad)
    with pytest.raises(ValueError, match=rf"\(2, {entry.dim + 1}\)"):
        t.inv(bad)
    if entry.context_dim:
        with pytest.raises(ValueError, match=rf"context of shape \(\.\.\., {entry.context_dim}\)"):
            flow.condition(torch.zeros(2, entry.context_dim + 2))
        with pytest.raises(ValueError, match="is conditional"):
            flow(torch.zeros(entry.dim, dtype=torch.float64))
    else:
        with pytest.raises(ValueError, match="context_dim=0"):
            flow.condition(torch.zeros(3))
