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
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import MADE, MaskedLinear
from .base import Flow, _functorch_active
from .spline import _spline, _spline_table, validate_spline_args

__all__ = ["AffineAutoregressive", "SplineAutoregressive"]


class _InversePlan(NamedTuple):
    order: list[int]
    hidden: list[tuple[Tensor, Tensor, nn.Module, list[int]]]
    out_weight: Tensor
    out_bias: Tensor


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
        param_major: bool = False,
    ) -> None:
        super().__init__(dim, context_dim, cache_size)
        hidden = (max(10 * dim, 16),) * 2 if hidden is None else hidden
        self.made = MADE(dim, params_per_dim, hidden, context_dim, order, activation, param_major)

    def _elementwise(
        self, x: Tensor, theta: Tensor, inverse: bool
    ) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        y, logd = self._elementwise(x, self.made(x, context), inverse=False)
        return y, logd.sum(-1)

    def _inverse_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        # One pass per coordinate, in the MADE's order: pass k computes the parameters of the
        # k-th coordinate i from x_{<k} (exact by then) and inverts that coordinate alone, so its
        # log-derivative is already the forward log-det's term at x.
        #
        # Speed (same values as D full MADE passes that each invert every coordinate): pass k
        # evaluates only what coordinate i's parameters depend on. That is i's rows of the output
        # layer (the full layer is (3K - 1) D rows for a spline) and, in each hidden layer, the
        # units connected to them; for a MADE those are the units of degree <= k, so they grow
        # with k. ``_inverse_plan`` sorts every hidden layer's units by the first pass that needs
        # them, which makes pass k's units a leading block of each sorted weight.
        plan = self._inverse_plan()
        batch = y.shape[:-1]
        if context is not None:
            batch = torch.broadcast_shapes(batch, context.shape[:-1])
            context = context.expand(*batch, -1)
        x = y.new_zeros(*batch, self.dim)
        p = self.made.params_per_dim
        ladj: Tensor | None = None
        for k, (i, index) in enumerate(zip(plan.order, self.made.order.unsqueeze(-1), strict=True)):
            h = x if context is None else torch.cat([x, context], dim=-1)
            n_prev = h.shape[-1]
            for weight, bias, activation, counts in plan.hidden:
                n = counts[k]
                h = activation(F.linear(h, weight[:n, :n_prev], bias[:n]))
                n_prev = n
            theta = F.linear(h, plan.out_weight[i * p : (i + 1) * p, :n_prev], plan.out_bias[i])
            xi, logd = self._elementwise(y[..., i : i + 1], theta.unsqueeze(-2), inverse=True)
            x = x.index_copy(-1, index, xi)
            ladj = logd[..., 0] if ladj is None else ladj + logd[..., 0]
        assert ladj is not None
        return x, ladj

    def _inverse_plan(self) -> _InversePlan:
        """The MADE's masked weights with each hidden layer's units sorted by the first inverse
        pass that needs them, and how many units each pass needs (see ``_inverse_ladj``)."""
        made, dim, p = self.made, self.dim, self.made.params_per_dim
        linears = [m for m in made.net if isinstance(m, MaskedLinear)]
        activations = [m for m in made.net if not isinstance(m, MaskedLinear)]
        # needs[l][k, j]: unit j of hidden layer l feeds the k-th coordinate's parameters
        rows = made.input_major_rows()
        need = linears[-1].mask[rows].unflatten(0, (dim, p)).any(1)[made.order]
        needs = [need]
        for layer in reversed(linears[1:-1]):
            need = (need.float() @ layer.mask.float()) > 0
            needs.append(need)
        needs.reverse()
        passes = torch.arange(dim, device=need.device)
        hidden, perm_prev = [], None
        for layer, activation, need in zip(linears[:-1], activations, needs, strict=True):
            first = torch.where(need.any(0), need.float().argmax(0), dim)  # first 1 of a column
            perm = torch.argsort(first, stable=True)
            weight = (layer.weight * layer.mask)[perm]
            if perm_prev is not None:
                weight = weight[:, perm_prev]
            counts = (first <= passes.unsqueeze(-1)).sum(-1).tolist()
            hidden.append((weight, layer.bias[perm], activation, counts))
            perm_prev = perm
        out = linears[-1]
        out_weight = (out.weight * out.mask)[rows]
        if perm_prev is not None:
            out_weight = out_weight[:, perm_prev]
        return _InversePlan(
            made.order.tolist(), hidden, out_weight, out.bias[rows].unflatten(0, (dim, p))
        )

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
        # parameter-major MADE output: the shifts and the log-scales are contiguous rows
        super().__init__(dim, 2, hidden, context_dim, order, activation, cache_size, True)
        self.log_scale_bound = float(log_scale_bound)

    def _affine(self, x: Tensor, loc: Tensor, s: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """The elementwise map with the bounded log-scale; returns the output and the log-scale."""
        s = _bounded(s, self.log_scale_bound)
        if inverse:
            return (x - loc) * torch.exp(-s), s
        return torch.addcmul(loc, torch.exp(s), x), s

    def _elementwise(self, x: Tensor, theta: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        return self._affine(x, theta[..., 0], theta[..., 1], inverse)

    def _forward_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if _functorch_active():
            out = self.made.flat(x, context)
            y, s = self._affine(x, *out.chunk(2, dim=-1), inverse=False)
            return y, s.sum(-1)
        fused = _fused_chain([self], x, context)
        if fused is not None:  # the whole layer, MADE and affine map, as one autograd node
            return fused
        # any other MADE: its parameter-major output holds the shifts and the log-scales as two
        # halves, read and differentiated by one fused function
        out = self.made.flat(x, context)
        y, ladj = _BoundedAffine.apply(x, out, self.log_scale_bound)
        return y, ladj

    @classmethod
    def _chain_forward_ladj(
        cls, flows: Sequence[Flow], x: Tensor, context: Tensor | None
    ) -> tuple[Tensor, Tensor] | None:
        # IAF layers in a row (a Compose of them) as one autograd node, unless a subclass
        # redefines the layer's pass
        if _functorch_active() or cls._forward_ladj is not AffineAutoregressive._forward_ladj:
            return None
        return _fused_chain(flows, x, context)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", log_scale_bound={self.log_scale_bound}"


def _relu_made_layers(made: nn.Module) -> list[MaskedLinear] | None:
    """The masked linear layers of a MADE whose hidden activations are all ReLUs (flowguide's
    default), which :class:`_MadeAffine` fuses; None for any other network."""
    if type(made) is not MADE:
        return None
    modules = list(made.net)
    linears, activations = modules[::2], modules[1::2]
    if any(type(m) is not MaskedLinear or m.bias is None for m in linears) or any(
        type(a) is not nn.ReLU for a in activations
    ):
        return None
    return linears  # type: ignore[return-value]


def _fused_chain(
    flows: Sequence[AffineAutoregressive], x: Tensor, context: Tensor | None
) -> tuple[Tensor, Tensor] | None:
    """IAF layers applied in a row (each reads ``context``) as one :class:`_MadeAffine` node:
    ``(y, summed log-dets)``, or None when a layer's MADE is not a ReLU MADE."""
    tensors: list[Tensor] = []
    depths: list[int] = []
    for flow in flows:
        layers = _relu_made_layers(flow.made)
        if layers is None:
            return None
        depths.append(len(layers))
        tensors += [t for layer in layers for t in (layer.weight, layer.bias, layer.mask)]
    x_in = x
    if context is not None:
        batch = x.shape[:-1]
        if batch != context.shape[:-1]:
            batch = torch.broadcast_shapes(batch, context.shape[:-1])
        x_in, context = x.expand(*batch, -1), context.expand(*batch, -1)
    bounds = tuple(flow.log_scale_bound for flow in flows)
    y, ladj = _MadeAffine.apply(x, x_in, context, bounds, tuple(depths), *tensors)
    return y, ladj


class _MadeAffine(torch.autograd.Function):
    r"""IAF layers' sampling-direction pass, one layer or several in a row, as one autograd node.
    Each layer is a MADE with ReLU hidden layers, :math:`h_0 = (x, c)`,
    :math:`h_l = \max(0, (W_l \odot M_l) h_{l-1} + b_l)`, its output
    :math:`(\mu, s) = (W_L \odot M_L) h_{L-1} + b_L`, then :class:`_BoundedAffine`'s map
    :math:`y = \mu + e^{b(s)} x` and :math:`\sum_i b(s_i)`; the next layer reads :math:`y` and
    the same context, and the log-dets add in order.

    The backward is the chain rule written out, last layer first: with :math:`g_L` the gradient
    of a MADE's output (:class:`_BoundedAffine`'s), :math:`\bar W_l = (g_l^\top h_{l-1}) \odot
    M_l`, :math:`\bar b_l = \sum g_l`, :math:`g_{l-1} = (g_l (W_l \odot M_l)) \odot [h_{l-1} >
    0]`; the input's gradient :math:`g_0` splits into the parts for :math:`x` (added to the
    affine map's, the gradient of the layer below's :math:`y`) and for :math:`c` (summed over
    the layers). It runs the products and elementwise kernels autograd would run for the same
    layers (the masked weights kept from the forward), without the graph's dozen-odd nodes per
    layer, its mask-multiply nodes, the cut that splits each concatenated input or the
    per-layer sums of the context's gradient. Under ``create_graph=True`` it differentiates the
    plain expression instead, so higher derivatives are exact.

    Inputs: ``x`` for the first layer's affine map and ``x_in``, ``x`` broadcast to the batch,
    for its MADE (two inputs, as for one unfused layer, so that autograd sums their gradients
    and any other of ``x`` in the same order: on the machine we checked, training gave bit for
    bit what the unfused layers give), ``context`` (or None) of that batch shape, the layers'
    log-scale bounds, their MADEs' depths (masked linear layers each), then each masked linear
    layer's weight, bias and mask, layer by layer."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        x_in: Tensor,
        context: Tensor | None,
        bounds: tuple[float, ...],
        depths: tuple[int, ...],
        *tensors: Tensor,
    ) -> tuple[Tensor, Tensor]:
        batch, dim = x_in.shape[:-1], x_in.shape[-1]
        c = None if context is None else context.reshape(-1, context.shape[-1])
        xf = x_in.reshape(-1, dim)
        saved: list[Tensor] = []
        total: Tensor | None = None
        k = 0
        for bound, depth in zip(bounds, depths, strict=True):
            h = xf if c is None else torch.cat((xf, c), -1)
            inputs, masked = [], []
            for i in range(depth):
                weight, bias, mask = tensors[k : k + 3]
                k += 3
                w = weight * mask
                inputs.append(h)
                masked.append(w)
                h = torch.addmm(bias, h, w.t())
                if i < depth - 1:
                    h = h.clamp_min_(0)  # ReLU, in place on the fresh product
            y, ladj, r, e = _affine_forward(xf, h, bound)
            saved += [xf, r, e, *inputs, *masked]
            total = ladj if total is None else total + ladj
            xf = y
        assert total is not None
        ctx.save_for_backward(x, x_in, context, *saved, *tensors)
        ctx.bounds, ctx.depths = bounds, depths
        return xf.view(*batch, dim), total.view(batch)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_y: Tensor | None, grad_ladj: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        depths: tuple[int, ...] = ctx.depths
        x, x_in, context, *rest = ctx.saved_tensors
        tensors = rest[sum(3 + 2 * d for d in depths) :]
        if torch.is_grad_enabled():
            return _made_affine_graph(
                ctx.needs_input_grad,
                x,
                x_in,
                context,
                ctx.bounds,
                depths,
                tensors,
                grad_y,
                grad_ladj,
            )
        needs = ctx.needs_input_grad
        wants = needs[5:]  # the weights', biases' and masks' (never) needs, layer by layer
        starts = [0]
        for d in depths:
            starts.append(starts[-1] + 3 * d)
        dim = x_in.shape[-1]
        gy = None if grad_y is None else grad_y.reshape(-1, dim)
        gl = None if grad_ladj is None else grad_ladj.reshape(-1)
        grads: list[Tensor | None] = [None] * len(tensors)
        grad_x = grad_in = grad_c = None
        at = len(rest) - len(tensors)  # the end of the last layer's saved tensors
        for layer in reversed(range(len(depths))):
            depth, start = depths[layer], starts[layer]
            at -= 3 + 2 * depth
            xf, r, e = rest[at : at + 3]
            inputs, masked = (
                rest[at + 3 : at + 3 + depth],
                rest[at + 3 + depth : at + 3 + 2 * depth],
            )
            # what the gradient of this layer's input serves: the context, or anything below
            below = needs[1] or (layer > 0 and (needs[0] or any(wants[:start])))
            if not (below or needs[0] or needs[2] or any(wants[start : starts[layer + 1]])):
                break
            gx, g = _affine_backward(xf, r, e, gy, gl)  # g: the gradient of the MADE's output
            for i in reversed(range(depth)):
                t = start + 3 * i
                if wants[t]:
                    grads[t] = (g.t() @ inputs[i]).mul_(tensors[t + 2])
                if wants[t + 1]:
                    grads[t + 1] = g.sum(0)
                if i == 0 and not (below or needs[2]):
                    break
                g = g @ masked[i]
                if i > 0:  # through the ReLU: its output is the next layer's input
                    g = torch.ops.aten.threshold_backward(g, inputs[i], 0)
            else:
                if needs[2]:  # the layers' parts summed last layer first, as autograd sums
                    grad_c = g[:, dim:] if grad_c is None else grad_c + g[:, dim:]
                if layer > 0:
                    gy = gx + g[:, :dim]
                else:
                    grad_in = g[:, :dim].reshape(x_in.shape) if needs[1] else None
            if layer == 0 and needs[0]:
                grad_x = gx.view(x_in.shape).sum_to_size(x.shape)
        if grad_c is not None:
            grad_c = grad_c.reshape(context.shape)
        return (grad_x, grad_in, grad_c, None, None, *grads)


def _made_affine_graph(
    needs: tuple[bool, ...],
    x: Tensor,
    x_in: Tensor,
    context: Tensor | None,
    bounds: tuple[float, ...],
    depths: tuple[int, ...],
    tensors: Sequence[Tensor],
    grad_y: Tensor | None,
    grad_ladj: Tensor | None,
) -> tuple[Tensor | None, ...]:
    """:class:`_MadeAffine`'s backward as a differentiable graph (for ``create_graph``)."""
    with torch.enable_grad():
        leaves = [t.view_as(t) if t is not None else None for t in (x, x_in, context, *tensors)]
        x, x_in, context, *params = leaves
        assert x is not None and x_in is not None
        y, made_in, total, k = x, x_in, None, 0  # the first MADE reads x_in, the others y
        for bound, depth in zip(bounds, depths, strict=True):
            h = made_in if context is None else torch.cat((made_in, context), -1)
            for i in range(depth):
                weight, bias, mask = params[k : k + 3]
                k += 3
                h = F.linear(h, weight * mask, bias)
                if i < depth - 1:
                    h = torch.relu(h)
            y, ladj = _affine_expression(y, h, bound)
            total = ladj if total is None else total + ladj
            made_in = y
        assert total is not None
        inputs = [x, x_in, context, None, None, *params]
        return _needed_grads((y, total), (grad_y, grad_ladj), inputs, needs)


def _needed_grads(
    outputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor | None],
    inputs: Sequence[Tensor | None],
    needs: Sequence[bool],
) -> tuple[Tensor | None, ...]:
    """The differentiable backwards' (``create_graph``) common end: the gradients of the
    ``outputs`` that receive one for the ``inputs`` that need one, None for the others."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if g is not None]
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
    found = iter(
        torch.autograd.grad(
            [o for o, _ in pairs],
            wanted,
            [g for _, g in pairs],
            create_graph=True,
            allow_unused=True,
        )
    )
    return tuple(next(found) if need else None for need in needs)


def _affine_forward(x: Tensor, out: Tensor, bound: float) -> tuple[Tensor, ...]:
    r"""The bounded affine map and its log-det from the MADE's output
    ``out`` = :math:`(\mu, s)`, with what the backward keeps: ``(y, ladj, 1 / d, e^b)``."""
    dim = out.shape[-1] // 2
    loc, s = out[..., :dim], out[..., dim:]
    r = s.abs().mul_(1 / bound).add_(1).reciprocal_()  # 1 / d
    b = s * r
    ladj = b.sum(-1)
    e = b.exp_()
    return torch.addcmul(loc, e, x), ladj, r, e


def _affine_backward(
    x: Tensor, r: Tensor, e: Tensor, grad_y: Tensor | None, grad_ladj: Tensor | None
) -> tuple[Tensor, Tensor]:
    """:func:`_affine_forward`'s gradients: for ``x`` (in the broadcast shape of ``y``) and for
    the MADE's output."""
    if grad_y is None:
        grad_y = e.new_zeros(())
    grad_x = grad_y * e
    grad_s = (grad_x * x).sum_to_size(r.shape)
    if grad_ladj is not None:
        grad_s = grad_s.add_(grad_ladj.unsqueeze(-1))
    grad_s = grad_s.mul_(r).mul_(r)  # b'(s) = 1 / d^2
    return grad_x, torch.cat((grad_y.expand_as(grad_s), grad_s), -1)


def _affine_expression(x: Tensor, out: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    r"""The bounded affine map as a plain differentiable expression, :math:`y = \mu + e^{b(s)} x`
    and :math:`\sum_i b(s_i)` from the MADE's output ``out`` = :math:`(\mu, s)`: what the
    differentiable backwards (``create_graph``) differentiate."""
    dim = out.shape[-1] // 2
    b = _bounded(out[..., dim:], bound)
    return torch.addcmul(out[..., :dim], b.exp(), x), b.sum(-1)


def _bounded(s: Tensor, bound: float) -> Tensor:
    """The smoothly bounded log-scale :math:`s / (1 + |s| / S)`, in :math:`(-S, S)`."""
    return s / (1 + s.abs() / bound)


class _BoundedAffine(torch.autograd.Function):
    r"""The IAF's sampling-direction map with its log-determinant, fused:
    :math:`y = \mu + e^{b(s)} x` and :math:`\sum_i b(s_i)`, with :math:`(\mu, s)` the two
    halves of the MADE's output and :math:`b(s) = s / d`, :math:`d = 1 + |s| / S`.

    Written out, the backward is :math:`\bar x = \bar y e^{b}`, :math:`\bar\mu = \bar y`,
    :math:`\bar s = (\bar y e^{b} x + \bar\ell) / d^2` (as :math:`b'(s) = 1 / d^2`), into one
    gradient for the MADE's output: a handful of elementwise kernels where autograd's graph of
    the same expression runs about a dozen, and none of the zero-filled copies that slicing the
    output would cost. It keeps :math:`1 / d`, so that the backward multiplies, not divides.
    Under ``create_graph=True`` the backward differentiates the plain expression instead, so
    higher derivatives are exact."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, out: Tensor, bound: float
    ) -> tuple[Tensor, Tensor]:
        y, ladj, r, e = _affine_forward(x, out, bound)
        ctx.save_for_backward(x, out, r, e)
        ctx.bound = bound
        return y, ladj

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_y: Tensor | None, grad_ladj: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, out, r, e = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _bounded_affine_graph(ctx.needs_input_grad, x, out, ctx.bound, grad_y, grad_ladj)
        grad_x, grad_out = _affine_backward(x, r, e, grad_y, grad_ladj)
        return grad_x.sum_to_size(x.shape), grad_out, None


def _bounded_affine_graph(
    needs: tuple[bool, ...],
    x: Tensor,
    out: Tensor,
    bound: float,
    grad_y: Tensor | None,
    grad_ladj: Tensor | None,
) -> tuple[Tensor | None, ...]:
    """:class:`_BoundedAffine`'s backward as a differentiable graph (for ``create_graph``)."""
    with torch.enable_grad():
        x, out = x.view_as(x), out.view_as(out)
        return (
            *_needed_grads(
                _affine_expression(x, out, bound), (grad_y, grad_ladj), (x, out), needs[:2]
            ),
            None,
        )


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
        table = _spline_table(
            theta, self.bound, self.min_width, self.min_height, self.min_derivative
        )
        return _spline(x, table, self.bound, inverse=inverse)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bins={self.bins}, bound={self.bound}"
