"""Property tests of the rational-quadratic spline (``flowguide.transforms.spline``), in float64.

The generic suite runs the spline flows end to end; here the elementwise spline itself is checked
over random raw parameters: knots, monotonicity, continuity, derivatives, inverse, identity at
zero parameters, argument validation and gradients far outside the bound.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowguide.transforms.spline import (
    SplineParams,
    rational_quadratic_spline,
    spline_params,
    validate_spline_args,
)

F64 = torch.float64
PROPERTY = settings(max_examples=60, deadline=None)


@st.composite
def splines(draw) -> tuple[SplineParams, float, int]:
    """Random raw parameters: bins 2..10, bound 0.5..5, entries in [-scale, scale], scale <= 5."""
    bins = draw(st.integers(2, 10))
    bound = draw(st.floats(0.5, 5.0))
    scale = draw(st.floats(0.0, 5.0))
    unit = draw(st.lists(st.floats(-1.0, 1.0), min_size=3 * bins - 1, max_size=3 * bins - 1))
    raw = scale * torch.tensor(unit, dtype=F64)
    return spline_params(raw, bound), bound, bins


def spline(x: torch.Tensor, p: SplineParams, bound: float, inverse: bool = False):
    return rational_quadratic_spline(x, p, bound, inverse=inverse)


def grid(bound: float, n: int = 2001, reach: float = 1.5) -> torch.Tensor:
    return torch.linspace(-reach * bound, reach * bound, n, dtype=F64)


# -- knots -------------------------------------------------------------------------------------


@PROPERTY
@given(splines())
def test_knots_span_the_interval_and_increase(case):
    p, bound, bins = case
    for knots in (p.x, p.y):
        assert knots.shape == (bins + 1,)
        assert knots[0].item() == -bound and knots[-1].item() == bound
        assert (knots.diff() > 0).all()
        # every bin keeps at least its floor (min_width = min_height = 1e-3, in units of 2B)
        assert (knots.diff() >= 2 * bound * 1e-3 * (1 - 1e-9)).all()
    assert (p.derivative > 0).all()
    assert p.derivative[0].item() == p.derivative[-1].item() == 1.0


@PROPERTY
@given(splines())
def test_spline_interpolates_its_knots_with_their_derivatives(case):
    """g(x_k) = y_k and g'(x_k) = delta_k; left and right limits at every knot agree."""
    p, bound, _ = case
    y, logd = spline(p.x, p, bound)
    torch.testing.assert_close(y, p.y, atol=1e-12, rtol=0)
    torch.testing.assert_close(logd.exp(), p.derivative, atol=0, rtol=1e-9)
    gap = 1e-11
    left, _ = spline(p.x[1:-1] - gap, p, bound)
    right, _ = spline(p.x[1:-1] + gap, p, bound)
    assert ((right - left).abs() <= 1e-9).all()
    x_back, _ = spline(p.y, p, bound, inverse=True)
    torch.testing.assert_close(x_back, p.x, atol=1e-12, rtol=0)


# -- monotonicity, continuity, derivative ------------------------------------------------------


@PROPERTY
@given(splines(), st.lists(st.floats(-1.5, 1.5), min_size=1, max_size=50))
def test_strictly_monotone(case, extra):
    p, bound, _ = case
    points = torch.cat([grid(bound), p.x, bound * torch.tensor(extra, dtype=F64)])
    x = points.unique()  # sorted, distinct
    x = x[torch.cat([torch.tensor([True]), x.diff() > 1e-6 * bound])]
    y, _ = spline(x, p, bound)
    assert (y.diff() > 0).all()


@PROPERTY
@given(splines())
def test_continuous_at_the_bound_with_unit_derivative(case):
    p, bound, _ = case
    for side in (-1.0, 1.0):
        edge = torch.tensor(side * bound, dtype=F64)
        eps = 1e-10
        inner, logd_inner = spline(edge - side * eps, p, bound)
        outer, logd_outer = spline(edge + side * eps, p, bound)
        at, _ = spline(edge, p, bound)
        assert abs(inner.item() - outer.item()) <= 1e-9
        assert abs(at.item() - edge.item()) <= 1e-12
        # identity outside, exactly
        assert outer.item() == edge.item() + side * eps and logd_outer.item() == 0.0
        # the derivative tends to 1 from inside: |g' - 1| shrinks in proportion to the distance,
        # at a rate |g''| <= ~2 s / w <= ~2e6 (slope s <= 1e3 over a width w >= 1e-3)
        assert logd_inner.isfinite()
        _, logd_far = spline(edge - side * 1e-8, p, bound)
        _, logd_near = spline(edge - side * 1e-12, p, bound)
        assert abs(logd_near.item()) <= 1e-5
        assert abs(logd_near.item()) <= 1e-3 * abs(logd_far.item()) + 1e-13


@PROPERTY
@given(splines())
def test_derivative_is_exp_logd_and_matches_autograd_and_finite_differences(case):
    p, bound, _ = case
    x = grid(bound, n=301, reach=1.2).requires_grad_(True)
    y, logd = spline(x, p, bound)
    (dydx,) = torch.autograd.grad(y.sum(), x)
    assert (logd.exp() > 0).all()
    torch.testing.assert_close(logd.exp(), dydx, atol=0, rtol=1e-9)
    # central differences, away from the knots (where the second derivative jumps)
    h = 1e-7
    x = x.detach()
    away = (x.unsqueeze(-1) - p.x).abs().min(-1).values > 1e-5
    x = x[away]
    fd = (spline(x + h, p, bound)[0] - spline(x - h, p, bound)[0]) / (2 * h)
    exact = spline(x, p, bound)[1].exp()
    assert ((fd - exact).abs() <= 1e-6 + 1e-5 * exact).all()


# -- inverse -----------------------------------------------------------------------------------


@PROPERTY
@given(splines())
def test_inverse_undoes_forward_and_returns_the_forward_log_derivative(case):
    p, bound, _ = case
    x = grid(bound)
    y, logd = spline(x, p, bound)
    x2, logd2 = spline(y, p, bound, inverse=True)
    torch.testing.assert_close(x2, x, atol=1e-8, rtol=0)
    torch.testing.assert_close(logd2, logd, atol=1e-6, rtol=0)
    # and the other way round: forward(inverse(y)) == y over a grid of outputs
    y = grid(bound)
    x, logd_inv = spline(y, p, bound, inverse=True)
    y2, logd_fwd = spline(x, p, bound)
    torch.testing.assert_close(y2, y, atol=1e-12, rtol=0)
    torch.testing.assert_close(logd_inv, logd_fwd, atol=1e-10, rtol=0)


@pytest.mark.parametrize("bins", [2, 3, 7, 10])
@pytest.mark.parametrize("bound", [0.5, 3.0])
@pytest.mark.parametrize("floors", [(1e-3, 1e-3, 1e-3), (0.05, 1e-4, 0.5)], ids=str)
def test_zero_parameters_are_the_identity(bins, bound, floors):
    p = spline_params(torch.zeros(4, 3 * bins - 1, dtype=F64), bound, *floors)
    torch.testing.assert_close(p.x, p.y, atol=1e-15, rtol=0)
    torch.testing.assert_close(p.derivative, torch.ones_like(p.derivative), atol=1e-15, rtol=0)
    x = grid(bound, n=101).reshape(101, 1).expand(101, 4)
    for inverse in (False, True):
        y, logd = spline(x, p, bound, inverse=inverse)
        torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
        torch.testing.assert_close(logd, torch.zeros_like(logd), atol=1e-12, rtol=0)


@pytest.mark.parametrize("floors", [(0.05, 1e-4), (1e-4, 0.05), (0.02, 0.02)], ids=str)
def test_bin_floors_hold_for_widths_and_heights_separately(floors):
    """Widths and heights share one softmax when their floors are equal and not otherwise;
    either way each keeps its own floor and the knots run from -B to B exactly."""
    min_width, min_height = floors
    raw = 6 * torch.randn(50, 3 * 6 - 1, generator=torch.Generator().manual_seed(3), dtype=F64)
    p = spline_params(raw, 2.0, min_width, min_height)
    for knots, floor in ((p.x, min_width), (p.y, min_height)):
        assert (knots[:, 0] == -2.0).all() and (knots[:, -1] == 2.0).all()
        assert (knots.diff(dim=-1) >= 4.0 * floor * (1 - 1e-9)).all()
        assert knots.diff(dim=-1).min() < 4.0 * floor * 1.5  # some bin sits near its floor
    x = torch.linspace(-2.5, 2.5, 50, dtype=F64)
    y, _ = spline(x, p, 2.0)
    x_back, _ = spline(y, p, 2.0, inverse=True)
    # a height at its floor of 1e-4 makes a bin nearly flat, where the inverse amplifies rounding
    torch.testing.assert_close(x_back, x, atol=1e-6, rtol=0)


def test_batched_parameters_broadcast_against_inputs():
    g = torch.Generator().manual_seed(0)
    p = spline_params(2 * torch.randn(3, 1, 3 * 5 - 1, generator=g, dtype=F64), 2.0)
    x = 2.5 * torch.randn(4, generator=g, dtype=F64)
    y, logd = spline(x, p, 2.0)
    assert y.shape == logd.shape == (3, 4)
    for i in range(3):
        yi, logdi = spline(x, SplineParams(*(t[i, 0] for t in p)), 2.0)
        torch.testing.assert_close(y[i], yi, atol=0, rtol=0)
        torch.testing.assert_close(logd[i], logdi, atol=0, rtol=0)


# -- argument validation -----------------------------------------------------------------------

GOOD = {"bins": 4, "bound": 3.0, "min_width": 1e-3, "min_height": 1e-3, "min_derivative": 1e-3}


@pytest.mark.parametrize(
    "name, value",
    [
        ("bins", 1),
        ("bins", 0),
        ("bins", -3),
        ("bins", 2.5),
        ("bins", True),
        ("bound", 0.0),
        ("bound", -1.0),
        ("bound", float("inf")),
        ("bound", float("nan")),
        ("min_width", 0.25),  # min_width * bins == 1
        ("min_width", 0.3),
        ("min_width", 0.0),
        ("min_width", -0.1),
        ("min_height", 0.25),
        ("min_height", 0.0),
        ("min_derivative", 0.0),
        ("min_derivative", 1.0),
        ("min_derivative", -0.5),
        ("min_derivative", 2.0),
    ],
)
def test_validate_spline_args_names_the_argument_and_value(name, value):
    with pytest.raises(ValueError, match=rf"{name}\b.*{value!r}"):
        validate_spline_args(**{**GOOD, name: value})


def test_validate_spline_args_accepts_the_edges_of_the_valid_range():
    validate_spline_args(2, 1e-6, 0.499, 0.499, 0.999)
    validate_spline_args(10, 100.0, 1e-9, 0.0999, 1e-9)


# -- far outside the bound ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gradients_through_far_outside_inputs(dtype):
    g = torch.Generator().manual_seed(1)
    raw = (5 * torch.randn(6, 3 * 8 - 1, generator=g, dtype=F64)).to(dtype).requires_grad_(True)
    # 1e4 as asked of the flows, and values whose squares overflow the dtype
    huge = 1e30 if dtype == torch.float32 else 1e200
    x = torch.tensor([-1e4, 1e4, -huge, huge, -50.0, 0.3], dtype=dtype).requires_grad_(True)
    y, logd = spline(x, spline_params(raw, 2.0), 2.0)
    assert torch.equal(y[:5], x[:5].detach()) and (logd[:5] == 0).all()
    (dydx,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    assert dydx.isfinite().all()
    assert (dydx[:5] == 1).all()
    (dlogd_dx,) = torch.autograd.grad(logd.sum(), x, retain_graph=True)
    assert (dlogd_dx[:5] == 0).all() and dlogd_dx.isfinite().all()
    (y.sum() + logd.sum()).backward()
    assert raw.grad.isfinite().all()
    # outside, nothing depends on the parameters; inside, something does
    assert (raw.grad[:5] == 0).all() and raw.grad[5].abs().sum() > 0
    # the inverse is the identity out there, with the same finite gradients
    yy = x.detach().clone().requires_grad_(True)
    x_back, logd_back = spline(yy, spline_params(raw.detach(), 2.0), 2.0, inverse=True)
    assert torch.equal(x_back[:5], yy[:5].detach()) and (logd_back[:5] == 0).all()
    (dxdy,) = torch.autograd.grad(x_back.sum() + logd_back.sum(), yy)
    assert dxdy.isfinite().all() and (dxdy[:5] == 1).all()


# -- the fused forward's written-out backward ---------------------------------------------------


def _plain_forward(x: torch.Tensor, raw: torch.Tensor, bound: float):
    """The forward spline with autograd's own backward: the fused node's reference."""
    from flowguide.transforms.spline import _bin_values, _spline_forward, _spline_table, _unpack

    knots, derivative = _spline_table(raw, bound)
    index = (x.clamp(-bound, bound).unsqueeze(-1) >= knots[..., 0, 1:-1]).sum(-1, keepdim=True)
    return _spline_forward(x, *_unpack(_bin_values(knots, derivative, index)), bound)[:2]


@PROPERTY
@given(splines(), st.integers(0, 2**31 - 1))
def test_fused_backward_equals_autograd_of_the_plain_expression(case, seed):
    _, bound, bins = case
    gen = torch.Generator().manual_seed(seed)
    raw = (2 * torch.randn(7, 3 * bins - 1, generator=gen, dtype=F64)).requires_grad_()
    # inside the bound, on both sides of it and far out: the identity tails have gradient 1
    x = bound * torch.tensor([-30.0, -1.2, -0.999, -0.3, 0.0, 0.6, 1.5], dtype=F64)
    x.requires_grad_()
    w_out, w_logd = torch.randn(2, 7, generator=gen, dtype=F64)
    for which in ("both", "out", "logd"):
        grads = []
        for fn in (lambda: rational_quadratic_spline(x, spline_params(raw, bound), bound),
                   lambda: _plain_forward(x, raw, bound)):  # fmt: skip
            out, logd = fn()
            loss = {"both": (out * w_out).sum() + (logd * w_logd).sum(),
                    "out": (out * w_out).sum(), "logd": (logd * w_logd).sum()}[which]  # fmt: skip
            grads.append(torch.autograd.grad(loss, (x, raw)))
        for fused, plain in zip(*grads, strict=True):
            torch.testing.assert_close(fused, plain, atol=1e-10, rtol=1e-9)


def test_fused_forward_passes_gradcheck_and_gradgradcheck():
    raw = (torch.randn(5, 3 * 4 - 1, dtype=F64) * 1.5).requires_grad_()
    x = torch.tensor([-2.5, -1.0, 0.1, 0.7, 1.9], dtype=F64, requires_grad=True)

    def f(x, raw):
        return rational_quadratic_spline(x, spline_params(raw, 2.0), 2.0)

    assert torch.autograd.gradcheck(f, (x, raw))
    assert torch.autograd.gradgradcheck(f, (x, raw))
