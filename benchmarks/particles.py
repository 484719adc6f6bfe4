"""The cost of ``flowguide.fit``'s particles: the time of one ELBO step at several particle counts.

``fit`` draws ``DEFAULT_FLOW_PARTICLES`` particles per step for a flowguide guide and evaluates
the model once for all of them, their draws on a batch dimension left of the model's plates. On a
small model such a step costs about as much for many particles as for one (the step's time is
Python's and the kernels' overhead, not arithmetic); on a model whose likelihood's arithmetic
dominates, it grows with them. This script measures which case each target is: for every target
of ``benchmarks/accuracy.py`` (the synthetic ones, and the 16 posteriordb posteriors when
``--root`` holds them) it times the step of ``AutoNeuralSpline`` with its defaults (the flow
ELBO, forward and backward, at the guide's initial parameters) at each of ``--particles``,
interleaved in ``--rounds`` rounds of ``--steps`` steps so that every count sees the same load,
and prints the median milliseconds per step and each count's ratio to the first.

Run: ``python benchmarks/particles.py [--root PATH] [--quick] [--only NAME ...]
[--particles 1 4 16] [--rounds 5] [--steps 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pyro
import torch

import flowguide as fg
from flowguide.train import flow_elbo_loss

__all__ = ["main", "step_times"]

HERE = Path(__file__).resolve().parent


def _accuracy() -> Any:
    """``benchmarks/accuracy.py``, for its targets (a script's folder is on ``sys.path`` when it
    runs; a test that loads this file by path needs it put there)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import accuracy

    return accuracy


def step_times(
    model: Any, particles: list[int], rounds: int, steps: int, seed: int = 0
) -> dict[int, float]:
    """The median over ``rounds`` of the mean milliseconds per ELBO step (forward and backward)
    of a fresh ``AutoNeuralSpline`` for each particle count, the counts interleaved per round."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = fg.AutoNeuralSpline(model)
    guide()  # set up, and register the parameters once
    params = list(guide.parameters())
    times: dict[int, list[float]] = {p: [] for p in particles}
    for _ in range(rounds):
        for p in particles:
            start = time.perf_counter()
            for _ in range(steps):
                flow_elbo_loss(model, guide, num_particles=p, register_params=False).backward()
                for q in params:
                    q.grad = None
            times[p].append(1e3 * (time.perf_counter() - start) / steps)
    return {p: statistics.median(v) for p, v in times.items()}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    acc = _accuracy()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=HERE.parent.parent / "shared" / "posteriordb")
    parser.add_argument("--quick", action="store_true", help="a smoke run on two targets")
    parser.add_argument("--only", nargs="*", help="targets whose name contains one of these")
    parser.add_argument("--particles", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    for name in ("rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.particles) < 1:
        parser.error(f"--particles must all be >= 1, got {args.particles}")
    torch.set_num_threads(1)
    counts = args.particles
    if args.quick:
        args.rounds, args.steps, args.only = 1, 3, args.only or ["banana", "funnel"]
    print(
        f"AutoNeuralSpline, flow ELBO step (forward and backward), median of {args.rounds} "
        f"rounds of {args.steps} steps, torch {torch.__version__}, pyro {pyro.__version__}, "
        "1 thread\n"
    )
    head = " | ".join(f"ms/step at {p}" for p in counts)
    ratios = " | ".join(f"{p} / {counts[0]}" for p in counts[1:])
    print(f"| target | {head} | {ratios} |")
    print("| --- |" + " ---: |" * (2 * len(counts) - 1))
    rows = []
    for target in acc.targets(args.root, args.only):
        try:
            ms = step_times(target.model, counts, args.rounds, args.steps)
        except Exception as error:  # a row that says so, not a lost run
            rows.append({"target": target.name, "error": f"{type(error).__name__}: {error}"})
            print(f"| {target.name} | failed: {rows[-1]['error']} |", flush=True)
            continue
        row = {"target": target.name, "ms": ms, "ratio": {p: ms[p] / ms[counts[0]] for p in ms}}
        rows.append(row)
        cells = [f"{ms[p]:.1f}" for p in counts] + [f"{row['ratio'][p]:.2f}" for p in counts[1:]]
        print(f"| {target.name} | " + " | ".join(cells) + " |", flush=True)
    return rows


if __name__ == "__main__":
    main()
