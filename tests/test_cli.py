"""The ``flowguide`` command line and its demo: the energy functions, the quadrature, the table
and a short end-to-end run."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pyro import poutine

from flowguide import cli


def _bumps(a: float, b: float) -> float:
    return -math.log(math.exp(-0.5 * a * a) + math.exp(-0.5 * b * b))


@pytest.mark.parametrize(
    ("energy", "z", "expected"),
    [
        # U1: on the ring at the modes (z1 = +-2) the energy is -log(1 + e^{-(4/0.6)^2/2})
        (cli.u1, (2.0, 0.0), _bumps(0.0, 4 / 0.6)),
        (cli.u1, (0.0, 2.0), _bumps(2 / 0.6, 2 / 0.6)),
        (cli.u1, (0.0, 0.0), 0.5 * (2 / 0.4) ** 2 + _bumps(2 / 0.6, 2 / 0.6)),
        (cli.u1, (-1.0, 3.0), 0.5 * ((math.sqrt(10) - 2) / 0.4) ** 2 + _bumps(-3 / 0.6, 1 / 0.6)),
        # U2: zero on the wave z2 = sin(pi z1 / 2)
        (cli.u2, (1.0, 1.0), 0.0),
        (cli.u2, (0.0, 0.4), 0.5),
        (cli.u2, (-1.0, 0.0), 0.5 * (1 / 0.4) ** 2),
        # U3 at z1 = 1: w1 = 1, w2 = 3
        (cli.u3, (1.0, -0.5), _bumps(-1.5 / 0.35, 1.5 / 0.35)),
        (
            cli.u3,
            (0.5, 0.0),
            _bumps(
                -math.sin(math.pi / 4) / 0.35,
                (-math.sin(math.pi / 4) + 3 * math.exp(-0.5 * (0.5 / 0.6) ** 2)) / 0.35,
            ),
        ),
        # U4 at z1 = 1: w1 = 1, w3 = 3 sigmoid(0) = 1.5
        (cli.u4, (1.0, 0.25), _bumps(-0.75 / 0.4, 0.75 / 0.35)),
        (cli.u4, (2.0, 0.0), _bumps(0.0, 3 / (1 + math.exp(-1 / 0.3)) / 0.35)),
    ],
)
def test_energy_values(energy, z, expected):
    value = energy(torch.tensor(z, dtype=torch.float64))
    assert value.item() == pytest.approx(expected, abs=1e-9)


def test_energies_broadcast_over_batches():
    z = torch.randn(3, 4, 2)
    for energy in (cli.u1, cli.u2, cli.u3, cli.u4):
        values = energy(z)
        assert values.shape == (3, 4)
        assert torch.allclose(values[1, 2], energy(z[1, 2]))


def test_grid_moments_of_a_gaussian():
    m = cli.grid_moments(
        lambda z: -0.5 * (((z - torch.tensor([0.5, -1.0], dtype=z.dtype)) / 0.8) ** 2).sum(-1),
        n=801,
    )
    assert m.mean == pytest.approx((0.5, -1.0), abs=1e-6)
    assert m.sd == pytest.approx((0.8, 0.8), abs=1e-6)
    assert m.log_z == pytest.approx(math.log(2 * math.pi * 0.8**2), abs=1e-6)


def test_u2_truth_is_analytic():
    # U2 + wall: z1 has density e^{-(z1/4)^8}, z2 | z1 ~ N(w1(z1), 0.4^2):
    # Z = 8 Gamma(9/8) sqrt(2 pi) 0.4, Var z1 = 16 Gamma(3/8) / Gamma(1/8)
    truth = cli.make_targets()["U2"].truth
    log_z = math.log(8 * math.gamma(9 / 8) * math.sqrt(2 * math.pi) * 0.4)
    assert truth.log_z == pytest.approx(log_z, abs=1e-4)
    assert truth.sd[0] == pytest.approx(4 * math.sqrt(math.gamma(3 / 8) / math.gamma(1 / 8)), 1e-4)
    assert truth.mean == pytest.approx((0.0, 0.0), abs=1e-8)


def test_funnel_points_and_packing_round_trip():
    target = cli.make_targets()["funnel"]
    samples = {"y": torch.tensor([1.0, 2.0]), "x": torch.tensor([-3.0, 4.0])}
    points = target.points(samples)
    assert points.tolist() == [[-3.0, 1.0], [4.0, 2.0]]  # plot coordinates (x, y)
    assert target.pack(points, ["y", "x"]).tolist() == [[1.0, -3.0], [2.0, 4.0]]
    # the model's density agrees with the target's
    trace = poutine.trace(
        poutine.condition(target.model, data={"y": torch.tensor(1.0), "x": torch.tensor(-3.0)})
    ).get_trace()
    assert trace.log_prob_sum().item() == pytest.approx(
        target.log_density(torch.tensor([-3.0, 1.0])).item(), abs=1e-5
    )


def test_energy_models_match_their_densities():
    z = torch.tensor([0.3, -1.2])
    for target in list(cli.make_targets().values())[:4]:
        model = poutine.condition(target.model, data={"z": z})
        trace = poutine.trace(model).get_trace()
        assert trace.log_prob_sum().item() == pytest.approx(target.log_density(z).item(), 1e-5)


def test_format_table_aligns_and_separates_targets():
    rows = [
        cli.Row("U1", "AutoIAF", 1.0, 0.5, 0.1, 0.02, 3.0, 500),
        cli.Row("funnel", "NUTS", mean_err=0.3, sd_err=0.1, seconds=2.0, ess_per_grad=0.01),
    ]
    lines = cli.format_table(rows).splitlines()
    assert lines[0].split()[:2] == ["target", "method"]
    assert lines[3] == ""
    assert lines[4].split() == ["funnel", "NUTS", "-", "-", "0.300", "10.0%", "0.0100", "-", "2.0s"]


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--quick", "--output", "--device", "--seed", "--steps", "--jobs"):
        assert option in out


def test_bad_arguments_exit_with_usage(capsys):
    for argv in (["demo", "--steps", "0"], ["demo", "--guides", "AutoNope"], []):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


def _check_outputs(out: str, folder: Path, targets: list[str], guides: list[str]) -> list[dict]:
    results = json.loads((folder / "results.json").read_text())
    rows = results["rows"]
    fits = [(r["target"], r["method"]) for r in rows if r["kl"] is not None]
    assert fits == [(t, g) for t in targets for g in guides]
    for row in rows:
        assert math.isfinite(row["mean_err"]) and math.isfinite(row["sd_err"])
        if row["kl"] is not None:
            assert math.isfinite(row["kl"]) and row["kl"] > -0.1  # KL >= 0 up to noise
        # every row is printed
        assert any(
            line.split()[:1] == [row["target"]] and row["method"] in line
            for line in out.splitlines()
        )
    for name in ("densities.png", "losses.png"):
        path = folder / name
        assert path.is_file() and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "table.txt").read_text().startswith("target")
    return rows


def test_quick_options():
    args = cli.make_parser().parse_args(["demo", "--quick", "--output", "x", "--jobs", "3"])
    config = cli._config(args)
    assert config.steps == cli.QUICK["steps"] < cli.DemoConfig().steps
    assert (config.jobs, config.output, config.guides) == (3, Path("x"), tuple(cli.GUIDES))
    args = cli.make_parser().parse_args(["demo", "--quick", "--steps", "7"])
    assert cli._config(args).steps == 7


def test_demo_end_to_end(tmp_path):
    """The whole demo (every target and guide, the samplers), with ``--quick``'s settings cut
    further to stay fast."""
    folder = tmp_path / "demo"
    config = cli.DemoConfig(
        output=folder,
        steps=20,
        eval_samples=1000,
        grid=40,
        mcmc_warmup=30,
        mcmc_samples=30,
        jobs=1,
        progress=False,
    )
    out = io.StringIO()
    table = cli.run_demo(config, out)
    text = out.getvalue()
    rows = _check_outputs(text, folder, ["U1", "U2", "U3", "U4", "funnel"], list(cli.GUIDES))
    assert rows == [dataclasses.asdict(r) for r in table]
    samplers = [r for r in rows if r["ess_per_grad"] is not None]
    if cli._neutra_module() is not None:
        assert [r["method"] for r in samplers] == ["NUTS", "NeuTra NUTS (AutoIAF)"]
        assert all(r["ess_per_grad"] > 0 and r["divergences"] >= 0 for r in samplers)
        assert (folder / "neutra_funnel.png").stat().st_size > 1000
    else:
        assert samplers == []
        assert "NeuTra vs NUTS: skipped" in text


def test_demo_in_worker_processes(tmp_path, capsys):
    """The command line with ``--jobs 2`` (fits in worker processes) on a subset; the same seed
    gives the same table as in one process."""
    folder = tmp_path / "out"
    argv = ["demo", "--quick", "--steps", "10", "--output", str(folder), "--jobs", "2"]
    argv += ["--targets", "U2", "funnel", "--guides", "AutoNeuralSpline", "AutoNormal"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "demo" in captured.err  # the progress bar
    rows = _check_outputs(
        captured.out, folder, ["U2", "funnel"], ["AutoNeuralSpline", "AutoNormal"]
    )
    assert "NeuTra vs NUTS: skipped (it needs the AutoIAF fit)" in captured.out
    assert not (folder / "neutra_funnel.png").exists()
    config = cli._config(cli.make_parser().parse_args([*argv[:-6], "--jobs", "1"]))
    config.targets, config.guides, config.plots = ("funnel",), ("AutoNormal",), False
    config.output = tmp_path / "again"
    again = cli.run_demo(config, io.StringIO())
    first = next(r for r in rows if (r["target"], r["method"]) == ("funnel", "AutoNormal"))
    assert again[0].kl == pytest.approx(first["kl"], abs=1e-6)


def test_neutra_section_is_skipped_without_the_module(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_neutra_module", lambda: None)
    config = cli.DemoConfig(
        output=tmp_path, steps=5, eval_samples=200, grid=20, targets=("funnel",), plots=False
    )
    config.guides, config.progress = ("AutoIAF",), False
    out = io.StringIO()
    rows = cli.run_demo(config, out)
    assert [r.method for r in rows] == ["AutoIAF"]
    assert (
        "NeuTra vs NUTS: skipped (flowguide.neutra.NeuTraMCMC is not available)" in out.getvalue()
    )


def test_python_dash_m_help():
    result = subprocess.run(
        [sys.executable, "-m", "flowguide", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout
