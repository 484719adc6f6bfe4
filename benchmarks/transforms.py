r"""Speed of flowguide's flow transforms against Pyro's (and zuko's) at equal architecture.

What it measures
----------------
For every family (planar, radial, affine autoregressive, rational-quadratic spline
autoregressive, rational-quadratic spline coupling), every dimension ``D`` in ``--dims`` and a
batch of ``--batch`` float32 vectors on the CPU, the wall time of one optimisation step of two
kinds:

* ``density``: a density-fitting step. A fresh batch ``y ~ N(0, I)`` is drawn (outside the timer;
  a new tensor each step, so no transform cache can hit), then, timed:
  ``TransformedDistribution(base, [flow]).log_prob(y).mean().backward()`` and zeroing the
  gradients. This runs the flow's *inverse* (for the autoregressive flows: ``D`` network passes).
* ``sample``: the path a variational guide takes. Timed:
  ``d.rsample((batch,))``, ``d.log_prob(sample)``, ``.mean().backward()`` and zeroing the
  gradients. This runs the flow's *forward* map; ``log_prob`` of the value just sampled is a
  cache hit for flowguide and Pyro.

Peers, built with the same hidden widths, bins (8) and bound (3): Pyro's ``planar``, ``radial``,
``affine_autoregressive``, ``SplineAutoregressive`` / ``SplineCoupling`` with
``order="quadratic"`` (flowguide's spline is rational-quadratic), plus extra rows for Pyro's
helper defaults (``order="linear"`` linear-rational splines; the coupling helper also splines the
pass-through half); and, when zuko imports, zuko's ``MAF`` and ``NSF`` with one transform (zuko's
``flow()`` gives the distribution; its density is one network pass and its sampling ``D``
passes, the opposite of flowguide's and Pyro's direction). Pyro's planar and radial flows have no
inverse, so their density step is reported as "n/a (no inverse)".

Every parameter of every implementation is perturbed by ``N(0, 0.05^2)`` noise after
construction, so no flow sits at its identity initialisation (which would flatter planar's
Newton inverse). Pyro's argument validation is switched off for all runs (it checks supports,
not transforms).

Protocol: ``--warmup`` rounds (one step of every implementation) are discarded (only one when a
round takes over a quarter of ``--cell-budget``). Then flowguide and its Pyro peers run
round-robin, in a freshly shuffled (seeded) order each round, so that load drifts hit them alike
and none systematically runs right after another (a step right after a memory-hungry one pays
for its aftermath: about 0.3 ms after a zuko sampling step at D = 10); zuko is timed afterwards,
in a block of its own. The median of each implementation's timed steps is reported, and for
the ratio a 95% bootstrap interval (each implementation's steps resampled 2,000 times): an
interval that straddles 1 is a tie within this run's noise. Each gets
``--repeats`` timed steps, fewer (never below 3) when they would exceed its share of
``--cell-budget`` seconds, so a slow peer does not starve the others; the table's last column
gives the counts (flowguide/pyro[/zuko]).
``torch.set_num_threads`` is left at its default unless ``--threads`` is given (printed in
the header either way, with the load average: on a shared machine, two OpenMP threads that
spin-wait for a descheduled partner inflate every timing, ``--threads 1`` is steadier).
``--clock cpu`` (with ``--threads 1``) reads each step's time from the calling thread's CPU
clock instead of the wall clock: with one intra-op thread, and the backward of CPU tensors run
on the calling thread, that clock holds all of a step's work and none of the time the thread
spends descheduled while other jobs run, so ratios stay put on a busy machine.

Hidden widths: ``(w, w)`` with ``w = min(10 * D, --max-hidden)`` (default cap 256). ``10 * D`` is
both libraries' default for the spline flows; the cap keeps the ``D``-pass inverses at ``D = 100``
within the time budget.

Run::

    python benchmarks/transforms.py                     # full: dims 10 and 100 (about 5 min)
    python benchmarks/transforms.py --threads 1         # steadier on a machine shared with others
    python benchmarks/transforms.py --threads 1 --clock cpu   # CPU time: immune to other jobs
    python benchmarks/transforms.py --quick             # dim 10, few repeats (under a minute)
    python benchmarks/transforms.py --output table.md   # also write the table to a file

Read the ratio column as ``pyro ms / flowguide ms``: above 1 flowguide is faster.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.nn import AutoRegressiveNN, DenseNN
from torch import Tensor, nn

import flowguide
from flowguide.transforms import (
    AffineAutoregressive,
    Planar,
    Radial,
    SplineAutoregressive,
    SplineCoupling,
)

try:
    import zuko
    from zuko.transforms import MonotonicRQSTransform
except ImportError:  # zuko is optional
    zuko = None

BINS = 8
BOUND = 3.0
NOISE = 0.05
FAMILIES = ("planar", "radial", "affine_autoregressive", "spline_autoregressive", "spline_coupling")
STEPS = ("density", "sample")


@dataclass
class Impl:
    """One implementation of a flow: its module and its two timed steps (``None``: no such
    step, e.g. no inverse)."""

    name: str
    module: nn.Module
    density: Callable[[Tensor], Tensor] | None
    sample: Callable[[int], Tensor] | None
    times: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Row:
    family: str
    dim: int
    step: str
    ours_ms: float
    peer: str
    peer_ms: float | None
    zuko_ms: float | None
    reps: str
    ratio_ci: tuple[float, float] | None = None


# -- construction ----------------------------------------------------------------------------


def _perturb(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen), alpha=NOISE)
    return module


def _base(dim: int) -> dist.Distribution:
    return dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)


def _torch_impl(name: str, flow: nn.Module, dim: int, has_inverse: bool = True) -> Impl:
    """An implementation used through ``pyro.distributions.TransformedDistribution``."""
    base = _base(dim)

    def density(y: Tensor) -> Tensor:
        return dist.TransformedDistribution(base, [flow]).log_prob(y)

    def sample(n: int) -> Tensor:
        d = dist.TransformedDistribution(base, [flow])
        return d.log_prob(d.rsample((n,)))

    return Impl(name, flow, density if has_inverse else None, sample)


def _zuko_impl(flow: nn.Module) -> Impl:
    def density(y: Tensor) -> Tensor:
        return flow().log_prob(y)

    def sample(n: int) -> Tensor:
        d = flow()
        return d.log_prob(d.rsample((n,)))

    return Impl("zuko", flow, density, sample)


def _zuko_nsf(dim: int, hidden: tuple[int, ...], passes: int | None = None) -> nn.Module:
    # zuko.flows.NSF fixes the spline's bound at 5; set ours (3) on its one transform
    flow = zuko.flows.NSF(dim, bins=BINS, transforms=1, passes=passes, hidden_features=hidden)
    for t in flow.transform.transforms:
        t.univariate = functools.partial(MonotonicRQSTransform, bound=BOUND, slope=1e-3)
    return flow


def build(family: str, dim: int, hidden: tuple[int, ...]) -> list[Impl]:
    """flowguide first, then Pyro's equal-architecture peer, then extra Pyro rows, then zuko."""
    torch.manual_seed(0)
    h = list(hidden)
    impls: list[Impl] = []
    if family == "planar":
        impls.append(_torch_impl("flowguide", Planar(dim), dim))
        impls.append(_torch_impl("pyro", T.planar(dim), dim, has_inverse=False))
    elif family == "radial":
        impls.append(_torch_impl("flowguide", Radial(dim), dim))
        impls.append(_torch_impl("pyro", T.radial(dim), dim, has_inverse=False))
    elif family == "affine_autoregressive":
        impls.append(_torch_impl("flowguide", AffineAutoregressive(dim, hidden=hidden), dim))
        impls.append(_torch_impl("pyro", T.affine_autoregressive(dim, hidden_dims=h), dim))
        if zuko is not None:
            impls.append(_zuko_impl(zuko.flows.MAF(dim, transforms=1, hidden_features=hidden)))
    elif family == "spline_autoregressive":
        ours = SplineAutoregressive(dim, bins=BINS, bound=BOUND, hidden=hidden)
        impls.append(_torch_impl("flowguide", ours, dim))
        # pyro's helper always builds the 4 parameter groups of the linear-rational spline, so
        # spline_autoregressive(order="quadratic") fails to unpack them (pyro 1.9.2): build the
        # quadratic one from its parts, as the helper would
        arn = AutoRegressiveNN(dim, h, param_dims=[BINS, BINS, BINS - 1])
        quad = T.SplineAutoregressive(dim, arn, count_bins=BINS, bound=BOUND, order="quadratic")
        impls.append(_torch_impl("pyro", quad, dim))
        lin = T.spline_autoregressive(dim, hidden_dims=h, count_bins=BINS, bound=BOUND)
        impls.append(_torch_impl("pyro order='linear'", lin, dim))
        if zuko is not None:
            impls.append(_zuko_impl(_zuko_nsf(dim, hidden)))
    elif family == "spline_coupling":
        ours_c = SplineCoupling(dim, bins=BINS, bound=BOUND, hidden=hidden)
        impls.append(_torch_impl("flowguide", ours_c, dim))
        # equal architecture: quadratic spline, pass-through half left unchanged (identity=True)
        split, rest = dim // 2, dim - dim // 2
        net = DenseNN(split, h, param_dims=[rest * BINS, rest * BINS, rest * (BINS - 1)])
        quad_c = T.SplineCoupling(
            dim, split, net, count_bins=BINS, bound=BOUND, order="quadratic", identity=True
        )
        impls.append(_torch_impl("pyro", quad_c, dim))
        # the helper's default: linear-rational splines, and the first half splined too
        lin_c = T.spline_coupling(dim, hidden_dims=h, count_bins=BINS, bound=BOUND)
        impls.append(_torch_impl("pyro spline_coupling() default", lin_c, dim))
        if zuko is not None:
            # zuko's coupling NSF: a 2-pass masked MLP; its first half gets constant splines
            impls.append(_zuko_impl(_zuko_nsf(dim, hidden, passes=2)))
    else:
        raise ValueError(f"unknown family {family!r}")
    for i, impl in enumerate(impls):
        _perturb(impl.module, seed=1000 + i)
    return impls


# -- timing ----------------------------------------------------------------------------------


#: what a step's time is read from: wall-clock time, or the CPU time of the calling thread
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock: Callable[[], float] = time.perf_counter


def _step(impl: Impl, step: str, batch: int, dim: int) -> float:
    """One timed step, in seconds (of the clock chosen by ``--clock``)."""
    y = torch.randn(batch, dim) if step == "density" else None
    start = _clock()
    if step == "density":
        assert impl.density is not None and y is not None
        lp = impl.density(y)
    else:
        assert impl.sample is not None
        lp = impl.sample(batch)
    lp.mean().backward()
    impl.module.zero_grad(set_to_none=True)
    return _clock() - start


def time_cell(
    impls: Sequence[Impl], step: str, batch: int, dim: int, warmup: int, repeats: int, budget: float
) -> None:
    """Time one (family, dim, step) cell, filling each implementation's ``times[step]``.

    ``warmup`` discarded rounds (only 1 when a round takes over a quarter of ``budget``), then
    timed steps: flowguide and its Pyro peers round-robin, in a freshly shuffled order each
    round (seeded), so that load drifts hit them alike and none systematically runs right after
    another (a step that follows a memory-hungry one pays for its aftermath: about 0.3 ms after a
    zuko sampling step). zuko, reported in its own column, is timed afterwards, in a block of
    its own. Every implementation gets ``repeats`` timed steps, fewer (never below 3) when they
    would exceed its share of ``budget`` seconds, so a slow peer does not starve the others.
    """
    active = [i for i in impls if (i.density if step == "density" else i.sample) is not None]
    last: dict[str, float] = {}
    for w in range(max(warmup, 1)):
        for i in active:
            last[i.name] = _step(i, step, batch, dim)
        if w == 0 and sum(last.values()) > budget / 4:
            break
    share = budget / len(active)
    reps = {
        i.name: max(min(3, repeats), min(repeats, math.floor(share / last[i.name]))) for i in active
    }
    for i in active:
        i.times[step] = []
    rng = random.Random(0)
    main = [i for i in active if i.name != "zuko"]
    for r in range(max(reps[i.name] for i in main)):
        rng.shuffle(main)
        for i in main:
            if r < reps[i.name]:
                i.times[step].append(_step(i, step, batch, dim))
    for i in active:
        if i.name == "zuko":
            _step(i, step, batch, dim)  # re-warm after the others
            i.times[step] = [_step(i, step, batch, dim) for _ in range(reps[i.name])]


def _median_ms(impl: Impl, step: str) -> float | None:
    ts = impl.times.get(step)
    return None if not ts else 1e3 * statistics.median(ts)


def ratio_interval(
    peer: Sequence[float], ours: Sequence[float], resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A 95% bootstrap interval of ``median(peer) / median(ours)``: each list of timed steps
    resampled with replacement (independently: the steps were interleaved, not paired), the
    ratio of medians computed per resample, and its 2.5% and 97.5% percentiles returned."""
    rng = random.Random(seed)
    ratios = sorted(
        statistics.median(rng.choices(peer, k=len(peer)))
        / statistics.median(rng.choices(ours, k=len(ours)))
        for _ in range(resamples)
    )
    return ratios[int(0.025 * (resamples - 1))], ratios[int(0.975 * (resamples - 1))]


# -- report ----------------------------------------------------------------------------------


def _fmt(ms: float | None, missing: str = "—") -> str:
    if ms is None:
        return missing
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| family | dim | step | flowguide ms | pyro ms | ratio pyro/flowguide | ratio 95% CI "
        "| zuko ms | timed steps |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        family = r.family if r.peer == "pyro" else f"{r.family} vs {r.peer}"
        if r.peer_ms is None:
            peer, ratio = "n/a (no inverse)", "—"
        else:
            peer, ratio = _fmt(r.peer_ms), f"{r.peer_ms / r.ours_ms:.2f}"
        ci = "—" if r.ratio_ci is None else f"{r.ratio_ci[0]:.2f} - {r.ratio_ci[1]:.2f}"
        lines.append(
            f"| {family} | {r.dim} | {r.step} | {_fmt(r.ours_ms)} | {peer} | {ratio} | {ci} | "
            f"{_fmt(r.zuko_ms)} | {r.reps} |"
        )
    return "\n".join(lines)


def header(args: argparse.Namespace, load: tuple[float, float]) -> str:
    return (
        f"flowguide {getattr(flowguide, '__version__', '?')}, torch {torch.__version__}, "
        f"pyro {pyro.__version__}, zuko {getattr(zuko, '__version__', 'not installed')}; "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"batch {args.batch}, float32, CPU; hidden widths (min(10*D, {args.max_hidden}),) * 2, "
        f"bins {BINS}, bound {BOUND}; median of each implementation's timed steps after "
        f"{args.warmup} warm-up round(s); clock: {args.clock}; "
        f"load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end; "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}"
    )


def run(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    for dim in args.dims:
        hidden = (min(10 * dim, args.max_hidden),) * 2
        for family in args.families:
            impls = build(family, dim, hidden)
            for step in STEPS:
                t0 = time.perf_counter()
                time_cell(impls, step, args.batch, dim, args.warmup, args.repeats, args.cell_budget)
                ours = _median_ms(impls[0], step)
                assert ours is not None
                zuko = next((i for i in impls if i.name == "zuko"), None)
                zuko_ms = None if zuko is None else _median_ms(zuko, step)
                peers = [i for i in impls[1:] if i.name != "zuko"]
                counts = [len(i.times.get(step, [])) for i in impls]
                for k, peer in enumerate(peers):
                    n = [len(impls[0].times[step]), len(peer.times.get(step, []))]
                    if k == 0 and zuko is not None:
                        n.append(len(zuko.times[step]))
                    theirs = peer.times.get(step)
                    ci = ratio_interval(theirs, impls[0].times[step]) if theirs else None
                    rows.append(
                        Row(
                            family,
                            dim,
                            step,
                            ours,
                            peer.name,
                            _median_ms(peer, step),
                            zuko_ms if k == 0 else None,
                            "/".join(map(str, n)),
                            ci,
                        )
                    )
                print(
                    f"  {family:22s} D={dim:<4d} {step:8s} timed steps {counts} "
                    f"({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="dim 10 only, 1 warm-up, 5 repeats")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="dimensions (10 100)")
    p.add_argument("--batch", type=int, default=1024, help="batch size (1024)")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed rounds per cell (25; --quick: 5)"
    )
    p.add_argument("--warmup", type=int, default=None, help="discarded rounds per cell (2)")
    p.add_argument(
        "--cell-budget",
        type=float,
        default=20.0,
        help="seconds of timed rounds per cell; fewer repeats (>= 3) when exceeded (20)",
    )
    p.add_argument("--max-hidden", type=int, default=256, help="cap of the hidden widths (256)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's default, left alone)",
    )
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: the CPU time of the calling thread, which a shared "
        "machine's other jobs do not inflate (with --threads 1 it holds all the step's work)",
    )
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--output", default=None, help="also write the markdown table to this file")
    args = p.parse_args(argv)
    if args.dims is None:
        args.dims = [10] if args.quick else [10, 100]
    if args.repeats is None:
        args.repeats = 5 if args.quick else 25
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    return args


def main(argv: Sequence[str] | None = None) -> None:
    global _clock
    args = parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit("--clock cpu needs --threads 1: other threads' work would not count")
    _clock = CLOCKS[args.clock]
    pyro.enable_validation(False)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    rows = run(args)
    text = header(args, (load_start, os.getloadavg()[0])) + "\n\n" + table(rows) + "\n"
    print()
    print(text)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
