r"""The flow base class, its conditioned view, and the glue flows: composition, permutation and an
elementwise affine map.

Every flow implements two fused methods, each returning the output together with
:math:`\log |\det J_f|` evaluated at the *base-side* point :math:`x`:

* ``_forward_ladj(x, context) -> (y, ladj)``
* ``_inverse_ladj(y, context) -> (x, ladj)``

Everything else (the torch ``Transform`` interface, its cache, conditioning, shape checks) is
written once, here.

Caching. Like any torch ``Transform`` with ``cache_size=1``, a flow remembers its last
``(x, y)`` pair so that ``TransformedDistribution.log_prob`` of a value it just sampled costs no
inverse. Ours also remembers the log-det of that pair, and the cache entry is stamped with the
version counters of the flow's parameters (and of the context): after an optimiser step, a
``load_state_dict`` or any in-place change the stamp no longer matches and the value is
recomputed, so a cached value is never stale (the failure of pyro#2564).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.distributions import Transform, constraints

__all__ = ["BoundFlow", "Compose", "ElementwiseAffine", "Flow", "Permute"]


def _functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ...) is running. The
    flows' fused autograd functions (one node with a written-out backward, for speed) serve
    plain autograd only; under these transforms the flows run their plain expressions."""
    return bool(torch._C._are_functorch_transforms_active())


def _check_int(value: Any, name: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class _FlowCache:
    __slots__ = ("key", "ladj", "x", "y")

    def __init__(self, x: Tensor, y: Tensor, ladj: Tensor, key: tuple) -> None:
        self.x, self.y, self.ladj, self.key = x, y, ladj, key


def _stamp_parameters(module: nn.Module, out: list) -> None:
    """Append ``id`` and version counter of every parameter of ``module`` (and its submodules)
    to ``out``: ``module.parameters()`` gives the same tensors, at several times the cost (it
    builds names and removes duplicates, which a stamp does not need)."""
    for p in module._parameters.values():
        if p is not None:
            out += (id(p), p._version)
    for m in module._modules.values():
        if m is not None:
            _stamp_parameters(m, out)


class _TransformMethods:
    """The torch ``Transform`` interface on top of a flow's fused methods (shared by a flow and
    its conditioned view)."""

    _cache_size: int
    _cache: _FlowCache | None

    def _bound(self) -> tuple[Flow, Tensor | None]:
        raise NotImplementedError

    def _stamp(self, flow: Flow, context: Tensor | None) -> tuple | None:
        if torch.is_inference_mode_enabled():
            return None
        # fix: the grad mode is part of the stamp, so a value computed under ``no_grad`` (say by
        # ``svi.evaluate_loss``) is never handed back, graph-less, once gradients are on again:
        # that silently stopped all training on the same data (no gradient, so no step, so a hit)
        stamp: list = [torch.is_grad_enabled()]
        _stamp_parameters(flow, stamp)
        if context is not None:
            stamp += (id(context), context._version)
        return tuple(stamp)

    def _lookup(self, x: Tensor | None, y: Tensor | None, key: tuple | None) -> _FlowCache | None:
        c = self._cache
        if c is None or key is None or c.key != key:
            return None
        if (x is None or x is c.x) and (y is None or y is c.y):
            return c
        return None

    def _store(self, x: Tensor, y: Tensor, ladj: Tensor, key: tuple | None) -> None:
        if self._cache_size and key is not None:
            # straight into the instance dict: ``nn.Module.__setattr__`` would first look the
            # name up among parameters, buffers and submodules, at every call
            self.__dict__["_cache"] = _FlowCache(x, y, ladj, key)

    def forward_and_log_abs_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""Return :math:`y = f(x)` and :math:`\log|\det \partial y / \partial x|` in one pass."""
        flow, context = self._bound()
        key = self._stamp(flow, context) if self._cache_size else None
        hit = self._lookup(x, None, key)
        if hit is not None:
            return hit.y, hit.ladj
        y, ladj = flow._forward_ladj(flow._check_input(x, "x"), context)
        self._store(x, y, ladj, key)
        return y, ladj

    def inverse_and_log_abs_det(self, y: Tensor) -> tuple[Tensor, Tensor]:
        r"""Return :math:`x = f^{-1}(y)` and the *forward* log-det
        :math:`\log|\det \partial y / \partial x|` at that point, in one pass."""
        flow, context = self._bound()
        key = self._stamp(flow, context) if self._cache_size else None
        hit = self._lookup(None, y, key)
        if hit is not None:
            return hit.x, hit.ladj
        x, ladj = flow._inverse_ladj(flow._check_input(y, "y"), context)
        self._store(x, y, ladj, key)
        return x, ladj

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward_and_log_abs_det(x)[0]

    def _inv_call(self, y: Tensor) -> Tensor:
        return self.inverse_and_log_abs_det(y)[0]

    def _call(self, x: Tensor) -> Tensor:
        return self.forward_and_log_abs_det(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inverse_and_log_abs_det(y)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        flow, context = self._bound()
        key = self._stamp(flow, context) if self._cache_size else None
        hit = self._lookup(x, y, key)
        if hit is not None:
            return hit.ladj
        return flow._forward_ladj(flow._check_input(x, "x"), context)[1]

    def __getstate__(self) -> dict[str, Any]:
        state = Transform.__getstate__(self)  # type: ignore[arg-type]
        state["_cache"] = None
        return state


def _vector(value: Tensor | float | None, default: float, dim: int, name: str) -> Tensor:
    floating = isinstance(value, Tensor) and value.is_floating_point()
    dtype = value.dtype if floating else torch.get_default_dtype()  # type: ignore[union-attr]
    t = torch.as_tensor(default if value is None else value, dtype=dtype).detach().cpu()
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != dim):
        raise ValueError(f"{name} must be a scalar or of shape ({dim},), got {tuple(t.shape)}")
    return t.expand(dim).clone()


class Flow(_TransformMethods, TransformModule):
    r"""Base class of flowguide's flows: a torch ``Transform`` on vectors that is also an
    ``nn.Module`` owning its parameters.

    Direction: the forward map :math:`y = f(x)` takes base noise :math:`x` to the target space.
    A flow with ``context_dim > 0`` is conditional: :meth:`condition` binds a context and returns
    the transform for it.

    Subclasses implement ``_forward_ladj(x, context)`` and ``_inverse_ladj(y, context)``, each
    returning the output and :math:`\log|\det \partial y / \partial x|`, of shape ``x.shape[:-1]``.
    Those are all a distribution needs: pushing a base density :math:`p_X` forward gives

    .. math::

        \log p_Y(y) = \log p_X\big(f^{-1}(y)\big)
            - \log\left|\det \frac{\partial f}{\partial x}\right|_{x = f^{-1}(y)},

    which ``pyro.distributions.TransformedDistribution`` computes from them.

    Example:
        A learnable shift :math:`y = x + b`, with log-det 0:

        >>> import pyro.distributions as dist
        >>> class Shift(Flow):
        ...     def __init__(self, dim):
        ...         super().__init__(dim)
        ...         self.b = nn.Parameter(torch.ones(dim))
        ...     def _forward_ladj(self, x, context):
        ...         return x + self.b, x.new_zeros(x.shape[:-1])
        ...     def _inverse_ladj(self, y, context):
        ...         return y - self.b, y.new_zeros(y.shape[:-1])
        >>> f = Shift(2)
        >>> f(torch.zeros(2)).tolist(), f.inv(torch.tensor([3.0, 3.0])).tolist()
        ([1.0, 1.0], [2.0, 2.0])
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> q = dist.TransformedDistribution(base, [f])
        >>> bool(torch.allclose(q.log_prob(torch.ones(2)), base.log_prob(torch.zeros(2))))
        True
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, dim: int, context_dim: int = 0, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        self.dim = _check_int(dim, "dim", 1)
        self.context_dim = _check_int(context_dim, "context_dim", 0)
        self._cache: _FlowCache | None = None

    # -- to implement -------------------------------------------------------------------------
    def _forward_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inverse_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @classmethod
    def _chain_forward_ladj(
        cls, flows: Sequence[Flow], x: Tensor, context: Tensor | None
    ) -> tuple[Tensor, Tensor] | None:
        """Several flows of this class in a row (each reading ``context``, or all none) as one
        fused pass: ``(y, the summed log-dets)``, or None where the class has none, and
        :class:`Compose` runs them one by one."""
        return None

    # -- shared machinery ---------------------------------------------------------------------
    @property
    def sign(self) -> int:  # type: ignore[override]
        """The sign of the Jacobian's determinant: +1, but for odd permutations."""
        return 1

    @property
    def is_conditional(self) -> bool:
        """Whether the flow needs a context (``context_dim > 0``)."""
        return self.context_dim > 0

    def _check_input(self, x: Tensor, name: str) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__}(dim={self.dim}) expects {name} of shape (..., {self.dim}), "
                f"got {tuple(x.shape)}"
            )
        return x

    def _check_context(self, context: Tensor) -> Tensor:
        if not isinstance(context, Tensor):
            raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
        if context.dim() < 1 or context.shape[-1] != self.context_dim:
            raise ValueError(
                f"{type(self).__name__}(context_dim={self.context_dim}) expects a context of "
                f"shape (..., {self.context_dim}), got {tuple(context.shape)}"
            )
        return context

    def _bound(self) -> tuple[Flow, Tensor | None]:
        if self.context_dim:
            raise ValueError(
                f"{type(self).__name__}(context_dim={self.context_dim}) is conditional: call "
                ".condition(context) to get the transform for a context"
            )
        return self, None

    def condition(self, context: Tensor) -> BoundFlow:
        """The transform of a conditional flow for ``context`` of shape ``(..., context_dim)``."""
        if not self.context_dim:
            raise ValueError(
                f"{type(self).__name__} was built with context_dim=0 and takes no context; "
                "pass context_dim=c > 0 to make it conditional"
            )
        return BoundFlow(self, self._check_context(context), self._cache_size)

    def with_cache(self, cache_size: int = 1) -> Transform:
        if cache_size == self._cache_size:
            return self
        return BoundFlow(self, None, cache_size)

    def __repr__(self) -> str:
        return nn.Module.__repr__(self)

    def extra_repr(self) -> str:
        extra = f"dim={self.dim}"
        if self.context_dim:
            extra += f", context_dim={self.context_dim}"
        return extra


class BoundFlow(_TransformMethods, Transform):
    r"""A flow bound to a context (or to another cache size): a plain torch ``Transform`` that
    reads the flow's current parameters at every call, so it never goes stale.

    Made by :meth:`Flow.condition` and :meth:`Flow.with_cache`. For a conditional flow
    :math:`f(\cdot\,; c)` it is the map :math:`x \mapsto f(x; c)` at the bound context
    :math:`c`; a context of shape ``(..., context_dim)`` broadcasts against the input's batch.

    Example:
        >>> from flowguide.transforms import Planar
        >>> flow = Planar(2, context_dim=3)  # starts as the identity, whatever the context
        >>> t = flow.condition(torch.zeros(4, 3))
        >>> t
        BoundFlow(Planar, context shape (4, 3))
        >>> x = torch.ones(4, 2)
        >>> y, ladj = t.forward_and_log_abs_det(x)
        >>> bool(torch.equal(y, x)), ladj.shape
        (True, torch.Size([4]))
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, flow: Flow, context: Tensor | None, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        self.flow = flow
        self.context = context
        self._cache = None

    def _bound(self) -> tuple[Flow, Tensor | None]:
        return self.flow, self.context

    @property
    def sign(self) -> int:  # type: ignore[override]
        return self.flow.sign

    def with_cache(self, cache_size: int = 1) -> Transform:
        if cache_size == self._cache_size:
            return self
        return BoundFlow(self.flow, self.context, cache_size)

    def __repr__(self) -> str:
        ctx = "" if self.context is None else f", context shape {tuple(self.context.shape)}"
        return f"BoundFlow({type(self.flow).__name__}{ctx})"


class Compose(Flow):
    r"""A composition :math:`f = f_n \circ \dots \circ f_1` of flows of the same dimension.

    The log-dets add. The composition is conditional when any part is; every conditional part
    receives the same context. Consecutive parts that have a fused pass together (IAF layers
    with ReLU MADEs) run as one autograd node, with the same values and gradients.

    Args:
        flows: the flows, in the order they act on base noise.

    Example:
        >>> from flowguide.transforms import Planar, Radial
        >>> f = Compose([Planar(2), Radial(2)])
        >>> y, ladj = f.forward_and_log_abs_det(torch.zeros(2))
        >>> y.tolist(), ladj.item()
        ([0.0, 0.0], 0.0)
    """

    def __init__(self, flows: Iterable[Flow], cache_size: int = 1) -> None:
        flows = list(flows)
        if not flows:
            raise ValueError("flows must hold at least one flow, got an empty sequence")
        for i, f in enumerate(flows):
            if not isinstance(f, Flow):
                raise TypeError(f"flows[{i}] must be a flowguide Flow, got {type(f).__name__}")
        dims = {f.dim for f in flows}
        if len(dims) != 1:
            raise ValueError(f"all flows must have the same dim, got dims {[f.dim for f in flows]}")
        contexts = {f.context_dim for f in flows if f.context_dim}
        if len(contexts) > 1:
            raise ValueError(
                "conditional parts must share one context_dim, got "
                f"{[f.context_dim for f in flows]}"
            )
        super().__init__(flows[0].dim, contexts.pop() if contexts else 0, cache_size)
        self.flows = nn.ModuleList(flows)

    def __len__(self) -> int:
        return len(self.flows)

    def __getitem__(self, i: int) -> Flow:
        return self.flows[i]  # type: ignore[return-value]

    @property
    def sign(self) -> int:  # type: ignore[override]
        return math.prod(f.sign for f in self.flows)  # type: ignore[misc]

    def _forward_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        total: Tensor | int = 0
        flows: list[Flow] = list(self.flows)  # type: ignore[arg-type]
        i = 0
        while i < len(flows):
            # a run of flows of one class, all conditional or none: one fused pass if the
            # class has one (``_chain_forward_ladj``), else one flow at a time
            first, j = flows[i], i + 1
            while (
                j < len(flows)
                and type(flows[j]) is type(first)
                and bool(flows[j].context_dim) == bool(first.context_dim)
            ):
                j += 1
            part = context if first.context_dim else None
            fused = type(first)._chain_forward_ladj(flows[i:j], x, part) if j - i > 1 else None
            if fused is not None:
                x, ladj = fused
                total = total + ladj
            else:
                for f in flows[i:j]:
                    x, ladj = f._forward_ladj(x, part)
                    total = total + ladj
            i = j
        return x, total  # type: ignore[return-value]

    def _inverse_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        total: Tensor | int = 0
        for f in reversed(self.flows):
            y, ladj = f._inverse_ladj(y, context if f.context_dim else None)
            total = total + ladj
        return y, total  # type: ignore[return-value]


class Permute(Flow):
    """A fixed permutation of the coordinates: ``y = x[..., permutation]``; log-det 0.

    Args:
        dim: the dimension.
        permutation: a permutation of ``0 .. dim - 1``; default the reversal.

    Example:
        >>> Permute(3)(torch.tensor([1.0, 2.0, 3.0])).tolist()
        [3.0, 2.0, 1.0]
    """

    permutation: Tensor
    inverse_permutation: Tensor

    def __init__(
        self, dim: int, permutation: Sequence[int] | Tensor | None = None, cache_size: int = 1
    ) -> None:
        super().__init__(dim, 0, cache_size)
        from ..nn import check_order

        perm = check_order(
            torch.arange(dim - 1, -1, -1) if permutation is None else permutation,
            dim,
            name="permutation",  # fix: errors named ``order``, an argument Permute does not have
        ).clone()
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", torch.argsort(perm))

    @property
    def sign(self) -> int:  # type: ignore[override]
        """The permutation's parity: -1 for an odd number of transpositions."""
        perm, seen, transpositions = self.permutation.tolist(), set(), 0
        for start in range(self.dim):
            length = 0
            while start not in seen:
                seen.add(start)
                start = perm[start]
                length += 1
            transpositions += max(length - 1, 0)
        return -1 if transpositions % 2 else 1

    def _forward_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return x[..., self.permutation], x.new_zeros(x.shape[:-1])

    def _inverse_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return y[..., self.inverse_permutation], y.new_zeros(y.shape[:-1])


class ElementwiseAffine(Flow):
    r"""A learnable elementwise affine map :math:`y = \mu + \sigma \odot x` with
    :math:`\sigma = e^{s}`; :math:`\log|\det J| = \sum_i s_i`.

    Args:
        dim: the dimension.
        loc: the initial :math:`\mu` (default 0).
        scale: the initial :math:`\sigma > 0` (default 1).

    Example:
        >>> f = ElementwiseAffine(2, loc=torch.tensor([1.0, -1.0]), scale=torch.tensor([2.0, 0.5]))
        >>> y, ladj = f.forward_and_log_abs_det(torch.ones(2))
        >>> y.tolist(), round(ladj.item(), 6)
        ([3.0, -0.5], 0.0)
    """

    def __init__(
        self,
        dim: int,
        loc: Tensor | float | None = None,
        scale: Tensor | float | None = None,
        cache_size: int = 1,
    ) -> None:
        super().__init__(dim, 0, cache_size)
        loc_t = _vector(loc, 0.0, dim, "loc")
        scale_t = _vector(scale, 1.0, dim, "scale")
        if not bool((scale_t > 0).all() & scale_t.isfinite().all()):
            raise ValueError(f"scale must be finite and > 0, got {scale_t.tolist()}")
        self.loc = nn.Parameter(loc_t.clone())
        self.log_scale = nn.Parameter(scale_t.log())

    def _forward_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        y = self.loc + self.log_scale.exp() * x
        return y, self.log_scale.sum().expand(x.shape[:-1])

    def _inverse_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        x = (y - self.loc) * torch.exp(-self.log_scale)
        return x, self.log_scale.sum().expand(y.shape[:-1])


class _Parameters(nn.Module):
    """The raw parameter vector of a planar or radial layer: a learnable vector, or, when
    ``context_dim > 0``, the output of an MLP of the context whose zero-initialised last layer
    has the same vector as its bias, so both start at the same transform."""

    def __init__(
        self, init: Tensor, context_dim: int, hidden: Sequence[int], activation: type[nn.Module]
    ) -> None:
        super().__init__()
        if context_dim:
            from ..nn import MLP

            self.net: MLP | None = MLP(context_dim, init.numel(), hidden, activation)
            with torch.no_grad():
                self.net.output_layer.bias.copy_(init)
        else:
            self.net = None
            self.raw = nn.Parameter(init.clone())

    def forward(self, context: Tensor | None) -> Tensor:
        if self.net is None:
            return self.raw
        return self.net(context)
