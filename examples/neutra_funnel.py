r"""NeuTra on Neal's funnel: NUTS in the base space of a fitted flow, against plain NUTS.

Neal's funnel in 10 dimensions (Neal 2003),

.. math::

    y \sim \mathcal{N}(0, 3), \qquad x_i \mid y \sim \mathcal{N}\big(0, e^{y/2}\big),
    \quad i = 1, \dots, 9,

has no data and a known answer: the marginal of :math:`y` is :math:`\mathcal{N}(0, 3)`. Its
geometry defeats a sampler with one step size: the scale of the :math:`x_i` changes by a factor
of about 90 between :math:`y = -3` and :math:`y = 6`, so a step that is stable in the neck is
tiny in the mouth and one that suits the mouth diverges in the neck. Plain NUTS tends to
stay out of the neck, with or without divergent transitions, which shows up as too small a sd of
:math:`y`.

NeuTra (Hoffman et al. 2019) first fits a flow guide :math:`z = T(\varepsilon)` to the posterior
by variational inference (here with ``flowguide.fit``), then runs NUTS on :math:`\varepsilon`,
where the posterior pulled back through :math:`T` is close to :math:`\mathcal{N}(0, I)` if the
flow fits. The draws are exact whatever the flow (the flow only preconditions), so the better
the fit, the larger the step and the fewer the divergences. ``flowguide.NeuTraMCMC`` is shaped
like ``pyro.infer.MCMC`` and returns draws under the model's site names.

The script prints, for each sampler, the number of divergent transitions, the smallest bulk
effective sample size over all coordinates (ArviZ, rank-normalised), the mean and sd of
:math:`y` (true: 0 and 3) and the wall time, and, if matplotlib is installed, writes a scatter
plot of :math:`(x_1, y)` for both samplers to ``--output``. It reports what it measured and
asserts nothing about the samplers.

    python examples/neutra_funnel.py                    # a few minutes on a laptop CPU
    python examples/neutra_funnel.py --smoke            # a few seconds: checks that it runs
    python examples/neutra_funnel.py --guide nsf --output out --seed 1
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS

from flowguide import AutoFlow, AutoIAF, AutoNeuralSpline, NeuTraMCMC, fit

__all__ = ["DIM", "Y_SCALE", "fit_guide", "main", "model", "plot", "run_neutra", "run_nuts"]

DIM = 10  # y and nine x_i
Y_SCALE = 3.0  # the sd of y, the funnel's known answer


def model() -> None:
    """Neal's funnel: ``y`` sets the log-scale of the nine ``x_i``."""
    y = pyro.sample("y", dist.Normal(0.0, Y_SCALE))
    with pyro.plate("coordinates", DIM - 1):
        pyro.sample("x", dist.Normal(0.0, torch.exp(y / 2)))


def fit_guide(kind: str, steps: int, seed: int, progress: bool = True) -> AutoFlow:
    """Fit an ``AutoIAF`` (``kind="iaf"``) or ``AutoNeuralSpline`` (``"nsf"``) guide."""
    pyro.clear_param_store()
    guide = AutoIAF(model, num_flows=3) if kind == "iaf" else AutoNeuralSpline(model, num_flows=3)
    result = fit(model, guide, num_steps=steps, num_particles=16, seed=seed, progress=progress)
    print(
        f"{type(guide).__name__}: {result.num_steps} steps ({result.stopped}), final loss "
        f"{result.final_loss:.3f}"
    )
    return guide


def _min_bulk_ess(samples: dict[str, torch.Tensor]) -> float:
    """The smallest rank-normalised bulk ESS over every coordinate of every site; ``samples``
    are grouped by chain, ``(chains, draws, ...)``."""
    import arviz as az

    arrays = {name: value.detach().double().numpy() for name, value in samples.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a single chain: ArviZ warns about R-hat, not ESS
        ess = az.ess(az.convert_to_dataset(arrays), method="bulk")
    return float(min(np.min(ess[name].values) for name in arrays))


def _report(name: str, samples: dict[str, torch.Tensor], divergences: int, seconds: float) -> dict:
    y = samples["y"].reshape(-1).double()
    return {
        "sampler": name,
        "divergences": divergences,
        "min bulk ESS": _min_bulk_ess(samples),
        "y mean": float(y.mean()),
        "y sd": float(y.std()),
        "seconds": seconds,
        "draws": samples,
    }


def run_neutra(guide: AutoFlow, num_samples: int, warmup: int, chains: int, **kernel: Any) -> dict:
    """NeuTra NUTS with the fitted guide; returns the summary row (and the draws)."""
    start = time.perf_counter()
    mcmc = NeuTraMCMC(
        model,
        guide,
        num_samples=num_samples,
        warmup_steps=warmup,
        num_chains=chains,
        progress=False,
        **kernel,
    )
    mcmc.run()
    seconds = time.perf_counter() - start
    divergences = int(mcmc.get_sample_stats()["diverging"].sum())
    return _report("NeuTra NUTS", mcmc.get_samples(group_by_chain=True), divergences, seconds)


def run_nuts(num_samples: int, warmup: int, chains: int, **kernel: Any) -> dict:
    """Plain Pyro NUTS on the model's own (unconstrained) coordinates, one chain after another
    in this process."""
    start = time.perf_counter()
    draws: list[dict[str, torch.Tensor]] = []
    divergences = 0
    for _ in range(chains):
        mcmc = MCMC(
            NUTS(model, **kernel),
            num_samples=num_samples,
            warmup_steps=warmup,
            disable_progbar=True,
        )
        mcmc.run()
        draws.append(mcmc.get_samples())
        divergences += sum(len(v) for v in mcmc.diagnostics()["divergences"].values())
    seconds = time.perf_counter() - start
    samples = {name: torch.stack([d[name] for d in draws]) for name in draws[0]}
    return _report("plain NUTS", samples, divergences, seconds)


def plot(rows: list[dict], path: Path) -> bool:
    """Scatter ``(x_1, y)`` of each sampler's draws side by side; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 4), sharex=True, sharey=True)
    for ax, row in zip(np.atleast_1d(axes), rows, strict=True):
        x1 = row["draws"]["x"][..., 0].reshape(-1).numpy()
        y = row["draws"]["y"].reshape(-1).numpy()
        ax.scatter(x1, y, s=4, alpha=0.4)
        ax.set_title(f"{row['sampler']}: {row['divergences']} divergences")
        ax.set_xlabel("$x_1$")
    np.atleast_1d(axes)[0].set_ylabel("$y$")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a very short run")
    parser.add_argument("--steps", type=int, default=None, help="SVI steps (default 3000)")
    parser.add_argument("--samples", type=int, default=None, help="draws per chain (default 1000)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 500)")
    parser.add_argument("--chains", type=int, default=1, help="chains per sampler (default 1)")
    parser.add_argument("--guide", choices=("iaf", "nsf"), default="iaf", help="the flow guide")
    parser.add_argument("--seed", type=int, default=0, help="the random seed (default 0)")
    parser.add_argument(
        "--output", type=Path, default=Path("out"), help="a folder for neutra_funnel.png"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small tensors: extra threads cost more than they give
    steps = args.steps or (100 if args.smoke else 3000)
    num_samples = args.samples or (30 if args.smoke else 1000)
    warmup = args.warmup or (30 if args.smoke else 500)
    # NUTS on the funnel's neck builds the deepest trees; the smoke run caps them
    kernel = {"max_tree_depth": 5} if args.smoke else {}

    guide = fit_guide(args.guide, steps, args.seed, progress=not args.smoke)
    pyro.set_rng_seed(args.seed)
    rows = [run_neutra(guide, num_samples, warmup, args.chains, **kernel)]
    pyro.set_rng_seed(args.seed)
    rows.append(run_nuts(num_samples, warmup, args.chains, **kernel))

    total = args.chains * num_samples
    print(f"\n{args.chains} chain(s) x {num_samples} draws after {warmup} warm-up steps each")
    print(
        f"{'sampler':12s} {'divergences':>11s} {'min bulk ESS':>12s} {'y mean':>7s} "
        f"{'y sd':>6s} {'seconds':>8s}"
    )
    for row in rows:
        print(
            f"{row['sampler']:12s} {row['divergences']:11d} {row['min bulk ESS']:12.1f} "
            f"{row['y mean']:7.2f} {row['y sd']:6.2f} {row['seconds']:8.1f}"
        )
    print(f"true: y mean 0, y sd {Y_SCALE:g}; ESS out of {total} draws per sampler")
    figure = args.output / "neutra_funnel.png"
    if plot(rows, figure):
        print(f"wrote {figure}")
    else:
        print("matplotlib is not installed: no figure")


if __name__ == "__main__":
    main()
