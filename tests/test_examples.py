"""The example scripts run (their ``--smoke`` mode, in a subprocess)."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "error::DeprecationWarning"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--smoke", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_quickstart(tmp_path):
    out = _run("quickstart.py", cwd=tmp_path).stdout
    assert "steps (budget)" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    for name in ("mu", "tau", *(f"theta[{i}]" for i in range(8))):
        mean, sd, lo, hi = map(float, lines[name])
        assert sd > 0 and lo < mean < hi
    assert float(lines["tau"][2]) > 0  # tau's 5% quantile: a scale is positive


def test_density_estimation(tmp_path):
    figure = tmp_path / "moons.png"
    out = _run("density_estimation.py", "--output", str(figure), cwd=tmp_path).stdout
    assert "mean NLL on the data" in out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _table_rows(text: str) -> dict[str, list[str]]:
    """The body rows of the first markdown table in ``text``, keyed by their first cell."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_eight_schools(tmp_path):
    out = _run("eight_schools.py", "--output", "tables", "--seed", "1", cwd=tmp_path).stdout
    written = (tmp_path / "tables" / "eight_schools.md").read_text()
    rows = _table_rows(out)
    assert list(rows) == ["AutoNormal", "AutoNeuralSpline", "AutoIAF"]  # a row per guide
    assert _table_rows(written) == rows  # the file holds the printed table
    for name, cells in rows.items():
        steps = int(cells[0])
        loss, mu_mean, mu_sd, log_tau_mean, log_tau_sd, tau_mean, tau_sd, khat = map(
            float, cells[1:9]
        )
        assert steps == 60, name
        assert all(math.isfinite(v) for v in (loss, mu_mean, log_tau_mean, tau_mean, khat)), name
        assert mu_sd > 0 and log_tau_sd > 0 and tau_sd > 0, name
        # Jensen: the log of the mean is at least the mean of the logs (up to the rounding)
        assert tau_mean > 0 and math.log(tau_mean) >= log_tau_mean - 2e-3, name
        assert cells[9] in ("good", "ok", "bad"), name


def test_neutra_funnel(tmp_path):
    out = _run("neutra_funnel.py", "--output", "figures", cwd=tmp_path).stdout
    assert "AutoIAF: 100 steps" in out
    rows = {}
    for line in out.splitlines():
        for name in ("NeuTra NUTS", "plain NUTS"):
            if line.startswith(name):
                rows[name] = line[len(name) :].split()
    assert set(rows) == {"NeuTra NUTS", "plain NUTS"}
    for name, (divergences, ess, y_mean, y_sd, _seconds) in rows.items():
        assert 0 <= int(divergences) <= 30, name  # at most one per draw kept
        assert 0 < float(ess) and math.isfinite(float(y_mean)), name
        assert 0 < float(y_sd) < 100, name
    figure = tmp_path / "figures" / "neutra_funnel.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in out


@pytest.mark.parametrize(
    "script", ["quickstart.py", "density_estimation.py", "eight_schools.py", "neutra_funnel.py"]
)
def test_help(script, tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and "--smoke" in result.stdout
