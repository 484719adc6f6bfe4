"""Every public class and function documents itself: a docstring with a doctested example (run by
``--doctest-modules``) and, where it implements something from the literature, its reference."""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = [
    "flowguide",
    "flowguide.transforms",
    "flowguide.nn",
    "flowguide.guides",
    "flowguide.train",
    "flowguide.diagnostics",
    "flowguide.neutra",
    "flowguide.amortized",
    "flowguide.distributed",
    "flowguide.cli",
]

# helpers with nothing from the literature to cite (argument checks, plumbing, I/O, the CLI)
NO_REFERENCE = {
    "BoundFlow",
    "FitResult",
    "FitCheck",
    "NoModeError",
    "ImportanceWeightWarning",
    "VectorizationWarning",
    "check_hidden",
    "check_order",
    "default_hidden",
    "plate_nesting",
    "unbatched_sites",
    "robust_init",
    "constrain_latent",
    "load_checkpoint",
    "khat_reading",
    "to_inference_data",
    "DistributedContext",
    "ShardedBatches",
    "average_gradients",
    "default_backend",
    "init_distributed",
    "launched_by_torchrun",
    "parameter_spread",
    "shard_slice",
    "step_seed",
    "main",
    "MLP",
    "MaskedLinear",
    "Permute",
    "Compose",
    "ElementwiseAffine",
    "Flow",
}
CITATION = ("Reference", "arXiv", "et al.")


def _public() -> list[tuple[str, str, object]]:
    seen: set[int] = set()
    out = []
    for module in MODULES:
        mod = importlib.import_module(module)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or id(obj) in seen:
                continue
            seen.add(id(obj))
            out.append((module, name, obj))
    return out


PUBLIC = _public()


@pytest.mark.parametrize(("module", "name", "obj"), PUBLIC, ids=[n for _, n, _ in PUBLIC])
def test_public_name_has_a_doctested_example(module, name, obj):
    doc = inspect.getdoc(obj) or ""
    assert ">>>" in doc, f"{module}.{name} has no doctested example"


@pytest.mark.parametrize(("module", "name", "obj"), PUBLIC, ids=[n for _, n, _ in PUBLIC])
def test_public_name_cites_its_reference(module, name, obj):
    if name in NO_REFERENCE:
        pytest.skip("plumbing: nothing to cite")
    doc = inspect.getdoc(obj) or ""
    assert any(c in doc for c in CITATION), f"{module}.{name} cites no reference"
