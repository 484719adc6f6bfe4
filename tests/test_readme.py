"""The README's quick start runs as written (with a smaller step budget)."""

from __future__ import annotations

import re
from pathlib import Path

import pyro

import flowguide

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(monkeypatch, capsys):
    text = README.read_text()
    code = re.search(r"## Quick start\s+```python\n(.*?)```", text, re.S).group(1)
    fit = flowguide.fit
    monkeypatch.setattr(
        flowguide, "fit", lambda *a, **k: fit(*a, **{**k, "num_steps": 300, "progress": False})
    )
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "budget" in out and "'mu'" in out and "'sigma'" in out
