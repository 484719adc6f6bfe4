r"""Autoregressive flows: affine (IAF) and rational-quadratic spline (NSF), both on one MADE.

Each flow is a MADE conditioner :math:`\theta_i = \mathrm{MADE}(x_{<i}, c)` and an elementwise
bijection :math:`y_i = \tau(x_i; \theta_i)`. The forward map (base noise to target, the sampling
direction) costs one MADE pass; the inverse costs one pass per dimension, because :math:`\theta_i`
needs :math:`x_{<i}`. The Jacobian is triangular in the MADE's order, so
:math:`\log|\det J| = \sum_i \log \tau'(x_i; \theta_i)`.

Affine (inverse autoregressive flow, Kingma et al. 2016, arXiv:1606.04934):
:math:`\tau(x; \mu, s) = \mu + e^{\tilde s} x` with the smoothly bounded log-scale
:math:`\tilde s = s / (1 + |s| / S)`, which stays in :math:`(-S, S)` and whose gradient decays
polynomially, never to zero.

Spline (Durkan et al. 2019, arXiv:1906.04032): :math:`\tau` is the rational-quadratic spline of
:mod:`flowguide.transforms.spline`, identity outside :math:`[-B, B]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..nn import MADE
from .base import Flow
from .spline import rational_quadratic_spline, spline_params, validate_spline_args

__all__ = ["AffineAutoregressive", "SplineAutoregressive"]


class _Autoregressive(Flow):
    """A MADE conditioner feeding an elementwise bijection; subclasses define the bijection."""

    def __init__(
        self,
        dim: int,
        params_per_dim: int,
        hidden: Sequence[int] | None,
        context_dim: int,
        order: Sequence[int] | Tensor | None,
        activation: type[nn.Module],
        cache_size: int,
    ) -> None:
        super().__init__(dim, context_dim, cache_size)
        hidden = (max(10 * dim, 16),) * 2 if hidden is None else hidden
        self.made = MADE(dim, params_per_dim, hidden, context_dim, order, activation)

    def _elementwise(
        self, x: Tensor, theta: Tensor, inverse: bool
    ) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        y, logd = self._elementwise(x, self.made(x, context), inverse=False)
        return y, logd.sum(-1)

    def _inverse_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        # after pass k the first k coordinates in the order are exact; the last pass's
        # parameters are all exact, so its log-derivatives are the forward log-det at x
        x = torch.zeros_like(y)
        if context is not None:
            x = x.expand(*torch.broadcast_shapes(y.shape[:-1], context.shape[:-1]), self.dim)
        for _ in range(self.dim):
            x, logd = self._elementwise(y, self.made(x, context), inverse=True)
        return x, logd.sum(-1)

    @property
    def order(self) -> Tensor:
        """The autoregressive order of the coordinates."""
        return self.made.order


class AffineAutoregressive(_Autoregressive):
    r"""An affine autoregressive flow (IAF):
    :math:`y_i = \mu_i(x_{<i}) + e^{\tilde s_i(x_{<i})} x_i`.

    Args:
        dim: the dimension.
        hidden: the MADE's hidden widths (default two layers of ``max(10 * dim, 16)``).
        context_dim: a context's width, fed to the MADE (0 for none).
        order: the autoregressive order, a permutation of ``0 .. dim - 1``.
        log_scale_bound: :math:`S`, the bound of the log-scale.
        activation: the MADE's activation.

    Reference: Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive
    Flow", arXiv:1606.04934.

    Example:
        >>> flow = AffineAutoregressive(3, hidden=(16,))
        >>> x = torch.randn(2, 3)
        >>> y, ladj = flow.forward_and_log_abs_det(x)
        >>> bool(torch.equal(x, y)), ladj.tolist()
        (True, [0.0, 0.0])
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] | None = None,
        context_dim: int = 0,
        order: Sequence[int] | Tensor | None = None,
        log_scale_bound: float = 5.0,
        activation: type[nn.Module] = nn.ReLU,
        cache_size: int = 1,
    ) -> None:
        if not log_scale_bound > 0:
            raise ValueError(f"log_scale_bound must be > 0, got {log_scale_bound!r}")
        super().__init__(dim, 2, hidden, context_dim, order, activation, cache_size)
        self.log_scale_bound = float(log_scale_bound)

    def _elementwise(self, x: Tensor, theta: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        loc, s = theta[..., 0], theta[..., 1]
        s = s / (1 + s.abs() / self.log_scale_bound)
        if inverse:
            return (x - loc) * torch.exp(-s), s
        return loc + torch.exp(s) * x, s

    def extra_repr(self) -> str:
        return super().extra_repr() + f", log_scale_bound={self.log_scale_bound}"


class SplineAutoregressive(_Autoregressive):
    r"""A rational-quadratic neural spline autoregressive flow:
    :math:`y_i = g(x_i; \theta_i(x_{<i}))`, the identity outside :math:`[-B, B]`.

    Args:
        dim: the dimension.
        bins: the number of spline bins :math:`K \ge 2`.
        bound: the half-width :math:`B > 0` of the spline's interval.
        hidden: the MADE's hidden widths (default two layers of ``max(10 * dim, 16)``).
        context_dim: a context's width, fed to the MADE (0 for none).
        order: the autoregressive order, a permutation of ``0 .. dim - 1``.
        min_width, min_height, min_derivative: floors of the bin widths and heights (as
            fractions of :math:`2B`, with ``min * bins < 1``) and of the knot derivatives.
        activation: the MADE's activation.

    Reference: Durkan et al. 2019, "Neural Spline Flows", arXiv:1906.04032.

    Example:
        >>> flow = SplineAutoregressive(2, bins=4, hidden=(8,))
        >>> x = torch.tensor([[0.5, -7.0]])
        >>> bool(torch.allclose(flow(x), x)), flow.inv(flow(x)).shape
        (True, torch.Size([1, 2]))
    """

    def __init__(
        self,
        dim: int,
        bins: int = 8,
        bound: float = 3.0,
        hidden: Sequence[int] | None = None,
        context_dim: int = 0,
        order: Sequence[int] | Tensor | None = None,
        min_width: float = 1e-3,
        min_height: float = 1e-3,
        min_derivative: float = 1e-3,
        activation: type[nn.Module] = nn.ReLU,
        cache_size: int = 1,
    ) -> None:
        validate_spline_args(bins, bound, min_width, min_height, min_derivative)
        super().__init__(dim, 3 * bins - 1, hidden, context_dim, order, activation, cache_size)
        self.bins, self.bound = bins, float(bound)
        self.min_width, self.min_height, self.min_derivative = min_width, min_height, min_derivative

    def _elementwise(self, x: Tensor, theta: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        p = spline_params(theta, self.bound, self.min_width, self.min_height, self.min_derivative)
        return rational_quadratic_spline(x, p, self.bound, inverse=inverse)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bins={self.bins}, bound={self.bound}"
