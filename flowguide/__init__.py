"""flowguide: normalizing-flow posteriors for Pyro."""

from . import nn, transforms
from .transforms import (
    AffineAutoregressive,
    Compose,
    ElementwiseAffine,
    Permute,
    Planar,
    Radial,
    SplineAutoregressive,
    SplineCoupling,
)

__version__ = "0.1.0"

__all__ = [
    "AffineAutoregressive",
    "Compose",
    "ElementwiseAffine",
    "Permute",
    "Planar",
    "Radial",
    "SplineAutoregressive",
    "SplineCoupling",
    "__version__",
    "nn",
    "transforms",
]
