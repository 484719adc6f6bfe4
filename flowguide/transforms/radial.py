r"""Radial flows (Rezende & Mohamed 2015), with an analytic inverse.

.. math::

    f(x) = x + \beta\, h(r)\, (x - x_0), \qquad r = \lVert x - x_0 \rVert,
    \qquad h(r) = \frac{1}{\alpha + r},

    \log |\det J_f(x)| = (D - 1) \log\left(1 + \beta h(r)\right)
        + \log\left(1 + \frac{\alpha\beta}{(\alpha + r)^2}\right).

Invertibility needs :math:`\beta \ge -\alpha`. We use :math:`\alpha = \mathrm{softplus}(a)` and
:math:`\beta = \alpha\, m(c)` with the shifted softplus :math:`m(c) > -1`, :math:`m(0) = 0`, so
:math:`\beta > -\alpha` always and :math:`c = 0` is the identity.

Inverse: :math:`y - x_0 = (1 + \beta h(r))(x - x_0)` is parallel to :math:`x - x_0`, and
:math:`\rho = \lVert y - x_0 \rVert = r (1 + \beta / (\alpha + r))` gives the quadratic
:math:`r^2 + (\alpha + \beta - \rho) r - \alpha\rho = 0` with a single root :math:`r \ge 0`, taken
in the form that does not cancel. Then :math:`x = x_0 + (y - x_0) / (1 + \beta h(r))`.

Reference: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
arXiv:1505.05770.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Flow, _Parameters
from .planar import _SHIFT

__all__ = ["Radial"]


class Radial(Flow):
    r"""A radial flow :math:`f(x) = x + \beta (x - x_0) / (\alpha + \lVert x - x_0 \rVert)`.

    Args:
        dim: the dimension.
        context_dim: a context's width; with ``context_dim > 0`` an MLP of the context gives
            :math:`x_0, \alpha, \beta`.
        hidden: the context network's hidden widths.
        activation: the context network's activation.

    Starts as the identity (:math:`\beta = 0`, a random centre :math:`x_0`).

    Example:
        >>> flow = Radial(2)
        >>> with torch.no_grad():
        ...     flow.params.raw[-1] = 1.5
        >>> x = torch.randn(4, 2)
        >>> bool(torch.allclose(flow.inv(flow(x)), x, atol=1e-5))
        True
    """

    def __init__(
        self,
        dim: int,
        context_dim: int = 0,
        hidden: Sequence[int] = (64,),
        activation: type[nn.Module] = nn.ReLU,
        cache_size: int = 1,
    ) -> None:
        super().__init__(dim, context_dim, cache_size)
        init = torch.cat([torch.randn(dim), torch.zeros(2)])
        self.params = _Parameters(init, context_dim, hidden, activation)

    def _split(self, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return x0, alpha, beta and alpha + beta, with the context's batch shape."""
        raw = self.params(context)
        x0, a, c = raw.split((self.dim, 1, 1), dim=-1)
        alpha = F.softplus(a)
        # fix: alpha + beta = alpha softplus(c + log(e - 1)) kept as such (floored at the smallest
        # normal number) instead of alpha + alpha m(c): m(c) = softplus(c + log(e - 1)) - 1 loses
        # all digits of 1 + m(c) as c -> -inf (rounds to -1 for c < -37 in float64), which made
        # the log-det -inf and the inverse at y = x0 NaN (and inaccurate for c ~ -30).
        alpha_beta = alpha * F.softplus(c + _SHIFT).clamp_min(torch.finfo(c.dtype).tiny)
        beta = alpha_beta - alpha
        return x0, alpha.squeeze(-1), beta.squeeze(-1), alpha_beta.squeeze(-1)

    def _ladj(self, r: Tensor, beta: Tensor, a_r: Tensor, ab_r: Tensor) -> Tensor:
        # fix, see _split: with h = 1 / (alpha + r), 1 + beta h = (alpha + beta + r) h and
        # 1 + alpha beta h^2 = (1 + beta h) (1 + t) with t = -beta r h / (alpha + beta + r) > -1:
        # no cancellation as beta -> -alpha, and exactly 0 at beta = 0. a_r = alpha + r and
        # ab_r = alpha + beta + r come from the caller, which needs them too.
        ratio = ab_r / a_r
        return self.dim * torch.log(ratio) + torch.log1p(-beta * r / (a_r * ab_r))

    def _forward_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        x0, alpha, beta, alpha_beta = self._split(context)
        diff = x - x0
        r = torch.linalg.vector_norm(diff, dim=-1)
        a_r = alpha + r
        y = x + (beta / a_r).unsqueeze(-1) * diff
        return y, self._ladj(r, beta, a_r, alpha_beta + r)

    def _inverse_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        x0, alpha, beta, alpha_beta = self._split(context)
        diff = y - x0
        rho = torch.linalg.vector_norm(diff, dim=-1)
        # r^2 + p r - alpha rho = 0 with p = alpha + beta - rho; the positive root without
        # cancellation: 2 alpha rho / (p + sqrt(.)) when p >= 0, (sqrt(.) - p) / 2 otherwise
        p = alpha_beta - rho
        root = torch.sqrt(p * p + 4 * alpha * rho)
        r = torch.where(p >= 0, 2 * alpha * rho / (p + root), 0.5 * (root - p))
        # x - x0 = (y - x0) / (1 + beta h), i.e. x = y - beta (y - x0) / (alpha + beta + r): no
        # 0 / 0 at beta = -alpha (fix, see _split), and exactly y at beta = 0
        ab_r = alpha_beta + r
        x = y - (beta / ab_r).unsqueeze(-1) * diff
        return x, self._ladj(r, beta, alpha + r, ab_r)
