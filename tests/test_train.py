"""The fit loop: budget and plateau stopping, the NaN guard, Ctrl-C, checkpoints and resuming."""

from __future__ import annotations

import math
import os
import pickle
import shutil
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
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch.distributions import constraints

import flowguide as fg
from flowguide.guides import constrain_latent
from flowguide.train import _LogJoint, flow_elbo_loss, load_checkpoint

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


#: torch.compile's CPU backend builds C++ kernels: without a compiler jit="compile" cannot run
needs_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")),
    reason="no C++ compiler for torch.compile",
)
COMPILE = pytest.param("compile", marks=needs_cxx)


def small_guide(m=model):
    return fg.AutoIAF(m, num_flows=2, hidden=(8,))


#: the model runs of fit's check that a batch of draws scores right, before its first step
#: (``flowguide.train._check_batched``: one run with three draws, then one per draw)
CHECK_CALLS = 4


def ready_guide(m, calls):
    """A guide already set up, with the model's call counter set so that, in fit with the
    default particles and ``init=None`` (no MAP search first), the batch check's runs count up
    to 0, call 1 is the set-up evaluation, which is step 0's, and step k is call k + 1."""
    guide = small_guide(m)
    guide()
    calls[0] = -CHECK_CALLS
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
        if calls[0] - 1 in bad_steps:  # the set-up evaluation is step 0
            pyro.factor("nan", torch.tensor(float("nan")))
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=torch.tensor(1.0))

    guide = ready_guide(flaky, calls)
    result = fg.fit(flaky, guide, num_steps=20, progress=False, seed=0, init=None)
    assert result.skipped_steps == sorted(bad_steps)
    assert len(result.losses) == 20 - len(bad_steps)
    assert all(torch.isfinite(p).all() for p in guide.parameters())


def test_a_non_finite_gradient_is_skipped_too():
    calls = [0]

    def kinked():
        calls[0] += 1
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        if calls[0] == 3:  # step 2: a finite value 0 with an infinite gradient
            pyro.factor("kink", torch.sqrt((loc - loc.detach()).abs()))
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=torch.tensor(1.0))

    guide = ready_guide(kinked, calls)
    result = fg.fit(kinked, guide, num_steps=6, progress=False, seed=0, init=None)
    assert result.skipped_steps == [2]


def test_repeated_failure_stops_with_an_explanation():
    calls, armed = [0], [False]

    def broken():
        calls[0] += 1
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        if armed[0] and calls[0] >= 2:  # from step 1 on (step 0's is the set-up evaluation)
            pyro.factor("nan", loc * float("nan"))

    guide = ready_guide(broken, calls)
    armed[0] = True
    with pytest.raises(FloatingPointError, match=r"step 5: .* 5 steps in a row .* smaller lr"):
        fg.fit(broken, guide, num_steps=50, max_bad_steps=5, progress=False, seed=0, init=None)
    assert all(torch.isfinite(p).all() for p in guide.parameters())


def test_ctrl_c_returns_what_was_fitted():
    calls = [0]

    def interrupted():
        calls[0] += 1
        if calls[0] == 11:  # step 10
            raise KeyboardInterrupt
        model()

    guide = ready_guide(interrupted, calls)
    result = fg.fit(interrupted, guide, num_steps=100, progress=False, seed=0, init=None)
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
        ({"average": -1}, "average must be an integer >= 0, got -1"),
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
    guide = small_guide()
    reference = fg.fit(model, guide, num_steps=steps, progress=False, seed=7).losses
    fitted = {name: p.detach().clone() for name, p in guide.named_parameters()}
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

    guide = small_guide()
    resumed = fg.fit(
        model,
        guide,
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
    # the checkpoint carried the parameter average too: the fits end at the same parameters
    for name, p in guide.named_parameters():
        torch.testing.assert_close(p.detach(), fitted[name], rtol=1e-5, atol=1e-5)


def test_resume_after_ctrl_c_redoes_the_interrupted_step(tmp_path):
    """A Ctrl-C in the middle of a step (here: inside the model) leaves a checkpoint from which
    the run continues as if never stopped: the same losses and the same fitted parameters."""
    calls, stop_at = [0], [None]

    def stoppable():
        calls[0] += 1
        if calls[0] == stop_at[0]:
            raise KeyboardInterrupt
        model()

    def run(checkpoint=None):
        pyro.clear_param_store()
        guide = small_guide(stoppable)
        options = {"checkpoint": checkpoint, "checkpoint_every": 10} if checkpoint else {}
        result = fg.fit(
            stoppable, guide, num_steps=40, progress=False, seed=3, init=None, **options
        )
        return result, {k: v.detach().clone() for k, v in guide.named_parameters()}

    reference, fitted = run()
    # a model run in the middle of a step between two checkpoints (after the batch check's)
    calls[0], stop_at[0] = 0, CHECK_CALLS + 26
    interrupted, _ = run(tmp_path / "fit.pt")
    done = len(interrupted.losses)
    assert interrupted.stopped == "interrupted" and 20 < done < 30
    assert load_checkpoint(tmp_path / "fit.pt")["step"] == done
    stop_at[0] = None
    resumed, params = run(tmp_path / "fit.pt")
    assert resumed.stopped == "budget"
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(reference.losses))
    for name, value in fitted.items():
        torch.testing.assert_close(params[name], value, msg=name)


class _Recording(torch.optim.Adam):
    """Adam that keeps a copy of the parameters after every step."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.iterates = []

    def step(self, closure=None):
        out = super().step(closure)
        self.iterates.append([p.detach().clone() for g in self.param_groups for p in g["params"]])
        return out


@pytest.mark.parametrize("average, steps", [(5, 40), (50, 40), (0, 40)])
def test_fit_returns_the_average_of_its_iterates(average, steps):
    """The returned parameters are the documented running average of the iterates (weights
    max(1/A, 4/(n+3))); average=0 returns the last iterate."""
    held = {}

    def recording(params, lr):
        held["optim"] = _Recording(params, lr)
        return held["optim"]

    guide = small_guide()
    fg.fit(
        model,
        guide,
        num_steps=steps,
        progress=False,
        seed=0,
        optim=recording,
        average=average,
        init=None,
    )
    iterates = held["optim"].iterates
    assert len(iterates) == steps
    expected = [t.clone() for t in iterates[0]]
    if average:
        for n, iterate in enumerate(iterates[1:], start=2):
            w = max(1.0 / average, 4.0 / (n + 3))
            expected = [e + w * (t - e) for e, t in zip(expected, iterate, strict=True)]
    else:
        expected = iterates[-1]
    params = [p for g in held["optim"].param_groups for p in g["params"]]
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-6)
    if average:  # and it is not the last iterate
        assert any(not torch.allclose(p, t) for p, t in zip(params, iterates[-1], strict=True))


def test_averaging_steadies_the_fitted_mean():
    """On a conjugate model with a known posterior mean, the averaged fit's location error is far
    below that of the last iterate over the same run (the iterates wander with the gradient's
    noise; their average does not)."""
    data = torch.linspace(-2.0, 2.0, 12, dtype=torch.float64)

    def normal_model():
        loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 5.0))
        with pyro.plate("data", 12):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)

    truth = data.sum().item() / (12 + 1 / 25)  # posterior mean, prior sd 5, noise sd 1
    errors = {}
    for average in (0, 300):
        pyro.clear_param_store()
        guide = fg.AutoIAF(normal_model, num_flows=1, hidden=(4,))
        fg.fit(
            normal_model,
            guide,
            num_steps=1500,
            num_particles=1,  # the noisiest gradient, where the average matters most
            lr=0.05,
            lr_decay=1.0,
            patience=0,
            progress=False,
            seed=5,
            average=average,
            init=None,
        )
        pyro.set_rng_seed(0)
        with torch.no_grad():
            draws = guide.get_posterior().sample((40000,))
        errors[average] = abs(draws.mean().item() - truth)
    assert errors[300] < 0.5 * errors[0], errors


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


# -- the MAP warm start (init="map") ------------------------------------------------------------


def _correlated_regression_data():
    """Unscaled, strongly correlated predictors: a column near 1000, one that is almost half of
    it, and one near 0.001; the posterior is a narrow ridge at very different scales."""
    gen = torch.Generator().manual_seed(0)
    n = 40
    x1 = 1000.0 + 50.0 * torch.randn(n, generator=gen, dtype=torch.float64)
    x2 = 0.5 * x1 + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    x3 = 1e-3 * torch.randn(n, generator=gen, dtype=torch.float64)
    X = torch.stack([x1, x2, x3], dim=-1)
    beta = torch.tensor([0.3, -0.2, 500.0], dtype=torch.float64)
    y = X @ beta + 2.0 * torch.randn(n, generator=gen, dtype=torch.float64)
    return X, y


def linear_regression(X, y, sigma=2.0, prior_sd=1000.0):
    beta = pyro.sample(
        "beta", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), prior_sd).to_event(1)
    )
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * beta).sum(-1), sigma), obs=y)


def test_map_init_equals_the_closed_form_posterior_of_a_linear_regression():
    X, y = _correlated_regression_data()
    # posterior N(m, P^-1) with P = X'X / s^2 + I / s0^2, m = P^-1 X'y / s^2
    precision = X.T @ X / 4.0 + torch.eye(3, dtype=X.dtype) / 1000.0**2
    cov = torch.linalg.inv(precision)
    mean = cov @ (X.T @ y) / 4.0
    corr = cov[0, 1] / (cov[0, 0] * cov[1, 1]).sqrt()
    assert corr.abs() > 0.99  # a ridge, as promised
    guide = fg.AutoNeuralSpline(linear_regression, hidden=(16,))
    found = fg.map_init(linear_regression, guide, X, y, covariance="diag")
    torch.testing.assert_close(found.loc, mean, rtol=1e-6, atol=1e-8 * mean.abs().max())
    torch.testing.assert_close(found.scale, cov.diagonal().sqrt(), rtol=1e-6, atol=0.0)
    assert found.decrement <= 1e-3 and found.num_evaluations >= 1 and found.scale_tril is None
    torch.testing.assert_close(guide.affine.loc.detach(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(guide.affine.log_scale.detach().exp(), found.scale)
    # the flow is left at the identity: the guide is the diagonal Laplace approximation
    z = mean + cov.diagonal().sqrt() * torch.randn(5, 3, dtype=X.dtype)
    laplace = dist.Normal(mean, cov.diagonal().sqrt()).to_event(1)
    torch.testing.assert_close(guide.get_posterior().log_prob(z), laplace.log_prob(z))
    # covariance="full" (the default): the guide is the full Laplace approximation, which for a
    # Gaussian posterior is the posterior itself; calling it again replaces the start
    found = fg.map_init(linear_regression, guide, X, y)
    torch.testing.assert_close(found.scale_tril @ found.scale_tril.T, cov, rtol=1e-6, atol=0.0)
    exact = dist.MultivariateNormal(mean, cov)
    z = exact.sample((5,))
    torch.testing.assert_close(guide.get_posterior().log_prob(z), exact.log_prob(z))
    draws = guide.sample_constrained(4000, X, y)["beta"]
    sd = cov.diagonal().sqrt()
    assert ((draws.mean(0) - mean).abs() / sd).max() < 0.1
    assert ((draws.std(0) / sd - 1).abs()).max() < 0.1
    assert len(guide.transform.flows) == 3  # flow, affine base, the fixed correlation map
    fg.map_init(linear_regression, guide, X, y, covariance="diag")
    assert len(guide.transform.flows) == 2


def test_map_init_and_fit_with_constrained_sites():
    # without the improper site: modes known in closed form in the unconstrained space
    def model():
        pyro.sample("s", dist.LogNormal(0.5, 0.3))  # u = log s ~ N(0.5, 0.3^2)
        pyro.sample("p", dist.Beta(3.0, 5.0))  # u = logit p: mode log(3/5), var 8 / 15

    found = fg.map_init(model, fg.AutoIAF(model, hidden=(8,)))
    expected = torch.tensor([0.5, math.log(3 / 5)])
    torch.testing.assert_close(found.loc, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(found.scale, torch.tensor([0.3, (8 / 15) ** 0.5]), rtol=1e-4, atol=0)
    # simplex and positive supports, one with an improper prior; samples stay in the supports
    pyro.clear_param_store()

    def with_rate():
        rate = pyro.sample("rate", dist.ImproperUniform(constraints.positive, (), ()))
        pyro.sample("w", dist.Dirichlet(torch.tensor([2.0, 3.0, 4.0])))
        pyro.sample("obs", dist.Exponential(rate), obs=torch.tensor([0.7, 1.3]))

    guide = fg.AutoNeuralSpline(with_rate, hidden=(8,))
    result = fg.fit(
        with_rate, guide, num_steps=30, num_particles=1, progress=False, seed=0, init="map"
    )
    # u = log rate: log p + log |J| = 2 u - 2 e^u + u, mode e^u = 3 / 2, curvature 2 e^u = 3
    assert result.init is not None
    assert abs(result.init.loc[0].item() - math.log(1.5)) < 1e-4
    assert abs(result.init.scale[0].item() - 3**-0.5) < 1e-4
    draws = guide.sample_constrained(200)
    assert (draws["rate"] > 0).all()
    torch.testing.assert_close(draws["w"].sum(-1), torch.ones(200))
    assert len(result.losses) == 30 and all(math.isfinite(v) for v in result.losses)


def test_map_init_errors_are_named():
    expected = "init must be 'auto', None, 'map' or 'map-diag', got 'laplace'"
    with pytest.raises(ValueError, match=expected):
        fg.fit(model, small_guide(), num_steps=1, progress=False, init="laplace")
    with pytest.raises(TypeError, match=r"init='map' needs a flowguide AutoFlow.*AutoNormal"):
        fg.fit(model, AutoNormal(model), num_steps=1, progress=False, init="map")
    with pytest.raises(TypeError, match=r"guide must be a flowguide AutoFlow.*AutoNormal"):
        fg.map_init(model, AutoNormal(model))
    with pytest.raises(ValueError, match="max_evals must be an integer >= 1, got 0"):
        fg.map_init(model, small_guide(), max_evals=0)
    with pytest.raises(ValueError, match="covariance must be 'full' or 'diag', got 'dense'"):
        fg.map_init(model, small_guide(), covariance="dense")
    with pytest.raises(ValueError, match="tol must be a number > 0, got -1"):
        fg.map_init(model, small_guide(), tol=-1)

    def not_finite():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("bad", x.new_tensor(-math.inf))  # an impossible model

    with pytest.raises(FloatingPointError, match="not finite"):
        fg.map_init(not_finite, small_guide(not_finite))

    def funnel():  # centred hierarchy: the density grows without bound as tau -> 0
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("groups", 8):
            theta = pyro.sample("theta", dist.Normal(0.0, tau))
            pyro.sample("y", dist.Normal(theta, 10.0), obs=torch.zeros(8))

    # the search's start (init_to_median's draws) is random: from some starts it runs so far down
    # the neck that the Hessian overflows first (FloatingPointError, which fit's init="auto"
    # also takes as "no MAP start"); this seed gives the test one start, whatever ran before
    pyro.set_rng_seed(1)
    guide = small_guide(funnel)
    guide(), pyro.clear_param_store()
    before = guide.affine.loc.detach().clone()
    with pytest.raises(ValueError, match="found no mode"):
        fg.map_init(funnel, guide, max_evals=200)
    assert torch.equal(guide.affine.loc.detach(), before)  # the guide is left untouched


def test_fit_with_map_init_resumes_from_a_checkpoint(tmp_path):
    """A run resumed from its checkpoint keeps the MAP start's fixed correlation map and the
    scaled location updates, and continues exactly as an uninterrupted run."""
    X, y = _correlated_regression_data()
    path = tmp_path / "fit.pt"

    def run(steps, checkpoint=None):
        pyro.clear_param_store()
        guide = fg.AutoIAF(linear_regression, num_flows=1, hidden=(8,))
        result = fg.fit(
            linear_regression,
            guide,
            X,
            y,
            num_steps=steps,
            progress=False,
            seed=0,
            init="map",
            checkpoint=checkpoint,
            lr_decay=1.0,
        )
        return guide, result

    whole, whole_result = run(40)
    assert whole_result.init is not None and len(whole.transform.flows) == 3
    run(20, path)
    resumed, resumed_result = run(40, path)
    assert resumed_result.init is None  # not searched again: the checkpoint holds the start
    assert len(resumed.transform.flows) == 3
    torch.testing.assert_close(
        torch.tensor(resumed_result.losses), torch.tensor(whole_result.losses)
    )
    torch.testing.assert_close(resumed.affine.loc.detach(), whole.affine.loc.detach())


def test_map_init_steps_out_of_a_saddle():
    """Started where the gradient vanishes and the Hessian is negative (L-BFGS stops at once),
    the shifted Newton steps still reach the mode of the double well
    -log p = 5 (x^2 - 1)^2 + x^2 / 200: x* = sqrt(1 - 1/2000), sd = 1 / sqrt(40 - 3/100 + 1/100)."""
    from pyro.infer.autoguide import init_to_value

    def well():
        x = pyro.sample("x", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 10.0))
        pyro.factor("well", -5.0 * (x**2 - 1.0) ** 2)

    start = torch.tensor(1e-14, dtype=torch.float64)
    guide = fg.AutoIAF(well, init_loc_fn=init_to_value(values={"x": start}))
    found = fg.map_init(well, guide)
    assert abs(abs(found.loc.item()) - math.sqrt(1 - 1 / 2000)) < 1e-8
    assert abs(found.scale.item() - 1 / math.sqrt(40 - 0.03 + 0.01)) < 1e-8


def flat():
    """``b``'s density is flat: no mode."""
    pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.sample("b", dist.ImproperUniform(constraints.real, (), ()))


def test_auto_init_starts_at_the_map_where_there_is_one(monkeypatch):
    guide = small_guide()
    result = fg.fit(model, guide, num_steps=5, progress=False, seed=0)
    assert result.init is not None and result.init_skipped is None
    pyro.clear_param_store()
    pyro.set_rng_seed(0)  # as fit(seed=0): the guide's start is drawn (init_to_median)
    again = small_guide()
    found = fg.map_init(model, again)  # the same search from the same start
    torch.testing.assert_close(result.init.loc, found.loc)

    pyro.clear_param_store()
    result = fg.fit(flat, fg.AutoIAF(flat, num_flows=1), num_steps=5, progress=False, seed=0)
    assert result.init is None and "no mode" in result.init_skipped
    assert len(result.losses) == 5  # the fit went on from the guide's own start

    pyro.clear_param_store()
    result = fg.fit(model, AutoNormal(model), num_steps=5, progress=False, seed=0)
    assert result.init is None and result.init_skipped is None  # not a flowguide guide

    pyro.clear_param_store()
    monkeypatch.setattr(fg.train, "AUTO_MAP_MAX_DIM", 1)
    result = fg.fit(model, small_guide(), num_steps=5, progress=False, seed=0)
    assert result.init is None and "latent dimension 2 is above" in result.init_skipped
    with pytest.raises(fg.NoModeError, match="not positive definite"):
        fg.fit(flat, fg.AutoIAF(flat, num_flows=1), num_steps=5, progress=False, init="map")


def test_auto_init_keeps_the_guide_start_when_the_mode_sits_in_a_funnels_neck():
    """Neal's funnel without data has a proper mode, at y = -40.5 (x = 0), where the Laplace
    approximation's x-scales are about e^-20: its ELBO is far below the guide's own start's, so
    init='auto' keeps the guide's start (the base exactly as before, no Laplace map)."""

    def funnel():
        y = pyro.sample("y", dist.Normal(0.0, 3.0))
        scale = torch.exp(y / 2).unsqueeze(-1).expand((*y.shape, 9))
        pyro.sample("x", dist.Normal(0.0, scale).to_event(1))

    found = fg.map_init(funnel, fg.AutoIAF(funnel, num_flows=1))
    assert abs(found.loc[0].item() + 40.5) < 1e-3  # y* = -9 * 9 / 2
    pyro.clear_param_store()

    guide = fg.AutoIAF(funnel, num_flows=1)
    guide()
    loc, scale = guide.affine.loc.detach().clone(), guide.affine.log_scale.detach().clone()
    flows = len(guide.transform.flows)
    result = fg.fit(funnel, guide, num_steps=1, lr=1e-12, progress=False, seed=0)
    assert result.init is None and "higher ELBO" in result.init_skipped
    assert len(guide.transform.flows) == flows
    torch.testing.assert_close(guide.affine.loc.detach(), loc, atol=1e-9, rtol=0)
    torch.testing.assert_close(guide.affine.log_scale.detach(), scale, atol=1e-9, rtol=0)


def test_map_init_restarts_find_the_higher_mode():
    """A two-mode density, started in the lower mode's basin: restarts from prior draws find the
    higher one (and say which start did); without restarts the search keeps the lower."""
    from pyro.infer.autoguide import init_to_value

    f64 = torch.float64

    def two_modes():
        x = pyro.sample("x", dist.Normal(torch.tensor(0.0, dtype=f64), 3.0))
        low = dist.Normal(torch.tensor(-1.0, dtype=f64), 0.3).log_prob(x) + math.log(0.3)
        high = dist.Normal(torch.tensor(2.0, dtype=f64), 0.3).log_prob(x) + math.log(0.7)
        pyro.factor("mixture", torch.logaddexp(low, high))

    def guide():
        return fg.AutoIAF(two_modes, init_loc_fn=init_to_value(values={"x": torch.tensor(-1.2)}))

    pyro.set_rng_seed(0)
    alone = fg.map_init(two_modes, guide())
    pyro.set_rng_seed(0)
    found = fg.map_init(two_modes, guide(), restarts=8)
    assert abs(alone.loc.item() + 1.0) < 0.05 and alone.start == 0
    assert abs(found.loc.item() - 2.0) < 0.05 and found.start > 0
    assert found.log_density > alone.log_density + 0.5
    with pytest.raises(ValueError, match="restarts must be an integer >= 0, got -1"):
        fg.map_init(two_modes, guide(), restarts=-1)


def test_default_optimizer_is_adam_with_the_same_updates():
    """fit's optimiser (Adam, fused where torch has it) steps exactly as plain Adam."""
    from flowguide.train import default_optimizer

    a = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    ours, plain = default_optimizer([a], lr=0.1), torch.optim.Adam([b], lr=0.1)
    for k in range(5):
        for p, opt in ((a, ours), (b, plain)):
            opt.zero_grad()
            ((p - k) ** 2).sum().backward()
            opt.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _mixed_model(x: torch.Tensor) -> None:
    """Sites of every kind the vectorised log joint must count: a latent scalar, a constrained
    latent, a latent vector event in no plate, data whose density depends on the latents,
    data under fixed parameters in a plate and outside one, a masked site, a scaled
    (subsampled-like) site and a constant factor."""
    loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
    pyro.sample("fixed", dist.Normal(1.0, 2.0), obs=x.new_tensor(0.3))
    pyro.factor("const", x.new_tensor(-1.5))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(loc + w[..., 0] * x, scale), obs=x)
        pyro.sample("noise", dist.Normal(0.0, 1.0), obs=x.flip(0))
        with poutine.mask(mask=x > 0):
            pyro.sample("masked", dist.Normal(w[..., 1], scale), obs=x)
        with poutine.scale(scale=3.0):
            pyro.sample("scaled", dist.Cauchy(loc, 1.0), obs=x)


@pytest.mark.parametrize("particles", [1, 7])
def test_vectorised_loss_is_the_mean_of_pyros_per_draw_log_weights(particles):
    """flow_elbo_loss with S draws equals -mean_s [log p(x, T(z_s)) + log|J_T| - log q(z_s)]
    with log p from Pyro's own trace of the model conditioned on each draw alone: every site,
    whether its density depends on the draws or not, counts once per draw."""
    from pyro.infer.autoguide import init_to_sample

    x = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    pyro.set_rng_seed(3)
    guide = fg.AutoIAF(_mixed_model, hidden=(8,), init_loc_fn=init_to_sample).double()
    guide(x)
    with torch.no_grad():  # a flow away from the identity
        for p in guide.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pyro.set_rng_seed(11)
    loss = flow_elbo_loss(_mixed_model, guide, x, num_particles=particles)
    pyro.set_rng_seed(11)
    z, log_q = guide.rsample_unconstrained(particles if particles > 1 else None)
    z, log_q = z.reshape(particles, -1), log_q.reshape(particles)
    log_w, log_p = [], []
    for s in range(particles):
        values, _, log_jac = constrain_latent(guide, z[s])
        trace = poutine.trace(poutine.condition(_mixed_model, data=values)).get_trace(x)
        log_p.append(trace.log_prob_sum())
        log_w.append(log_p[-1] + log_jac - log_q[s])
    torch.testing.assert_close(loss, -torch.stack(log_w).mean(), rtol=1e-12, atol=1e-10)
    # one log joint per draw (NeuTra's many chains): each equals Pyro's for that draw alone
    values, _, _ = constrain_latent(guide, z, guide.max_plate_nesting)
    with _LogJoint(values, particles, guide.max_plate_nesting, per_particle=True) as joint:
        _mixed_model(x)
    expected = torch.stack(log_p) if particles > 1 else log_p[0]
    torch.testing.assert_close(joint.total(), expected, rtol=1e-12, atol=1e-10)


def test_a_site_that_does_not_broadcast_over_the_draws_is_named():
    def stubborn():
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        # a fixed batch of 3 left of the model's (no) plates: it collides with the draws' dim
        pyro.sample("obs", dist.Normal(loc.reshape(-1)[:1].expand(3), 1.0), obs=torch.zeros(3))

    guide = small_guide(stubborn)
    guide()
    with pytest.raises(ValueError, match=r"site 'obs' has batch shape \(3,\).* 4 particles"):
        flow_elbo_loss(stubborn, guide, num_particles=4)

    def misaligned():
        x = torch.zeros(5)
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", 5):
            # w[..., :1] keeps the event dim: (draws, 1, 1) puts the draws two dims left
            pyro.sample("obs", dist.Normal(w[..., :1] * x, 1.0), obs=x)

    guide = small_guide(misaligned)
    guide()
    with pytest.raises(ValueError, match=r"site 'obs' .* shape \(4, 1, 5\).* nothing left"):
        flow_elbo_loss(misaligned, guide, num_particles=4)


def _with_model_param(x: torch.Tensor) -> None:
    loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    gain = pyro.param("gain", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(gain * loc, scale), obs=x)


@pytest.mark.parametrize("mode", [True, COMPILE])
@pytest.mark.parametrize("particles", [1, 4])
def test_jit_gives_the_same_fit(particles, mode):
    """jit=True ("trace") and jit="compile" draw the same base noise and compute the same loss:
    the loss histories and the fitted parameters (the guide's and the model's own) match
    jit=False's."""
    x = torch.linspace(-2.0, 2.0, 12)
    fits = []
    for jit in (False, mode):
        pyro.clear_param_store()
        guide = small_guide(_with_model_param)
        result = fg.fit(
            _with_model_param,
            guide,
            x,
            num_steps=60,
            num_particles=particles,
            progress=False,
            seed=0,
            init=None,
            jit=jit,
        )
        assert (result.compile_seconds > 0) == bool(jit)  # the compilation is timed
        params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        fits.append((result.losses, params))
    (losses, params), (jit_losses, jit_params) = fits
    assert len(jit_losses) == 60
    torch.testing.assert_close(torch.tensor(jit_losses), torch.tensor(losses))
    assert params.keys() == jit_params.keys() and "gain" in params
    assert not torch.equal(params["gain"], torch.tensor(1.0))  # the model's parameter trained
    for name, value in params.items():
        torch.testing.assert_close(jit_params[name], value, msg=name)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: fg.AutoPlanar(m, num_flows=4),
        lambda m: fg.AutoRadial(m, num_flows=4),
        lambda m: fg.AutoNeuralSpline(m, num_flows=2, hidden=(8,)),
        lambda m: fg.AutoNeuralSpline(m, num_flows=2, hidden=(8,), coupling=True),
    ],
    ids=["planar", "radial", "spline", "spline-coupling"],
)
@pytest.mark.parametrize("mode", [True, COMPILE])
def test_jit_gives_the_same_losses_for_every_family(make, mode):
    x = torch.linspace(-2.0, 2.0, 12)
    runs = []
    for jit in (False, mode):
        pyro.clear_param_store()
        guide = make(_with_model_param)
        options = {"num_steps": 20, "num_particles": 3, "progress": False, "seed": 0}
        runs.append(fg.fit(_with_model_param, guide, x, init=None, jit=jit, **options).losses)
    torch.testing.assert_close(torch.tensor(runs[1]), torch.tensor(runs[0]))


@pytest.mark.parametrize("mode", [True, COMPILE])
def test_jit_refuses_what_a_trace_would_freeze(mode):
    def subsampled():
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 10, subsample_size=3):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=torch.zeros(3))

    with pytest.raises(ValueError, match=r"subsamples: plate 'data' draws 3 of 10"):
        guide = small_guide(subsampled)
        fg.fit(subsampled, guide, num_steps=3, progress=False, init=None, jit=mode)

    def reads_a_number():
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        # .item() turns a draw into a Python number, which a trace records as a constant
        spread = 1.0 + loc.detach().abs().sum().item()
        pyro.sample("obs", dist.Normal(loc, spread), obs=torch.tensor(0.5))

    pyro.clear_param_store()
    # the default particles fall back to one (the .item() sums the draws), then jit refuses
    from flowguide.diagnostics import VectorizationWarning

    with pytest.raises(ValueError, match=r"structure depends on its values .* use jit=False"):
        with pytest.warns(VectorizationWarning, match="one draw at a time"):
            fg.fit(
                reads_a_number,
                small_guide(reads_a_number),
                num_steps=3,
                progress=False,
                init=None,
                jit=mode,
            )
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=rf"jit={mode!r} .* AutoNormal .* JitTrace_ELBO"):
        fg.fit(model, AutoNormal(model), num_steps=3, progress=False, jit=mode)
    with pytest.raises(ValueError, match=rf"jit={mode!r} .* loss Trace_ELBO"):
        fg.fit(model, small_guide(), num_steps=3, progress=False, loss=Trace_ELBO(), jit=mode)


def test_jit_argument_is_checked():
    with pytest.raises(ValueError, match=r"jit must be False, True, 'trace' or 'compile', got 'x'"):
        fg.fit(model, small_guide(), num_steps=3, progress=False, jit="x")


def test_jit_compile_reports_a_compiler_failure(monkeypatch):
    """A torch.compile that cannot build (no C++ compiler, say) is reported with what to use
    instead, at the first compiled step, not as an error deep inside TorchInductor."""

    def broken(*args, **kwargs):
        def run(*a, **k):
            raise OSError("no C++ compiler found\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(RuntimeError, match=r"torch.compile failed \(OSError: no C\+\+ .*'trace'"):
        fg.fit(model, small_guide(), num_steps=3, progress=False, init=None, jit="compile")


@needs_cxx
def test_jit_compile_checks_the_gradient(monkeypatch):
    """The compiled loss's gradient is checked against the plain loss's at a test draw: a
    compiled program that lost a parameter's gradient (here: one that reads the first parameter
    detached, so the loss's value is right and that gradient is zero) is refused."""
    from flowguide.train import _InductorLoss

    build = _InductorLoss._compile

    def losing(self, *args):
        build(self, *args)
        program = self.compiled
        self.compiled = lambda eps, first, *rest: program(eps, first.detach(), *rest)

    monkeypatch.setattr(_InductorLoss, "_compile", losing)
    with pytest.raises(ValueError, match=r"gradient for parameter '\S+' differs"):
        fg.fit(model, small_guide(), num_steps=3, progress=False, init=None, jit="compile")


def test_callback_sees_every_step_and_can_stop_the_fit():
    seen = []

    def log(step, loss):
        seen.append((step, loss))

    result = fg.fit(model, small_guide(), num_steps=12, progress=False, init=None, callback=log)
    assert [s for s, _ in seen] == list(range(12))
    assert [loss for _, loss in seen] == result.losses
    pyro.clear_param_store()
    result = fg.fit(
        model,
        small_guide(),
        num_steps=50,
        progress=False,
        init=None,
        callback=lambda step, loss: step == 6,
    )
    assert result.stopped == "callback" and len(result.losses) == 7


def test_default_particles_and_the_fallback_for_a_model_without_plates():
    """fit's default: DEFAULT_FLOW_PARTICLES draws per step for a flowguide guide (one vectorised
    model call), one for Pyro's guides; a model whose data sit outside any plate cannot take a
    batch of draws, so the default falls back to one particle with a warning, while an explicit
    num_particles is taken at its word."""
    from flowguide.diagnostics import VectorizationWarning
    from flowguide.train import DEFAULT_FLOW_PARTICLES

    assert DEFAULT_FLOW_PARTICLES == 16
    shapes = []

    def plated():
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        shapes.append(tuple(loc.shape))
        with pyro.plate("data", 3):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=torch.tensor([0.5, 1.0, 1.5]))

    result = fg.fit(plated, small_guide(plated), num_steps=3, progress=False, init=None)
    assert result.num_particles == 16 and shapes[-1] == (16, 1), shapes[-1]
    pyro.clear_param_store()
    result = fg.fit(plated, AutoNormal(plated), num_steps=3, progress=False)
    assert result.num_particles == 1
    calls = {}
    for k in (1, 3):  # a Pyro guide's default Trace_ELBO runs the model once per particle
        pyro.clear_param_store()
        guide = AutoNormal(plated)
        guide()
        before = len(shapes)
        fg.fit(plated, guide, num_steps=2, num_particles=k, progress=False)
        calls[k] = len(shapes) - before
    assert calls[3] - calls[1] == 2 * (3 - 1), calls

    def unplated():
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=torch.tensor([0.5, 1.0, 1.5]))

    pyro.clear_param_store()
    with pytest.warns(VectorizationWarning, match="fitting with num_particles=1"):
        result = fg.fit(unplated, small_guide(unplated), num_steps=3, progress=False, init=None)
    assert result.num_particles == 1 and len(result.losses) == 3
    assert all(math.isfinite(v) for v in result.losses)
    pyro.clear_param_store()
    with pytest.raises(ValueError):  # asked for: no silent fallback
        fg.fit(
            unplated, small_guide(unplated), num_steps=3, num_particles=4, progress=False, init=None
        )


def test_a_model_that_gives_a_batch_of_draws_a_wrong_log_density_is_caught(monkeypatch):
    """A model valid for one draw but wrong for a batch raises no shape error: a factor summed
    over all dims adds the draws together, and data in no plate with as many entries as the
    particles pair up with them. fit checks the batched log joint against one draw at a time:
    the default falls back to one particle (and then fits the right posterior), an explicit
    num_particles raises, naming the problem."""
    from flowguide.diagnostics import VectorizationWarning

    def summed():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.factor("f", -0.5 * (z - 1.0).pow(2).sum())  # also sums over a batch of draws

    pyro.clear_param_store()
    guide = small_guide(summed)
    with pytest.warns(VectorizationWarning, match="one draw at a time"):
        result = fg.fit(summed, guide, num_steps=1500, progress=False, init=None, seed=0)
    assert result.num_particles == 1
    mean = guide.sample_constrained(4000)["z"].mean(0)  # posterior N(0.5, 0.5) per coordinate
    assert torch.allclose(mean, torch.full((2,), 0.5), atol=0.1), mean
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="one draw at a time"):
        fg.fit(summed, small_guide(summed), num_steps=2, num_particles=4, progress=False)
    # init="auto" compares two starts' ELBOs: one draw per model call for such a model too
    pyro.clear_param_store()
    counts = []
    loss = fg.train.flow_elbo_loss

    def spy(*args, num_particles=1, **kwargs):
        counts.append(num_particles)
        return loss(*args, num_particles=num_particles, **kwargs)

    monkeypatch.setattr(fg.train, "flow_elbo_loss", spy)
    result = fg.fit(summed, small_guide(summed), num_steps=2, num_particles=1, progress=False)
    assert result.init is not None and counts and set(counts) == {1}, counts

    def paired():  # three data in no plate, and three particles: the shapes agree
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=torch.tensor([0.5, 1.0, 1.5]))

    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"site 'obs' has batch shape \(3,\)"):
        fg.fit(paired, small_guide(paired), num_steps=2, num_particles=3, progress=False)
    pyro.clear_param_store()
    guide = small_guide(paired)
    guide()
    z = torch.zeros(3, 1)
    with pytest.raises(ValueError, match="site 'obs'"):  # the loss itself refuses too
        fg.train._negative_elbo(paired, guide, z, torch.zeros(3), (), {})


def test_the_batch_check_keeps_the_random_stream_and_passes_a_subsampled_model(monkeypatch):
    """The check draws from its own generator and seeds each model call alike (the same
    subsample), so a model it passes fits exactly as without it, subsampled plate included."""

    def subsampled():
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        with pyro.plate("data", 50, subsample_size=10) as idx:
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=torch.arange(50.0)[idx] / 50)

    def losses():
        pyro.clear_param_store()
        guide = small_guide(subsampled)
        return fg.fit(subsampled, guide, num_steps=20, progress=False, init=None, seed=3)

    checked = losses()  # no VectorizationWarning (pytest makes warnings errors)
    assert checked.num_particles == fg.train.DEFAULT_FLOW_PARTICLES
    calls = []
    monkeypatch.setattr(fg.train, "_check_batched", lambda *a, **k: calls.append(1))
    unchecked = losses()
    assert calls == [1] and checked.losses == unchecked.losses
