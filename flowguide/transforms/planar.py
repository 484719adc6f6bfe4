r"""Planar flows (Rezende & Mohamed 2015), with a true inverse.

.. math::

    f(x) = x + \hat u \, \tanh(w^\top x + b), \qquad
    \log |\det J_f(x)| = \log\left(1 + (1 - \tanh^2(w^\top x + b))\, w^\top \hat u\right).

Invertibility needs :math:`w^\top \hat u > -1`. We build it into the parameterisation:

.. math::

    \hat u = u + \left(m(w^\top u) - w^\top u\right) \frac{w}{\lVert w \rVert^2},
    \qquad m(a) = \mathrm{softplus}(a + \log(e - 1)) - 1,

so :math:`w^\top \hat u = m(w^\top u) > -1`, and :math:`m(0) = 0` makes :math:`u = 0` the
identity for any :math:`w` (Rezende & Mohamed's :math:`m(a) = -1 + \mathrm{softplus}(a)` does not
vanish at 0).

Inverse (no library we know of has one). Writing :math:`\alpha = w^\top x`, the forward map gives
:math:`w^\top y = \alpha + w^\top \hat u \tanh(\alpha + b)`, a strictly increasing scalar equation
in :math:`\alpha` whose root lies in
:math:`[w^\top y - |w^\top \hat u|, w^\top y + |w^\top \hat u|]`.
We solve it by Newton's method safeguarded by bisection on that bracket, then set
:math:`x = y - \hat u \tanh(\alpha + b)`. The root-finding runs without autograd; one last Newton
step with autograd on gives the exact first-order gradients (the implicit function theorem).

Reference: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
arXiv:1505.05770.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Flow, _Parameters

__all__ = ["Planar", "shifted_softplus"]

_SHIFT = math.log(math.e - 1.0)


def shifted_softplus(a: Tensor) -> Tensor:
    r""":math:`m(a) = \mathrm{softplus}(a + \log(e - 1)) - 1`: increasing, :math:`> -1`, and
    :math:`m(0) = 0`.

    Example:
        >>> shifted_softplus(torch.tensor([0.0, -50.0])).tolist()
        [0.0, -1.0]
    """
    return F.softplus(a + _SHIFT) - 1.0


class Planar(Flow):
    r"""A planar flow :math:`f(x) = x + \hat u \tanh(w^\top x + b)` (see the module docstring).

    Args:
        dim: the dimension.
        context_dim: a context's width; with ``context_dim > 0`` an MLP of the context gives
            :math:`u, w, b` (amortized planar flows, as in Rezende & Mohamed's VAEs).
        hidden: the context network's hidden widths.
        activation: the context network's activation.
        max_iter: the most Newton steps of the inverse.

    Starts as the identity (:math:`u = 0`, :math:`b = 0`, small random :math:`w`). The log-det is
    :math:`\log(1 + (1 - \tanh^2(w^\top x + b))\, w^\top \hat u)`, and :math:`w^\top \hat u > -1`
    by construction, so every parameter value gives an invertible map.

    Reference: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
    arXiv:1505.05770 (the inverse is ours, see the module docstring).

    Example:
        >>> flow = Planar(3)
        >>> with torch.no_grad():
        ...     _ = flow.u.normal_()
        >>> x = torch.randn(5, 3)
        >>> bool(torch.allclose(flow.inv(flow(x)), x, atol=1e-5))
        True
    """

    def __init__(
        self,
        dim: int,
        context_dim: int = 0,
        hidden: Sequence[int] = (64,),
        activation: type[nn.Module] = nn.ReLU,
        max_iter: int = 100,
        cache_size: int = 1,
    ) -> None:
        super().__init__(dim, context_dim, cache_size)
        init = torch.cat([torch.zeros(dim), torch.randn(dim) / math.sqrt(dim), torch.zeros(1)])
        self.params = _Parameters(init, context_dim, hidden, activation)
        self.max_iter = max_iter

    @property
    def u(self) -> Tensor:
        """The unconstrained :math:`u` (unconditional flows only)."""
        return self.params.raw[: self.dim]

    def _split(self, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Return w, u_hat, b, w.u_hat and 1 + w.u_hat, each with the context's batch shape."""
        raw = self.params(context)
        u, w, b = raw.split((self.dim, self.dim, 1), dim=-1)
        wu = (w * u).sum(-1, keepdim=True)
        # fix: keep 1 + w.u_hat = softplus(w.u + log(e - 1)) itself, floored at the smallest
        # normal number. ``shifted_softplus`` rounds to exactly -1 once w.u < -37 (float64), and
        # then log(1 + w.u_hat) was -inf and the inverse NaN (e.g. for u = -100 w).
        one_plus = F.softplus(wu + _SHIFT).clamp_min(torch.finfo(wu.dtype).tiny)
        wu_hat = one_plus - 1.0
        norm2 = (w * w).sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        u_hat = u + (wu_hat - wu) * w / norm2
        return w, u_hat, b.squeeze(-1), wu_hat.squeeze(-1), one_plus.squeeze(-1)

    def _forward_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        w, u_hat, b, _, one_plus = self._split(context)
        h = torch.tanh((x * w).sum(-1) + b)
        y = x + u_hat * h.unsqueeze(-1)
        return y, _log_slope(h, one_plus)

    def _inverse_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        w, u_hat, b, wu, one_plus = self._split(context)
        target = (y * w).sum(-1)
        b, wu = b.expand_as(target), wu.expand_as(target)
        one_plus = one_plus.expand_as(target)
        with torch.no_grad():
            alpha = _solve_monotone(target, b, wu, self.max_iter, one_plus)
        # one Newton step with autograd on: exact value at the root, exact first-order gradients
        h = torch.tanh(alpha + b)
        alpha = alpha - (alpha + wu * h - target) / _slope(h, one_plus)
        h = torch.tanh(alpha + b)
        x = y - u_hat * h.unsqueeze(-1)
        return x, _log_slope(h, one_plus)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", max_iter={self.max_iter}"


def _slope(h: Tensor, one_plus: Tensor) -> Tensor:
    r""":math:`1 + (1 - h^2) c` written as :math:`(1 + c) - h^2 c`: positive, with no cancellation
    when :math:`c` is close to -1, and exactly 1 when :math:`c = 0` (fix, see ``Planar._split``)."""
    return one_plus + h * h * (1 - one_plus)


def _log_slope(h: Tensor, one_plus: Tensor) -> Tensor:
    return torch.log(_slope(h, one_plus))


def _solve_monotone(
    target: Tensor, b: Tensor, c: Tensor, max_iter: int, one_plus: Tensor | None = None
) -> Tensor:
    r"""Solve :math:`\alpha + c \tanh(\alpha + b) = t` (with :math:`c > -1`) elementwise by
    Newton's method, falling back to bisection whenever a step leaves the bracket.
    ``one_plus`` is :math:`1 + c` computed without rounding (default ``1 + c``)."""
    one_plus = 1 + c if one_plus is None else one_plus
    lo, hi = target - c.abs(), target + c.abs()
    alpha = target.clone()
    tol = 4 * torch.finfo(target.dtype).eps
    for i in range(max_iter):
        h = torch.tanh(alpha + b)
        g = alpha + c * h - target
        lo = torch.where(g < 0, alpha, lo)
        hi = torch.where(g > 0, alpha, hi)
        step = alpha - g / _slope(h, one_plus)
        outside = (step <= lo) | (step >= hi)
        alpha = torch.where(outside & (g != 0), 0.5 * (lo + hi), step)
        if i % 4 == 3 and bool((g.abs() <= tol * (1 + target.abs())).all()):
            break
    return alpha
