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

Reference: Durkan, Bekasov, Murray, Papamakarios 2019, "Neural Spline Flows", arXiv:1906.04032.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

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
    bins = raw.shape[-1]
    size = minimum + (1 - minimum * bins) * _softmax(raw)
    inner = 2 * bound * torch.cumsum(size[..., :-1], dim=-1) - bound
    return F.pad(F.pad(inner, (1, 0), value=-bound), (0, 1), value=bound)


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
    bins = (raw.shape[-1] + 1) // 3
    raw_w, raw_h, raw_d = raw.split((bins, bins, bins - 1), dim=-1)
    shift = math.log(math.expm1(1.0 - min_derivative))
    derivative = min_derivative + F.softplus(raw_d + shift)
    derivative = F.pad(derivative, (1, 1), value=1.0)
    return SplineParams(
        _knots(raw_w, bound, min_width), _knots(raw_h, bound, min_height), derivative
    )


def _gather(p: SplineParams, index: Tensor) -> tuple[Tensor, ...]:
    """Per-element bin quantities: x_k, w_k, y_k, h_k, delta_k, delta_{k+1}."""
    both = torch.cat([index, index + 1], dim=-1)
    x = p.x.gather(-1, both)
    y = p.y.gather(-1, both)
    d = p.derivative.gather(-1, both)
    xk, yk = x[..., 0], y[..., 0]
    return xk, x[..., 1] - xk, yk, y[..., 1] - yk, d[..., 0], d[..., 1]


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
    shape = torch.broadcast_shapes(inputs.shape, params.x.shape[:-1])
    inputs = inputs.expand(shape)
    p = SplineParams(*(t.expand(*shape, t.shape[-1]) for t in params))
    inside = (inputs >= -bound) & (inputs <= bound)
    z = inputs.clamp(-bound, bound)
    edges = p.y if inverse else p.x
    index = (z.unsqueeze(-1) >= edges[..., 1:-1]).sum(dim=-1, keepdim=True)
    xk, wk, yk, hk, dk, dk1 = _gather(p, index)
    s = hk / wk
    curve = dk1 + dk - 2 * s
    if inverse:
        dy = z - yk
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
    else:
        xi = ((z - xk) / wk).clamp(0.0, 1.0)
    om = xi * (1 - xi)
    denom = s + curve * om
    if not inverse:
        out = yk + hk * (s * xi * xi + dk * om) / denom
    logd = (
        2 * torch.log(s)
        + torch.log(dk1 * xi * xi + 2 * s * om + dk * (1 - xi) ** 2)
        - 2 * torch.log(denom)
    )
    return torch.where(inside, out, inputs), torch.where(inside, logd, torch.zeros_like(logd))
