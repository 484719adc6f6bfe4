"""flowguide: normalizing-flow posteriors for Pyro."""

from . import diagnostics, distributed, nn, transforms
from .amortized import AmortizedFlowPosterior, AutoAmortizedFlow
from .guides import AutoFlow, AutoIAF, AutoNeuralSpline, AutoPlanar, AutoRadial
from .neutra import ManyChainHMC, NeuTraMCMC, NeuTraPotential
from .train import FitResult, MapInit, NoModeError, fit, map_init
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
    "AmortizedFlowPosterior",
    "AutoAmortizedFlow",
    "AutoFlow",
    "AutoIAF",
    "AutoNeuralSpline",
    "AutoPlanar",
    "AutoRadial",
    "Compose",
    "ElementwiseAffine",
    "FitResult",
    "ManyChainHMC",
    "MapInit",
    "NeuTraMCMC",
    "NeuTraPotential",
    "NoModeError",
    "Permute",
    "Planar",
    "Radial",
    "SplineAutoregressive",
    "SplineCoupling",
    "__version__",
    "diagnostics",
    "distributed",
    "fit",
    "map_init",
    "nn",
    "transforms",
]
