"""Checks of the benchmark scripts: their own machinery, and a smoke run of each (``--quick``, on
the synthetic targets only, so that no test needs ``../shared``). No test asserts a speed."""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pyro
import pytest
import torch

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


@pytest.fixture
def restored() -> Iterator[None]:
    """The scripts set torch's threads, Pyro's validation flags and param store for the whole
    process, as a script may; put them back for the tests after."""
    threads = torch.get_num_threads()
    with pyro.validation_enabled():  # restores the validation flags on exit
        yield
    torch.set_num_threads(threads)
    pyro.clear_param_store()


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
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str], restored: None
) -> None:
    out = tmp_path / "table.md"
    bench.main(
        ["--quick", "--families", "planar", "--repeats", "5", "--batch", "64",
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


def test_svi_quick_run(restored: None) -> None:
    text = _load("svi").main(["--quick"])
    rows = [
        line.split("|")[1:-1]
        for line in text.splitlines()
        if "| IAF |" in line or "| NSF |" in line
    ]
    assert len(rows) == 6  # three models, two families
    for row in rows:
        ratios = [float(cell) for cell in row[8:10]]  # Pyro / flowguide, plain and jit
        assert all(math.isfinite(r) and r > 0 for r in ratios), row
    # jit="compile" on the first model only in a smoke run: its steady step and its ratio
    compiled = [row for row in rows if row[5].strip() != "-"]
    assert [row[0].strip() for row in compiled] == ["banana-3d"] * 2
    for row in compiled:
        assert float(row[5]) > 0 and float(row[10]) > 0, row


def test_accuracy_quick_run(tmp_path: Path, restored: None) -> None:
    methods = ["AutoIAF", "pyro AutoNormal"]
    root = str(tmp_path / "absent")
    rows = _load("accuracy").main(
        ["--quick", "--root", root, "--only", "banana", "--jit", "trace", "--methods", *methods]
    )
    assert [(r["target"], r["method"]) for r in rows] == [("banana-2d", m) for m in methods]
    for row in rows:
        assert "error" not in row, row
        assert math.isfinite(row["mean_err"]) and 0 < row["sd_min"] <= row["sd_max"]
    # --jit compiles flowguide's guide only (Pyro's guides keep their own loss)
    assert rows[0]["compile_s"] > 0 and rows[1]["compile_s"] == 0


def test_accuracy_init_scale_reaches_flowguide_guides_only(
    monkeypatch: pytest.MonkeyPatch, restored: None
) -> None:
    acc = _load("accuracy")
    made: list[tuple[str, dict[str, object]]] = []

    def recorder(name: str) -> object:
        build = acc.METHODS[name]

        def make(model: object, **kwargs: object) -> object:
            made.append((name, kwargs))
            return build(model, **kwargs)

        return make

    for name in ("AutoIAF", "pyro AutoNormal"):
        monkeypatch.setitem(acc.METHODS, name, recorder(name))
    target = acc.targets(None, ["banana"])[0]
    for name in ("AutoIAF", "pyro AutoNormal"):
        row = acc.run(target, name, 5, 1, 0, 100, init=None, average=0, init_scale=0.5)
        assert "error" not in row, row
    assert made == [("AutoIAF", {"init_scale": 0.5}), ("pyro AutoNormal", {})]
    with pytest.raises(SystemExit):
        acc.main(["--quick", "--init-scale", "0"])


def test_accuracy_scores_float32_draws_of_a_float64_model(restored: None) -> None:
    """Pyro's AutoIAFNormal keeps float32 parameters on a float64 model; a target whose
    ``extract`` multiplies the draws by float64 data (gp_pois_regr's does) must still score it,
    and a failure in the scoring is a row saying so, not a crashed run."""
    acc = _load("accuracy")
    data = torch.tensor([[1.0, 0.0], [0.5, 1.0]], dtype=torch.float64)

    def model() -> None:
        loc = torch.zeros(2, dtype=torch.float64)
        pyro.sample("x", pyro.distributions.Normal(loc, 1.0).to_event(1))

    def extract(s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        y = (data @ s["x"][..., None]).squeeze(-1)
        return {"y[1]": y[:, 0], "y[2]": y[:, 1]}

    ref = {"y[1]": (0.0, 1.0), "y[2]": (0.0, math.sqrt(1.25))}
    target = acc.Target("linear-2d", model, ref, extract)
    row = acc.run(target, "pyro AutoIAFNormal", 5, 1, 0, 200)
    assert "error" not in row, row
    assert math.isfinite(row["mean_err"]) and row["sd_min"] > 0

    def broken(s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise RuntimeError("no such parameter")

    failed = acc.run(acc.Target("broken-2d", model, ref, broken), "AutoIAF", 5, 1, 0, 200)
    assert failed["error"].startswith("scoring the fit: RuntimeError: no such parameter"), failed
    assert "failed: scoring the fit" in acc._fmt(failed)


def test_accuracy_fit_budget_leaves_the_budget_to_fit(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    restored: None,
) -> None:
    acc = _load("accuracy")
    quick = ["--quick", "--root", str(tmp_path / "absent"), "--only", "banana"]
    fit = acc.fg.fit
    calls: list[dict[str, object]] = []

    @functools.wraps(fit)  # the script reads fit's defaults from its signature
    def recording_fit(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return fit(*args, **{**kwargs, "num_steps": 5})  # a short fit for the test

    monkeypatch.setattr(acc.fg, "fit", recording_fit)
    rows = acc.main([*quick, "--fit-budget", "--methods", "AutoIAF"])
    assert "error" not in rows[0], rows[0]
    assert not {"num_steps", "num_particles", "patience"} & set(calls[0]), calls[0]
    assert rows[0]["steps"] == 5
    header = (
        "fit's budget: steps 5000 at most (patience 3), lr 0.01 decaying to x0.01, particles "
        "fit's default (16 for"
    )
    assert header in capsys.readouterr().out
    acc.main([*quick, "--methods", "AutoIAF"])
    assert calls[1]["num_steps"] == 200 and calls[1]["patience"] == 0, calls[1]


def test_neutra_quick_run(tmp_path: Path, restored: None) -> None:
    methods = ["ManyChainHMC (AutoIAF)", "pyro NeuTraReparam (AutoIAFNormal)"]
    rows = _load("neutra").main(
        ["--quick", "--root", str(tmp_path / "absent"), "--methods", *methods]
    )
    assert [(r["target"], r["method"]) for r in rows] == [("funnel-10d", m) for m in methods]
    for row in rows:
        assert "error" not in row, row
        assert row["grad_evals"] > 0 and row["min_ess"] > 0 and row["divergences"] >= 0


def test_particle_cost_times_every_count_and_names_a_failure(
    tmp_path: Path,
    restored: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    particles = _load("particles")
    args = ["--root", str(tmp_path / "absent"), "--rounds", "1", "--steps", "2"]
    rows = particles.main([*args, "--only", "banana", "--particles", "1", "3"])
    assert [r["target"] for r in rows] == ["banana-2d"]
    assert set(rows[0]["ms"]) == {1, 3} and all(v > 0 for v in rows[0]["ms"].values())
    assert rows[0]["ratio"][1] == 1.0
    assert rows[0]["ratio"][3] == rows[0]["ms"][3] / rows[0]["ms"][1]
    assert "| banana-2d |" in capsys.readouterr().out
    quick = particles.main(["--root", str(tmp_path / "absent"), "--quick"])
    assert [r["target"] for r in quick] == ["banana-2d", "funnel-10d"]
    assert all(set(r["ms"]) == {1, 4, 16} for r in quick)

    def unplated() -> None:  # data outside any plate: it cannot take a batch of draws
        loc = pyro.sample("loc", pyro.distributions.Normal(0.0, 1.0))
        pyro.sample("obs", pyro.distributions.Normal(loc, 1.0), obs=torch.tensor([0.0, 1.0]))

    assert particles.step_times(unplated, [1], rounds=1, steps=1)[1] > 0
    with pytest.raises(ValueError):
        particles.step_times(unplated, [2], rounds=1, steps=1)
    with pytest.raises(SystemExit):
        particles.main([*args, "--particles", "0"])
    capsys.readouterr()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(particles, "step_times", broken)  # a failed target is a row, not a crash
    assert particles.main([*args, "--only", "banana"]) == [
        {"target": "banana-2d", "error": "RuntimeError: boom"}
    ]
    assert "| banana-2d | failed: RuntimeError: boom |" in capsys.readouterr().out


def test_energy_targets_have_the_right_reference_moments() -> None:
    """Rezende & Mohamed's U1 to U4 on the box: the grid moments against closed forms where there
    are some (U2's z1 is uniform on the box; U1 is symmetric in both coordinates) and against a
    self-normalised importance estimate from uniform draws elsewhere."""
    acc = _load("accuracy")
    box = acc.ENERGY_BOX
    u2 = acc.energy_moments(acc.ENERGIES["U2"])
    assert abs(u2["z[1]"][0]) < 1e-9 and abs(u2["z[1]"][1] - 2 * box / math.sqrt(12)) < 1e-5
    u1 = acc.energy_moments(acc.ENERGIES["U1"])
    assert abs(u1["z[1]"][0]) < 1e-9 and abs(u1["z[2]"][0]) < 1e-9
    gen = torch.Generator().manual_seed(0)
    z = (torch.rand(400_000, 2, generator=gen, dtype=torch.float64) * 2 - 1) * box
    for name, energy in acc.ENERGIES.items():
        ref = acc.energy_moments(energy)
        w = torch.softmax(-energy(z), 0)
        for i in range(2):
            mean = (w * z[:, i]).sum().item()
            sd = (w * (z[:, i] - mean) ** 2).sum().sqrt().item()
            want_mean, want_sd = ref[f"z[{i + 1}]"]
            assert abs(mean - want_mean) < 0.02 * want_sd, (name, i, mean, want_mean)
            assert abs(sd / want_sd - 1) < 0.02, (name, i, sd, want_sd)
    # the model's log density is -U (up to a constant) inside the box
    target = next(t for t in acc.targets(None, ["U3"]) if t.name == "U3-2d")
    point = torch.tensor([0.5, -1.0], dtype=torch.float64)
    trace = pyro.poutine.trace(pyro.poutine.condition(target.model, {"z": point})).get_trace()
    other = pyro.poutine.trace(
        pyro.poutine.condition(target.model, {"z": torch.zeros(2, dtype=torch.float64)})
    ).get_trace()
    delta = trace.log_prob_sum() - other.log_prob_sum()
    want = acc.ENERGIES["U3"](torch.zeros(2, dtype=torch.float64)) - acc.ENERGIES["U3"](point)
    assert torch.allclose(delta, want)
