r"""The ``flowguide`` command line: ``flowguide demo`` (also ``python -m flowguide demo``).

The demo shows what flowguide is for on built-in targets, with no data to fetch. It fits every
flow guide (:class:`~flowguide.guides.AutoPlanar`, :class:`~flowguide.guides.AutoRadial`,
:class:`~flowguide.guides.AutoIAF`, :class:`~flowguide.guides.AutoNeuralSpline`) and Pyro's
mean-field ``AutoNormal`` for contrast to five two-dimensional posteriors:

* the four energy functions of Rezende & Mohamed (2015, Table 1), :math:`p(z) \propto e^{-U(z)}`,
  written as Pyro models (a flat latent ``z`` and ``pyro.factor("U", -U(z))``), with

  .. math::

      w_1(z) = \sin(2 \pi z_1 / 4), \quad
      w_2(z) = 3 e^{-\frac{1}{2} ((z_1 - 1) / 0.6)^2}, \quad
      w_3(z) = 3 \sigma((z_1 - 1) / 0.3),

  :math:`\sigma` the logistic function, and

  .. math::

      U_1(z) &= \tfrac{1}{2} \big((\lVert z \rVert - 2) / 0.4\big)^2
          - \log\big(e^{-\frac{1}{2} ((z_1 - 2) / 0.6)^2}
                     + e^{-\frac{1}{2} ((z_1 + 2) / 0.6)^2}\big), \\
      U_2(z) &= \tfrac{1}{2} \big((z_2 - w_1(z)) / 0.4\big)^2, \\
      U_3(z) &= -\log\big(e^{-\frac{1}{2} ((z_2 - w_1(z)) / 0.35)^2}
                     + e^{-\frac{1}{2} ((z_2 - w_1(z) + w_2(z)) / 0.35)^2}\big), \\
      U_4(z) &= -\log\big(e^{-\frac{1}{2} ((z_2 - w_1(z)) / 0.4)^2}
                     + e^{-\frac{1}{2} ((z_2 - w_1(z) + w_3(z)) / 0.35)^2}\big).

  :math:`U_2, U_3, U_4` do not confine :math:`z_1` (:math:`e^{-U}` does not decay as
  :math:`|z_1|` grows), so their densities cannot be normalised; the paper draws them on
  :math:`[-4, 4]^2` only. The demo adds a soft wall :math:`(z_1 / 4)^8` to them: the density is
  nearly unchanged on :math:`|z_1| \le 3` and falls by :math:`e^{-1}` at :math:`|z_1| = 4` and
  :math:`e^{-6}` at 5. Their true moments and normalising constants come from numerical
  integration on a fine grid (:func:`grid_moments`);
* Neal's funnel, :math:`y \sim \mathcal{N}(0, 3^2)`, :math:`x \mid y \sim \mathcal{N}(0, e^{y})`
  (standard deviation :math:`e^{y/2}`), whose moments are known: means 0,
  :math:`\operatorname{sd}(y) = 3`, :math:`\operatorname{sd}(x) = e^{9/4}`.

Every guide starts at the model's median with unit scale (the targets' scale) and takes the same
number of steps. The demo prints a table (per target and guide: the negative ELBO, the KL
divergence :math:`\mathrm{KL}(q \,\|\, p) = -\mathrm{ELBO} + \log Z`, the largest error of a
mean in true standard deviations, the largest relative error of a standard deviation, and the
time) and writes figures to the output folder: each fitted guide's density beside the true one
(``densities.png``) and the training curves (``losses.png``), with the table as ``table.txt``
and everything as ``results.json``. The fits run in ``--jobs`` worker processes; each fit's seed
depends only on ``--seed``, its target and its guide, so the table does not depend on the
number of workers.

NeuTra vs NUTS: when :mod:`flowguide.neutra` provides ``NeuTraMCMC``, the demo also runs NUTS in
the base space of the ``AutoIAF`` fit to the funnel (the NeuTra paper's flow) against plain NUTS
on the funnel, with the same warm-up and draws, adds their effective sample size per gradient
evaluation and their divergences to the table, and draws both samplers' draws
(``neutra_funnel.png``). Without it, the section is skipped with a one-line note.

References:
    D. J. Rezende, S. Mohamed (2015), "Variational Inference with Normalizing Flows", ICML,
    arXiv:1505.05770.

    R. M. Neal (2003), "Slice sampling", Annals of Statistics 31(3) (the funnel).

    M. Hoffman et al. (2019), "NeuTra-lizing Bad Geometry in Hamiltonian Monte Carlo Using Neural
    Transport", arXiv:1903.03704.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import multiprocessing
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoGuide, AutoNormal, init_to_median
from torch import Tensor

from . import __version__
from .guides import AutoFlow, AutoIAF, AutoNeuralSpline, AutoPlanar, AutoRadial, robust_init
from .train import fit, flow_elbo_loss

# the command line is ``main``; the other names are used from outside this module (the tests)
__all__ = [
    "GUIDES",
    "DemoConfig",
    "Row",
    "format_table",
    "grid_moments",
    "main",
    "make_parser",
    "make_targets",
    "run_demo",
    "u1",
    "u2",
    "u3",
    "u4",
]

# ------------------------------------------------------------------------------------------------
# The energy functions of Rezende & Mohamed (2015), Table 1
# ------------------------------------------------------------------------------------------------


def w1(z: Tensor) -> Tensor:
    r""":math:`w_1(z) = \sin(2 \pi z_1 / 4)` for points ``z`` of shape ``(..., 2)``."""
    return torch.sin(2 * math.pi * z[..., 0] / 4)


def w2(z: Tensor) -> Tensor:
    r""":math:`w_2(z) = 3 \exp(-\frac{1}{2} ((z_1 - 1) / 0.6)^2)`."""
    return 3 * torch.exp(-0.5 * ((z[..., 0] - 1) / 0.6) ** 2)


def w3(z: Tensor) -> Tensor:
    r""":math:`w_3(z) = 3 \sigma((z_1 - 1) / 0.3)`, :math:`\sigma` the logistic function."""
    return 3 * torch.sigmoid((z[..., 0] - 1) / 0.3)


def _log_two_bumps(a: Tensor, b: Tensor) -> Tensor:
    """:math:`\\log(e^{-a^2/2} + e^{-b^2/2})`, computed stably."""
    return torch.logaddexp(-0.5 * a**2, -0.5 * b**2)


def u1(z: Tensor) -> Tensor:
    r"""The energy :math:`U_1` (a ring with two modes) at points ``z`` of shape ``(..., 2)``.

    .. math::

        U_1(z) = \tfrac{1}{2} \big((\lVert z \rVert - 2) / 0.4\big)^2
            - \log\big(e^{-\frac{1}{2} ((z_1 - 2) / 0.6)^2}
                       + e^{-\frac{1}{2} ((z_1 + 2) / 0.6)^2}\big)

    The density :math:`e^{-U_1}` is a ring of radius 2 with its mass gathered at
    :math:`z_1 = \pm 2`.

    Reference: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
    arXiv:1505.05770, Table 1.

    Example:
        >>> round(u1(torch.tensor([0.0, 2.0])).item(), 3)  # on the ring, between the modes
        4.862
    """
    r = torch.linalg.vector_norm(z, dim=-1)
    return 0.5 * ((r - 2) / 0.4) ** 2 - _log_two_bumps((z[..., 0] - 2) / 0.6, (z[..., 0] + 2) / 0.6)


def u2(z: Tensor) -> Tensor:
    r"""The energy :math:`U_2` (a sine wave) at points ``z`` of shape ``(..., 2)``, without the
    demo's soft wall (see :func:`make_targets`).

    .. math::

        U_2(z) = \tfrac{1}{2} \big((z_2 - w_1(z)) / 0.4\big)^2, \qquad
        w_1(z) = \sin(2 \pi z_1 / 4).

    Reference: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
    arXiv:1505.05770, Table 1.

    Example:
        >>> z = torch.tensor([[1.0, 1.0], [0.0, 0.4], [-1.0, 0.0]])  # z2 = w1(z) at the first
        >>> u2(z).tolist()
        [0.0, 0.5, 3.125]
    """
    return 0.5 * ((z[..., 1] - w1(z)) / 0.4) ** 2


def u3(z: Tensor) -> Tensor:
    r"""The energy :math:`U_3` (a sine wave splitting in two around :math:`z_1 = 1`) at points
    ``z`` of shape ``(..., 2)``, without the demo's soft wall.

    .. math::

        U_3(z) = -\log\big(e^{-\frac{1}{2} ((z_2 - w_1(z)) / 0.35)^2}
            + e^{-\frac{1}{2} ((z_2 - w_1(z) + w_2(z)) / 0.35)^2}\big),

    :math:`w_1(z) = \sin(2 \pi z_1 / 4)`, :math:`w_2(z) = 3 e^{-\frac{1}{2} ((z_1 - 1) / 0.6)^2}`:
    two branches, :math:`z_2 = w_1(z)` and :math:`z_2 = w_1(z) - w_2(z)`, that part furthest at
    :math:`z_1 = 1`.

    Reference: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
    arXiv:1505.05770, Table 1.

    Example:
        >>> z = torch.tensor([[1.0, 1.0], [1.0, -2.0], [1.0, -0.5]])  # both branches, between
        >>> [round(u, 3) + 0.0 for u in u3(z).tolist()]  # + 0.0: -0.0 shows as 0.0
        [0.0, 0.0, 8.491]
    """
    return -_log_two_bumps((z[..., 1] - w1(z)) / 0.35, (z[..., 1] - w1(z) + w2(z)) / 0.35)


def u4(z: Tensor) -> Tensor:
    r"""The energy :math:`U_4` (two sine waves, one shifted by a step at :math:`z_1 = 1`) at
    points ``z`` of shape ``(..., 2)``, without the demo's soft wall.

    .. math::

        U_4(z) = -\log\big(e^{-\frac{1}{2} ((z_2 - w_1(z)) / 0.4)^2}
            + e^{-\frac{1}{2} ((z_2 - w_1(z) + w_3(z)) / 0.35)^2}\big),

    :math:`w_1(z) = \sin(2 \pi z_1 / 4)`, :math:`w_3(z) = 3 \sigma((z_1 - 1) / 0.3)`,
    :math:`\sigma` the logistic function: the second wave sits :math:`w_3 \approx 3` below the
    first for :math:`z_1 \gg 1` and merges with it for :math:`z_1 \ll 1`.

    Reference: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
    arXiv:1505.05770, Table 1.

    Example:
        >>> # where the waves merge (-log 2); on the upper and the lower wave; off both
        >>> z = torch.tensor([[-1.0, -1.0], [3.0, -1.0], [3.0, -4.0], [3.0, 2.0]])
        >>> [round(u, 1) + 0.0 for u in u4(z).tolist()]  # + 0.0: -0.0 shows as 0.0
        [-0.7, 0.0, 0.0, 28.1]
    """
    a = (z[..., 1] - w1(z)) / 0.4
    b = (z[..., 1] - w1(z) + w3(z)) / 0.35
    return -_log_two_bumps(a, b)


def soft_wall(z: Tensor) -> Tensor:
    r"""The demo's confinement of :math:`z_1` for :math:`U_2, U_3, U_4`: :math:`(z_1 / 4)^8`."""
    return (z[..., 0] / 4) ** 8


# ------------------------------------------------------------------------------------------------
# Targets
# ------------------------------------------------------------------------------------------------


@dataclass
class Moments:
    """A two-dimensional distribution's mean and standard deviation (in plot coordinates) and
    the log of its normalising constant."""

    mean: tuple[float, float]
    sd: tuple[float, float]
    log_z: float = 0.0


@dataclass
class Target:
    """A two-dimensional demo posterior.

    Attributes:
        name: a short name (``"U1"``, ..., ``"funnel"``).
        title: a one-line description.
        model: the Pyro model (no arguments).
        log_density: the unnormalised log density at points of shape ``(..., 2)`` in plot
            coordinates.
        coords: the site and element index of plot coordinates 0 and 1 (index ``None`` for a
            scalar site).
        extent: the plot box ``(x_min, x_max, y_min, y_max)``.
        known: the true moments where they are known; otherwise :attr:`truth` integrates
            ``log_density`` numerically over ``box``.
        box: the integration box of :func:`grid_moments`.
        check_dims: the coordinates whose means and standard deviations are checked.
        log_scale: draw densities on a log scale (the funnel's neck is too sharp otherwise).
    """

    name: str
    title: str
    model: Callable[[], None]
    log_density: Callable[[Tensor], Tensor]
    coords: tuple[tuple[str, int | None], tuple[str, int | None]]
    extent: tuple[float, float, float, float]
    known: Moments | None = None
    box: tuple[float, float, float, float] = (-6.0, 6.0, -6.0, 6.0)
    check_dims: tuple[int, ...] = (0, 1)
    log_scale: bool = False

    @functools.cached_property
    def truth(self) -> Moments:
        """The true moments and :math:`\\log Z` (integrated on a grid the first time)."""
        return self.known if self.known is not None else grid_moments(self.log_density, self.box)

    def points(self, samples: dict[str, Tensor]) -> Tensor:
        """Plot coordinates, shape ``(N, 2)``, of draws keyed by site name."""
        cols = [samples[s] if i is None else samples[s][..., i] for s, i in self.coords]
        return torch.stack([c.reshape(-1) for c in cols], -1)

    def pack(self, points: Tensor, sites: Sequence[str]) -> Tensor:
        """Points in plot coordinates as a guide's packed latent vectors: the sites in the order
        of ``sites``, each site's elements in order."""
        cols = []
        for name in sites:
            mine = sorted((i or 0, k) for k, (s, i) in enumerate(self.coords) if s == name)
            cols.extend(points[..., k] for _, k in mine)
        return torch.stack(cols, -1)


def grid_moments(
    log_density: Callable[[Tensor], Tensor],
    box: tuple[float, float, float, float] = (-6.0, 6.0, -6.0, 6.0),
    n: int = 1201,
) -> Moments:
    r"""Mean, standard deviation and :math:`\log Z` of the density :math:`e^{f}`,
    ``f = log_density``, by the midpoint rule on an ``n`` by ``n`` grid over ``box``, in double
    precision.

    With cell sides :math:`h_x, h_y` and cell centres :math:`c_{jk}`,

    .. math::

        Z \approx h_x h_y \sum_{j,k} e^{f(c_{jk})}, \qquad
        \mathbb{E}[g] \approx \sum_{j,k} g(c_{jk}) \, e^{f(c_{jk})} \Big/
            \sum_{j,k} e^{f(c_{jk})},

    the weights taken relative to the largest :math:`f` so that nothing overflows. For a smooth
    density with negligible mass outside ``box`` the error is :math:`O(h^2)`.

    Reference: Press et al. 2007, "Numerical Recipes: The Art of Scientific Computing", 3rd ed.,
    Cambridge University Press, chapter 4 (the extended midpoint rule).

    Example:
        >>> m = grid_moments(lambda z: -0.5 * ((z - 1.0) ** 2).sum(-1), n=601)
        >>> [round(v, 3) for v in (*m.mean, *m.sd)], abs(m.log_z - math.log(2 * math.pi)) < 1e-5
        ([1.0, 1.0, 1.0, 1.0], True)
    """
    x0, x1, y0, y1 = box
    hx, hy = (x1 - x0) / n, (y1 - y0) / n
    xs = torch.linspace(x0 + hx / 2, x1 - hx / 2, n, dtype=torch.float64, device="cpu")
    ys = torch.linspace(y0 + hy / 2, y1 - hy / 2, n, dtype=torch.float64, device="cpu")
    pts = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), -1)
    logp = log_density(pts).to(torch.float64)
    top = logp.max()
    w = torch.exp(logp - top)
    total = w.sum()
    log_z = float(top + total.log() + math.log(hx * hy))
    w = (w / total)[..., None]
    mean = (w * pts).sum((0, 1))
    sd = (w * (pts - mean) ** 2).sum((0, 1)).sqrt()
    return Moments((float(mean[0]), float(mean[1])), (float(sd[0]), float(sd[1])), log_z)


def _energy_target(name: str, title: str, energy: Callable[[Tensor], Tensor]) -> Target:
    def model() -> None:
        z = pyro.sample("z", dist.ImproperUniform(constraints.real, (), (2,)))
        pyro.factor("U", -energy(z))

    def log_density(z: Tensor) -> Tensor:
        return -energy(z)

    return Target(
        name=name,
        title=title,
        model=model,
        log_density=log_density,
        coords=(("z", 0), ("z", 1)),
        extent=(-4.5, 4.5, -4.5, 4.5),
    )


def funnel_target() -> Target:
    r"""Neal's funnel: :math:`y \sim \mathcal{N}(0, 3^2)`, :math:`x \sim \mathcal{N}(0, e^{y})`,
    in plot coordinates ``(x, y)``.

    Only :math:`y`'s moments are checked: those of :math:`x` (:math:`\operatorname{sd}(x) =
    e^{9/4}`) come from rare draws at large :math:`y` (its kurtosis is about :math:`3 e^{9}`),
    so even exact samples cannot estimate them."""

    def model() -> None:
        y = pyro.sample("y", dist.Normal(0.0, 3.0))
        pyro.sample("x", dist.Normal(0.0, torch.exp(y / 2)))

    def log_density(p: Tensor) -> Tensor:
        x, y = p[..., 0], p[..., 1]
        return dist.Normal(0.0, 3.0).log_prob(y) + dist.Normal(0.0, torch.exp(y / 2)).log_prob(x)

    return Target(
        name="funnel",
        title="Neal's funnel: y ~ N(0, 3), x ~ N(0, exp(y/2))",
        model=model,
        log_density=log_density,
        coords=(("x", None), ("y", None)),
        extent=(-15.0, 15.0, -8.0, 8.0),
        known=Moments((0.0, 0.0), (math.exp(9 / 4), 3.0), 0.0),
        check_dims=(1,),
        log_scale=True,
    )


def make_targets() -> dict[str, Target]:
    r"""The demo's targets by name: ``U1`` to ``U4`` (Rezende & Mohamed 2015; ``U2`` to ``U4``
    with the :func:`soft_wall`) and ``funnel``.

    The energy targets are :math:`p(z) \propto e^{-U(z)}` written as a Pyro model (a flat latent
    ``z`` and ``pyro.factor("U", -U(z))``), with the soft wall :math:`(z_1 / 4)^8` added to
    :math:`U_2, U_3, U_4`, which do not confine :math:`z_1` on their own. The funnel is
    :math:`y \sim \mathcal{N}(0, 3^2)`, :math:`x \mid y \sim \mathcal{N}(0, e^{y})`. Each
    value is a ``Target``: its model, its log density in plot coordinates, and its true
    moments as ``truth`` (known for the funnel, integrated by :func:`grid_moments` otherwise).

    Reference: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
    arXiv:1505.05770, Table 1 (U1 to U4); Neal 2003, "Slice sampling", Annals of Statistics 31(3)
    (the funnel).

    Example:
        >>> targets = make_targets()
        >>> list(targets)
        ['U1', 'U2', 'U3', 'U4', 'funnel']
        >>> [round(v, 3) for v in targets["funnel"].truth.sd]  # sd(x) = e^(9/4), sd(y) = 3
        [9.488, 3.0]
    """
    targets = [
        _energy_target("U1", "a ring with two modes", u1),
        _energy_target("U2", "a sine wave", lambda z: u2(z) + soft_wall(z)),
        _energy_target("U3", "a sine wave splitting in two", lambda z: u3(z) + soft_wall(z)),
        _energy_target("U4", "two shifted sine waves", lambda z: u4(z) + soft_wall(z)),
        funnel_target(),
    ]
    return {t.name: t for t in targets}


# ------------------------------------------------------------------------------------------------
# Guides and fits
# ------------------------------------------------------------------------------------------------

GuideFactory = Callable[..., AutoGuide]


def _auto_normal(model: Callable[..., Any], **kwargs: Any) -> AutoNormal:
    return AutoNormal(model, init_loc_fn=robust_init(init_to_median), **kwargs)


#: The guides the demo fits, by name: flowguide's four flow guides with their default flows, and
#: Pyro's mean-field ``AutoNormal`` for contrast (started, like them, at the model's median).
GUIDES: dict[str, GuideFactory] = {
    "AutoPlanar": AutoPlanar,
    "AutoRadial": AutoRadial,
    "AutoIAF": AutoIAF,
    "AutoNeuralSpline": AutoNeuralSpline,
    "AutoNormal": _auto_normal,
}

#: The flow whose funnel fit preconditions NeuTra (the NeuTra paper's flow), when it is fitted.
NEUTRA_FLOW = "AutoIAF"


@dataclass
class DemoConfig:
    """The demo's settings (see ``flowguide demo --help``).

    The targets' scales are about 1, so every guide starts at unit scale (``init_scale=1``)
    rather than the library's default 0.1, which suits posteriors of unknown scale.

    Attributes:
        output: the folder for the figures, ``table.txt`` and ``results.json``.
        steps, particles, lr, init_scale: each fit's SVI steps, ELBO particles, initial
            learning rate and initial scale.
        eval_samples: guide draws for the moment errors.
        grid: the side of the plot grid of the density figures.
        device, seed, jobs: the torch device, the base seed and the worker processes.
        guides, targets: the names to fit (keys of ``GUIDES`` and of :func:`make_targets`).
        neutra, mcmc_warmup, mcmc_samples: whether to run NeuTra NUTS against plain NUTS on the
            funnel, and their warm-up and draws.
        progress, plots: show a progress bar; write the figures.

    The demo fits the guides to the energy functions of Rezende & Mohamed 2015 and to Neal's
    funnel, and on the funnel compares NUTS in the base space of the ``AutoIAF`` fit (NeuTra,
    Hoffman et al. 2019) with plain NUTS.

    Reference: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
    arXiv:1505.05770; Hoffman et al. 2019, "NeuTra-lizing Bad Geometry in Hamiltonian Monte Carlo
    Using Neural Transport", arXiv:1903.03704.

    Example:
        >>> config = DemoConfig(steps=100, guides=("AutoIAF", "AutoNormal"))
        >>> config.steps, config.init_scale, config.targets
        (100, 1.0, ('U1', 'U2', 'U3', 'U4', 'funnel'))
    """

    output: Path = Path("flowguide-demo")
    steps: int = 500
    particles: int = 64
    lr: float = 0.02
    init_scale: float = 1.0
    eval_samples: int = 20_000
    grid: int = 120
    device: str = "cpu"
    seed: int = 0
    jobs: int = 1
    guides: tuple[str, ...] = tuple(GUIDES)
    targets: tuple[str, ...] = ("U1", "U2", "U3", "U4", "funnel")
    neutra: bool = True
    mcmc_warmup: int = 200
    mcmc_samples: int = 300
    progress: bool = True
    plots: bool = True


@dataclass
class Row:
    r"""One line of the demo's table: a guide fitted to a target, or a sampler run on it.

    Attributes:
        target, method: the target's and the guide's (or sampler's) names.
        neg_elbo: the negative ELBO, from 4096 fresh draws (guides only).
        kl: :math:`\mathrm{KL}(q \,\|\, p) = -\mathrm{ELBO} + \log Z` (guides only).
        mean_err: the largest error of a mean, in true standard deviations.
        sd_err: the largest relative error of a standard deviation.
        seconds: the wall time of the fit (or run) and its evaluation.
        steps: SVI steps taken (or MCMC iterations, warm-up included).
        ess_per_grad: the smallest bulk effective sample size over the two coordinates, per
            gradient evaluation, warm-up included (samplers only).
        divergences: divergent transitions after warm-up (samplers only).

    The KL divergence comes from :math:`\mathrm{ELBO} = \log Z - \mathrm{KL}(q \,\|\, p)`,
    :math:`Z` the target's normalising constant (by quadrature; 1 for the funnel), so it carries
    the Monte Carlo error of the ELBO. The effective sample size is the bulk ESS of Vehtari et
    al.; NeuTra NUTS is the sampler of Hoffman et al. 2019.

    Reference: Vehtari et al. 2021, "Rank-Normalization, Folding, and Localization: An Improved
    R-hat for Assessing Convergence of MCMC", Bayesian Analysis, arXiv:1903.08008; Hoffman et al.
    2019, "NeuTra-lizing Bad Geometry in Hamiltonian Monte Carlo Using Neural Transport",
    arXiv:1903.03704.

    Example:
        >>> row = Row("U1", "AutoIAF", neg_elbo=1.43, kl=0.05, mean_err=0.02, sd_err=0.03)
        >>> row.kl, row.steps, row.ess_per_grad  # no sampler columns for a guide
        (0.05, None, None)
    """

    target: str
    method: str
    neg_elbo: float | None = None
    kl: float | None = None
    mean_err: float = math.nan
    sd_err: float = math.nan
    seconds: float = 0.0
    steps: int | None = None
    ess_per_grad: float | None = None
    divergences: int | None = None


@dataclass
class _SamplerOutput:
    method: str
    points: np.ndarray  # (num_samples, 2), plot coordinates
    diverging: np.ndarray  # (num_samples,), bool
    grad_evals: int
    seconds: float
    iterations: int


@dataclass
class _FitOutput:
    """What one fit sends back (plain data, so that it can come from a worker process)."""

    target: str
    method: str
    neg_elbo: float
    points: np.ndarray  # guide draws in plot coordinates, (eval_samples, 2)
    log_density: np.ndarray | None  # the guide's log density on the plot grid, (grid, grid)
    losses: list[float]
    seconds: float
    steps: int
    samplers: list[_SamplerOutput] = field(default_factory=list)


@dataclass(frozen=True)
class _Task:
    target: str
    guide: str
    seed: int
    config: DemoConfig
    samplers: bool = False


@functools.cache
def _targets() -> dict[str, Target]:
    return make_targets()


@torch.no_grad()
def _draw(guide: AutoGuide, n: int) -> dict[str, Tensor]:
    if isinstance(guide, AutoFlow):
        return guide.sample_constrained(n)
    with pyro.plate("_demo_draws", n, dim=-1):
        trace = poutine.trace(guide).get_trace()
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }


@torch.no_grad()
def _neg_elbo(model: Callable[[], None], guide: AutoGuide, n: int) -> float:
    if isinstance(guide, AutoFlow):
        return float(flow_elbo_loss(model, guide, num_particles=n))
    elbo = Trace_ELBO(num_particles=n, vectorize_particles=True, max_plate_nesting=0)
    return float(elbo.loss(model, guide))


@torch.no_grad()
def _guide_log_density(guide: AutoGuide, target: Target, points: Tensor) -> Tensor | None:
    """The guide's log density at points in plot coordinates (every demo site is unconstrained,
    so no Jacobian enters), or None for a guide it cannot evaluate."""
    if isinstance(guide, AutoFlow):
        sites = list(guide._unconstrained_shapes)
        return guide.get_posterior().log_prob(target.pack(points, sites))
    if isinstance(guide, AutoNormal):
        sites = list(dict.fromkeys(name for name, _ in target.coords))
        z = target.pack(points, sites)
        loc = torch.cat([getattr(guide.locs, s).reshape(-1) for s in sites])
        scale = torch.cat([getattr(guide.scales, s).reshape(-1) for s in sites])
        return dist.Normal(loc, scale).log_prob(z).sum(-1)
    return None


def _plot_grid(target: Target, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Grid axes and points ``(n, n, 2)`` over the target's plot box (rows along y)."""
    x0, x1, y0, y1 = target.extent
    xs = torch.linspace(x0, x1, n, dtype=torch.float64, device="cpu")
    ys = torch.linspace(y0, y1, n, dtype=torch.float64, device="cpu")
    return xs, ys, torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _fit_task(task: _Task) -> _FitOutput:
    """Fit one guide to one target, evaluate it at once (guides of one class share Pyro
    parameter names, so each fit starts from a clear parameter store), and run the samplers on
    the funnel when asked. Runs in a worker process with ``--jobs`` > 1."""
    config = task.config
    target = _targets()[task.target]
    with torch.device(config.device):
        pyro.clear_param_store()
        guide = GUIDES[task.guide](target.model, init_scale=config.init_scale)
        loss = None
        if not isinstance(guide, AutoFlow):
            loss = Trace_ELBO(
                num_particles=config.particles, vectorize_particles=True, max_plate_nesting=0
            )
        result = fit(
            target.model,
            guide,
            num_steps=config.steps,
            lr=config.lr,
            num_particles=config.particles,
            loss=loss,
            progress=False,
            seed=task.seed,
        )
        start = time.perf_counter()
        points = target.points(_draw(guide, config.eval_samples))
        neg_elbo = _neg_elbo(target.model, guide, 4096)
        grid = _plot_grid(target, config.grid)[2].to(torch.get_default_dtype())
        try:
            logq = _guide_log_density(guide, target, grid.to(config.device))
        except (NotImplementedError, RuntimeError, ValueError):  # fall back to a histogram
            logq = None
        output = _FitOutput(
            target=target.name,
            method=task.guide,
            neg_elbo=neg_elbo,
            points=_numpy(points),
            log_density=None if logq is None else _numpy(logq),
            losses=result.losses,
            seconds=result.seconds + time.perf_counter() - start,
            steps=result.num_steps,
        )
        if task.samplers:
            assert isinstance(guide, AutoFlow)
            output.samplers = _run_samplers(target, guide, task.guide, config, task.seed)
    return output


def _init_worker() -> None:
    torch.set_num_threads(1)
    # the main process handles Ctrl-C (and stops the workers)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _execute(tasks: Sequence[_Task], jobs: int) -> Iterator[_FitOutput]:
    """Run ``tasks`` in this process (``jobs`` <= 1) or in ``jobs`` worker processes, yielding
    outputs as they finish."""
    if jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield _fit_task(task)
        return
    context = multiprocessing.get_context("spawn")  # fork is unsafe once torch has threads
    pool = ProcessPoolExecutor(min(jobs, len(tasks)), context, initializer=_init_worker)
    try:
        futures = [pool.submit(_fit_task, task) for task in tasks]
        for future in as_completed(futures):
            yield future.result()
    except BaseException:
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


# ------------------------------------------------------------------------------------------------
# NeuTra vs NUTS on the funnel: runs only when flowguide.neutra provides NeuTraMCMC
# ------------------------------------------------------------------------------------------------


def _neutra_module() -> Any | None:
    """``flowguide.neutra`` when it exists and provides ``NeuTraMCMC``, else None."""
    try:
        module = importlib.import_module("flowguide.neutra")
    except ImportError:
        return None
    return module if hasattr(module, "NeuTraMCMC") else None


class _Counted:
    """A model that counts its calls: in HMC, one call per potential-and-gradient evaluation."""

    def __init__(self, model: Callable[[], None]) -> None:
        self.model = model
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1
        return self.model(*args, **kwargs)


def _run_samplers(
    target: Target, guide: AutoFlow, flow_name: str, config: DemoConfig, seed: int
) -> list[_SamplerOutput]:
    """Plain NUTS, and NeuTra NUTS in the base space of ``guide``, with the same warm-up and
    draws. Gradient evaluations are counted as model calls (the same for both)."""
    from pyro.infer import MCMC, NUTS

    neutra = _neutra_module()
    assert neutra is not None
    outputs = []
    for method in ("NUTS", f"NeuTra NUTS ({flow_name})"):
        counted = _Counted(target.model)
        pyro.set_rng_seed(seed)
        start = time.perf_counter()
        if method == "NUTS":
            mcmc = MCMC(
                NUTS(counted),
                num_samples=config.mcmc_samples,
                warmup_steps=config.mcmc_warmup,
                disable_progbar=True,
            )
            mcmc.run()
            samples = mcmc.get_samples()
            diverging = np.zeros(config.mcmc_samples, dtype=bool)
            diverging[[int(i) for i in mcmc.diagnostics()["divergences"]["chain 0"]]] = True
        else:
            sampler = neutra.NeuTraMCMC(
                counted,
                guide,
                num_samples=config.mcmc_samples,
                warmup_steps=config.mcmc_warmup,
                progress=False,
            ).run()
            samples = sampler.get_samples()
            flags = sampler.get_sample_stats(group_by_chain=False)["diverging"]
            diverging = np.asarray(flags.cpu(), dtype=bool)
        outputs.append(
            _SamplerOutput(
                method=method,
                points=_numpy(target.points(samples)),
                diverging=diverging,
                grad_evals=counted.calls,
                seconds=time.perf_counter() - start,
                iterations=config.mcmc_warmup + config.mcmc_samples,
            )
        )
    return outputs


def _min_ess(points: np.ndarray) -> float:
    import arviz as az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one short chain: arviz may warn about it
        return min(float(az.ess(points[None, :, k], method="bulk")) for k in range(points.shape[1]))


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------


def _errors(points: np.ndarray, target: Target) -> tuple[float, float]:
    dims = list(target.check_dims)
    mean, sd = points.mean(0)[dims], points.std(0, ddof=1)[dims]
    true_mean = np.asarray(target.truth.mean)[dims]
    true_sd = np.asarray(target.truth.sd)[dims]
    mean_err = np.max(np.abs(mean - true_mean) / true_sd)
    sd_err = np.max(np.abs(sd / true_sd - 1))
    return float(mean_err), float(sd_err)


def _fit_row(output: _FitOutput, target: Target) -> Row:
    mean_err, sd_err = _errors(output.points, target)
    return Row(
        target=output.target,
        method=output.method,
        neg_elbo=output.neg_elbo,
        kl=output.neg_elbo + target.truth.log_z,
        mean_err=mean_err,
        sd_err=sd_err,
        seconds=output.seconds,
        steps=output.steps,
    )


def _sampler_row(output: _SamplerOutput, target: Target) -> Row:
    mean_err, sd_err = _errors(output.points, target)
    return Row(
        target=target.name,
        method=output.method,
        mean_err=mean_err,
        sd_err=sd_err,
        seconds=output.seconds,
        steps=output.iterations,
        ess_per_grad=_min_ess(output.points) / max(output.grad_evals, 1),
        divergences=int(output.diverging.sum()),
    )


def _fmt(value: float | int | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def format_table(rows: Sequence[Row]) -> str:
    """The demo's comparison table as aligned plain text, a blank line between targets.

    One line per :class:`Row`: ``-ELBO`` and ``KL(q|p)`` to three decimals, the moment errors,
    the bulk ESS per gradient evaluation (Vehtari et al. 2021) and the divergences of the
    samplers, and the time; a value that does not apply shows as ``-``.

    Reference: Vehtari et al. 2021, "Rank-Normalization, Folding, and Localization: An Improved
    R-hat for Assessing Convergence of MCMC", Bayesian Analysis, arXiv:1903.08008 (the ESS
    column).

    Example:
        >>> print(format_table([Row("U1", "AutoIAF", 1.0, 0.5, 0.1, 0.02, 3.0, 500)]))
        target  method   -ELBO  KL(q|p)  mean err  sd err  ESS/grad  div.  time
        ------  -------  -----  -------  --------  ------  --------  ----  ----
        U1      AutoIAF  1.000    0.500     0.100    2.0%         -     -  3.0s
    """
    header = ("target", "method", "-ELBO", "KL(q|p)", "mean err", "sd err", "ESS/grad", "div.")
    header = (*header, "time")
    lines = [
        (
            r.target,
            r.method,
            _fmt(r.neg_elbo, ".3f"),
            _fmt(r.kl, ".3f"),
            _fmt(r.mean_err, ".3f"),
            _fmt(r.sd_err, ".1%"),
            _fmt(r.ess_per_grad, ".4f"),
            _fmt(r.divergences, "d"),
            f"{r.seconds:.1f}s",
        )
        for r in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(header, *lines, strict=True)]

    def render(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    body: list[str] = [render(header), "  ".join("-" * w for w in widths)]
    for i, cells in enumerate(lines):
        if i and cells[0] != lines[i - 1][0]:
            body.append("")
        body.append(render(cells))
    return "\n".join(body)


NOTES = """\
-ELBO: negative ELBO from 4096 fresh draws. KL(q|p) = -ELBO + log Z (log Z by quadrature, 0 for
the funnel): 0 is a perfect fit. mean err: largest error of a mean, in true sds; sd err: largest
relative error of an sd (funnel: y only; the moments of x come from rare draws at large y).
ESS/grad: smallest bulk ESS over (x, y) per gradient evaluation, warm-up included; div.:
divergent transitions after warm-up. time: per fit, with its evaluation. Every guide starts at
the median, the centre of U1's ring: a saddle point of the KL, where a guide that does not break
the symmetry stays, a blob over the hole."""


# ------------------------------------------------------------------------------------------------
# The figures
# ------------------------------------------------------------------------------------------------


def _pyplot() -> Any | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _show_density(ax: Any, target: Target, xs: Tensor, ys: Tensor, logp: np.ndarray) -> None:
    logp = np.where(np.isfinite(logp), logp, -np.inf)
    logp = logp - np.max(logp)
    if target.log_scale:
        values, vmin = np.maximum(logp, -12.0), -12.0
    else:
        values, vmin = np.exp(logp), 0.0
    ax.pcolormesh(xs.numpy(), ys.numpy(), values, shading="auto", cmap="viridis", vmin=vmin)


def _plot_densities(
    plt: Any,
    targets: Sequence[Target],
    fits: dict[tuple[str, str], _FitOutput],
    rows: dict[tuple[str, str], Row],
    config: DemoConfig,
) -> Path:
    names = list(config.guides)
    fig, axes = plt.subplots(
        len(targets),
        len(names) + 1,
        figsize=(2.1 * (len(names) + 1), 2.1 * len(targets) + 0.4),
        squeeze=False,
    )
    for i, target in enumerate(targets):
        xs, ys, grid = _plot_grid(target, config.grid)
        _show_density(axes[i, 0], target, xs, ys, _numpy(target.log_density(grid)))
        axes[i, 0].set_ylabel(target.name, fontsize=11)
        for j, name in enumerate(names, start=1):
            ax, output = axes[i, j], fits[target.name, name]
            if output.log_density is not None:
                _show_density(ax, target, xs, ys, output.log_density)
            else:  # no density: a histogram of draws
                x0, x1, y0, y1 = target.extent
                points = output.points
                ax.hist2d(points[:, 0], points[:, 1], 60, [[x0, x1], [y0, y1]], cmap="viridis")
            kl = rows[target.name, name].kl
            ax.text(0.03, 0.04, f"KL {kl:.2f}", transform=ax.transAxes, color="w", fontsize=8)
    for j, title in enumerate(["truth", *names]):
        axes[0, j].set_title(title, fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Fitted guide densities beside the true ones (funnel: log scale)", fontsize=11)
    fig.tight_layout()
    path = config.output / "densities.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_losses(
    plt: Any,
    targets: Sequence[Target],
    fits: dict[tuple[str, str], _FitOutput],
    config: DemoConfig,
) -> Path:
    fig, axes = plt.subplots(1, len(targets), figsize=(3.2 * len(targets), 3.3), squeeze=False)
    for ax, target in zip(axes[0], targets, strict=True):
        for name in config.guides:
            losses = np.asarray(fits[target.name, name].losses, dtype=np.float64)
            if losses.size == 0:
                continue
            k = max(1, losses.size // 25)
            smooth = np.convolve(losses + target.truth.log_z, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(smooth.size) + k - 1, smooth, label=name, lw=1.2)
        ax.set_title(target.name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_yscale("symlog", linthresh=0.1)
    axes[0, 0].set_ylabel("KL(q|p) estimate (smoothed)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = config.output / "losses.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_samplers(
    plt: Any,
    target: Target,
    samplers: Sequence[_SamplerOutput],
    rows: Sequence[Row],
    config: DemoConfig,
) -> Path:
    xs, ys, grid = _plot_grid(target, config.grid)
    logp = _numpy(target.log_density(grid))
    fig, axes = plt.subplots(1, len(samplers), figsize=(4.2 * len(samplers), 3.6), squeeze=False)
    for ax, output, row in zip(axes[0], samplers, rows, strict=True):
        ax.contour(xs.numpy(), ys.numpy(), logp - logp.max(), levels=np.arange(-12.0, 0.0, 2.0))
        ok, bad = output.points[~output.diverging], output.points[output.diverging]
        ax.scatter(ok[:, 0], ok[:, 1], s=4, c="k", alpha=0.5, label="draws")
        if len(bad):
            ax.scatter(bad[:, 0], bad[:, 1], s=12, c="r", label="divergent")
        ax.legend(fontsize=7, loc="upper right")
        ax.set_xlim(*target.extent[:2])
        ax.set_ylim(*target.extent[2:])
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title(
            f"{row.method}: {len(output.points)} draws after {config.mcmc_warmup} warm-up\n"
            f"ESS/grad {_fmt(row.ess_per_grad, '.4f')}, {row.divergences} divergent",
            fontsize=9,
        )
    fig.tight_layout()
    path = config.output / "neutra_funnel.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# The demo
# ------------------------------------------------------------------------------------------------


def run_demo(config: DemoConfig, out: TextIO | None = None) -> list[Row]:
    r"""Run the demo: fit, print the table to ``out`` (default stdout), and write the figures,
    ``table.txt`` and ``results.json`` to ``config.output``. Returns the table's rows.

    Every chosen guide is fitted to every chosen target with :func:`~flowguide.train.fit` and
    scored on fresh draws: :math:`-\mathrm{ELBO}`, :math:`\mathrm{KL}(q \,\|\, p) =
    -\mathrm{ELBO} + \log Z`, and the errors of the means and standard deviations against the
    truth. With ``config.neutra`` and the ``AutoIAF`` funnel fit, NUTS in that fit's base space
    (NeuTra) runs against plain NUTS. Unknown guide or target names, or ``cuda`` where there is
    none, raise ``ValueError``.

    Reference: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
    arXiv:1505.05770 (the energy functions); Hoffman et al. 2019, "NeuTra-lizing Bad Geometry in
    Hamiltonian Monte Carlo Using Neural Transport", arXiv:1903.03704 (NeuTra).

    Example:
        >>> import io, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     config = DemoConfig(
        ...         output=Path(folder), steps=5, eval_samples=200, grid=10, targets=("funnel",),
        ...         guides=("AutoNormal",), neutra=False, plots=False, progress=False,
        ...     )
        ...     rows = run_demo(config, out=io.StringIO())
        ...     written = sorted(path.name for path in Path(folder).iterdir())
        >>> [(row.target, row.method, row.steps) for row in rows], written
        ([('funnel', 'AutoNormal', 5)], ['results.json', 'table.txt'])
    """
    out = out if out is not None else sys.stdout
    targets_by_name = make_targets()
    for kind, chosen, known in (
        ("guide", config.guides, GUIDES),
        ("target", config.targets, targets_by_name),
    ):
        unknown = sorted(set(chosen) - known.keys())
        if unknown or not chosen:
            raise ValueError(f"unknown or no {kind}s {unknown}; choose from {list(known)}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r}: CUDA is not available here")
    targets = [targets_by_name[n] for n in config.targets]

    # ---- the NeuTra-vs-NUTS hook: needs flowguide.neutra.NeuTraMCMC and an AutoIAF funnel fit
    neutra_note = None
    run_samplers = False
    if config.neutra and "funnel" in config.targets:
        if _neutra_module() is None:
            neutra_note = "NeuTra vs NUTS: skipped (flowguide.neutra.NeuTraMCMC is not available)"
        elif NEUTRA_FLOW not in config.guides:
            neutra_note = f"NeuTra vs NUTS: skipped (it needs the {NEUTRA_FLOW} fit)"
        else:
            run_samplers = True

    # each fit's seed depends on its target and guide alone, so a subset gives the same fits
    order = {name: i for i, name in enumerate([*targets_by_name, *GUIDES])}
    tasks = [
        _Task(
            target.name,
            name,
            config.seed + 100 * order[target.name] + order[name] - len(targets_by_name),
            config,
            samplers=run_samplers and (target.name, name) == ("funnel", NEUTRA_FLOW),
        )
        for target in targets
        for name in config.guides
    ]
    tasks.sort(key=lambda task: not task.samplers)  # the longest task first
    config.output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc="demo", unit="fit", dynamic_ncols=True)
    fits: dict[tuple[str, str], _FitOutput] = {}
    threads = torch.get_num_threads()
    # 2-D problems: tiny tensors, so more threads only add overhead (and stall on busy cores)
    torch.set_num_threads(1)
    try:
        for output in _execute(tasks, config.jobs):
            fits[output.target, output.method] = output
            if bar is not None:
                bar.set_postfix_str(f"{output.target} {output.method}", refresh=False)
                bar.update(1)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()

    rows = {key: _fit_row(fits[key], targets_by_name[key[0]]) for key in fits}
    table = [rows[t.name, g] for t in targets for g in config.guides]
    samplers = [s for f in fits.values() for s in f.samplers]
    sampler_rows = [_sampler_row(s, targets_by_name["funnel"]) for s in samplers]
    table += sampler_rows
    text = format_table(table) + "\n" + NOTES + (f"\n{neutra_note}" if neutra_note else "")
    print(text, file=out)

    figures: list[Path] = []
    plt = _pyplot() if config.plots else None
    if config.plots and plt is None:
        print("figures: skipped (matplotlib is missing: pip install 'flowguide[plot]')", file=out)
    if plt is not None:
        figures.append(_plot_densities(plt, targets, fits, rows, config))
        figures.append(_plot_losses(plt, targets, fits, config))
        if samplers:
            funnel = targets_by_name["funnel"]
            figures.append(_plot_samplers(plt, funnel, samplers, sampler_rows, config))
    seconds = time.perf_counter() - start
    results = {
        "flowguide": __version__,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "truth": {t.name: asdict(t.truth) for t in targets},
        "rows": [asdict(r) for r in table],
        "seconds": seconds,
    }
    (config.output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (config.output / "table.txt").write_text(text + "\n")
    for path in [*figures, config.output / "table.txt", config.output / "results.json"]:
        print(f"wrote {path}", file=out)
    print(f"done in {seconds:.0f}s", file=out)
    return table


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------

#: What ``--quick`` changes (a run for CI, well under a minute on two cores).
QUICK = {"steps": 150, "eval_samples": 4000, "grid": 80, "mcmc_warmup": 60, "mcmc_samples": 60}


def default_jobs() -> int:
    """The default number of worker processes: the usable CPU cores, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def make_parser() -> argparse.ArgumentParser:
    """The ``flowguide`` argument parser: the command ``demo`` and its options.

    The demo fits the flow guides to the energy functions of Rezende & Mohamed 2015 and to
    Neal's funnel (see :func:`run_demo`).

    Reference: Rezende & Mohamed 2015, "Variational Inference with Normalizing Flows",
    arXiv:1505.05770 (the demo's energy functions).

    Example:
        >>> args = make_parser().parse_args(["demo", "--quick", "--targets", "U1", "funnel"])
        >>> args.command, args.quick, args.targets, args.steps
        ('demo', True, ['U1', 'funnel'], None)
    """
    parser = argparse.ArgumentParser(
        prog="flowguide", description="flowguide: normalizing-flow guides for Pyro."
    )
    parser.add_argument("--version", action="version", version=f"flowguide {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    defaults = DemoConfig()
    demo = commands.add_parser(
        "demo",
        help="fit every flow guide to 2-D test posteriors and compare them",
        description=(
            "Fit AutoPlanar, AutoRadial, AutoIAF, AutoNeuralSpline and Pyro's AutoNormal to the "
            "four 2-D energy functions of Rezende & Mohamed (2015) and to Neal's funnel; print a "
            "comparison table and write figures. When flowguide.neutra is present, also compare "
            "NeuTra NUTS (in the base space of the AutoIAF fit) with plain NUTS on the funnel."
        ),
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help=f"a fast run for CI: {QUICK['steps']} steps per fit, fewer draws and iterations",
    )
    demo.add_argument(
        "--output",
        type=Path,
        default=defaults.output,
        metavar="DIR",
        help="folder for the figures and results (default: %(default)s)",
    )
    demo.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="torch device (default: cpu)"
    )
    demo.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: 0)")
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help=f"SVI steps per fit (default: {defaults.steps}; {QUICK['steps']} with --quick)",
    )
    demo.add_argument(
        "--jobs",
        type=_positive_int,
        default=None,
        help="worker processes for the fits (default: the CPU cores, at most 4; 1 on cuda)",
    )
    demo.add_argument(
        "--guides",
        nargs="+",
        choices=list(GUIDES),
        default=list(GUIDES),
        metavar="GUIDE",
        help="the guides to fit (default: all: %(default)s)",
    )
    demo.add_argument(
        "--targets",
        nargs="+",
        choices=list(defaults.targets),
        default=list(defaults.targets),
        metavar="TARGET",
        help="the targets (default: all: %(default)s)",
    )
    demo.add_argument(
        "--no-neutra", action="store_true", help="skip the NeuTra-vs-NUTS section on the funnel"
    )
    demo.add_argument("--no-plots", action="store_true", help="write no figures")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _config(args: argparse.Namespace) -> DemoConfig:
    jobs = args.jobs
    if jobs is None:
        jobs = 1 if args.device == "cuda" else default_jobs()
    config = DemoConfig(
        output=args.output,
        device=args.device,
        seed=args.seed,
        jobs=jobs,
        guides=tuple(dict.fromkeys(args.guides)),
        targets=tuple(dict.fromkeys(args.targets)),
        neutra=not args.no_neutra,
        progress=not args.no_progress,
        plots=not args.no_plots,
    )
    if args.quick:
        for key, value in QUICK.items():
            setattr(config, key, value)
    if args.steps is not None:
        config.steps = args.steps
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flowguide`` command line with ``argv`` (default ``sys.argv[1:]``); returns the
    exit status.

    Example:
        >>> main(["--version"])
        Traceback (most recent call last):
        ...
        SystemExit: 0
    """
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        try:
            run_demo(_config(args))
        except ValueError as error:
            parser.error(str(error))
    return 0
