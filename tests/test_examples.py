"""The example scripts run (their ``--smoke`` mode, in a subprocess)."""

from __future__ import annotations

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


@pytest.mark.parametrize("script", ["quickstart.py", "density_estimation.py"])
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
