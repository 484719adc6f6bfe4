"""flowguide: normalizing-flow posteriors for Pyro."""

from . import diagnostics, nn, transforms
from .guides import AutoFlow, AutoIAF, AutoNeuralSpline, AutoPlanar, AutoRadial
from .train import FitResult, fit
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
    "AutoFlow",
    "AutoIAF",
    "AutoNeuralSpline",
    "AutoPlanar",
    "AutoRadial",
    "Compose",
    "ElementwiseAffine",
    "FitResult",
    "Permute",
    "Planar",
    "Radial",
    "SplineAutoregressive",
    "SplineCoupling",
    "__version__",
    "diagnostics",
    "fit",
    "nn",
    "transforms",
]
