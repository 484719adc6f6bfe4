r"""Normalizing-flow transforms for Pyro.

Direction: every flow's forward map :math:`y = f(x)` takes base noise :math:`x` to the target
(latent) space. That is the sampling direction, the one Pyro's ``AutoContinuous.get_transform``
and NeuTra use; a density is evaluated through the inverse.

Every flow is a torch ``Transform`` on vectors (``event_dim = 1``) and an ``nn.Module``, so it
composes with ``pyro.distributions.TransformedDistribution`` and registers its parameters with
``pyro.module``. Every flow starts as the identity. A flow built with ``context_dim = c > 0`` is
conditional: ``flow.condition(context)`` returns the transform for a context.

Families: :class:`Planar`, :class:`Radial`, :class:`AffineAutoregressive` (IAF),
:class:`SplineAutoregressive` and :class:`SplineCoupling` (neural spline flows); glue:
:class:`Compose`, :class:`Permute`, :class:`ElementwiseAffine`.
"""

from .autoregressive import AffineAutoregressive, SplineAutoregressive
from .base import BoundFlow, Compose, ElementwiseAffine, Flow, Permute
from .coupling import SplineCoupling
from .planar import Planar
from .radial import Radial
from .spline import rational_quadratic_spline, spline_params

__all__ = [
    "AffineAutoregressive",
    "BoundFlow",
    "Compose",
    "ElementwiseAffine",
    "Flow",
    "Permute",
    "Planar",
    "Radial",
    "SplineAutoregressive",
    "SplineCoupling",
    "rational_quadratic_spline",
    "spline_params",
]
