"""Shared fixtures: the transform registry, a ``--device`` option, and parameter randomisation."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

from flowguide import transforms as T


def pytest_configure(config: pytest.Config) -> None:
    # The tests use tiny tensors, where a second intra-op thread only adds synchronisation (and
    # on a busy 2-core machine, spinning); one thread is faster and gives repeatable timings.
    torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="torch device for the transform tests")


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return torch.device(name)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@dataclass(frozen=True)
class Entry:
    """A registry entry: how to build a flow and what its Jacobian must look like."""

    make: Callable[[], T.Flow]
    dim: int
    context_dim: int = 0
    # "dense", "autoregressive" (triangular in the flow's order), "coupling" (block), "diagonal"
    pattern: str = "dense"
    # whether the flow is the identity at initialisation (a permutation is not)
    identity: bool = True


def _made_order(dim: int) -> list[int]:
    g = torch.Generator().manual_seed(dim)
    return torch.randperm(dim, generator=g).tolist()


REGISTRY: dict[str, Entry] = {
    "planar-d1": Entry(lambda: T.Planar(1), 1),
    "planar-d4": Entry(lambda: T.Planar(4), 4),
    "planar-d3-ctx2": Entry(lambda: T.Planar(3, context_dim=2, hidden=(8,)), 3, 2),
    "radial-d1": Entry(lambda: T.Radial(1), 1),
    "radial-d4": Entry(lambda: T.Radial(4), 4),
    "radial-d3-ctx2": Entry(lambda: T.Radial(3, context_dim=2, hidden=(8,)), 3, 2),
    "iaf-d1": Entry(lambda: T.AffineAutoregressive(1, hidden=(8,)), 1, 0, "autoregressive"),
    "iaf-d5-order": Entry(
        lambda: T.AffineAutoregressive(5, hidden=(16, 16), order=_made_order(5)),
        5,
        0,
        "autoregressive",
    ),
    "iaf-d4-ctx3": Entry(
        lambda: T.AffineAutoregressive(4, hidden=(16,), context_dim=3), 4, 3, "autoregressive"
    ),
    "nsf-ar-d1": Entry(
        lambda: T.SplineAutoregressive(1, bins=4, hidden=(8,)), 1, 0, "autoregressive"
    ),
    "nsf-ar-d4-order": Entry(
        lambda: T.SplineAutoregressive(4, bins=5, bound=2.0, hidden=(16,), order=_made_order(4)),
        4,
        0,
        "autoregressive",
    ),
    "nsf-ar-d3-ctx2": Entry(
        lambda: T.SplineAutoregressive(3, bins=6, hidden=(16,), context_dim=2),
        3,
        2,
        "autoregressive",
    ),
    "nsf-coupling-d2": Entry(lambda: T.SplineCoupling(2, bins=4, hidden=(8,)), 2, 0, "coupling"),
    "nsf-coupling-d5-ctx3": Entry(
        lambda: T.SplineCoupling(5, bins=6, hidden=(16,), context_dim=3, split=2), 5, 3, "coupling"
    ),
    "affine-d3": Entry(lambda: T.ElementwiseAffine(3), 3, 0, "diagonal"),
    "permute-d4": Entry(lambda: T.Permute(4, [2, 0, 3, 1]), 4, 0, "permutation", identity=False),
    "compose-d3": Entry(
        lambda: T.Compose(
            [
                T.Planar(3),
                T.AffineAutoregressive(3, hidden=(8,)),
                T.Radial(3),
                T.SplineCoupling(3, hidden=(8,)),
                T.ElementwiseAffine(3),
            ]
        ),
        3,
    ),
    "compose-d3-ctx2": Entry(
        lambda: T.Compose(
            [
                T.SplineAutoregressive(3, hidden=(8,), context_dim=2),
                T.Permute(3),
                T.Planar(3, context_dim=2, hidden=(8,)),
                T.AffineAutoregressive(3, hidden=(8,)),
            ]
        ),
        3,
        2,
        identity=False,
    ),
}


def randomize(flow: torch.nn.Module, scale: float = 0.5, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its (identity) initialisation, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.dim() == 2:
                noise = noise / p.shape[1] ** 0.5
            p.add_((scale * noise).to(p))
    return flow


def build(
    name: str,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    random: bool = True,
    seed: int = 0,
) -> T.Flow:
    torch.manual_seed(seed)
    flow = REGISTRY[name].make()
    if random:
        randomize(flow, seed=seed)
    return flow.to(device=device, dtype=dtype)


def bind(flow: T.Flow, context: torch.Tensor | None):
    """The plain transform of a flow: itself, or its conditioned view."""
    return flow if context is None else flow.condition(context)


def load_vae_example() -> ModuleType:
    """``examples/vae.py`` imported as a module (its parser, VAE and helpers, for tests)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "vae.py"
    spec = importlib.util.spec_from_file_location("vae_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
