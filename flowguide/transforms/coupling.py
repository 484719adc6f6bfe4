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
from .spline import _spline, _spline_table, validate_spline_args

__all__ = ["SplineCoupling"]


class SplineCoupling(Flow):
    r"""A rational-quadratic spline coupling layer: the first ``split`` coordinates pass through
    and parameterise monotone splines of the others.

    .. math::

        y_{1:d} = x_{1:d}, \qquad y_i = g\big(x_i; \theta_i(x_{1:d}, c)\big) \quad (i > d),
        \qquad \log|\det J| = \sum_{i > d} \log g'\big(x_i; \theta_i\big),

    with :math:`g` the spline of :func:`~flowguide.transforms.rational_quadratic_spline` (the
    identity outside :math:`[-B, B]`) and :math:`\theta` an MLP's output. The Jacobian is block
    triangular, so the inverse, like the forward map, takes one network pass. It starts as the
    identity (the MLP's last layer starts at zero).

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

    References: Dinh, Sohl-Dickstein & Bengio 2017, "Density estimation using Real NVP",
    arXiv:1605.08803 (coupling layers); Durkan et al. 2019, "Neural Spline Flows",
    arXiv:1906.04032 (rational-quadratic spline couplings).

    Example:
        >>> flow = SplineCoupling(4, bins=4, hidden=(8,))
        >>> x = torch.randn(3, 4)
        >>> y, ladj = flow.forward_and_log_abs_det(x)
        >>> bool(torch.allclose(x, y)), ladj.abs().max().item() < 1e-6
        (True, True)
        >>> _ = torch.manual_seed(0)
        >>> with torch.no_grad():  # move it away from the identity
        ...     _ = flow.net.output_layer.bias.normal_()
        >>> y = flow(x)
        >>> x2, _ = flow.inverse_and_log_abs_det(y.clone())  # a new tensor: no cache hit
        >>> bool(torch.allclose(x2, x, atol=1e-5)), bool(torch.allclose(y[:, :2], x[:, :2]))
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
        table = _spline_table(
            theta, self.bound, self.min_width, self.min_height, self.min_derivative
        )
        yb, logd = _spline(xb, table, self.bound, inverse=inverse)
        return torch.cat([xa, yb], dim=-1), logd.sum(-1)

    def _forward_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._couple(x, context, inverse=False)

    def _inverse_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._couple(y, context, inverse=True)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", split={self.split}, bins={self.bins}, bound={self.bound}"
