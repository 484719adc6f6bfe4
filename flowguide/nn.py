r"""Conditioner networks: a plain MLP and MADE, both with a zero-initialised output layer.

A conditioner maps its input (and an optional context) to the parameters of an elementwise
bijection. Its last layer starts at zero, so the parameters it outputs start at zero; every
flowguide bijection is the identity at zero parameters, so every flow starts as the identity.

MADE (Germain et al. 2015, "MADE: Masked Autoencoder for Distribution Estimation",
arXiv:1502.03509) masks the weights of an MLP so that output :math:`i` depends only on the inputs
that come before :math:`i` in a given order. Every input gets a degree (its 1-based position in
the order), every hidden unit a degree :math:`m \in \{1, \dots, D - 1\}`, and a connection from a
unit of degree :math:`a` to one of degree :math:`b` is kept when :math:`b \ge a` (into a hidden
unit) or :math:`b > a` (into an output). Context inputs have degree 0: they reach every unit.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MADE", "MLP", "MaskedLinear", "check_hidden", "check_order"]


def check_hidden(hidden: Sequence[int], name: str = "hidden") -> tuple[int, ...]:
    """Validate a list of hidden widths: non-empty, every width a positive integer.

    A single integer is read as one hidden layer. Returns the widths as a tuple; anything else
    raises ``ValueError`` naming the argument (``name``).

    Example:
        >>> check_hidden([64, 64]), check_hidden(16)
        ((64, 64), (16,))
        >>> check_hidden((8, 0))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: hidden must be a non-empty sequence of positive integers ... got (8, 0)
    """
    if isinstance(hidden, int):
        hidden = (hidden,)
    hidden = tuple(hidden)
    if len(hidden) == 0 or any(
        not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in hidden
    ):
        raise ValueError(
            f"{name} must be a non-empty sequence of positive integers (hidden layer widths), "
            f"got {hidden!r}"
        )
    return hidden


def check_order(order: Sequence[int] | Tensor | None, dim: int, name: str = "order") -> Tensor:
    """Validate an input order: a permutation of ``0 .. dim - 1`` (default: the identity).

    Returns it as a ``long`` tensor. Non-integers, repeats and wrong lengths raise
    ``ValueError`` naming the argument (``name``), rather than being truncated or reordered.

    Example:
        >>> check_order(None, 3).tolist(), check_order([2, 0, 1], 3).tolist()
        ([0, 1, 2], [2, 0, 1])
        >>> check_order([0, 0, 1], 3)
        Traceback (most recent call last):
        ...
        ValueError: order must be a permutation of 0..2 (length 3), got [0, 0, 1]
    """
    if order is None:
        return torch.arange(dim)
    # fix: convert without a dtype first, so that non-integers (0.5, True) are rejected rather
    # than silently truncated to a permutation; ``name`` lets Permute report its own argument
    given = torch.as_tensor(order).flatten()
    perm = given.long()
    if (
        given.dtype == torch.bool
        or not torch.equal(perm.to(given.dtype), given)
        or perm.numel() != dim
        or not torch.equal(perm.sort().values, torch.arange(dim))
    ):
        raise ValueError(
            f"{name} must be a permutation of 0..{dim - 1} (length {dim}), got {given.tolist()}"
        )
    return perm


def _check_positive_int(value: int, name: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _activation(activation: Callable[[], nn.Module]) -> nn.Module:
    """Instantiate a hidden activation; a ReLU acts in place, on the fresh output of the linear
    layer before it (whose backward does not read it), which saves an allocation per layer."""
    module = activation()
    if type(module) is nn.ReLU:
        module.inplace = True
    return module


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (a buffer).

    Args:
        mask: a ``(out_features, in_features)`` 0/1 tensor.
        bias: whether the layer has a bias.

    Example:
        >>> layer = MaskedLinear(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        >>> layer(torch.ones(3, 2)).shape
        torch.Size([3, 2])
    """

    mask: Tensor

    def __init__(self, mask: Tensor, bias: bool = True) -> None:
        out_features, in_features = mask.shape
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MLP(nn.Module):
    """A multilayer perceptron with a zero-initialised output layer.

    Args:
        in_features: the input width.
        out_features: the output width.
        hidden: the hidden widths, for example ``(64, 64)``.
        activation: the hidden activation's class (default ``nn.ReLU``).

    Example:
        >>> net = MLP(3, 4, hidden=(8,))
        >>> net(torch.randn(5, 3)).abs().max().item()
        0.0
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        _check_positive_int(in_features, "in_features")
        _check_positive_int(out_features, "out_features")
        widths = (in_features, *check_hidden(hidden), out_features)
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths[:-1]):
            layers += [nn.Linear(a, b), _activation(activation)]
        last = nn.Linear(widths[-2], widths[-1])
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    @property
    def output_layer(self) -> nn.Linear:
        """The zero-initialised last layer."""
        return self.net[-1]  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MADE(nn.Module):
    r"""A masked MLP whose ``params_per_dim`` outputs for input :math:`i` depend only on the inputs
    before :math:`i` in ``order`` (and on the context, if any).

    The output has shape ``(..., dim, params_per_dim)``. The output layer starts at zero.

    Args:
        dim: the number of autoregressive inputs :math:`D`.
        params_per_dim: how many parameters each input's bijection needs.
        hidden: the hidden widths; each should be at least ``dim - 1`` so that every input can
            reach the outputs after it.
        context_dim: the width of the context input (0 for none).
        order: the order of the inputs, a permutation of ``0 .. dim - 1`` (default: ``0, 1, ...``).
        activation: the hidden activation's class.
        param_major: lay the output layer's rows out parameter by parameter (all inputs' first
            parameter, then all inputs' second, ...) instead of input by input. The output has
            the same shape and values either way; parameter-major makes ``out[..., j]`` a
            contiguous row, which speeds up bijections that read their parameters one kind at
            a time (the affine flow's shift and log-scale).

    Reference: Germain et al. 2015, arXiv:1502.03509.

    Example:
        >>> made = MADE(3, params_per_dim=2, hidden=(8,))
        >>> made(torch.randn(5, 3)).shape
        torch.Size([5, 3, 2])
    """

    order: Tensor

    def __init__(
        self,
        dim: int,
        params_per_dim: int,
        hidden: Sequence[int] = (64, 64),
        context_dim: int = 0,
        order: Sequence[int] | Tensor | None = None,
        activation: Callable[[], nn.Module] = nn.ReLU,
        param_major: bool = False,
    ) -> None:
        super().__init__()
        self.dim = _check_positive_int(dim, "dim")
        self.param_major = bool(param_major)
        self.params_per_dim = _check_positive_int(params_per_dim, "params_per_dim")
        self.context_dim = _check_positive_int(context_dim, "context_dim", minimum=0)
        hidden = check_hidden(hidden)
        perm = check_order(order, dim)
        self.register_buffer("order", perm)

        # degree of input i = 1 + its position in the order; context inputs have degree 0
        in_degree = torch.empty(dim, dtype=torch.long)
        in_degree[perm] = torch.arange(1, dim + 1)
        in_degree = torch.cat([in_degree, torch.zeros(context_dim, dtype=torch.long)])
        # hidden degrees run over low .. dim - 1; degree-0 units (which see the context only)
        # exist when there is a context, so the first input's parameters can depend on it
        low = 0 if (context_dim > 0 or dim == 1) else 1
        layers: list[nn.Module] = []
        prev = in_degree
        for width in hidden:
            deg = torch.arange(width) % (dim - low) + low
            mask = (deg[:, None] >= prev[None, :]).float()
            layers += [MaskedLinear(mask), _activation(activation)]
            prev = deg
        if self.param_major:
            out_degree = in_degree[:dim].repeat(params_per_dim)
        else:
            out_degree = in_degree[:dim].repeat_interleave(params_per_dim)
        last = MaskedLinear((out_degree[:, None] > prev[None, :]).float())
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    @property
    def output_layer(self) -> MaskedLinear:
        """The zero-initialised last layer."""
        return self.net[-1]  # type: ignore[return-value]

    def flat(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The output layer's values, unshaped: ``(..., dim * params_per_dim)``, laid out input
        by input, or parameter by parameter with ``param_major``."""
        if context is not None:
            batch = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
            x = torch.cat([x.expand(*batch, -1), context.expand(*batch, -1)], dim=-1)
        return self.net(x)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        out = self.flat(x, context)
        if self.param_major:
            return out.unflatten(-1, (self.params_per_dim, self.dim)).transpose(-1, -2)
        return out.unflatten(-1, (self.dim, self.params_per_dim))

    def input_major_rows(self) -> Tensor:
        """The permutation of the output layer's rows that lists them input by input (input 0's
        parameters, then input 1's, ...): the identity unless ``param_major``."""
        rows = torch.arange(self.dim * self.params_per_dim, device=self.order.device)
        if self.param_major:
            return rows.view(self.params_per_dim, self.dim).t().reshape(-1)
        return rows
