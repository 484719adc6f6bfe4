"""Data-parallel training (flowguide.distributed and examples/vae.py under torchrun): two CPU
processes with gloo on this machine train as one process with the same global batch does."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import load_vae_example
from torch import nn

from flowguide.amortized import AmortizedFlowPosterior
from flowguide.distributed import (
    DistributedContext,
    ShardedBatches,
    average_gradients,
    init_distributed,
    launched_by_torchrun,
    parameter_spread,
    shard_slice,
    step_seed,
)

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


# -- sharding ----------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_make_up_the_global_batch(world_size):
    batch = 12
    pieces = [torch.arange(batch)[shard_slice(batch, r, world_size)] for r in range(world_size)]
    assert all(len(p) == batch // world_size for p in pieces)
    assert torch.equal(torch.cat(pieces), torch.arange(batch))


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_batches_are_slices_of_the_single_process_batches(world_size):
    n, batch = 50, 8
    single = ShardedBatches(n, batch, seed=3)
    ranks = [ShardedBatches(n, batch, r, world_size, seed=3) for r in range(world_size)]
    assert len(single) == len(ranks[0]) == n // batch
    for step in range(3 * len(single)):  # three epochs
        union = torch.cat([r.indices(step) for r in ranks])
        assert torch.equal(union, single.indices(step))
    # an epoch visits distinct data, and the next epoch is shuffled differently
    epoch0 = torch.cat(list(single))
    assert len(set(epoch0.tolist())) == len(epoch0) == len(single) * batch
    single.set_epoch(1)
    epoch1 = torch.cat(list(single))
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(epoch1[:batch], single.indices(len(single)))
    ordered = ShardedBatches(n, batch, 1, 2, shuffle=False)
    assert ordered.indices(0).tolist() == [4, 5, 6, 7]


def test_step_seed_is_deterministic_and_separates_steps_and_streams():
    assert step_seed(0, 7) == step_seed(0, 7)
    seeds = {step_seed(s, t, k) for s in range(3) for t in range(50) for k in ("", "noise")}
    assert len(seeds) == 300
    assert all(0 <= s < 2**63 for s in seeds)


def test_bad_arguments_raise_clear_errors(monkeypatch, no_torchrun):
    with pytest.raises(
        ValueError,
        match=r"global_batch_size=50 is not divisible by world_size=4: .* multiple of 4 "
        r"\(e\.g\. 48 or 52\)",
    ):
        ShardedBatches(600, 50, 0, 4)
    with pytest.raises(ValueError, match=r"global_batch_size=3 .* world_size=4: .*\(e\.g\. 4\)"):
        shard_slice(3, 0, 4)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, world_size=2\)"):
        shard_slice(8, 2, 2)
    with pytest.raises(ValueError, match=r"world_size must be an integer >= 1, got 0"):
        shard_slice(8, 0, 0)
    with pytest.raises(ValueError, match=r"global_batch_size=64 is larger than the data set"):
        ShardedBatches(10, 64)
    with pytest.raises(ValueError, match=r"backend must be one of \('gloo', 'nccl'\)"):
        init_distributed("mpi")
    with pytest.raises(ValueError, match=r"world_size=2 needs a process group"):
        DistributedContext(rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"step must be an integer"):
        step_seed(0, 1.5)  # type: ignore[arg-type]
    # a torchrun environment: checked before any process group is created
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match=r"backend='nccl' needs a CUDA device, got device=cpu"):
        init_distributed("nccl", device="cpu")
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match=r"RANK must be an integer, got 'one'"):
        init_distributed()


def test_the_example_rejects_a_batch_not_divisible_by_the_world_size(
    monkeypatch, capsys, no_torchrun
):
    vae = load_vae_example()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit) as exit_info:
        vae.parse(["--smoke", "--synthetic"])  # --smoke: a global batch of 50
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--batch-size 50: global_batch_size=50 is not divisible by world_size=4" in err
    assert "(e.g. 48 or 52)" in err
    assert vae.parse(["--smoke", "--synthetic", "--batch-size", "48"]).distributed


def test_a_single_process_context_is_the_identity(no_torchrun):
    assert not launched_by_torchrun()
    with init_distributed() as ctx:
        assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main) == (0, 1, None, True)
        assert not ctx.active
        net = nn.Linear(2, 1)
        assert ctx.wrap(net) is net
        x = torch.tensor([1.0, 2.0], requires_grad=True)
        mean = ctx.all_reduce_mean(x)
        assert torch.equal(mean, x.detach()) and not mean.requires_grad
        assert ctx.broadcast_object({"a": 1}) == {"a": 1}
        assert torch.equal(ctx.shard(torch.arange(6)), torch.arange(6))
        ctx.barrier()
        assert parameter_spread(net.parameters()) == 0.0


# -- two processes -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 2, generator=g, dtype=torch.float64)
    w = torch.randn(2, 6, generator=g, dtype=torch.float64)
    return torch.bernoulli(torch.sigmoid(z @ w), generator=g)


def _train_tiny_vae(ctx: DistributedContext, steps: int) -> tuple[list[float], list[torch.Tensor]]:
    """A tiny Bernoulli VAE with an IAF posterior in float64, trained with the gradients
    averaged by average_gradients; returns the per-step global-batch losses and parameters."""
    x, batch, latent = _tiny_data(), 16, 2
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh()).double()
    posterior = AmortizedFlowPosterior(encoder, latent, flow="iaf", data_shape=(6,), hidden=(8,))
    decoder = nn.Linear(latent, 6).double()
    params = [*posterior.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=0.02)
    batches = ShardedBatches(len(x), batch, ctx.rank, ctx.world_size, seed=1)
    normal = torch.distributions.Normal
    losses = []
    for step in range(steps):
        xb = x[batches.indices(step)]
        g = torch.Generator().manual_seed(step_seed(1, step, "noise"))
        eps = ctx.shard(torch.randn(batch, latent, generator=g, dtype=torch.float64))
        loc, scale, context = posterior.encode(xb)
        z, ladj = posterior.flow.condition(context).forward_and_log_abs_det(loc + eps * scale)
        log_q = normal(loc, scale).log_prob(loc + eps * scale).sum(-1) - ladj
        log_p = normal(0.0, 1.0).log_prob(z).sum(-1)
        log_p = log_p + torch.distributions.Bernoulli(logits=decoder(z)).log_prob(xb).sum(-1)
        loss = (log_q - log_p).mean()  # the mean over this rank's shard
        optimizer.zero_grad()
        loss.backward()
        average_gradients(params)
        optimizer.step()
        losses.append(ctx.all_reduce_mean(loss).item())
    return losses, [p.detach().clone() for p in params]


def _worker(rank: int, world_size: int, port: int, out: str, steps: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    with init_distributed(timeout=datetime.timedelta(seconds=120)) as ctx:
        losses, params = _train_tiny_vae(ctx, steps)
        perturbed = [p.clone() for p in params]
        if rank == 1:
            perturbed[0].view(-1)[0] += 0.25
        record = {
            "losses": losses,
            "params": params,
            "spread": parameter_spread(params),
            "perturbed_spread": parameter_spread(perturbed),
            "broadcast": ctx.broadcast_object({"from": rank}),
            "mean_rank": ctx.all_reduce_mean(torch.tensor(float(rank))).item(),
            "backend": ctx.backend,
            "world_size": ctx.world_size,
        }
        ctx.barrier()
    torch.save(record, Path(out) / f"rank{rank}.pt")


@needs_gloo
def test_two_processes_average_gradients_like_one_process(tmp_path, no_torchrun):
    steps = 8
    torch.multiprocessing.spawn(
        _worker, args=(2, _free_port(), str(tmp_path), steps), nprocs=2, join=True
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single_losses, single_params = _train_tiny_vae(DistributedContext(), steps)

    for record in ranks:
        assert record["backend"] == "gloo" and record["world_size"] == 2
        assert record["spread"] == 0.0
        assert record["perturbed_spread"] == pytest.approx(0.25)
        assert record["broadcast"] == {"from": 0}
        assert record["mean_rank"] == 0.5
    # (a) the ranks hold the same parameters, bit for bit
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)
    # (b) and the same curve and parameters as one process with the global batch
    assert ranks[0]["losses"] == ranks[1]["losses"]
    losses = torch.tensor(ranks[0]["losses"], dtype=torch.float64)
    single = torch.tensor(single_losses, dtype=torch.float64)
    torch.testing.assert_close(losses, single, rtol=1e-9, atol=0)
    assert losses[-1] < losses[0]  # it trains
    for a, b in zip(ranks[0]["params"], single_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _torchrun_env(port: int) -> dict[str, str]:
    """The environment torchrun gives the only process of a one-process job."""
    return {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


@needs_gloo
def test_close_frees_the_group_when_torch_dynamo_is_imported_after_init():
    # torch.distributed.nn's collectives default to group=group.WORLD, bound on import; the
    # first torch.optim optimizer imports torch._dynamo, which imports them. Imported after the
    # group was created, they kept it (and its gloo threads) alive past close() into
    # interpreter shutdown, where a gloo thread releasing the last collective aborted the
    # process now and then. A fresh interpreter, so that nothing was imported before.
    script = textwrap.dedent(
        """
        import warnings, weakref
        import torch.distributed as dist
        from flowguide.distributed import init_distributed
        warnings.simplefilter("error")
        ctx = init_distributed("gloo")
        import torch._dynamo  # what the first torch.optim optimizer does
        group = weakref.ref(dist.group.WORLD)
        ctx.close()
        print("freed" if group() is None else "alive")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env |= _torchrun_env(_free_port())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["freed"]


@needs_gloo
def test_close_warns_when_the_group_is_still_referenced(monkeypatch):
    for name, value in _torchrun_env(_free_port()).items():
        monkeypatch.setenv(name, value)
    ctx = init_distributed("gloo")
    keep = [dist.group.WORLD]  # as a DistributedDataParallel wrapper does
    with pytest.warns(RuntimeWarning, match=r"still referenced .* before calling close\(\)"):
        ctx.close()
    assert not dist.is_initialized()
    keep.clear()


def _run(cmd: list[str], out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env |= {"MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    args = ["--smoke", "--synthetic", "--posteriors", "diagonal,iaf", "--dtype", "float64"]
    args += ["--no-progress", "--output", str(out), *extra]
    done = subprocess.run(
        [*cmd, str(ROOT / "examples" / "vae.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=out.parent,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@needs_gloo
def test_vae_example_under_torchrun_matches_one_process(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    two = _run([*torchrun, "--nproc_per_node=2"], tmp_path / "two")
    # the reference: one process, the same global batch of 50, the same data-parallel loop
    one = _run([sys.executable], tmp_path / "one", "--distributed")
    assert "data-parallel over 2 process(es)" in two.stdout
    assert two.stdout.count("parameters agree across 2 processes to 0.0e+00") == 2
    assert two.stdout.count("wrote ") == 1  # rank 0 alone reports and writes
    assert "data-parallel over 1 process(es)" in one.stdout
    for name in ("diagonal", "iaf"):
        a, b = (
            torch.load(tmp_path / run / "checkpoints" / f"{name}.pt", weights_only=True)
            for run in ("two", "one")
        )
        # (a) the processes' parameters agree (parameter_spread at the end of the epoch)
        assert a["history"]["rank_spread"] == [0.0]
        # (b) the loss curve and the parameters are those of the single process
        curve_two = torch.tensor(a["history"]["step_loss"], dtype=torch.float64)
        curve_one = torch.tensor(b["history"]["step_loss"], dtype=torch.float64)
        assert len(curve_two) == 12  # 600 images, batch 50
        torch.testing.assert_close(curve_two, curve_one, rtol=1e-6, atol=0)
        for part in ("decoder", "guide"):
            for key, value in a[part].items():
                torch.testing.assert_close(value, b[part][key], rtol=1e-6, atol=1e-9)
