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
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Flow, _Parameters

__all__ = [
    "Planar",
    "PlanarParameters",
    "planar_forward",
    "planar_inverse",
    "planar_parameters",
    "planar_stack_forward",
    "planar_stack_inverse",
    "shifted_softplus",
]

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
        self.params = _Parameters(self.initial_raw(dim), context_dim, hidden, activation)
        self.max_iter = max_iter

    @staticmethod
    def initial_raw(dim: int) -> Tensor:
        r"""A raw vector :math:`(u, w, b)` of the identity: :math:`u = 0`, :math:`b = 0` and
        :math:`w \sim \mathcal{N}(0, I / \mathrm{dim})` (drawn from torch's global generator).

        Example:
            >>> raw = Planar.initial_raw(3)
            >>> raw.shape, raw[:3].tolist(), raw[-1].item()
            (torch.Size([7]), [0.0, 0.0, 0.0], 0.0)
        """
        return torch.cat([torch.zeros(dim), torch.randn(dim) / math.sqrt(dim), torch.zeros(1)])

    @property
    def u(self) -> Tensor:
        """The unconstrained :math:`u` (unconditional flows only)."""
        return self.params.raw[: self.dim]

    def _split(self, context: Tensor | None) -> PlanarParameters:
        """The layer's parameters for ``context``, each with the context's batch shape."""
        return _planar_parameters(self.params(context), self.dim)

    def _forward_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return planar_forward(x, self._split(context))

    def _inverse_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return planar_inverse(y, self._split(context), self.max_iter)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", max_iter={self.max_iter}"


class PlanarParameters(NamedTuple):
    r"""A planar layer's parameters, derived from its raw vector by :func:`planar_parameters`:
    :math:`w`, :math:`\hat u`, :math:`b`, :math:`w^\top \hat u` and :math:`1 + w^\top \hat u`
    (the last computed without rounding). ``w`` and ``u_hat`` have shape ``(..., dim)``, the others
    ``(...)``."""

    w: Tensor
    u_hat: Tensor
    b: Tensor
    wu_hat: Tensor
    one_plus: Tensor


def planar_parameters(raw: Tensor) -> PlanarParameters:
    r"""A planar layer's parameters from its raw vector :math:`(u, w, b)` of shape
    ``(..., 2 dim + 1)``: :math:`\hat u = u + (m(w^\top u) - w^\top u) w / \lVert w \rVert^2`
    with :math:`m` the shifted softplus (see the module docstring), so that
    :math:`w^\top \hat u > -1`.

    :class:`Planar` reads the raw vector from its own parameters or from its context network;
    amortized code can pass slices of one network's output instead (one raw vector per layer
    along a dimension before the last: every leading dimension is a batch dimension).

    Reference: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
    arXiv:1505.05770 (appendix A, the constraint on :math:`\hat u`).

    Example:
        >>> raw = torch.cat([torch.zeros(2), torch.tensor([1.0, 0.0]), torch.zeros(1)])
        >>> p = planar_parameters(raw)  # u = 0: the identity
        >>> p.u_hat.tolist(), p.wu_hat.item(), p.one_plus.item()
        ([0.0, 0.0], 0.0, 1.0)
    """
    if not isinstance(raw, Tensor):
        raise TypeError(f"raw must be a torch.Tensor, got {type(raw).__name__}")
    width = raw.shape[-1] if raw.dim() else 0
    if width < 3 or width % 2 == 0:
        raise ValueError(
            f"raw must have shape (..., 2 * dim + 1) with dim >= 1 (u, w and b), got "
            f"{tuple(raw.shape)}"
        )
    return _planar_parameters(raw, (width - 1) // 2)


def _planar_parameters(raw: Tensor, dim: int) -> PlanarParameters:
    """:func:`planar_parameters` without the argument checks, for the flows' forward and
    inverse passes, whose raw vectors have the right shape by construction."""
    u, w, b = raw.split((dim, dim, 1), dim=-1)
    wu = torch.linalg.vecdot(w, u).unsqueeze(-1)
    # fix: keep 1 + w.u_hat = softplus(w.u + log(e - 1)) itself, floored at the smallest normal
    # number. ``shifted_softplus`` rounds to exactly -1 once w.u < -37 (float64), and then
    # log(1 + w.u_hat) was -inf and the inverse NaN (e.g. for u = -100 w).
    one_plus = F.softplus(wu + _SHIFT).clamp_min(torch.finfo(wu.dtype).tiny)
    wu_hat = one_plus - 1.0
    norm2 = torch.linalg.vecdot(w, w).unsqueeze(-1).clamp_min(torch.finfo(w.dtype).tiny)
    u_hat = u + (wu_hat - wu) * w / norm2
    return PlanarParameters(w, u_hat, b.squeeze(-1), wu_hat.squeeze(-1), one_plus.squeeze(-1))


def planar_forward(x: Tensor, p: PlanarParameters) -> tuple[Tensor, Tensor]:
    r"""The planar map :math:`y = x + \hat u \tanh(w^\top x + b)` and its log-det
    :math:`\log(1 + (1 - \tanh^2(w^\top x + b))\, w^\top \hat u)` for the parameters ``p``
    (from :func:`planar_parameters`; their batch shape broadcasts against ``x.shape[:-1]``).

    Reference: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
    arXiv:1505.05770.

    Example:
        >>> p = planar_parameters(torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0]))
        >>> y, ladj = planar_forward(torch.zeros(3, 2), p)  # tanh(0) = 0: y = x
        >>> y.abs().max().item(), ladj.tolist() == [p.one_plus.log().item()] * 3
        (0.0, True)
    """
    h = torch.tanh(torch.linalg.vecdot(x, p.w) + p.b)
    y = torch.addcmul(x, p.u_hat, h.unsqueeze(-1))
    return y, _log_slope(h, p.one_plus)


def planar_inverse(y: Tensor, p: PlanarParameters, max_iter: int = 100) -> tuple[Tensor, Tensor]:
    r"""The inverse of :func:`planar_forward`: :math:`x` with :math:`f(x) = y`, and the forward
    log-det at :math:`x`. Solves the scalar equation for :math:`\alpha = w^\top x` by Newton's
    method safeguarded by bisection (at most ``max_iter`` steps, without autograd), then takes
    one Newton step with autograd on, which gives exact first-order gradients (see the module
    docstring).

    Reference: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
    arXiv:1505.05770 (the forward map; the inverse is ours).

    Example:
        >>> p = planar_parameters(torch.tensor([2.0, -1.0, 0.5, 1.0, 0.3]))
        >>> x = torch.randn(4, 2)
        >>> y, ladj = planar_forward(x, p)
        >>> x2, ladj2 = planar_inverse(y, p)
        >>> bool(torch.allclose(x2, x, atol=1e-5)), bool(torch.allclose(ladj2, ladj, atol=1e-5))
        (True, True)
    """
    target = torch.linalg.vecdot(y, p.w)
    b, wu = p.b.expand_as(target), p.wu_hat.expand_as(target)
    one_plus = p.one_plus.expand_as(target)
    with torch.no_grad():
        alpha = _solve_monotone(target, b, wu, max_iter, one_plus)
    # one Newton step with autograd on: exact value at the root, exact first-order gradients
    h = torch.tanh(alpha + b)
    alpha = alpha - (alpha + wu * h - target) / _slope(h, one_plus)
    h = torch.tanh(alpha + b)
    x = y - p.u_hat * h.unsqueeze(-1)
    return x, _log_slope(h, one_plus)


def planar_stack_forward(x: Tensor, p: PlanarParameters) -> tuple[Tensor, Tensor]:
    r"""A stack of :math:`L` planar layers applied in order, :math:`f^{(L)} \circ \dots \circ
    f^{(1)}`, and the sum of their log-dets, for parameters with a layer dimension: ``p.w`` and
    ``p.u_hat`` of shape ``(..., L, dim)``, the others ``(..., L)`` (say
    ``planar_parameters(raw)`` for ``raw`` of shape ``(..., L, 2 dim + 1)``, the output of one
    network for all layers).

    The same values as :func:`planar_forward` layer after layer; only the maps run one layer at
    a time (with a hand-written backward; higher derivatives are exact too), the log-dets are
    taken together at the end.

    Reference: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
    arXiv:1505.05770.

    Example:
        >>> raw = torch.randn(4, 3, 5)  # 4 data, 3 layers, dim 2
        >>> p = planar_parameters(raw)
        >>> x = torch.randn(4, 2)
        >>> y, ladj = planar_stack_forward(x, p)
        >>> z, total = x, 0
        >>> for layer in range(3):
        ...     z, l = planar_forward(z, PlanarParameters(*(t.select(1, layer) for t in p)))
        ...     total = total + l
        >>> bool(torch.allclose(y, z)), bool(torch.allclose(ladj, total))
        (True, True)
    """
    h = _PlanarStack.apply(x, p.w, p.u_hat, p.b)
    return h[0], _log_slope(h[1], p.one_plus).sum(-1)


class _PlanarStack(torch.autograd.Function):
    r"""The maps of a planar stack, :math:`x_l = x_{l-1} + \hat u_l h_l` with
    :math:`h_l = \tanh(w_l^\top x_{l-1} + b_l)`: returns :math:`x_L` and every :math:`h_l`
    (``(..., L)``), from which the caller takes the log-dets with autograd.

    Speed: four kernels per layer forward and four backward, with the backward written out
    (autograd's would record about three times as many nodes for sixteen small layers). The
    backward runs the chain rule from the last layer to the first,

    .. math::

        \bar h_l = \bar x_l^\top \hat u_l + \bar h_l^{\mathrm{direct}}, \quad
        \bar a_l = \bar h_l (1 - h_l^2), \quad
        \bar x_{l-1} = \bar x_l + \bar a_l w_l,

    and then the parameters' gradients for all layers at once:
    :math:`\bar{\hat u}_l = \bar x_l h_l`, :math:`\bar w_l = \bar a_l x_{l-1}`,
    :math:`\bar b_l = \bar a_l` (summed over broadcast dimensions). Under ``create_graph=True``
    the backward differentiates the plain composition instead, so higher derivatives are exact."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, w: Tensor, u_hat: Tensor, b: Tensor
    ) -> tuple[Tensor, Tensor]:
        layers, dim = w.shape[-2], w.shape[-1]
        batch = torch.broadcast_shapes(x.shape[:-1], w.shape[:-2])
        xs = x.new_empty(layers + 1, *batch, dim)  # x_0 .. x_L
        hs = x.new_empty(layers, *batch)
        xs[0] = x
        for i, (wi, ui, bi) in enumerate(
            zip(w.unbind(-2), u_hat.unbind(-2), b.unbind(-1), strict=True)
        ):
            torch.tanh(torch.linalg.vecdot(xs[i], wi) + bi, out=hs[i])
            torch.addcmul(xs[i], ui, hs[i].unsqueeze(-1), out=xs[i + 1])
        ctx.save_for_backward(xs, hs, x, w, u_hat, b)
        return xs[-1].clone(), hs.movedim(0, -1)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, grad_h: Tensor | None) -> tuple[Tensor | None, ...]:
        xs, hs, x, w, u_hat, b = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the gradient must itself be differentiable (Hessians), which
            # the written-out chain rule below is not (its saved x_l, h_l carry no graph), so
            # differentiate the plain composition instead (fix: higher derivatives were
            # silently missing these layers' terms)
            return _stack_backward_graph(ctx.needs_input_grad, (x, w, u_hat, b), grad_y, grad_h)
        x_shape, b_shape = x.shape, b.shape
        g = grad_y.expand(xs.shape[1:])
        slope = 1 - hs * hs  # d h_l / d a_l
        # a_l's gradient is (x_l's gradient . u_l + h_l's own) * slope_l: the second part at once
        direct = hs.new_zeros(()) if grad_h is None else grad_h.movedim(-1, 0) * slope
        direct = direct.expand(hs.shape)
        grads_x, grads_a = [], []
        layers = zip(w.unbind(-2), u_hat.unbind(-2), slope.unbind(0), direct.unbind(0), strict=True)
        for wi, ui, si, di in reversed(list(layers)):
            grads_x.append(g)
            ga = torch.addcmul(di, torch.linalg.vecdot(g, ui), si)
            grads_a.append(ga)
            g = torch.addcmul(g, ga.unsqueeze(-1), wi)
        need = ctx.needs_input_grad
        grad_x = g.sum_to_size(x_shape) if need[0] else None
        gas = torch.stack(grads_a[::-1], -1)  # (..., L)
        grad_w = grad_u = grad_b = None
        if need[1]:
            grad_w = (gas.unsqueeze(-1) * xs[:-1].movedim(0, -2)).sum_to_size(w.shape)
        if need[2]:
            gxs = torch.stack(grads_x[::-1], -2)  # (..., L, D): the gradient at each x_l
            grad_u = (gxs * hs.movedim(0, -1).unsqueeze(-1)).sum_to_size(u_hat.shape)
        if need[3]:
            grad_b = gas.sum_to_size(b_shape)
        return grad_x, grad_w, grad_u, grad_b


def _stack_backward_graph(
    needs: tuple[bool, ...], inputs: tuple[Tensor, ...], grad_y: Tensor, grad_h: Tensor | None
) -> tuple[Tensor | None, ...]:
    """``_PlanarStack``'s backward as a differentiable graph: the layers recomputed with torch
    operations and differentiated with ``create_graph=True``."""
    with torch.enable_grad():
        # aliases, so that the gradients are partial derivatives in each input: asked of the
        # inputs themselves, autograd would also follow any path between them (u_hat depends
        # on w) and return total derivatives
        inputs = tuple(t.view_as(t) for t in inputs)
        z, w, u_hat, b = inputs
        hs = []
        for wi, ui, bi in zip(w.unbind(-2), u_hat.unbind(-2), b.unbind(-1), strict=True):
            h = torch.tanh(torch.linalg.vecdot(z, wi) + bi)
            z = z + ui * h.unsqueeze(-1)
            hs.append(h)
        outputs, grads = [z], [grad_y]
        if grad_h is not None:
            outputs.append(torch.stack(hs, -1))
            grads.append(grad_h)
        wanted = [t for t, need in zip(inputs, needs, strict=False) if need]
        found = iter(
            torch.autograd.grad(outputs, wanted, grads, create_graph=True, allow_unused=True)
        )
    return tuple(next(found) if need else None for need in needs[: len(inputs)])


def planar_stack_inverse(
    y: Tensor, p: PlanarParameters, max_iter: int = 100
) -> tuple[Tensor, Tensor]:
    r"""The inverse of :func:`planar_stack_forward`: the layers inverted by
    :func:`planar_inverse` from the last to the first, and the summed forward log-det.

    Reference: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
    arXiv:1505.05770 (the forward map; the inverse is ours).

    Example:
        >>> p = planar_parameters(torch.randn(4, 3, 5))
        >>> x = torch.randn(4, 2)
        >>> y, ladj = planar_stack_forward(x, p)
        >>> x2, ladj2 = planar_stack_inverse(y, p)
        >>> bool(torch.allclose(x2, x, atol=1e-4)), bool(torch.allclose(ladj2, ladj, atol=1e-4))
        (True, True)
    """
    # the log-dets' shape even for an empty stack, as planar_stack_forward gives it
    total = y.new_zeros(torch.broadcast_shapes(y.shape[:-1], p.b.shape[:-1]))
    layers = zip(*(t.unbind(-2) for t in p[:2]), *(t.unbind(-1) for t in p[2:]), strict=True)
    for layer in reversed(list(layers)):
        y, ladj = planar_inverse(y, PlanarParameters(*layer), max_iter)
        total = total + ladj
    return y, total


def _slope(h: Tensor, one_plus: Tensor) -> Tensor:
    r""":math:`1 + (1 - h^2) c` written as :math:`(1 + c) - h^2 c`: positive, with no cancellation
    when :math:`c` is close to -1, and exactly 1 when :math:`c = 0` (fix, see
    ``planar_parameters``)."""
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
