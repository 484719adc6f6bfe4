r"""The monotone rational-quadratic spline (Durkan et al. 2019), elementwise and batched.

On :math:`[-B, B]` the spline has :math:`K` bins with knots :math:`(x_k, y_k)` and positive
derivatives :math:`\delta_k` at the knots. In bin :math:`k`, with :math:`w_k = x_{k+1} - x_k`,
:math:`h_k = y_{k+1} - y_k`, :math:`s_k = h_k / w_k` and :math:`\xi = (x - x_k) / w_k`,

.. math::

    g(x) = y_k + \frac{h_k \left[ s_k \xi^2 + \delta_k \xi (1 - \xi) \right]}
                      {s_k + (\delta_{k+1} + \delta_k - 2 s_k)\, \xi (1 - \xi)},

    g'(x) = \frac{s_k^2 \left[ \delta_{k+1} \xi^2 + 2 s_k \xi (1 - \xi)
            + \delta_k (1 - \xi)^2 \right]}
            {\left[ s_k + (\delta_{k+1} + \delta_k - 2 s_k)\, \xi (1 - \xi) \right]^2}.

Outside :math:`[-B, B]` the map is the identity, and the boundary derivatives are 1, so the map is
continuously differentiable everywhere. The inverse solves a quadratic
:math:`a \xi^2 + b \xi + c = 0` (with :math:`c \le 0`) for its root in :math:`[0, 1]`, written as
:math:`2c / (-b - \sqrt{b^2 - 4ac})` when :math:`b \ge 0` and as
:math:`(\sqrt{b^2 - 4ac} - b) / 2a` when :math:`b < 0` (then :math:`a = h_k s_k - b > 0`), so
neither form cancels catastrophically; the discriminant is clamped at zero.

Parameterisation (ours): unnormalised widths, heights and interior derivatives. Widths and heights
go through a softmax with a floor (``min_width``, ``min_height``); derivatives through
:math:`\delta = \delta_{\min} + \mathrm{softplus}(\theta + c)` with :math:`c` chosen so that
:math:`\theta = 0` gives :math:`\delta = 1`. Zero parameters therefore give equal bins with unit
slopes: exactly the identity.

Values inside the bound are computed on a clamped copy of the input and then selected, so inputs
far outside the bound never send a NaN gradient through the branch they do not use.

The forward direction, the one a guide's training step runs, is one autograd node with its
backward written out (checked against autograd of the plain expression in the tests); the knots
of the widths and of the heights come from one softmax, and a bin's six values from one gather.

Reference: Durkan, Bekasov, Murray, Papamakarios 2019, "Neural Spline Flows", arXiv:1906.04032.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import _functorch_active

__all__ = ["SplineParams", "rational_quadratic_spline", "spline_params", "validate_spline_args"]


class SplineParams(NamedTuple):
    """Knots and derivatives of a batch of splines, each of shape ``(..., K + 1)``."""

    x: Tensor
    y: Tensor
    derivative: Tensor


def validate_spline_args(
    bins: int, bound: float, min_width: float, min_height: float, min_derivative: float
) -> None:
    """Raise ``ValueError`` naming the argument when a spline setting is out of range."""
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be a finite number > 0, got {bound!r}")
    for name, value in (("min_width", min_width), ("min_height", min_height)):
        if not (0 < value and value * bins < 1):
            raise ValueError(
                f"{name} must be > 0 with {name} * bins < 1 (bins={bins}), got {value!r}"
            )
    if not (0 < min_derivative < 1):
        raise ValueError(f"min_derivative must lie in (0, 1), got {min_derivative!r}")


def _softmax(raw: Tensor) -> Tensor:
    """``torch.softmax(raw, dim=-1)``, computed on the CPU as a softmax over the rows of the
    transposed ``(K, N)`` view: the same function, but torch's CPU kernel for a short last dim
    (``K`` = 8 bins) is about 10x slower than its kernel for a reduction across rows (torch 2.x);
    it was the largest single cost of a spline flow's training step (speed fix)."""
    if raw.device.type != "cpu" or raw.dim() == 0:
        return torch.softmax(raw, dim=-1)
    bins = raw.shape[-1]
    return torch.softmax(raw.reshape(-1, bins).T, dim=0).T.reshape(raw.shape)


def _knots(raw: Tensor, bound: float, minimum: float) -> Tensor:
    """Knots from unnormalised bin sizes ``(..., K)``: ``(..., K + 1)`` from -B to B."""
    # x_k = -B + 2B [m k + (1 - m K) (softmax_0 + ... + softmax_{k-1})] for k < K and x_K = B,
    # in few kernels: a cumsum, one multiply-add with the constant term, a pad at each end
    bins = raw.shape[-1]
    shares = torch.cumsum(F.pad(_softmax(raw)[..., :-1], (1, 0)), dim=-1)
    floor = torch.linspace(
        -bound, bound * (2 * minimum * (bins - 1) - 1), bins, dtype=raw.dtype, device=raw.device
    )
    knots = torch.add(floor, shares, alpha=2 * bound * (1 - minimum * bins))
    return F.pad(knots, (0, 1), value=bound)


def _spline_table(
    raw: Tensor,
    bound: float,
    min_width: float = 1e-3,
    min_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """:func:`spline_params` in the form :func:`_spline` reads: the x and y knots stacked,
    ``(..., 2, K + 1)``, and the derivatives, ``(..., K + 1)``. The widths and heights go through
    one softmax when their floors are equal (the default)."""
    bins = (raw.shape[-1] + 1) // 3
    sizes, raw_d = raw.split((2 * bins, bins - 1), dim=-1)
    sizes = sizes.unflatten(-1, (2, bins))
    if min_width == min_height:
        knots = _knots(sizes, bound, min_width)
    else:
        widths, heights = sizes.unbind(-2)
        knots = torch.stack(
            [_knots(widths, bound, min_width), _knots(heights, bound, min_height)], dim=-2
        )
    shift = math.log(math.expm1(1.0 - min_derivative))
    return knots, F.pad(min_derivative + F.softplus(raw_d + shift), (1, 1), value=1.0)


def spline_params(
    raw: Tensor,
    bound: float,
    min_width: float = 1e-3,
    min_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> SplineParams:
    r"""Turn unnormalised parameters ``(..., 3K - 1)`` into knots and knot derivatives.

    The last axis holds ``K`` widths :math:`\theta^w`, ``K`` heights :math:`\theta^h` and
    ``K - 1`` interior derivatives :math:`\theta^d`. With :math:`w_{\min}` = ``min_width`` (and
    likewise for the heights),

    .. math::

        w_k = 2B \left[ w_{\min} + (1 - K w_{\min})\, \mathrm{softmax}(\theta^w)_k \right],
        \qquad x_0 = -B, \quad x_k = x_{k-1} + w_k, \quad x_K = B,

        \delta_k = \delta_{\min} + \mathrm{softplus}\big(\theta^d_k
            + \log(e^{1 - \delta_{\min}} - 1)\big), \qquad \delta_0 = \delta_K = 1,

    so zero parameters give :math:`K` equal bins and unit slopes: the identity. The boundary
    derivatives of 1 make the spline join the identity outside :math:`[-B, B]` smoothly.

    Reference: Durkan et al. 2019, "Neural Spline Flows", arXiv:1906.04032 (the spline; the
    floors and the shift that makes zero parameters the identity are this package's choices).

    Example:
        >>> p = spline_params(torch.zeros(4, 3 * 5 - 1), bound=3.0)
        >>> p.x.shape, bool(torch.allclose(p.x, p.y))
        (torch.Size([4, 6]), True)
        >>> bool(torch.allclose(p.derivative, torch.ones(6)))
        True
    """
    knots, derivative = _spline_table(raw, bound, min_width, min_height, min_derivative)
    return SplineParams(*knots.unbind(-2), derivative)


def _bin_values(knots: Tensor, derivative: Tensor, index: Tensor) -> Tensor:
    """Each element's bin ends, shape ``(..., 3, 2)``: rows x, y and derivative, columns the
    knots ``index`` and ``index + 1`` (``knots`` and ``derivative`` as :func:`_spline_table`
    gives them)."""
    both = torch.cat([index, index + 1], dim=-1)
    xy = knots.gather(-1, both.unsqueeze(-2).expand(*both.shape[:-1], 2, 2))
    return torch.cat([xy, derivative.gather(-1, both).unsqueeze(-2)], dim=-2)


def _unpack(values: Tensor) -> tuple[Tensor, ...]:
    """Per-element bin quantities from :func:`_bin_values`: x_k, w_k, y_k, h_k, delta_k,
    delta_{k+1}."""
    (xk, x1), (yk, y1), (dk, dk1) = (values[..., i, :].unbind(-1) for i in range(3))
    return xk, x1 - xk, yk, y1 - yk, dk, dk1


def rational_quadratic_spline(
    inputs: Tensor, params: SplineParams, bound: float, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    r"""Apply the monotone rational-quadratic spline :math:`g` (or its inverse) elementwise.

    In bin :math:`k`, with :math:`\xi = (x - x_k) / w_k` and :math:`s_k = h_k / w_k`,

    .. math::

        g(x) = y_k + \frac{h_k \left[ s_k \xi^2 + \delta_k \xi (1 - \xi) \right]}
                          {s_k + (\delta_{k+1} + \delta_k - 2 s_k)\, \xi (1 - \xi)},

    and :math:`g(x) = x` outside :math:`[-B, B]`; the inverse solves a quadratic in
    :math:`\xi` (see the module docstring for :math:`g'` and the stable root).

    Args:
        inputs: values of shape ``S``.
        params: knots and derivatives broadcastable to ``S + (K + 1,)``.
        bound: the half-width :math:`B` of the spline's interval.
        inverse: apply :math:`g^{-1}` instead of :math:`g`.

    Returns:
        the outputs (shape ``S``) and :math:`\log g'` at the *forward* input, elementwise
        (shape ``S``), so ``inverse=True`` returns the forward log-derivative at the
        recovered point.

    Reference: Durkan et al. 2019, "Neural Spline Flows", arXiv:1906.04032.

    Example:
        >>> p = spline_params(torch.randn(3, 3 * 4 - 1), bound=2.0)
        >>> x = torch.tensor([-5.0, 0.3, 1.9])
        >>> y, logd = rational_quadratic_spline(x, p, bound=2.0)
        >>> x2, _ = rational_quadratic_spline(y, p, bound=2.0, inverse=True)
        >>> bool(torch.allclose(x, x2, atol=1e-5)), y[0].item(), logd[0].item()
        (True, -5.0, 0.0)
    """
    x, y, derivative = torch.broadcast_tensors(*params)
    return _spline(inputs, (torch.stack([x, y], dim=-2), derivative), bound, inverse)


def _spline(
    inputs: Tensor, table: tuple[Tensor, Tensor], bound: float, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    """:func:`rational_quadratic_spline` for parameters in :func:`_spline_table`'s form."""
    knots, derivative = table
    shape = torch.broadcast_shapes(inputs.shape, derivative.shape[:-1])
    inputs = inputs.expand(shape)
    knots = knots.expand(*shape, *knots.shape[-2:])
    derivative = derivative.expand(*shape, derivative.shape[-1])
    # the interior knots lie strictly inside (-B, B), so an input beyond the bound falls in the
    # first or last bin without being clamped first
    edges = knots[..., 1 if inverse else 0, 1:-1]
    index = (inputs.unsqueeze(-1) >= edges).sum(dim=-1, keepdim=True)
    values = _bin_values(knots, derivative, index)
    if not inverse:
        if (
            torch.is_grad_enabled()
            and (inputs.requires_grad or values.requires_grad)
            and not _functorch_active()
        ):
            return _SplineForward.apply(inputs, values, bound)  # type: ignore[no-any-return]
        return _spline_forward(inputs, *_unpack(values), bound)[:2]
    xk, wk, yk, hk, dk, dk1 = _unpack(values)
    inside = (inputs >= -bound) & (inputs <= bound)
    s = hk / wk
    s2 = s + s
    curve = dk1 + dk - s2
    dy = inputs.clamp(-bound, bound) - yk
    a = hk * (s - dk) + dy * curve
    b = hk * dk - dy * curve
    c = -s * dy
    root = (b * b - 4 * a * c).clamp_min(0.0).sqrt()
    # the root in [0, 1] without cancellation: 2c / (-b - root) when b >= 0, and
    # (root - b) / 2a when b < 0 (then a = h s - b > 0); the unused branch gets a safe divisor
    pos = b >= 0
    xi = torch.where(
        pos,
        2 * c / torch.where(pos, -b - root, -torch.ones_like(b)),
        (root - b) / torch.where(pos, torch.ones_like(a), 2 * a),
    ).clamp(0.0, 1.0)
    out = xk + xi * wk
    logd = _log_derivative(s, s2, xi, 1 - xi, curve, dk, dk1)[0]
    return torch.where(inside, out, inputs), torch.where(inside, logd, torch.zeros_like(logd))


def _log_derivative(
    s: Tensor, s2: Tensor, xi: Tensor, t: Tensor, curve: Tensor, dk: Tensor, dk1: Tensor
) -> tuple[Tensor, ...]:
    r""":math:`\log g' = 2 \log s + \log N - 2 \log D` at :math:`\xi` for both directions
    (``s2`` is :math:`2s`, ``t`` is :math:`1 - \xi`), with the terms :math:`\xi (1 - \xi)`,
    :math:`D` and :math:`N` that the forward map and its backward reuse. Every term of
    :math:`N` is non-negative, so nothing cancels."""
    om = xi * t
    denom = torch.addcmul(s, curve, om)
    slope = torch.addcmul(torch.addcmul(dk1 * xi * xi, s2, om), dk * t, t)
    ratio = torch.log(s / denom)
    return ratio + ratio + torch.log(slope), om, denom, slope


def _spline_forward(
    inputs: Tensor,
    xk: Tensor,
    wk: Tensor,
    yk: Tensor,
    hk: Tensor,
    dk: Tensor,
    dk1: Tensor,
    bound: float,
) -> tuple[Tensor, ...]:
    r"""The forward spline :math:`g` and :math:`\log g'` given each element's bin (knot
    :math:`x_k`, width, :math:`y_k`, height, the two knot derivatives), the identity outside
    :math:`[-B, B]`; after the two outputs, the intermediates :class:`_SplineForward`'s backward
    reuses. Every term of the numerators is non-negative, so nothing cancels."""
    # (s + s rather than 2 * s: on the small tensors of an SVI step an operation with a Python
    # number costs about twice one between tensors, for wrapping the number)
    inside = (inputs >= -bound) & (inputs <= bound)
    s = hk / wk
    s2 = s + s
    xi = ((inputs.clamp(-bound, bound) - xk) / wk).clamp(0.0, 1.0)
    t = 1 - xi
    curve = dk1 + dk - s2
    logd, om, denom, slope = _log_derivative(s, s2, xi, t, curve, dk, dk1)
    num = torch.addcmul(s * xi * xi, dk, om)  # s xi^2 + d_k xi (1 - xi)
    out = torch.addcmul(yk, hk, num / denom)
    zero = torch.zeros((), dtype=logd.dtype, device=logd.device)
    return (
        torch.where(inside, out, inputs),
        torch.where(inside, logd, zero),
        inside,
        s,
        xi,
        t,
        om,
        curve,
        denom,
        num,
        slope,
    )


class _SplineForward(torch.autograd.Function):
    r""":func:`_spline_forward` as one autograd node with its backward written out.

    With :math:`\xi = (x - x_k) / w_k`, :math:`s = h_k / w_k`, :math:`c = \delta_{k+1} +
    \delta_k - 2s`, :math:`D = s + c\,\xi(1 - \xi)`, :math:`P = s\xi^2 + \delta_k \xi(1 -
    \xi)`, :math:`N = \delta_{k+1}\xi^2 + 2s\xi(1 - \xi) + \delta_k(1 - \xi)^2`, the outputs
    are :math:`y = y_k + h_k P / D` and :math:`\ell = 2\log s + \log N - 2\log D`; the
    backward applies the chain rule through these shared terms once, as one node, where
    autograd's graph of the same expression has a node per operation. On the small tensors of an
    SVI step the spline's cost is per-kernel overhead, and the guide's step runs 1.10x to 1.16x
    faster for it (``docs/benchmarks/svi.md``). Under ``create_graph=True`` it differentiates the
    plain expression instead, so that higher derivatives are exact."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, inputs: Tensor, values: Tensor, bound: float
    ) -> tuple[Tensor, Tensor]:
        _, wk, _, hk, dk, dk1 = bins = _unpack(values)
        out, logd, *kept = _spline_forward(inputs, *bins, bound)
        ctx.save_for_backward(inputs, values, wk, hk, dk, dk1, *kept)
        ctx.bound = bound
        return out, logd

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: Tensor | None, grad_logd: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: differentiate the plain expression
            return _spline_forward_graph(needs, saved[:2], ctx.bound, grad_out, grad_logd)
        _, _, wk, hk, dk, dk1, inside, s, xi, t, om, curve, denom, num, slope = saved
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        gy = zero if grad_out is None else torch.where(inside, grad_out, zero)
        gl = zero if grad_logd is None else torch.where(inside, grad_logd, zero)
        gl2 = gl + gl  # (not 2 * gl: see _spline_forward)
        inv_d = denom.reciprocal()
        a = gy * hk * inv_d  # the adjoint of P
        g_denom = -torch.addcmul(gl2, a, num) * inv_d
        g_slope = gl / slope
        g_slope2 = g_slope + g_slope
        g_curve = g_denom * om
        g_om = torch.addcmul(torch.addcmul(a * dk, g_slope2, s), g_denom, curve)
        g_s = gl2 / s + a * xi * xi + g_slope2 * om + g_denom - (g_curve + g_curve)
        g_xi = (xi + xi) * torch.addcmul(a * s, g_slope, dk1) - g_slope2 * dk * t
        g_xi = torch.addcmul(g_xi, g_om, t - xi)
        inv_w = wk.reciprocal()
        g_x = g_xi * inv_w
        g_w = -torch.addcmul(g_x * xi, g_s * s, inv_w)  # through xi and s
        g_h = gy * num * inv_d + g_s * inv_w  # through the output and s
        g_dk = torch.addcmul(a * om, g_slope * t, t) + g_curve
        g_dk1 = g_slope * xi * xi + g_curve
        grad_inputs = None
        if needs[0]:
            grad_inputs = g_x if grad_out is None else torch.where(inside, g_x, grad_out)
        grad_values = None
        if needs[1]:  # x_k, x_{k+1}, y_k, y_{k+1}, delta_k, delta_{k+1}, as (..., 3, 2)
            gy_full = gy.expand_as(s)
            parts = [-g_x - g_w, g_w, gy_full - g_h, g_h, g_dk, g_dk1]
            grad_values = torch.stack(parts, dim=-1).unflatten(-1, (3, 2))
        return grad_inputs, grad_values, None


def _spline_forward_graph(
    needs: tuple[bool, ...],
    inputs: tuple[Tensor, ...],
    bound: float,
    grad_out: Tensor | None,
    grad_logd: Tensor | None,
) -> tuple[Tensor | None, ...]:
    """:class:`_SplineForward`'s backward as a differentiable graph (for ``create_graph``)."""
    with torch.enable_grad():
        args = [t.view_as(t) for t in inputs]
        out, logd = _spline_forward(args[0], *_unpack(args[1]), bound)[:2]
        outputs, grads = [], []
        for value, grad in ((out, grad_out), (logd, grad_logd)):
            if grad is not None:
                outputs.append(value)
                grads.append(grad)
        wanted = [t for t, need in zip(args, needs, strict=False) if need]
        found = iter(
            torch.autograd.grad(outputs, wanted, grads, create_graph=True, allow_unused=True)
        )
    return (*(next(found) if need else None for need in needs[:2]), None)
