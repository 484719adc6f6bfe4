r"""Radial flows (Rezende & Mohamed 2015), with an analytic inverse.

.. math::

    f(x) = x + \beta\, h(r)\, (x - x_0), \qquad r = \lVert x - x_0 \rVert,
    \qquad h(r) = \frac{1}{\alpha + r},

    \log |\det J_f(x)| = (D - 1) \log\left(1 + \beta h(r)\right)
        + \log\left(1 + \frac{\alpha\beta}{(\alpha + r)^2}\right).

Invertibility needs :math:`\beta \ge -\alpha`. We use :math:`\alpha = \mathrm{softplus}(a)` and
:math:`\alpha + \beta = \mathrm{softplus}(b)`, so :math:`\beta > -\alpha` always, and
:math:`a = b` (both 0 at the start) is the identity.

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

__all__ = ["Radial"]


class Radial(Flow):
    r"""A radial flow :math:`f(x) = x + \beta (x - x_0) / (\alpha + \lVert x - x_0 \rVert)`.

    Args:
        dim: the dimension.
        context_dim: a context's width; with ``context_dim > 0`` an MLP of the context gives
            :math:`x_0, \alpha, \beta`.
        hidden: the context network's hidden widths.
        activation: the context network's activation.

    Starts as the identity (:math:`\beta = 0`, a random centre :math:`x_0`). With
    :math:`r = \lVert x - x_0 \rVert` the log-det is
    :math:`(D - 1) \log(1 + \beta / (\alpha + r)) + \log(1 + \alpha\beta / (\alpha + r)^2)`;
    :math:`\alpha > 0` and :math:`\alpha + \beta > 0` are built in, so the map is always
    invertible, with a closed-form inverse.

    Reference: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
    arXiv:1505.05770 (the inverse is ours, see the module docstring).

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

    def _split(self, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Return :math:`x_0`, :math:`\alpha` and :math:`\alpha + \beta`, the last two with a
        trailing axis of size 1 (they broadcast against ``(..., dim)``)."""
        raw = self.params.raw if context is None else self.params(context)
        # ``split_with_sizes``: the same views as ``Tensor.split``, without its Python wrapper
        x0, ab = raw.split_with_sizes((self.dim, 2), dim=-1)
        # one softplus for both; floored so that neither underflows to 0
        alpha, alpha_beta = (
            F.softplus(ab).clamp_min(torch.finfo(ab.dtype).tiny).split_with_sizes((1, 1), dim=-1)
        )
        return x0, alpha, alpha_beta

    def _ladj(self, r: Tensor, neg_t: Tensor, ratio: Tensor, ab_r: Tensor) -> Tensor:
        # 1 + beta h(r) = (alpha + beta + r) / (alpha + r) = ratio, a ratio of positive terms
        # (no cancellation as beta -> -alpha; exactly 1 at beta = 0), and
        # 1 + beta h + beta h' r = ratio (1 - beta r / ((alpha + r)(alpha + beta + r)))
        # with -beta / (alpha + r) = 1 - ratio = neg_t, the factor that moves x
        ladj = torch.add(torch.log1p(neg_t * r / ab_r), torch.log(ratio), alpha=self.dim)
        return ladj.squeeze(-1)

    def _forward_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        x0, alpha, alpha_beta = self._split(context)
        diff = x - x0
        r = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
        ab_r = alpha_beta + r
        ratio = ab_r / (alpha + r)
        neg_t = 1 - ratio
        y = torch.addcmul(x, neg_t, diff, value=-1)
        return y, self._ladj(r, neg_t, ratio, ab_r)

    def _inverse_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        x0, alpha, alpha_beta = self._split(context)
        diff = y - x0
        rho = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
        p = alpha_beta - rho
        root = torch.sqrt(p * p + 4 * alpha * rho)
        r = torch.where(p >= 0, 2 * alpha * rho / (p + root), 0.5 * (root - p))
        a_r, ab_r = alpha + r, alpha_beta + r
        # x - x0 = (y - x0) (alpha + r) / (alpha + beta + r), so x = y - beta (y - x0) / ab_r
        x = torch.addcmul(y, (alpha - alpha_beta) / ab_r, diff)
        ratio = ab_r / a_r
        return x, self._ladj(r, 1 - ratio, ratio, ab_r)
