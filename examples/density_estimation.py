"""Density estimation: fit a neural spline flow to two moons by maximum likelihood.

flowguide's flows are ordinary torch ``Transform`` modules, so they serve outside SVI too. Here
a stack of ``SplineCoupling`` layers, with the coordinates swapped in between, maps standard
normal noise to the data; the log-likelihood of a data point is evaluated through the flow's
exact inverse (one network pass per coupling layer).

    python examples/density_estimation.py                 # about a minute; writes out/two_moons.png
    python examples/density_estimation.py --smoke         # a few seconds
    python examples/density_estimation.py --output moons.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyro.distributions as dist
import torch

from flowguide.transforms import Compose, ElementwiseAffine, Permute, SplineCoupling


def two_moons(n: int, noise: float = 0.08, seed: int = 0) -> np.ndarray:
    """Two interleaved half circles with Gaussian noise, shape ``(n, 2)`` (as scikit-learn's
    ``make_moons``, written with numpy)."""
    rng = np.random.default_rng(seed)
    upper = rng.random(n) < 0.5
    angle = np.pi * rng.random(n)
    x = np.where(upper, np.cos(angle), 1 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    return np.stack([x, y], 1) + noise * rng.standard_normal((n, 2))


def make_flow(layers: int = 6, bins: int = 8, hidden: tuple[int, ...] = (64, 64)) -> Compose:
    """Spline couplings, the two coordinates swapped between layers, then a learnable
    elementwise affine map (the data's location and scale)."""
    parts = []
    for i in range(layers):
        if i:
            parts.append(Permute(2))
        parts.append(SplineCoupling(2, bins=bins, bound=4.0, hidden=hidden))
    parts.append(ElementwiseAffine(2))
    return Compose(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a very short run")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps (default 2000)")
    parser.add_argument(
        "--output", type=Path, default=Path("out/two_moons.png"), help="the figure's file"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # small tensors: extra threads cost more than they give
    steps = args.steps or (30 if args.smoke else 2000)
    torch.manual_seed(0)

    data = torch.as_tensor(two_moons(512 if args.smoke else 4096), dtype=torch.float32)
    flow = make_flow(layers=2 if args.smoke else 6, hidden=(16,) if args.smoke else (64, 64))
    # start the affine map at the data's moments, so the splines see standardised inputs
    with torch.no_grad():
        flow[-1].loc.copy_(data.mean(0))
        flow[-1].log_scale.copy_(data.std(0).log())
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    model = dist.TransformedDistribution(base, [flow])

    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    start = time.perf_counter()
    for step in range(steps):
        batch = data[torch.randint(len(data), (256,))]
        loss = -model.log_prob(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"step {step:5d}  negative log-likelihood {loss.item():.3f}")
    with torch.no_grad():
        nll = -model.log_prob(data).mean().item()
    print(f"trained in {time.perf_counter() - start:.1f}s; mean NLL on the data {nll:.3f} nats")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = torch.linspace(-1.6, 2.6, 150), torch.linspace(-1.1, 1.6, 110)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)
    with torch.no_grad():
        density = model.log_prob(grid.reshape(-1, 2)).exp().reshape(grid.shape[:2])
        samples = model.sample((2000,))
    data, samples = data[:2000].numpy(), samples.numpy()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharex=True, sharey=True)
    axes[0].scatter(data[:, 0], data[:, 1], s=2, alpha=0.5)
    axes[0].set_title("data")
    axes[1].pcolormesh(xs.numpy(), ys.numpy(), density.numpy(), shading="auto", cmap="viridis")
    axes[1].set_title("flow density")
    axes[2].scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5, c="C1")
    axes[2].set_title("flow samples")
    for ax in axes:
        ax.set_xlim(float(xs[0]), float(xs[-1]))
        ax.set_ylim(float(ys[0]), float(ys[-1]))
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
