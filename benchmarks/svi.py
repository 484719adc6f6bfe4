"""Time one SVI step: flowguide's guides and fit loop against Pyro's flow guides, in one run.

For each model and flow family, at equal architecture (same number of flow layers, same hidden
widths, same bins and bound), it times a training step with ``num_particles`` particles:

* flowguide: ``flowguide.fit`` with the guide's default loss (the direct flow ELBO, particles
  vectorised), per step, after a warm-up fit;
* flowguide jit: ``flowguide.fit(..., jit=True)`` (the loss compiled with ``torch.jit.trace``
  after the first step), timed as whole fits of ``--jit-steps`` steps (default 500), the one-off
  compilation included (``--no-jit`` skips these rows);
* flowguide compile: ``flowguide.fit(..., jit="compile")`` (the loss traced to ATen
  operations and compiled by TorchInductor), timed inside each fit from its 20th step on through
  ``fit``'s ``callback``: the steady step, after the one-off compilation, whose wall time is
  reported beside it (the first compilation, then the median of the later ones, which hit
  TorchInductor's cache; run with ``TORCHINDUCTOR_CACHE_DIR`` set to a new folder for a first
  compilation from an empty cache; ``--no-compile`` skips these columns);
* Pyro: ``SVI(model, guide, Adam, Trace_ELBO(num_particles, vectorize_particles=True)).step()``
  with ``AutoIAFNormal`` (IAF) or ``AutoNormalizingFlow`` with ``spline_autoregressive``.
  Pyro's default spline is the linear-rational one (``order="linear"``); its rational-quadratic
  one (``order="quadratic"``, the spline flowguide uses) fails inside an SVI guide in pyro 1.9.2
  with ``ValueError: too many values to unpack``, so the comparison uses Pyro's default.
  The script also tries Pyro's ``JitTrace_ELBO`` with the same guides and reports its failure
  (pyro#3132) under the table.

They run side by side: after a warm-up of each, their blocks alternate, in a random order per
repeat, so that load changes on a shared machine hit all alike (the ratio is the robust figure;
the absolute times depend on the load). ``--clock cpu`` reads the calling thread's CPU time
instead of the wall clock: with one torch thread it holds all of a step's work, and none of the
time the process waits while other jobs run.

It prints a markdown table of milliseconds per step (medians over repeats) and the ratio
Pyro / flowguide (above 1: flowguide is faster). No timing is asserted anywhere.

Run: ``python benchmarks/svi.py`` (``--quick`` for a smoke run; ``--output FILE`` to save the
table).
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import iterated, spline_autoregressive
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoNormalizingFlow

import flowguide as fg

__all__ = ["MODELS", "main"]


def banana3() -> None:
    """A 3-D banana: x1 ~ N(0, 1), x2 ~ N(x1^2, 0.5), x3 ~ N(x2 - x1, 1)."""
    x1 = pyro.sample("x1", dist.Normal(0.0, 1.0))
    x2 = pyro.sample("x2", dist.Normal(x1**2, 0.5))
    pyro.sample("x3", dist.Normal(x2 - x1, 1.0))


_SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
_SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def schools(y: torch.Tensor = _SCHOOLS_Y, sigma: torch.Tensor = _SCHOOLS_SIGMA) -> None:
    """Eight schools, non-centered (10 latent dimensions)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * eta, sigma), obs=y)


_G = torch.Generator().manual_seed(0)
_X = torch.randn(200, 50, generator=_G)
_Y = _X @ torch.linspace(-1, 1, 50) + 0.5 * torch.randn(200, generator=_G)


def regression50(x: torch.Tensor = _X, y: torch.Tensor = _Y) -> None:
    """A 50-D Bayesian linear regression with 200 observations (the data made once, at import,
    as a model's data would be passed in, not regenerated at every step)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(50), 1.0).to_event(1))
    with pyro.plate("data", 200):
        # (x * w).sum(-1) rather than x @ w, so that a batch of particles (w of shape
        # (particles, 1, 50), the draws left of the plate's dim) broadcasts to (particles, 200)
        pyro.sample("y", dist.Normal((x * w).sum(-1), 0.5), obs=y)


MODELS: dict[str, tuple[Callable[[], None], int]] = {
    "banana-3d": (banana3, 3),
    "eight-schools-10d": (schools, 10),
    "regression-50d": (regression50, 50),
}


#: what a block's time is read from: wall-clock time, or the CPU time of the calling thread
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock: Callable[[], float] = time.perf_counter


class _PyroSteps:
    """Pyro's route: ``SVI(...).step()`` with vectorised particles, timed in blocks."""

    def __init__(
        self, model: Callable[[], None], guide: Callable, particles: int, jit: bool = False
    ) -> None:
        elbo = JitTrace_ELBO if jit else Trace_ELBO
        self.svi = SVI(
            model,
            guide,
            pyro.optim.Adam({"lr": 1e-3}),
            elbo(num_particles=particles, vectorize_particles=True, max_plate_nesting=1),
        )
        self.block(5)  # set-up and warm-up

    def block(self, steps: int) -> float:
        start = _clock()
        for _ in range(steps):
            self.svi.step()
        return (_clock() - start) / steps


def _fit_options(particles: int, jit: bool | str) -> dict[str, Any]:
    """The options of every timed ``flowguide.fit`` call (no progress bar, no early stop)."""
    return {
        "num_particles": particles,
        "progress": False,
        "patience": 0,
        "lr": 1e-3,
        "init": None,
        "jit": jit,
    }


class _OurSteps:
    """flowguide's route: ``flowguide.fit`` for a block of steps (the loop itself, as a user
    runs it, the parameter average included; its per-call set-up is paid once per block). The
    MAP start of ``init="auto"`` is a one-off search before the first step, not a step's cost,
    and would move the guide at every block: ``init=None`` here. With ``jit=True`` each block
    is one ``fit(..., jit=True)`` of ``jit_steps`` steps, its one-off compilation included."""

    def __init__(
        self,
        model: Callable[[], None],
        guide: fg.AutoFlow,
        particles: int,
        jit: bool = False,
        jit_steps: int = 500,
    ) -> None:
        self.model, self.guide, self.jit_steps = model, guide, jit_steps
        self.options = _fit_options(particles, jit)
        self.block(5)  # set-up and warm-up

    def block(self, steps: int) -> float:
        steps = self.jit_steps if self.options["jit"] else steps
        start = _clock()
        fg.fit(self.model, self.guide, num_steps=steps, **self.options)
        return (_clock() - start) / steps


class _OurCompiledSteps:
    """flowguide's route with ``fit(..., jit="compile")``: each block is one fit, its steps
    timed from step ``warm`` to its end through ``fit``'s ``callback`` (the steady step, after
    the one-off compilation); the compilations' wall times are kept, the first apart (with
    an empty TorchInductor cache, ``TORCHINDUCTOR_CACHE_DIR`` set to a new folder, it is a
    user's first compilation; later fits of the same graph hit the cache)."""

    def __init__(
        self, model: Callable[[], None], guide: fg.AutoFlow, particles: int, warm: int = 20
    ) -> None:
        self.model, self.guide, self.warm = model, guide, warm
        self.options = _fit_options(particles, "compile")
        self.compile_seconds: list[float] = []
        self.block(5)  # set-up, warm-up and the first compilation
        self.first_compile = self.compile_seconds.pop()

    def block(self, steps: int) -> float:
        marks: dict[int, float] = {}
        last = self.warm + steps - 1

        def mark(step: int, _: float) -> None:
            if step in (self.warm - 1, last):
                marks[step] = _clock()

        result = fg.fit(self.model, self.guide, num_steps=last + 1, callback=mark, **self.options)
        self.compile_seconds.append(result.compile_seconds)
        return (marks[last] - marks[self.warm - 1]) / steps


def _time_runners(
    runners: dict[str, _OurSteps | _OurCompiledSteps | _PyroSteps],
    steps: int,
    repeats: int,
    rng: random.Random,
) -> dict[str, float]:
    """Median ms per step of each runner, their blocks interleaved in a random order per
    repeat, so that load drifts on a shared machine hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        order = list(runners.items())
        rng.shuffle(order)
        for name, runner in order:
            times[name].append(runner.block(steps))
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _pyro_jit_fails(model: Callable[[], None], guide: Callable, particles: int) -> str:
    """Pyro's ``JitTrace_ELBO`` with Pyro's flow guide: '' where it runs, else its error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _PyroSteps(model, guide, particles, jit=True)
    except Exception as error:  # any failure is the finding
        where = traceback.extract_tb(error.__traceback__)[-1]
        return f"{type(error).__name__} at {Path(where.filename).name}:{where.lineno}"
    return ""


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50, help="steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None, help="also write the table to this file")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--jit-steps",
        type=int,
        default=500,
        help="steps of each fit(jit=True) block (its one-off compilation is included)",
    )
    parser.add_argument("--no-jit", action="store_true", help="skip the fit(jit=True) rows")
    parser.add_argument(
        "--no-compile", action="store_true", help='skip the fit(jit="compile") columns'
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: the calling thread's CPU time, which other jobs on a "
        "shared machine do not inflate (needs --threads 1)",
    )
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1: other threads' work would not count")
    global _clock
    _clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    steps, repeats = (5, 2) if args.quick else (args.steps, args.repeats)
    if args.quick:
        args.jit_steps = 20
    torch.manual_seed(0)
    rng = random.Random(0)

    rows = [
        "| model | family | layers, hidden | flowguide ms/step | flowguide jit ms/step "
        "| flowguide compile ms/step | compile s (first, later) | Pyro ms/step | Pyro / flowguide "
        "| Pyro / flowguide jit | Pyro / flowguide compile |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    failures: set[str] = set()
    for name, (model, dim) in MODELS.items():
        hidden = [max(3 * dim + 1, 16)]
        layers = 2
        cases = {
            "IAF": (
                functools.partial(fg.AutoIAF, num_flows=layers, hidden=hidden),
                functools.partial(AutoIAFNormal, hidden_dim=hidden, num_transforms=layers),
            ),
            "NSF": (
                # equal architecture: Pyro's spline layers only (no closing affine layer), and
                # Pyro's bound of 3
                functools.partial(
                    fg.AutoNeuralSpline, num_flows=layers, hidden=hidden, bound=3.0, affine=False
                ),
                functools.partial(
                    AutoNormalizingFlow,
                    init_transform_fn=functools.partial(
                        iterated,
                        layers,
                        spline_autoregressive,
                        hidden_dims=hidden,
                    ),
                ),
            ),
        }
        for family, (ours, theirs) in cases.items():
            pyro.clear_param_store()
            failed = _pyro_jit_fails(model, theirs(model), args.particles)
            if failed:
                failures.add(f"{family}: {failed}")
            pyro.clear_param_store()
            guide = ours(model)
            runners: dict[str, _OurSteps | _OurCompiledSteps | _PyroSteps] = {
                "ours": _OurSteps(model, guide, args.particles),
                "pyro": _PyroSteps(model, theirs(model), args.particles),
            }
            if not args.no_jit:  # the same guide, fitted on with jit=True
                runners["jit"] = _OurSteps(
                    model, guide, args.particles, jit=True, jit_steps=args.jit_steps
                )
            compiled = None
            # the same guide again, with jit="compile" (a smoke run: the first model only, as
            # each first compilation takes seconds)
            if not args.no_compile and not (args.quick and name != next(iter(MODELS))):
                try:
                    compiled = _OurCompiledSteps(model, guide, args.particles)
                    runners["compile"] = compiled
                except RuntimeError as error:  # torch.compile cannot build here
                    failures.add(f"{family} compile: {str(error).splitlines()[0]}")
            t = _time_runners(runners, steps, repeats, rng)
            jit = (f"{t['jit']:.2f}", f"{t['pyro'] / t['jit']:.2f}") if "jit" in t else ("-",) * 2
            comp = ("-",) * 3
            if compiled is not None:
                seconds = statistics.median(compiled.compile_seconds)
                comp = (
                    f"{t['compile']:.2f}",
                    f"{compiled.first_compile:.1f}, {seconds:.1f}",
                    f"{t['pyro'] / t['compile']:.2f}",
                )
            rows.append(
                f"| {name} | {family} | {layers} x {hidden} | {t['ours']:.2f} | {jit[0]} | "
                f"{comp[0]} | {comp[1]} | {t['pyro']:.2f} | {t['pyro'] / t['ours']:.2f} | "
                f"{jit[1]} | {comp[2]} |"
            )
            print(rows[-1], flush=True)
    if failures:
        rows.append("")
        rows.append(
            "Failures (Pyro's JitTrace_ELBO with the same Pyro guides; flowguide's "
            'jit="compile" where torch.compile cannot build): ' + "; ".join(sorted(failures))
        )
    table = "\n".join(rows)
    header = (
        f"SVI step, {args.particles} particles (vectorised), float32, CPU, "
        f"torch {torch.__version__}, pyro {pyro.__version__}, {torch.get_num_threads()} threads, "
        f"clock: {args.clock}"
    )
    text = header + "\n\n" + table
    print("\n" + text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
