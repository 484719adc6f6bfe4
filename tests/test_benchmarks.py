"""Checks of the benchmark scripts' own machinery (not of any timing: no test asserts a speed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"_bench_{name}", REPO / "benchmarks" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load("transforms")


def test_ratio_interval_covers_a_tie_and_excludes_a_clear_gap(bench: ModuleType) -> None:
    import random

    rng = random.Random(1)
    ours = [1.0 + 0.05 * rng.random() for _ in range(200)]
    same = [1.0 + 0.05 * rng.random() for _ in range(200)]
    low, high = bench.ratio_interval(same, ours)
    assert low < 1.0 < high and high - low < 0.03
    slower = [2.0 * t for t in same]  # the peer takes twice as long: the ratio is near 2
    low, high = bench.ratio_interval(slower, ours)
    assert 1.9 < low <= high < 2.1


def test_ratio_interval_is_seeded(bench: ModuleType) -> None:
    ours, peer = [1.0, 1.2, 0.9, 1.1], [2.0, 2.5, 1.8, 2.2]
    assert bench.ratio_interval(peer, ours) == bench.ratio_interval(peer, ours)


def test_quick_run_prints_a_table_with_intervals(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyro

    out = tmp_path / "table.md"
    with pyro.validation_enabled():  # restores the validation flags that main switches off
        bench.main(
            ["--quick", "--families", "planar", "--repeats", "3", "--batch", "64",
             "--output", str(out)]
        )  # fmt: skip
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| planar |")]
    assert len(rows) == 2  # density (Pyro has no inverse) and sampling
    density, sample = (row.split("|")[1:-1] for row in rows)
    assert density[2].strip() == "density" and density[6].strip() == "—"
    low, high = (float(v) for v in sample[6].split(" - "))
    assert 0 < low <= float(sample[5]) <= high
    assert "ratio 95% CI" in capsys.readouterr().out
