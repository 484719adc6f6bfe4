r"""Rational-quadratic spline coupling flows (Dinh et al. 2017; Durkan et al. 2019).

The coordinates split into a first block :math:`x_a = x_{1:d}` that passes through unchanged and
a second block transformed elementwise by rational-quadratic splines whose parameters an MLP
computes from :math:`x_a` (and a context):

.. math::

    y_a = x_a, \qquad y_b = g(x_b; \theta(x_a, c)), \qquad
    \log|\det J| = \sum_{i \in b} \log g'(x_i; \theta_i).

Forward and inverse both cost one network pass. Stack couplings with permutations in between so
every coordinate gets transformed.

References: Dinh, Sohl-Dickstein, Bengio 2017, "Density estimation using Real NVP",
arXiv:1605.08803; Durkan et al. 2019, "Neural Spline Flows", arXiv:1906.04032.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..nn import MLP
from .base import Flow
from .spline import rational_quadratic_spline, spline_params, validate_spline_args

__all__ = ["SplineCoupling"]


class SplineCoupling(Flow):
    r"""A rational-quadratic spline coupling layer.

    Args:
        dim: the dimension, at least 2.
        bins: the number of spline bins :math:`K \ge 2`.
        bound: the half-width :math:`B > 0` of the spline's interval.
        hidden: the MLP's hidden widths (default two layers of ``max(10 * dim, 16)``).
        context_dim: a context's width, fed to the MLP (0 for none).
        split: how many leading coordinates pass through (default ``dim // 2``).
        min_width, min_height, min_derivative: as for
            :class:`~flowguide.transforms.SplineAutoregressive`.
        activation: the MLP's activation.

    Example:
        >>> flow = SplineCoupling(4, bins=4, hidden=(8,))
        >>> x = torch.randn(3, 4)
        >>> y, ladj = flow.forward_and_log_abs_det(x)
        >>> bool(torch.allclose(x, y)), ladj.abs().max().item() < 1e-6
        (True, True)
    """

    def __init__(
        self,
        dim: int,
        bins: int = 8,
        bound: float = 3.0,
        hidden: Sequence[int] | None = None,
        context_dim: int = 0,
        split: int | None = None,
        min_width: float = 1e-3,
        min_height: float = 1e-3,
        min_derivative: float = 1e-3,
        activation: type[nn.Module] = nn.ReLU,
        cache_size: int = 1,
    ) -> None:
        validate_spline_args(bins, bound, min_width, min_height, min_derivative)
        if not isinstance(dim, int) or dim < 2:
            raise ValueError(f"dim must be an integer >= 2 for a coupling flow, got {dim!r}")
        super().__init__(dim, context_dim, cache_size)
        split = dim // 2 if split is None else split
        # fix: reject bools like every other integer argument (split=True passed as 1)
        if not isinstance(split, int) or isinstance(split, bool) or not 1 <= split < dim:
            raise ValueError(f"split must be an integer in [1, {dim - 1}], got {split!r}")
        hidden = (max(10 * dim, 16),) * 2 if hidden is None else hidden
        self.split, self.bins, self.bound = split, bins, float(bound)
        self.min_width, self.min_height, self.min_derivative = min_width, min_height, min_derivative
        self.net = MLP(split + context_dim, (dim - split) * (3 * bins - 1), hidden, activation)

    def _couple(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        xa, xb = x[..., : self.split], x[..., self.split :]
        h = xa
        if context is not None:
            batch = torch.broadcast_shapes(xa.shape[:-1], context.shape[:-1])
            h = torch.cat([xa.expand(*batch, -1), context.expand(*batch, -1)], dim=-1)
            xa, xb = xa.expand(*batch, -1), xb.expand(*batch, -1)
        theta = self.net(h).unflatten(-1, (self.dim - self.split, 3 * self.bins - 1))
        p = spline_params(theta, self.bound, self.min_width, self.min_height, self.min_derivative)
        yb, logd = rational_quadratic_spline(xb, p, self.bound, inverse=inverse)
        return torch.cat([xa, yb], dim=-1), logd.sum(-1)

    def _forward_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._couple(x, context, inverse=False)

    def _inverse_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._couple(y, context, inverse=True)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", split={self.split}, bins={self.bins}, bound={self.bound}"
