"""The fit loop: budget and plateau stopping, the NaN guard, Ctrl-C, checkpoints and resuming."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import flowguide as fg
from flowguide.train import load_checkpoint

MODEL_SRC = textwrap.dedent(
    """
    import time
    import pyro, pyro.distributions as dist, torch

    DATA = torch.linspace(-2.0, 2.0, 12)
    SLEEP = [0.0]

    def model(data=DATA):
        time.sleep(SLEEP[0])
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("obs", dist.Normal(loc, scale), obs=data)
    """
)
NS: dict = {}
exec(MODEL_SRC, NS)
model = NS["model"]


@pytest.fixture(autouse=True)
def _clean():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def small_guide(m=model):
    return fg.AutoIAF(m, num_flows=2, hidden=(8,))


def ready_guide(m, calls):
    """A guide already set up, with the model's call counter reset: in fit, call 1 is the set-up
    evaluation and step k is call k + 2."""
    guide = small_guide(m)
    guide()
    calls[0] = 0
    return guide


def test_budget_and_history():
    result = fg.fit(model, small_guide(), num_steps=60, progress=False, seed=0)
    assert result.stopped == "budget" and result.num_steps == 60 and len(result.losses) == 60
    assert result.final_loss < result.losses[0]
    assert result.seconds > 0


def test_stops_on_a_plateau():
    result = fg.fit(
        model,
        small_guide(),
        num_steps=20000,
        window=50,
        min_steps=200,
        patience=2,
        progress=False,
        seed=0,
        lr=0.05,
    )
    assert result.stopped == "plateau"
    assert result.num_steps < 20000 and result.num_steps % 50 == 0


def test_same_seed_same_losses():
    a = fg.fit(model, small_guide(), num_steps=30, progress=False, seed=3).losses
    pyro.clear_param_store()
    b = fg.fit(model, small_guide(), num_steps=30, progress=False, seed=3).losses
    assert a == b


def test_non_finite_steps_never_touch_the_parameters():
    bad_steps = {5, 6, 7}
    calls = [0]

    def flaky():
        calls[0] += 1
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        if calls[0] - 2 in bad_steps:  # the set-up evaluation and step 0 come first
            pyro.factor("nan", torch.tensor(float("nan")))
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=torch.tensor(1.0))

    guide = ready_guide(flaky, calls)
    result = fg.fit(flaky, guide, num_steps=20, progress=False, seed=0)
    assert result.skipped_steps == sorted(bad_steps)
    assert len(result.losses) == 20 - len(bad_steps)
    assert all(torch.isfinite(p).all() for p in guide.parameters())


def test_a_non_finite_gradient_is_skipped_too():
    calls = [0]

    def kinked():
        calls[0] += 1
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        if calls[0] == 4:  # step 2: a finite value 0 with an infinite gradient
            pyro.factor("kink", torch.sqrt((loc - loc.detach()).abs()))
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=torch.tensor(1.0))

    result = fg.fit(kinked, ready_guide(kinked, calls), num_steps=6, progress=False, seed=0)
    assert result.skipped_steps == [2]


def test_repeated_failure_stops_with_an_explanation():
    calls, armed = [0], [False]

    def broken():
        calls[0] += 1
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        if armed[0] and calls[0] >= 2:  # from step 0 on
            pyro.factor("nan", loc * float("nan"))

    guide = ready_guide(broken, calls)
    armed[0] = True
    with pytest.raises(FloatingPointError, match=r"step 4: .* 5 steps in a row .* smaller lr"):
        fg.fit(broken, guide, num_steps=50, max_bad_steps=5, progress=False, seed=0)
    assert all(torch.isfinite(p).all() for p in guide.parameters())


def test_ctrl_c_returns_what_was_fitted():
    calls = [0]

    def interrupted():
        calls[0] += 1
        if calls[0] == 12:
            raise KeyboardInterrupt
        model()

    guide = ready_guide(interrupted, calls)
    result = fg.fit(interrupted, guide, num_steps=100, progress=False, seed=0)
    assert result.stopped == "interrupted"
    assert len(result.losses) == 10  # steps 0..9 finished; step 10 was interrupted


def test_progress_bar_shows_the_loss(capsys):
    fg.fit(model, small_guide(), num_steps=20, progress=True, seed=0)
    err = capsys.readouterr().err
    assert "fit" in err and "loss=" in err and "20/20" in err


def test_pyro_elbo_and_other_guides():
    guide = AutoNormal(model)
    result = fg.fit(
        model, guide, num_steps=40, loss=Trace_ELBO(num_particles=2), progress=False, seed=0
    )
    assert len(result.losses) == 40 and result.losses[-1] < result.losses[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_steps": 0}, "num_steps must be an integer >= 1, got 0"),
        ({"num_particles": 1.5}, "num_particles must be an integer >= 1, got 1.5"),
        ({"lr": -1.0}, "lr must be > 0, got -1.0"),
        ({"lr_decay": 0.0}, r"lr_decay must lie in \(0, 1\], got 0.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fg.fit(model, small_guide(), progress=False, **kwargs)


def test_checkpoint_is_written_atomically_and_loads_safely(tmp_path):
    path = tmp_path / "run.pt"
    fg.fit(
        model,
        small_guide(),
        num_steps=25,
        checkpoint=path,
        checkpoint_every=10,
        progress=False,
        seed=0,
    )
    state = load_checkpoint(path)
    assert state["step"] == 25 and len(state["losses"]) == 25
    assert not list(tmp_path.glob("*.tmp"))  # no temporary file left behind

    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a flowguide checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="not a readable flowguide checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(Path("x"), f)  # an arbitrary object: weights_only loading refuses it
    with pytest.raises(ValueError, match="not a readable flowguide checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "run.pt"
    fg.fit(model, small_guide(), num_steps=5, checkpoint=path, progress=False, seed=0)
    pyro.clear_param_store()

    def other():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="do not match this model and guide"):
        fg.fit(
            other, fg.AutoPlanar(other, num_flows=2), num_steps=5, checkpoint=path, progress=False
        )


def test_resume_after_the_process_is_killed(tmp_path):
    """A fit killed mid-run resumes from its checkpoint and reproduces, to float tolerance, the
    losses of an uninterrupted run with the same seed."""
    steps, every = 60, 10
    reference = fg.fit(model, small_guide(), num_steps=steps, progress=False, seed=7).losses
    pyro.clear_param_store()

    path = tmp_path / "run.pt"
    script = tmp_path / "run.py"
    script.write_text(
        MODEL_SRC
        + textwrap.dedent(
            f"""
            import flowguide as fg
            SLEEP[0] = 0.05
            fg.fit(model, fg.AutoIAF(model, num_flows=2, hidden=(8,)), num_steps={steps},
                   checkpoint={str(path)!r}, checkpoint_every={every}, progress=False, seed=7)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if path.exists() and load_checkpoint(path)["step"] >= 2 * every:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = load_checkpoint(path)["step"]
    assert every <= killed_at < steps

    resumed = fg.fit(
        model,
        small_guide(),
        num_steps=steps,
        checkpoint=path,
        checkpoint_every=every,
        progress=False,
        seed=7,
    )
    assert len(resumed.losses) == steps
    torch.testing.assert_close(
        torch.tensor(resumed.losses), torch.tensor(reference), rtol=1e-5, atol=1e-5
    )


def test_pyro_flow_guide_with_a_shared_parameter():
    """Pyro's AutoIAFNormal registers one tensor under two names; fit must not pass it twice."""
    from pyro.infer.autoguide import AutoIAFNormal

    result = fg.fit(
        model, AutoIAFNormal(model), num_steps=5, loss=Trace_ELBO(), progress=False, seed=0
    )
    assert len(result.losses) == 5


def test_stale_parameters_in_the_store_are_refused():
    """A second guide of the same name would train the first one's tensors: refuse, clearly."""
    fg.fit(model, small_guide(), num_steps=3, progress=False, seed=0)
    with pytest.raises(ValueError, match=r"clear_param_store\(\)"):
        fg.fit(model, small_guide(), num_steps=3, progress=False, seed=0)
