"""Checks of the posteriordb Pyro models in ``benchmarks/posteriordb.py``.

The posteriordb data are not part of the repository. The tests look for them in
``$FLOWGUIDE_POSTERIORDB`` or in ``shared/posteriordb`` next to the repository root, and are
skipped when neither exists.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import math
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _find_root() -> Path | None:
    candidates = [os.environ.get("FLOWGUIDE_POSTERIORDB"), REPO.parent / "shared" / "posteriordb"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def _load_module() -> ModuleType:
    name = "flowguide_benchmarks_posteriordb"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "posteriordb.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


ROOT = _find_root()
pdb = _load_module()
NAMES = sorted(pdb.POSTERIORS)

pytestmark = pytest.mark.skipif(
    ROOT is None, reason="posteriordb data not found (set FLOWGUIDE_POSTERIORDB)"
)


@functools.cache
def _check(name: str):
    return pdb.check_posterior(name, ROOT, num_draws=20)


@pytest.mark.parametrize("name", NAMES)
def test_dimension_matches_model_md(name: str) -> None:
    result = _check(name)
    assert result.unconstrained_dim == result.expected_dim


@pytest.mark.parametrize("name", NAMES)
def test_log_density_finite_at_reference(name: str) -> None:
    result = _check(name)
    assert math.isfinite(result.log_density_at_mean)
    if result.draw_log_densities is not None:
        assert torch.isfinite(result.draw_log_densities).all()
        # the vectorised evaluation agrees with the one-draw-at-a-time evaluation
        assert result.batch_mismatch < 1e-8
        # extract() inverts sites_from_reference()
        assert result.roundtrip_error < 1e-8


def test_reference_mean_beats_prior_draw_for_most() -> None:
    losers = [name for name in NAMES if not _check(name).mean_beats_prior_draw]
    assert len(losers) <= 2, losers


@pytest.mark.parametrize("name", NAMES)
def test_extract_covers_reference_names(name: str) -> None:
    posterior = pdb.load_posterior(name, ROOT)
    sites = {k: v.unsqueeze(0) for k, v in posterior.reference_mean_sites().items()}
    extracted = posterior.extract(sites)
    assert list(extracted) == list(posterior.reference)
    for key, (mean, _) in posterior.reference.items():
        assert extracted[key].shape == (1,)
        assert float(extracted[key][0]) == pytest.approx(mean, rel=1e-9, abs=1e-9)


def test_dimensions_match_posteriordb_index() -> None:
    index = ROOT / "reference_posteriors_index.csv"
    if not index.is_file():
        pytest.skip("no reference_posteriors_index.csv")
    column = "unconstrained_dim(parsed from Stan parameters block)"
    with index.open(newline="") as handle:
        dims = {row["posterior"]: int(row[column]) for row in csv.DictReader(handle)}
    for name in NAMES:
        assert _check(name).unconstrained_dim == dims[name], name


def test_deterministic_sites_agree_with_extract() -> None:
    for name in [
        "eight_schools-eight_schools_noncentered",
        "gp_pois_regr-gp_pois_regr",
        "garch-garch11",
    ]:
        posterior = pdb.load_posterior(name, ROOT)
        sites = posterior.reference_mean_sites()
        trace = pdb.poutine.trace(pdb.poutine.condition(posterior.model, data=sites)).get_trace()
        extracted = posterior.extract({k: v.unsqueeze(0) for k, v in sites.items()})
        recorded = {
            k: trace.nodes[k]["value"].unsqueeze(0)
            for k in posterior.spec.params
            if k in trace.nodes and k not in sites
        }
        assert recorded, name
        flat = pdb._flatten(recorded, {k: posterior.spec.params[k] for k in recorded})
        for key, value in flat.items():
            assert torch.allclose(value, extracted[key], rtol=1e-10, atol=1e-12), (name, key)


def test_eight_schools_forms_differ_by_the_jacobian() -> None:
    """Centred and noncentred forms give one posterior: log p_c - log p_nc = -8 log tau + c."""
    centered = pdb.load_posterior("eight_schools-eight_schools_centered", ROOT)
    noncentered = pdb.load_posterior("eight_schools-eight_schools_noncentered", ROOT)
    draws = pdb.load_reference_draws(centered.name, ROOT)
    subset = {k: draws[k][:200] for k in centered.reference}
    lp_c = pdb.batch_log_density(centered.model, centered.sites_from_reference(subset))
    lp_nc = pdb.batch_log_density(noncentered.model, noncentered.sites_from_reference(subset))
    offset = lp_c - lp_nc + 8 * subset["tau"].log()
    assert float(offset.max() - offset.min()) < 1e-9


def test_models_train_with_vectorized_particles() -> None:
    """One SVI step of AutoNormal with vectorised particles runs on every model."""
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal
    from pyro.infer.autoguide.initialization import init_to_value
    from pyro.optim import Adam

    for name in NAMES:
        posterior = pdb.load_posterior(name, ROOT)
        pdb.pyro.clear_param_store()
        init = init_to_value(values=posterior.reference_mean_sites())
        guide = AutoNormal(posterior.model, init_loc_fn=init, init_scale=1e-3)
        elbo = Trace_ELBO(num_particles=3, vectorize_particles=True)
        svi = SVI(posterior.model, guide, Adam({"lr": 1e-3}), elbo)
        loss = svi.step()
        assert math.isfinite(loss), name
    pdb.pyro.clear_param_store()
