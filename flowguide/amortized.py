r"""Amortized flow posteriors for VAEs and other models with local latents (pyro#2849).

A model with one latent :math:`z_n` per datum :math:`x_n` (a VAE, a mixed model, a topic model)
needs a posterior :math:`q(z_n \mid x_n)` for every datum, and there can be millions of them. An
*amortized* posterior shares one network across the data: an encoder reads :math:`x` and outputs
the parameters of :math:`q(z \mid x)`. flowguide's amortized posterior is a diagonal Gaussian
shaped by a conditional normalizing flow whose parameters also depend on :math:`x`:

.. math::

    (\mu, \sigma, h) = \mathrm{heads}(e(x)), \qquad
    z_0 \sim \mathcal{N}(\mu, \operatorname{diag}\sigma^2), \qquad
    z = f_h(z_0),

    \log q(z \mid x) = \log \mathcal{N}(z_0; \mu, \operatorname{diag}\sigma^2)
        - \log \left| \det \frac{\partial f_h}{\partial z_0} \right|,

with :math:`e` the user's encoder (any ``nn.Module`` that maps a batch of data to a batch of
feature vectors), three linear heads added by flowguide (:math:`\mu`, :math:`\sigma` through a
softplus, and a context :math:`h`), and :math:`f_h` a conditional flow that reads :math:`h`:

* ``"planar"``: planar layers whose parameters one linear map of :math:`h` predicts per datum,
  all layers at once (:class:`AmortizedPlanar`; Rezende & Mohamed 2015, section 4.2);
* ``"radial"``: radial layers whose parameters an MLP of :math:`h` predicts per datum, one MLP
  per layer;
* ``"iaf"``: inverse autoregressive layers whose MADE also reads :math:`h` (Kingma et al. 2016),
  the autoregressive order reversed between layers;
* ``"nsf"``: rational-quadratic spline autoregressive layers with :math:`h` fed to the MADE
  (Durkan et al. 2019), between two affine autoregressive layers;
* ``None``: no flow, the diagonal Gaussian encoder of the plain VAE.

Every flow starts as the identity, so at initialisation the posterior *is* the diagonal Gaussian
encoder, and a flow can only improve on it.

Three ways to use it:

* :class:`AmortizedFlowPosterior` is the building block: ``posterior(x)`` is a Pyro distribution
  (batch shape ``x``'s batch, event shape ``(latent_dim,)``) for a hand-written guide,
  ``pyro.sample("z", posterior(x_batch))`` inside the data plate.
* :class:`AutoAmortizedFlow` is an autoguide: given the model and an encoder it builds the amortized
  posterior for the local sites in the (subsampled) data plate, and a flowguide
  :class:`~flowguide.guides.AutoIAF` for any global sites, so a VAE needs no hand-written guide.
* :func:`importance_weighted_log_likelihood` estimates :math:`\log p(x)` per datum by importance
  sampling (the IWAE bound of Burda et al. 2016 with many samples); :func:`iwae_bound` and
  :func:`dreg_loss` train with the importance-weighted bound, the latter with the
  doubly-reparameterized gradient of Tucker et al. 2018.

References:
    Kingma & Welling 2014, "Auto-Encoding Variational Bayes", arXiv:1312.6114.
    Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows", arXiv:1505.05770.
    Burda, Grosse, Salakhutdinov 2016, "Importance Weighted Autoencoders", arXiv:1509.00519.
    Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive Flow",
    arXiv:1606.04934.
    van den Berg et al. 2018, "Sylvester Normalizing Flows for Variational Inference",
    arXiv:1803.05649.
    Rainforth et al. 2018, "Tighter Variational Bounds are Not Necessarily Better",
    arXiv:1802.04537.
    Tucker, Lawson, Gu, Maddison 2018, "Doubly Reparameterized Gradient Estimators for Monte Carlo
    Objectives", arXiv:1810.04152.
    Durkan et al. 2019, "Neural Spline Flows", arXiv:1906.04032.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.distributions import biject_to, constraints

from .guides import AutoIAF, default_hidden, plate_nesting
from .nn import MLP
from .transforms import (
    AffineAutoregressive,
    Compose,
    Flow,
    Planar,
    Radial,
    SplineAutoregressive,
)
from .transforms.planar import (
    PlanarParameters,
    _planar_parameters,
    planar_stack_forward,
    planar_stack_inverse,
)

__all__ = [
    "FLOW_FAMILIES",
    "AmortizedFlowPosterior",
    "AmortizedPlanar",
    "AutoAmortizedFlow",
    "LogJoint",
    "build_conditional_flow",
    "dreg_loss",
    "importance_weighted_log_likelihood",
    "iwae_bound",
]

#: ``log_joint(x, z) -> log p(x, z)``: ``x`` of shape ``(B, *data_shape)``, ``z`` of shape
#: ``(K, B, latent_dim)``, the result of shape ``(K, B)`` (one value per sample and datum).
LogJoint = Callable[[Tensor, Tensor], Tensor]

#: The flow families of :class:`AmortizedFlowPosterior` and their default number of layers
#: (for ``"nsf"`` the spline layers; its opening and closing affine layers come on top).
FLOW_FAMILIES: dict[str, int] = {"planar": 16, "radial": 16, "iaf": 2, "nsf": 2}


def _check_int(value: Any, name: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def build_conditional_flow(
    family: str,
    latent_dim: int,
    context_dim: int,
    num_flows: int | None = None,
    hidden: Sequence[int] | None = None,
    bins: int = 8,
    bound: float = 3.0,
    affine: bool = True,
) -> Flow:
    r"""A conditional flow of one of the :data:`FLOW_FAMILIES`, the identity at initialisation.

    The flow has ``num_flows`` layers :math:`f_h = f^{(L)}_h \circ \dots \circ f^{(1)}_h`, each
    reading the context :math:`h`, so :math:`\log|\det J_{f_h}| = \sum_l \log|\det
    J_{f^{(l)}_h}|`:

    * ``"planar"``: an :class:`AmortizedPlanar` stack, whose one network of :math:`h` predicts
      every layer's parameters together;
    * ``"radial"``: a :class:`~flowguide.transforms.Compose` of
      :class:`~flowguide.transforms.Radial` layers, each with its own MLP of :math:`h` for its
      parameters;
    * ``"iaf"``: :class:`~flowguide.transforms.AffineAutoregressive` layers,
      :math:`z_i \mapsto \mu_i(z_{<i}, h) + e^{s_i(z_{<i}, h)} z_i`, on a MADE that also reads
      :math:`h`, the order reversed every other layer;
    * ``"nsf"``: :class:`~flowguide.transforms.SplineAutoregressive` layers, the same with a
      rational-quadratic spline for the affine map, between (``affine=True``) two affine
      autoregressive layers: a spline maps :math:`[-B, B]` onto itself, so the opening layer
      can move and scale each coordinate to where the spline's bins are, and the closing one
      gives every coordinate a location and scale conditioned on the others and on :math:`h`
      (:class:`~flowguide.guides.AutoNeuralSpline` has the closing one).

    Args:
        family: ``"planar"``, ``"radial"``, ``"iaf"`` or ``"nsf"``.
        latent_dim: the latent dimension :math:`D`.
        context_dim: the context's width :math:`c \ge 1`.
        num_flows: the number of layers (default :data:`FLOW_FAMILIES` ``[family]``).
        hidden: the conditioners' hidden widths: the MADE's for ``"iaf"`` and ``"nsf"`` (default
            :func:`~flowguide.guides.default_hidden`), each radial layer's parameter MLP's
            (default the first of those widths alone) and the planar stack's parameter
            network's (its first width; default none: one linear map of :math:`h` for all
            layers, as in Rezende & Mohamed's and van den Berg et al.'s amortized planar
            flows).
        bins, bound: the spline's bins and half-width (``"nsf"`` only).
        affine: put an ``"nsf"`` flow's spline layers between two affine autoregressive
            layers (not counted in ``num_flows``).

    References: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
    arXiv:1505.05770 (planar, radial); Kingma et al. 2016, "Improved Variational Inference with
    Inverse Autoregressive Flow", arXiv:1606.04934 (IAF); Germain et al. 2015, "MADE: Masked
    Autoencoder for Distribution Estimation", arXiv:1502.03509; Durkan et al. 2019, "Neural
    Spline Flows", arXiv:1906.04032 (NSF).

    Example:
        >>> flow = build_conditional_flow("planar", 3, context_dim=4, num_flows=2)
        >>> z0, h = torch.randn(5, 3), torch.randn(5, 4)
        >>> z, ladj = flow.condition(h).forward_and_log_abs_det(z0)
        >>> bool(torch.equal(z, z0)), ladj.abs().max().item()
        (True, 0.0)
    """
    if family not in FLOW_FAMILIES:
        raise ValueError(
            f"flow must be one of {sorted(FLOW_FAMILIES)} or None (a diagonal Gaussian), "
            f"got {family!r}"
        )
    _check_int(latent_dim, "latent_dim", 1)
    _check_int(context_dim, "context_dim", 1)
    num_flows = FLOW_FAMILIES[family] if num_flows is None else num_flows
    _check_int(num_flows, "num_flows", 1)
    widths = tuple(hidden) if hidden is not None else default_hidden(latent_dim)
    if family == "planar":
        # one linear map of the context for all layers unless hidden is given: the amortized
        # planar flows of Rezende & Mohamed and of van den Berg et al.'s baselines
        planar_hidden = () if hidden is None else tuple(hidden)[:1]
        return AmortizedPlanar(latent_dim, context_dim, num_flows, hidden=planar_hidden)
    layers: list[Flow] = []
    wrapped = family == "nsf" and affine  # an affine layer before and after the splines
    for i in range(num_flows + 2 * wrapped):
        if family == "radial":
            layers.append(Radial(latent_dim, context_dim, hidden=widths[:1] or widths))
        else:
            # alternate the autoregressive order (not the coordinates: a Permute layer would
            # make the flow a permutation at initialisation, and the base is not isotropic)
            order = torch.arange(latent_dim)
            order = order.flip(0) if i % 2 else order
            if family == "iaf" or (wrapped and i in (0, num_flows + 1)):
                layers.append(
                    AffineAutoregressive(latent_dim, widths, context_dim=context_dim, order=order)
                )
            else:
                layers.append(
                    SplineAutoregressive(
                        latent_dim, bins, bound, widths, context_dim=context_dim, order=order
                    )
                )
    return Compose(layers)


class AmortizedPlanar(Flow):
    r"""A stack of ``num_flows`` planar layers whose parameters one network of the context
    predicts together, as in Rezende & Mohamed's VAEs (the encoder outputs every layer's
    :math:`(u_l, w_l, b_l)` per datum):

    .. math::

        (u_l, w_l, b_l)_{l=1}^{L} = g(h), \qquad
        f_h = f^{(L)} \circ \dots \circ f^{(1)}, \quad
        f^{(l)}(z) = z + \hat u_l \tanh(w_l^\top z + b_l),

    with :math:`\hat u_l` the invertible reparameterisation of :class:`~flowguide.transforms.Planar`
    (see :func:`~flowguide.transforms.planar.planar_parameters`), so every layer is invertible and
    :math:`\log|\det J_{f_h}| = \sum_l \log(1 + (1 - \tanh^2(w_l^\top z_{l-1} + b_l))
    w_l^\top \hat u_l)`.

    The same map as a :class:`~flowguide.transforms.Compose` of conditional ``Planar`` layers, but
    with one network :math:`g` (an MLP, or one linear map with ``hidden=()``) for all layers
    instead of one per layer: two matrix products for the whole stack instead of two per layer,
    and one parameter tensor per network layer for the optimiser, not four per flow layer. The
    derived parameters :math:`\hat u_l, w_l^\top \hat u_l` of all layers are computed at once;
    only the planar maps themselves run layer by layer.

    Starts as the identity for every context: :math:`g`'s last layer has zero weights and its bias
    is each layer's ``Planar.initial_raw`` (:math:`u = 0`, :math:`b = 0`, small random :math:`w`).
    The inverse inverts the layers in reverse order (see ``Planar``).

    Args:
        dim: the dimension :math:`D`.
        context_dim: the context's width (at least 1).
        num_flows: the number of layers :math:`L`.
        hidden: the hidden widths of :math:`g`; ``()`` (the default) for one linear map.
        activation: :math:`g`'s hidden activation.
        max_iter: the most Newton steps of each layer's inverse.

    Reference: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
    arXiv:1505.05770 (section 4.2, amortized flow parameters).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> flow = AmortizedPlanar(3, context_dim=4, num_flows=8, hidden=(16,)).double()
        >>> z0 = torch.randn(5, 3, dtype=torch.float64)
        >>> h = torch.randn(5, 4, dtype=torch.float64)
        >>> z, ladj = flow.condition(h).forward_and_log_abs_det(z0)  # the identity at first
        >>> bool(torch.equal(z, z0)), ladj.abs().max().item()
        (True, 0.0)
        >>> with torch.no_grad():
        ...     _ = flow.output_layer.weight.normal_(0, 0.1)
        >>> z = flow.condition(h)(z0)
        >>> bool(torch.allclose(flow.condition(h).inv(z), z0, atol=1e-9))
        True
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        num_flows: int = 16,
        hidden: Sequence[int] = (),
        activation: type[nn.Module] = nn.ReLU,
        max_iter: int = 100,
        cache_size: int = 1,
    ) -> None:
        super().__init__(dim, context_dim, cache_size)
        _check_int(context_dim, "context_dim", 1)
        self.num_flows = _check_int(num_flows, "num_flows", 1)
        hidden = tuple(hidden)
        init = torch.cat([Planar.initial_raw(dim) for _ in range(num_flows)])
        self.net: nn.Module
        if hidden:
            self.net = MLP(context_dim, init.numel(), hidden, activation)
        else:  # one linear map (zero weights, as MLP's output layer)
            self.net = nn.Linear(context_dim, init.numel())
            nn.init.zeros_(self.net.weight)
        with torch.no_grad():
            self.output_layer.bias.copy_(init)
        self.max_iter = max_iter

    @property
    def output_layer(self) -> nn.Linear:
        """The network's last layer (zero weights at initialisation)."""
        return self.net.output_layer if isinstance(self.net, MLP) else self.net  # type: ignore

    def __len__(self) -> int:
        return self.num_flows

    def layer_parameters(self, context: Tensor) -> PlanarParameters:
        """Every layer's parameters for ``context`` of shape ``(..., context_dim)``: ``w`` and
        ``u_hat`` of shape ``(..., num_flows, dim)``, the others ``(..., num_flows)``."""
        return self._stack_parameters(self._check_context(context))

    def _stack_parameters(self, context: Tensor | None) -> PlanarParameters:
        # the context was checked where it was bound (``condition``), and the network's output
        # has the raw vectors' shape by construction: no checks on the forward and inverse paths
        raw = self.net(context).unflatten(-1, (self.num_flows, 2 * self.dim + 1))
        return _planar_parameters(raw, self.dim)

    def _forward_ladj(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return planar_stack_forward(x, self._stack_parameters(context))

    def _inverse_ladj(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return planar_stack_inverse(y, self._stack_parameters(context), self.max_iter)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_flows={self.num_flows}, max_iter={self.max_iter}"


class AmortizedFlowPosterior(nn.Module):
    r"""An amortized posterior :math:`q(z \mid x)`: a diagonal Gaussian encoder shaped by a
    conditional flow (see the module docstring for the construction).

    .. math::

        z = f_{h(x)}(z_0), \quad z_0 \sim \mathcal{N}\big(\mu(x), \operatorname{diag}
        \sigma(x)^2\big), \qquad \log q(z \mid x) = \log \mathcal{N}\big(z_0; \mu(x),
        \operatorname{diag} \sigma(x)^2\big) - \log\left|\det \frac{\partial f_{h(x)}}
        {\partial z_0}\right|.

    The encoder interface: ``encoder`` is any ``nn.Module`` that maps a batch of data of shape
    ``(B, *data_shape)`` to a batch of feature vectors of shape ``(B, feature_dim)`` (an MLP, a
    CNN, a transformer with pooling ...). flowguide adds the heads: linear maps from the features
    to :math:`\mu`, to :math:`\sigma` (through a softplus, floored at ``min_scale``) and to the
    flow's context :math:`h`. ``feature_dim`` is found by running the encoder once on zeros of
    shape ``(2, *data_shape)`` when it is not given.

    Calling ``posterior(x)`` with ``x`` of shape ``(*batch, *data_shape)`` returns a
    ``pyro.distributions.TransformedDistribution`` with batch shape ``batch`` and event shape
    ``(latent_dim,)``: it has ``rsample`` and ``log_prob``, and a sample's ``log_prob`` reuses the
    log-det of the forward pass (no inverse). In a hand-written guide::

        def guide(x_all):
            pyro.module("posterior", posterior)
            with pyro.plate("data", len(x_all), subsample_size=128) as idx:
                pyro.sample("z", posterior(x_all[idx]))

    Args:
        encoder: the feature network (see above).
        latent_dim: the latent dimension :math:`D`.
        flow: ``"planar"``, ``"radial"``, ``"iaf"``, ``"nsf"``, ``None`` (the plain diagonal
            Gaussian), or a flowguide :class:`~flowguide.transforms.Flow` of dimension ``D``
            (conditional ones get the context).
        data_shape: the shape of one datum; checks the data's shape (clear errors) and lets
            ``feature_dim`` be found. At least one of ``data_shape`` and ``feature_dim``.
        feature_dim: the width of the encoder's output.
        num_flows: the number of flow layers (default :data:`FLOW_FAMILIES`).
        context_dim: the width of the context :math:`h` (default ``clip(2 D, 16, 256)``);
            ignored, like the other flow options, when ``flow=None``.
        hidden, bins, bound: the flow's conditioner widths and spline settings, see
            :func:`build_conditional_flow`.
        min_scale: the floor of :math:`\sigma`.

    References: Kingma & Welling 2014, "Auto-Encoding Variational Bayes", arXiv:1312.6114 (the
    amortized Gaussian encoder); Rezende & Mohamed 2015, "Variational Inference with Normalizing
    Flows", arXiv:1505.05770, and Kingma et al. 2016, "Improved Variational Inference with Inverse
    Autoregressive Flow", arXiv:1606.04934 (flows conditioned on the datum).

    Example:
        >>> encoder = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        >>> posterior = AmortizedFlowPosterior(encoder, 2, flow="iaf", data_shape=(6,))
        >>> q = posterior(torch.randn(5, 6))
        >>> q.batch_shape, q.event_shape, q.rsample((3,)).shape
        (torch.Size([5]), torch.Size([2]), torch.Size([3, 5, 2]))
    """

    def __init__(
        self,
        encoder: nn.Module,
        latent_dim: int,
        flow: str | Flow | None = "iaf",
        *,
        data_shape: int | Sequence[int] | None = None,
        feature_dim: int | None = None,
        num_flows: int | None = None,
        context_dim: int | None = None,
        hidden: Sequence[int] | None = None,
        bins: int = 8,
        bound: float = 3.0,
        min_scale: float = 1e-4,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(
                f"encoder must be an nn.Module mapping data to features, got {type(encoder)}"
            )
        self.latent_dim = _check_int(latent_dim, "latent_dim", 1)
        if not (isinstance(min_scale, (int, float)) and min_scale >= 0):
            raise ValueError(f"min_scale must be a number >= 0, got {min_scale!r}")
        self.min_scale = float(min_scale)
        if isinstance(data_shape, int):
            data_shape = (data_shape,)
        self.data_shape: tuple[int, ...] | None = None
        if data_shape is not None:
            self.data_shape = tuple(data_shape)
            if any(not isinstance(s, int) or s < 0 for s in self.data_shape):
                raise ValueError(f"data_shape must be a tuple of sizes, got {data_shape!r}")
        if feature_dim is None:
            if self.data_shape is None:
                raise ValueError(
                    "pass data_shape (the shape of one datum) or feature_dim (the width of the "
                    "encoder's output): flowguide needs one to build the heads"
                )
            feature_dim = self._probe_features(encoder)
        self.feature_dim = _check_int(feature_dim, "feature_dim", 1)
        self.encoder = encoder

        # the flow and its context
        self.flow: Flow | None
        if flow is None:
            self.flow, self.context_dim = None, 0  # context_dim, num_flows ... are ignored
        elif isinstance(flow, Flow):
            if flow.dim != latent_dim:
                raise ValueError(f"flow has dim={flow.dim} but latent_dim={latent_dim}")
            if context_dim is not None and context_dim != flow.context_dim:
                raise ValueError(
                    f"the flow reads a context of size context_dim={flow.context_dim} but "
                    f"context_dim={context_dim} was given"
                )
            self.flow, self.context_dim = flow, flow.context_dim
        elif isinstance(flow, str):
            self.context_dim = (
                min(max(2 * latent_dim, 16), 256) if context_dim is None else context_dim
            )
            _check_int(self.context_dim, "context_dim", 1)
            self.flow = build_conditional_flow(
                flow, latent_dim, self.context_dim, num_flows, hidden, bins, bound
            )
        else:
            raise TypeError(
                "flow must be 'planar', 'radial', 'iaf', 'nsf', None or a flowguide Flow, "
                f"got {type(flow).__name__}"
            )
        self.family = flow if isinstance(flow, str) or flow is None else type(flow).__name__

        # the heads
        self.loc_head = nn.Linear(self.feature_dim, latent_dim)
        self.scale_head = nn.Linear(self.feature_dim, latent_dim)
        self.context_head = (
            nn.Linear(self.feature_dim, self.context_dim) if self.context_dim else None
        )
        reference = next((p for p in encoder.parameters() if p.is_floating_point()), None)
        if reference is not None:
            self.to(device=reference.device, dtype=reference.dtype)

    # -- encoding -----------------------------------------------------------------------------
    def _probe_features(self, encoder: nn.Module) -> int:
        assert self.data_shape is not None
        reference = next((p for p in encoder.parameters() if p.is_floating_point()), None)
        dtype = reference.dtype if reference is not None else torch.get_default_dtype()
        device = reference.device if reference is not None else None
        probe = torch.zeros(2, *self.data_shape, dtype=dtype, device=device)
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.no_grad():
                out = encoder(probe)
        except Exception as error:
            raise ValueError(
                f"the encoder failed on a probe batch of shape {tuple(probe.shape)} "
                f"(2 data of data_shape={self.data_shape}): {error}"
            ) from error
        finally:
            encoder.train(was_training)
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 2:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                "the encoder must map data of shape (B, *data_shape) to features of shape "
                f"(B, feature_dim); on input (2, *{self.data_shape}) it returned {shape}"
            )
        return int(out.shape[1])

    def _features(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if self.data_shape is not None:
            k = len(self.data_shape)
            if x.dim() < k + 1 or tuple(x.shape[x.dim() - k :]) != self.data_shape:
                raise ValueError(
                    f"{type(self).__name__} expects data of shape (batch, *{self.data_shape}), "
                    f"got {tuple(x.shape)}"
                )
            batch = tuple(x.shape[: x.dim() - k])
        else:
            if x.dim() < 1:
                raise ValueError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
            batch = tuple(x.shape[:1])
        flat = x.reshape(-1, *x.shape[len(batch) :])
        try:
            features = self.encoder(flat)
        except RuntimeError as error:
            raise ValueError(
                f"the encoder failed on data of shape {tuple(x.shape)}: {error}"
            ) from error
        if (
            not isinstance(features, Tensor)
            or features.dim() != 2
            or features.shape != (flat.shape[0], self.feature_dim)
        ):
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features)
            raise ValueError(
                f"the encoder must return features of shape (B, feature_dim={self.feature_dim}); "
                f"on data of shape {tuple(flat.shape)} it returned {shape}"
            )
        return features, batch

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        r"""The base Normal's :math:`\mu, \sigma` (each of shape ``(*batch, D)``) and the
        context :math:`h` (``(*batch, context_dim)``, or None without a flow) for data ``x``."""
        features, batch = self._features(x)
        loc = self.loc_head(features).reshape(*batch, self.latent_dim)
        scale = F.softplus(self.scale_head(features)) + self.min_scale
        scale = scale.reshape(*batch, self.latent_dim)
        context = None
        if self.context_head is not None:
            context = self.context_head(features).reshape(*batch, self.context_dim)
        return loc, scale, context

    # -- the distribution ---------------------------------------------------------------------
    def _check_params(self, loc: Tensor, scale: Tensor, context: Tensor | None) -> None:
        d = self.latent_dim
        if loc.dim() < 1 or loc.shape[-1] != d or scale.shape != loc.shape:
            raise ValueError(
                f"loc and scale must both have shape (..., latent_dim={d}), got "
                f"{tuple(loc.shape)} and {tuple(scale.shape)}"
            )
        if self.context_dim:
            if context is None:
                raise ValueError(
                    f"this posterior's flow needs a context of shape (..., {self.context_dim})"
                )
            if context.shape[-1:] != (self.context_dim,) or (context.shape[:-1] != loc.shape[:-1]):
                raise ValueError(
                    f"context must have shape {(*loc.shape[:-1], self.context_dim)} "
                    f"(loc's batch, context_dim={self.context_dim}), got {tuple(context.shape)}"
                )
        elif context is not None:
            raise ValueError(
                f"this posterior has no flow context (context_dim=0), got a context of shape "
                f"{tuple(context.shape)}"
            )

    def distribution(
        self, loc: Tensor, scale: Tensor, context: Tensor | None = None
    ) -> dist.TransformedDistribution:
        r"""The posterior for given encoder outputs: :math:`\mathcal{N}(\mu, \sigma^2)` pushed
        through :math:`f_h`; batch shape ``loc.shape[:-1]``, event shape ``(D,)``."""
        self._check_params(loc, scale, context)
        base = dist.Normal(loc, scale).to_event(1)
        transforms = []
        if self.flow is not None:
            transforms.append(self.flow.condition(context) if self.context_dim else self.flow)
        return dist.TransformedDistribution(base, transforms)

    def forward(self, x: Tensor) -> dist.TransformedDistribution:
        """The posterior :math:`q(z \\mid x)` for data ``x`` of shape ``(*batch, *data_shape)``."""
        return self.distribution(*self.encode(x))

    def rsample_and_log_prob(
        self, x: Tensor, num_samples: int | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""Draw :math:`z \sim q(z \mid x)` differentiably with :math:`\log q(z \mid x)`, in one
        fused pass: shapes ``(num_samples, *batch, D)`` and ``(num_samples, *batch)`` (no leading
        dim when ``num_samples`` is None)."""
        z, log_q, _ = self._rsample(self.encode(x), num_samples)
        return z, log_q

    def _rsample(
        self, params: tuple[Tensor, Tensor, Tensor | None], num_samples: int | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        loc, scale, context = params
        shape = loc.shape if num_samples is None else (num_samples, *loc.shape)
        eps = torch.randn(shape, dtype=loc.dtype, device=loc.device)
        z0 = loc + scale * eps
        log_q = (-0.5 * eps * eps - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        z = z0
        if self.flow is not None:
            bound = self.flow.condition(context) if self.context_dim else self.flow
            z, ladj = bound.forward_and_log_abs_det(z0)
            log_q = log_q - ladj
        return z, log_q, z0

    def log_prob_stopped(self, z: Tensor, params: tuple[Tensor, Tensor, Tensor | None]) -> Tensor:
        r""":math:`\log q_{\bar\phi}(z \mid x)` with every parameter :math:`\phi` of the posterior
        (encoder, heads, flow) held fixed: gradients reach ``z`` only. ``params`` are
        :meth:`encode`'s outputs. This is the term of the doubly-reparameterized gradient
        (:func:`dreg_loss`); it inverts the flow."""
        loc, scale, context = (None if t is None else t.detach() for t in params)
        assert loc is not None and scale is not None
        z0, ladj = z, z.new_zeros(())
        if self.flow is not None:
            fixed = {f"flow.{name}": p.detach() for name, p in self.flow.named_parameters()}
            z0, ladj = torch.func.functional_call(_Inverse(self.flow), fixed, (z, context))
        eps = (z0 - loc) / scale
        return (-0.5 * eps * eps - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1) - ladj

    def extra_repr(self) -> str:
        return (
            f"latent_dim={self.latent_dim}, flow={self.family!r}, feature_dim={self.feature_dim}"
            f", context_dim={self.context_dim}, data_shape={self.data_shape}"
        )


class _Inverse(nn.Module):
    """Calls a flow's fused inverse, so that ``torch.func.functional_call`` can swap the flow's
    parameters (named ``flow.<name>``) for detached copies."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.flow._inverse_ladj(y, context if self.flow.context_dim else None)


# -- importance weighting ---------------------------------------------------------------------
def _check_samples(num_samples: Any) -> int:
    return _check_int(num_samples, "num_samples", 1)


def _log_joint(log_joint: LogJoint, x: Tensor, z: Tensor) -> Tensor:
    out = log_joint(x, z)
    if not isinstance(out, Tensor) or out.shape != z.shape[:-1]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"log_joint(x, z) must return log p(x, z) of shape (num_samples, batch) = "
            f"{tuple(z.shape[:-1])} for z of shape {tuple(z.shape)}, got {shape}"
        )
    return out


def iwae_bound(
    log_joint: LogJoint, posterior: AmortizedFlowPosterior, x: Tensor, num_samples: int = 8
) -> Tensor:
    r"""The importance-weighted bound of each datum, differentiable (reparameterized gradients):

    .. math::

        \mathcal{L}_K(x) = \log \frac{1}{K} \sum_{k=1}^{K} w_k, \qquad
        w_k = \frac{p(x, z_k)}{q(z_k \mid x)}, \quad z_k \sim q(\cdot \mid x),

    with :math:`\mathcal{L}_1 = \mathrm{ELBO} \le \mathcal{L}_K \le \mathcal{L}_{K+1} \le \log
    p(x)` in expectation (Burda et al. 2016). Returns shape ``x``'s batch (one datum per row).

    Args:
        log_joint: ``(x, z) -> log p(x, z)``, see :data:`LogJoint`.
        posterior: the amortized posterior.
        x: a batch of data, ``(B, *data_shape)``.
        num_samples: :math:`K`.

    Example:
        >>> posterior = AmortizedFlowPosterior(nn.Identity(), 1, flow=None, feature_dim=1)
        >>> def log_joint(x, z):  # z ~ N(0, 1), x | z ~ N(z, 1)
        ...     prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        ...     return prior + dist.Normal(z, 1.0).log_prob(x).sum(-1)
        >>> iwae_bound(log_joint, posterior, torch.zeros(4, 1), num_samples=16).shape
        torch.Size([4])
    """
    k = _check_samples(num_samples)
    z, log_q = posterior.rsample_and_log_prob(x, k)
    log_w = _log_joint(log_joint, x, z) - log_q
    return torch.logsumexp(log_w, 0) - math.log(k)


def dreg_loss(
    log_joint: LogJoint, posterior: AmortizedFlowPosterior, x: Tensor, num_samples: int = 8
) -> Tensor:
    r"""A surrogate loss whose value is :math:`-\frac{1}{B} \sum_b \mathcal{L}_K(x_b)` (see
    :func:`iwae_bound`) and whose gradient is the doubly-reparameterized (DReG) estimator of
    Tucker et al. 2018 for the posterior's parameters :math:`\phi` and the usual IWAE gradient
    for the model's parameters :math:`\theta`:

    .. math::

        \nabla_\theta: \; \sum_k \tilde w_k \nabla_\theta \log p_\theta(x, z_k), \qquad
        \nabla_\phi: \; \sum_k \tilde w_k^2 \,
            \frac{\partial \log w_k}{\partial z_k} \frac{\partial z_k}{\partial \phi},
        \qquad \tilde w_k = \frac{w_k}{\sum_j w_j},

    where :math:`\partial \log w_k / \partial z_k` holds :math:`\phi` fixed in
    :math:`q_\phi(z_k \mid x)`. Both are unbiased for the gradient of the IWAE bound; the
    :math:`\phi` one drops the score-function term whose variance grows with :math:`K` (the
    signal-to-noise problem of Rainforth et al. 2018). Implementation: one model evaluation with
    :math:`\log q` computed at fixed :math:`\phi` (:meth:`AmortizedFlowPosterior.log_prob_stopped`,
    which inverts the flow), the weights :math:`\tilde w` on the model's gradient, and a hook on
    :math:`z_k` that multiplies its gradient by another :math:`\tilde w_k`.

    Use it in a training loop: ``dreg_loss(log_joint, posterior, x_batch, 8).backward()``. The
    model's parameters are whatever ``log_joint`` closes over (say a decoder's).

    Example:
        >>> posterior = AmortizedFlowPosterior(nn.Identity(), 1, flow="planar", feature_dim=1)
        >>> def log_joint(x, z):
        ...     prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        ...     return prior + dist.Normal(z, 1.0).log_prob(x).sum(-1)
        >>> loss = dreg_loss(log_joint, posterior, torch.zeros(4, 1), num_samples=8)
        >>> loss.backward()
        >>> posterior.loc_head.weight.grad.shape
        torch.Size([1, 1])
    """
    k = _check_samples(num_samples)
    params = posterior.encode(x)
    z, _, _ = posterior._rsample(params, k)
    log_w = _log_joint(log_joint, x, z) - posterior.log_prob_stopped(z, params)
    bound = torch.logsumexp(log_w, 0) - math.log(k)
    weights = torch.softmax(log_w.detach(), 0)
    if z.requires_grad:
        z.register_hook(lambda grad: grad * weights.unsqueeze(-1))
    surrogate = -(weights * log_w).sum(0).mean()
    return surrogate - surrogate.detach() + (-bound.mean()).detach()


@torch.no_grad()
def importance_weighted_log_likelihood(
    model: LogJoint | Callable[..., Any],
    guide: AmortizedFlowPosterior | AutoAmortizedFlow,
    *args: Any,
    num_samples: int = 1000,
    batch_size: int = 8192,
    indices: Tensor | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> Tensor:
    r"""The importance-sampled estimate of :math:`\log p(x_n)` of every datum,

    .. math::

        \log \hat p(x_n) = \log \frac{1}{K} \sum_{k=1}^K
            \frac{p(x_n, z_{nk})}{q(z_{nk} \mid x_n)}, \qquad z_{nk} \sim q(\cdot \mid x_n),

    a stochastic lower bound whose expectation increases to :math:`\log p(x_n)` as :math:`K`
    grows (the IWAE bound); with :math:`K = 1` it is an ELBO estimate. The :math:`K` samples are
    drawn and scored in batches of at most ``batch_size`` (sample, datum) pairs and combined
    with a running log-sum-exp, so memory does not grow with :math:`K`.

    Two forms:

    * ``importance_weighted_log_likelihood(log_joint, posterior, x)``: ``posterior`` an
      :class:`AmortizedFlowPosterior`, ``log_joint(x, z)`` as in :data:`LogJoint`, ``x`` of shape
      ``(N, *data_shape)``; returns shape ``(N,)``.
    * ``importance_weighted_log_likelihood(model, guide, *args, **kwargs)``: a Pyro model and its
      :class:`AutoAmortizedFlow`, with the model's arguments. It scores the data of the guide's
      data plate, all of them or those at ``indices``, by running the model with the plate's
      subsample and the local latents conditioned (and any global latents fixed at one draw of
      their guide: the estimate is then of :math:`\log p(x_n \mid \text{globals})`); only sites
      inside the data plate count, without any ``poutine.scale`` (so a KL warm-up factor does
      not leak in). Returns shape ``(len(indices),)``, by default ``(plate size,)``. The model
      must read its data through the plate's subsample (``x[idx]``), as in the default set-up of
      :class:`AutoAmortizedFlow`; for a model that is handed its minibatch, use the first form
      with ``guide.posterior``.

    Args:
        model: ``log_joint`` or the Pyro model.
        guide: the :class:`AmortizedFlowPosterior` or the :class:`AutoAmortizedFlow`.
        *args, **kwargs: ``x``, or the model's arguments.
        num_samples: :math:`K`.
        batch_size: the most (sample, datum) pairs scored at once.
        indices: the Pyro form only: which data of the plate to score.
        progress: show a progress bar over the data.

    Reference: Burda, Grosse & Salakhutdinov 2016, "Importance Weighted Autoencoders",
    arXiv:1509.00519.

    Example:
        >>> posterior = AmortizedFlowPosterior(nn.Identity(), 1, flow=None, feature_dim=1)
        >>> def log_joint(x, z):
        ...     prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        ...     return prior + dist.Normal(z, 1.0).log_prob(x).sum(-1)
        >>> importance_weighted_log_likelihood(log_joint, posterior, torch.zeros(3, 1)).shape
        torch.Size([3])
    """
    k = _check_samples(num_samples)
    _check_int(batch_size, "batch_size", 1)
    if isinstance(guide, AmortizedFlowPosterior):
        if len(args) != 1 or kwargs or indices is not None:
            raise ValueError(
                "with an AmortizedFlowPosterior pass exactly (log_joint, posterior, x); "
                f"got {len(args)} positional arguments and keywords {sorted(kwargs)}"
                + (" and indices" if indices is not None else "")
            )
        return _iw_tensor(model, guide, args[0], k, batch_size, progress)
    if isinstance(guide, AutoAmortizedFlow):
        return guide._importance_weighted(model, args, kwargs, k, batch_size, indices, progress)
    raise TypeError(
        "guide must be an AmortizedFlowPosterior or an AutoAmortizedFlow, "
        f"got {type(guide).__name__}"
    )


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _bar(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="datum", dynamic_ncols=True, leave=False)


def _iw_tensor(
    log_joint: LogJoint,
    posterior: AmortizedFlowPosterior,
    x: Tensor,
    k: int,
    batch_size: int,
    progress: bool,
) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor of shape (N, *data_shape), got {x!r}")
    n = x.shape[0]
    data_chunk = max(1, batch_size // k)
    sample_chunk = min(k, batch_size)
    out = []
    bar = _bar(n, progress, "log p(x)")
    for a, b in _chunks(n, data_chunk):
        xb = x[a:b]
        params = posterior.encode(xb)
        total = None
        for s, t in _chunks(k, sample_chunk):
            z, log_q, _ = posterior._rsample(params, t - s)
            lse = torch.logsumexp(_log_joint(log_joint, xb, z) - log_q, 0)
            total = lse if total is None else torch.logaddexp(total, lse)
        assert total is not None
        out.append(total - math.log(k))
        if bar is not None:
            bar.update(b - a)
    if bar is not None:
        bar.close()
    return torch.cat(out) if out else x.new_zeros(0)


# -- the autoguide ----------------------------------------------------------------------------
def _index_first_argument(idx: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """The default ``data`` accessor: the model's first positional argument, indexed by the data
    plate's subsample along its first dimension."""
    if not args or not isinstance(args[0], Tensor):
        raise ValueError(
            "AutoAmortizedFlow's default data accessor reads the model's first positional "
            "argument (the full data set, indexed by the plate's subsample); the model was called "
            f"with {len(args)} positional arguments"
            + (f", the first a {type(args[0]).__name__}" if args else "")
            + ". Pass data=lambda idx, *args, **kwargs: <the encoder's input for idx>"
        )
    return args[0][idx.to(args[0].device)]


class _LocalSite:
    __slots__ = ("event_dim", "name", "shape", "size", "transform", "unconstrained_shape")

    def __init__(self, name: str, site: dict[str, Any], shape: tuple[int, ...]) -> None:
        fn = site["fn"]
        self.name = name
        self.event_dim: int = fn.event_dim
        self.shape = shape  # the constrained event shape of one datum
        self.transform = biject_to(fn.support)
        self.unconstrained_shape = tuple(self.transform.inverse_shape(torch.Size(shape)))
        self.size = math.prod(self.unconstrained_shape)


class AutoAmortizedFlow(AutoGuide):
    r"""An autoguide for models whose local latents sit in a (subsampled) data plate: an
    :class:`AmortizedFlowPosterior` for the local sites, a global flow guide for the rest.

    The local latents of one datum (all sites listed in ``local_sites``, each mapped to
    unconstrained space by ``biject_to`` and packed into one vector of size :math:`D`) get the
    amortized posterior :math:`q(z_n \mid x_n)`, whose encoder reads the datum
    ``data(idx, *args, **kwargs)[i]`` of the plate's subsample ``idx``. A single real-vector local
    site (a VAE's ``z``) is sampled from it directly; otherwise an auxiliary site carries the
    packed vector and each local site is a ``Delta`` with the log-Jacobian of its ``biject_to``
    map. Global latent sites (outside the data plate), if any, get ``global_guide`` (default a
    flowguide :class:`~flowguide.guides.AutoIAF`) on the model with the local sites hidden
    (``poutine.block``). Works with ``SVI(model, guide, optim, Trace_ELBO())``, subsampling and
    vectorized particles, and with :func:`importance_weighted_log_likelihood`. With global
    latents :math:`\beta` and local ones :math:`z_n` the guide is

    .. math::

        q(\beta, z_{1:N} \mid x) = q(\beta) \prod_{n=1}^N q(z_n \mid x_n),

    and only the subsample's :math:`z_n` are sampled at each call.

    The data plate: the plate the local sites sit in (all must share it and sit in no other
    plate). By default it is created at every call from the prototype's subsample size and the
    current full size ``len(args[0])``, so the same guide serves a training and a test set; with
    a custom ``data`` accessor the plate keeps the first call's sizes unless ``create_plates``
    makes it (``create_plates(*args, **kwargs) -> pyro.plate``, as in Pyro's autoguides, for a
    model that is handed its minibatch and its indices).

    Args:
        model: the Pyro model.
        encoder: the feature network of :class:`AmortizedFlowPosterior` (data of shape
            ``(B, *data_shape)`` to features ``(B, F)``), or a ready
            :class:`AmortizedFlowPosterior` whose ``latent_dim`` is the packed local dimension.
        local_sites: the names of the local latent sites (default: every latent site in a
            subsampled plate).
        data: ``data(idx, *args, **kwargs) -> Tensor`` of shape ``(len(idx), *data_shape)``, the
            encoder's input for the subsample ``idx`` (default: ``args[0][idx]``).
        flow, num_flows, context_dim, hidden, bins, bound, feature_dim, min_scale: the
            posterior's options, see :class:`AmortizedFlowPosterior`.
        global_guide: ``model -> AutoGuide`` for the global latents (default
            :class:`~flowguide.guides.AutoIAF`).
        create_plates: as in Pyro's autoguides.

    Reference: Kingma & Welling 2014, "Auto-Encoding Variational Bayes", arXiv:1312.6114
    (amortized inference with an encoder).

    Example:
        >>> def model(x):
        ...     with pyro.plate("data", len(x), subsample_size=4) as idx:
        ...         z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        ...         pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1),
        ...                     obs=x[idx])
        >>> guide = AutoAmortizedFlow(model, nn.Sequential(nn.Linear(1, 8), nn.Tanh()))
        >>> guide(torch.randn(10, 1))["z"].shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        model: Callable[..., Any],
        encoder: nn.Module,
        *,
        local_sites: Sequence[str] | None = None,
        data: Callable[..., Tensor] | None = None,
        flow: str | Flow | None = "iaf",
        num_flows: int | None = None,
        context_dim: int | None = None,
        hidden: Sequence[int] | None = None,
        bins: int = 8,
        bound: float = 3.0,
        feature_dim: int | None = None,
        min_scale: float = 1e-4,
        global_guide: Callable[[Callable[..., Any]], AutoGuide] | None = None,
        create_plates: Callable[..., Any] | None = None,
    ) -> None:
        if not isinstance(encoder, nn.Module):
            raise TypeError(
                "encoder must be an nn.Module (data to features) or an AmortizedFlowPosterior, "
                f"got {type(encoder).__name__}"
            )
        if isinstance(local_sites, str):
            local_sites = [local_sites]
        if data is not None and not callable(data):
            raise TypeError(f"data must be a callable (idx, *args, **kwargs) -> Tensor, got {data}")
        super().__init__(model, create_plates=create_plates)
        self._encoder = (encoder,)  # not registered: the posterior owns it once built
        self._requested_sites = None if local_sites is None else list(local_sites)
        self._data = data or _index_first_argument
        self._default_data = data is None
        self._options: dict[str, Any] = dict(
            flow=flow,
            num_flows=num_flows,
            context_dim=context_dim,
            hidden=hidden,
            bins=bins,
            bound=bound,
            feature_dim=feature_dim,
            min_scale=min_scale,
        )
        self._make_global = global_guide or AutoIAF
        self._sites: list[_LocalSite] = []
        self._plate_name = ""
        self._plate_dim = -1
        self._nesting = 1
        self._direct = False
        self.global_guide: AutoGuide | None = None

    # -- properties ---------------------------------------------------------------------------
    @property
    def local_sites(self) -> list[str]:
        """The local sites' names (after set-up)."""
        return [s.name for s in self._sites]

    @property
    def plate_name(self) -> str:
        """The data plate's name (after set-up)."""
        return self._plate_name

    @property
    def latent_dim(self) -> int:
        """The packed unconstrained dimension :math:`D` of one datum's local latents."""
        return sum(s.size for s in self._sites)

    @property
    def _aux_name(self) -> str:
        return f"_{self._pyro_name}_local_latent"

    # -- set-up -------------------------------------------------------------------------------
    def setup(self, *args: Any, **kwargs: Any) -> AutoAmortizedFlow:
        """Set the guide up for the model's arguments (as its first call would), so that its
        parameters exist, say for a torch optimiser or ``load_state_dict``; returns the guide."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return self

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        trace = poutine.block(poutine.trace(self.model).get_trace)(*args, **kwargs)
        self.prototype_trace = trace
        latent = {
            name: site
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        }
        self._nesting = plate_nesting(trace)
        names = self._requested_sites
        if names is None:
            names = [
                name
                for name, site in latent.items()
                if any(_subsampled(f) for f in site["cond_indep_stack"] if f.vectorized)
            ]
            if not names:
                raise ValueError(
                    "AutoAmortizedFlow found no latent site inside a subsampled plate "
                    "(pyro.plate(name, N, subsample_size=B)); name the local sites with "
                    f"local_sites=[...] (latent sites: {sorted(latent)})"
                )
        missing = [n for n in names if n not in latent]
        if missing:
            raise ValueError(
                f"local_sites {missing} are not latent sample sites of the model "
                f"(latent sites: {sorted(latent)})"
            )
        frame = self._data_frame(names, latent)
        self._plate_name, self._plate_dim = frame.name, frame.dim
        self._sites = [self._local_site(n, latent[n], frame) for n in names]
        for s in self._sites:
            if latent[s.name]["fn"].support.is_discrete:
                raise ValueError(
                    f"local site {s.name!r} is discrete; AutoAmortizedFlow covers continuous "
                    "sites (enumerate discrete ones with TraceEnum_ELBO)"
                )
        only = self._sites[0] if len(self._sites) == 1 else None
        self._direct = (
            only is not None and only.event_dim == 1 and _is_real(latent[only.name]["fn"].support)
        )
        # frames of the sites this guide samples itself, and of the global ones
        self._prototype_frames = {}
        for site in latent.values():
            for f in site["cond_indep_stack"]:
                if not f.vectorized:
                    raise NotImplementedError(
                        "AutoAmortizedFlow does not support sequential plates"
                    )
                self._prototype_frames[f.name] = f

        # the encoder's input for the prototype subsample
        idx = trace.nodes[frame.name]["value"] if frame.name in trace.nodes else None
        if idx is None:
            idx = torch.arange(frame.size)
        if self._default_data and self.create_plates is None:
            n = args[0].shape[0] if args and isinstance(args[0], Tensor) else None
            if n is not None and n != (frame.full_size or frame.size):
                raise ValueError(
                    f"the data plate {frame.name!r} has full size {frame.full_size or frame.size} "
                    f"but the model's first argument (read by the default data accessor) has "
                    f"{n} rows, shape {tuple(args[0].shape)}; pass "
                    "data=lambda idx, *args, **kwargs: ... (and create_plates=...)"
                )
        x = self._data_batch(idx, *args, **kwargs)

        encoder = self._encoder[0]
        if isinstance(encoder, AmortizedFlowPosterior):
            if encoder.latent_dim != self.latent_dim:
                raise ValueError(
                    f"the posterior has latent_dim={encoder.latent_dim} but the local sites "
                    f"{self.local_sites} pack into {self.latent_dim} unconstrained dimensions"
                )
            posterior = encoder
        else:
            posterior = AmortizedFlowPosterior(
                encoder, self.latent_dim, data_shape=tuple(x.shape[1:]), **self._options
            )
        self.posterior = posterior
        with torch.no_grad():
            posterior.encode(x)  # fail now, on a clear error, rather than inside SVI

        global_names = [n for n in latent if n not in names]
        if global_names:
            blocked = poutine.block(self.model, hide=list(names))
            self.global_guide = self._make_global(blocked)
            setup = getattr(self.global_guide, "_setup_prototype", None)
            if setup is not None:
                poutine.block(setup)(*args, **kwargs)

    def _data_frame(self, names: list[str], latent: dict[str, dict[str, Any]]) -> Any:
        frames = {}
        for n in names:
            stack = [f for f in latent[n]["cond_indep_stack"] if f.vectorized]
            if len(stack) != 1:
                where = (
                    "is not inside any pyro.plate"
                    if not stack
                    else f"sits in {len(stack)} plates {[f.name for f in stack]}"
                )
                raise ValueError(
                    f"local site {n!r} {where}; AutoAmortizedFlow needs each local site inside "
                    "exactly one plate, the data plate (e.g. pyro.plate('data', N, "
                    "subsample_size=B)); fold other batch dimensions into the event with "
                    ".to_event()"
                )
            frames[n] = stack[0]
        if len({f.name for f in frames.values()}) > 1:
            raise ValueError(
                "the local sites must share one data plate, got "
                + ", ".join(f"{n!r} in {f.name!r}" for n, f in frames.items())
            )
        return next(iter(frames.values()))

    def _local_site(self, name: str, site: dict[str, Any], frame: Any) -> _LocalSite:
        value, event_dim = site["value"], site["fn"].event_dim
        batch = tuple(value.shape[: value.dim() - event_dim])
        pos = len(batch) + frame.dim
        rest = [s for i, s in enumerate(batch) if i != pos]
        if pos < 0 or batch[pos] != frame.size or any(s != 1 for s in rest):
            raise ValueError(
                f"local site {name!r} has batch shape {batch} in plate {frame.name!r} of "
                f"subsample size {frame.size} at dim {frame.dim}: expected the subsample at dim "
                f"{frame.dim} and size 1 elsewhere; declare per-datum dimensions as event "
                "dimensions with .to_event()"
            )
        return _LocalSite(name, site, tuple(value.shape[value.dim() - event_dim :]))

    def _check_prototype(self, part_trace: poutine.Trace) -> None:
        assert self.prototype_trace is not None
        for name, site in part_trace.iter_stochastic_nodes():
            mine = self.prototype_trace.nodes.get(name)
            if mine is None or mine["value"].shape != site["value"].shape:
                raise ValueError(f"the global guide's site {name!r} does not match the model")

    def _create_plates(self, *args: Any, **kwargs: Any) -> dict[str, pyro.plate]:
        plates: dict[str, pyro.plate] = {}
        if self.create_plates is not None:
            made = self.create_plates(*args, **kwargs)
            made = [made] if isinstance(made, pyro.plate) else list(made)
            for p in made:
                if not isinstance(p, pyro.plate):
                    raise TypeError(f"create_plates must return pyro.plate objects, got {p!r}")
                plates[p.name] = p
        for name, frame in sorted(self._prototype_frames.items()):
            if name in plates:
                continue
            full = frame.full_size or frame.size
            size = frame.size
            if name == self._plate_name and self._default_data and args:
                n = int(args[0].shape[0]) if isinstance(args[0], Tensor) else full
                size = n if size == full else min(size, n)
                full = n
            plates[name] = pyro.plate(name, full, subsample_size=size, dim=frame.dim)
        self.plates = plates
        return plates

    def _data_batch(self, idx: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        x = self._data(idx, *args, **kwargs)
        if not isinstance(x, Tensor):
            raise TypeError(f"data(idx, *args, **kwargs) must return a tensor, got {type(x)}")
        n = int(idx.shape[0]) if isinstance(idx, Tensor) else len(idx)
        if x.dim() < 1 or x.shape[0] != n:
            raise ValueError(
                f"the data plate {self._plate_name!r} selects a subsample of {n} data (indices of "
                f"shape {tuple(idx.shape)}) but data(...) returned a batch of shape "
                f"{tuple(x.shape)}: its first dimension must index that subsample"
            )
        return x

    # -- the guide ----------------------------------------------------------------------------
    def _to_plate(self, t: Tensor | None) -> Tensor | None:
        """Move a per-datum tensor's batch dim to the data plate's dim: ``(B, k)`` to
        ``(B, 1, ..., 1, k)``."""
        if t is None or self._plate_dim == -1:
            return t
        return t.reshape(t.shape[0], *(1,) * (-self._plate_dim - 1), t.shape[-1])

    def _unpack(self, u: Tensor) -> Iterator[tuple[_LocalSite, Tensor, Tensor]]:
        """Split packed unconstrained draws ``(..., D)`` into each site's constrained value
        ``(..., *shape)`` and the log-Jacobian of its ``biject_to`` map ``(...)``."""
        start = 0
        batch = u.shape[:-1]
        for s in self._sites:
            piece = u[..., start : start + s.size].reshape(*batch, *s.unconstrained_shape)
            start += s.size
            value = s.transform(piece)
            ladj = s.transform.log_abs_det_jacobian(piece, value)
            if ladj.dim() > len(batch):
                ladj = ladj.reshape(*ladj.shape[: len(batch)], -1).sum(-1)
            yield s, value, ladj.expand(batch)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result: dict[str, Tensor] = {}
        if self.global_guide is not None:
            result.update(self.global_guide(*args, **kwargs))
        with plates[self._plate_name] as idx:
            x = self._data_batch(idx, *args, **kwargs)
            posterior: AmortizedFlowPosterior = self.posterior  # registers its parameters
            loc, scale, context = posterior.encode(x)
            q = posterior.distribution(
                self._to_plate(loc), self._to_plate(scale), self._to_plate(context)
            )
            if self._direct:
                name = self._sites[0].name
                result[name] = pyro.sample(name, q)
            else:
                u = pyro.sample(self._aux_name, q, infer={"is_auxiliary": True})
                for s, value, ladj in self._unpack(u):
                    result[s.name] = pyro.sample(
                        s.name, dist.Delta(value, log_density=-ladj, event_dim=s.event_dim)
                    )
        return result

    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        raise NotImplementedError(
            "an amortized posterior has one median per datum: use guide.posterior(x) instead"
        )

    # -- importance weighting (see importance_weighted_log_likelihood) --------------------------
    def _importance_weighted(
        self,
        model: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        k: int,
        batch_size: int,
        indices: Tensor | None,
        progress: bool,
    ) -> Tensor:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        frame = self._prototype_frames[self._plate_name]
        full, size = frame.full_size or frame.size, frame.size
        if self._default_data and args and isinstance(args[0], Tensor):
            n = int(args[0].shape[0])
            size, full = (n if size == full else min(size, n)), n
        subsampled = size < full
        if indices is None:
            indices = torch.arange(full)
        indices = torch.as_tensor(indices).reshape(-1)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= full):
            raise ValueError(f"indices must lie in [0, {full}) (the data plate's size)")
        # the model's plate draws exactly `size` indices when subsampled: score chunks of that
        # size, padding the last one; otherwise any chunk size
        chunk = size if subsampled else max(1, min(full, batch_size // k))
        samples = max(1, min(k, batch_size // chunk))
        globals_ = self._global_draw(args, kwargs)
        nesting = self._nesting
        out = []
        bar = _bar(indices.numel(), progress, "log p(x)")
        for a, b in _chunks(indices.numel(), chunk):
            idx = indices[a:b]
            m = idx.numel()
            if subsampled and m < chunk:
                idx = torch.cat([idx, idx[-1:].expand(chunk - m)])
            x = self._data_batch(idx, *args, **kwargs)
            params = self.posterior.encode(x)
            total = None
            for s, t in _chunks(k, samples):
                u, log_q, _ = self.posterior._rsample(params, t - s)
                u = self._to_plate_samples(u, nesting)
                log_q = log_q.reshape(u.shape[:-1])
                values = dict(globals_)
                values[self._plate_name] = idx
                for site, value, ladj in self._unpack(u):
                    values[site.name] = value
                    log_q = log_q - ladj
                with pyro.plate("_flowguide_iw_particles", t - s, dim=-nesting - 1):
                    tr = poutine.trace(poutine.condition(model, data=values)).get_trace(
                        *args, **kwargs
                    )
                log_p = self._per_datum_log_prob(tr, nesting, t - s, idx.numel())
                log_w = log_p - log_q.reshape(t - s, -1)  # (K, 1.., B, 1..) to (K, B)
                lse = torch.logsumexp(log_w, 0)
                total = lse if total is None else torch.logaddexp(total, lse)
            assert total is not None
            out.append((total - math.log(k))[:m])
            if bar is not None:
                bar.update(m)
        if bar is not None:
            bar.close()
        return torch.cat(out) if out else torch.zeros(0)

    def _global_draw(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Tensor]:
        if self.global_guide is None:
            return {}
        tr = poutine.block(poutine.trace(self).get_trace)(*args, **kwargs)
        local = set(self.local_sites) | {self._aux_name}
        return {
            name: site["value"]
            for name, site in tr.nodes.items()
            if site["type"] == "sample"
            and not site_is_subsample(site)
            and name not in local
            and not site["infer"].get("is_auxiliary")
        }

    def _to_plate_samples(self, u: Tensor, nesting: int) -> Tensor:
        """``(K, B, D)`` to ``(K, 1, ..., B, 1, ..., D)``: K at the particle dim ``-nesting - 1``
        and B at the data plate's dim."""
        k, b, d = u.shape
        pos = -self._plate_dim  # 1 for dim -1
        return u.reshape(k, *(1,) * (nesting - pos), b, *(1,) * (pos - 1), d)

    def _per_datum_log_prob(self, trace: poutine.Trace, nesting: int, k: int, b: int) -> Tensor:
        """Sum the log-densities of the sites in the data plate over everything but the particle
        dim and the data plate's dim: shape ``(K, B)``."""
        total: Tensor | None = None
        data_pos = nesting + 1 + self._plate_dim
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if site["name"] == self._plate_name:
                continue
            if not any(f.name == self._plate_name for f in site["cond_indep_stack"]):
                continue
            lp = site["fn"].log_prob(site["value"])
            if site["mask"] is not None:
                lp = torch.where(torch.as_tensor(site["mask"]), lp, lp.new_zeros(()))
            lp = lp.reshape(*(1,) * (nesting + 1 - lp.dim()), *lp.shape)
            keep = {0, data_pos}
            other = [i for i in range(lp.dim()) if i not in keep]
            if other:
                lp = lp.sum(other, keepdim=True)
            lp = lp.reshape(lp.shape[0], lp.shape[data_pos]).expand(k, b)
            total = lp if total is None else total + lp
        if total is None:
            raise ValueError(f"no sample site in the data plate {self._plate_name!r}")
        return total


def _subsampled(frame: Any) -> bool:
    return frame.full_size is not None and frame.size != frame.full_size


def _is_real(support: constraints.Constraint) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real
