r"""Data-parallel training under ``torch.distributed``: one process per device, each working on
its shard of every global batch, with the gradients averaged across processes.

``torchrun`` starts the processes and describes each one in environment variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`init_distributed`
reads them, joins the process group (``gloo`` on CPUs, ``nccl`` on CUDA devices) and returns a
:class:`DistributedContext`; without them it returns a single-process context, so the same
script runs with ``python`` and with ``torchrun``.

The batch is sharded so that data-parallel training computes what one process would with the
same global batch: every rank draws the same global batch of indices (the same seeded
permutation, :class:`ShardedBatches`) and takes its own contiguous slice, so the union of the
ranks' shards *is* the single-process batch. When each rank's loss is the *mean* over its shard,
averaging the gradients over the ranks (:class:`~torch.nn.parallel.DistributedDataParallel`
through :meth:`DistributedContext.wrap`, or :func:`average_gradients`) gives the gradient of the
mean over the global batch, the single-process gradient. Randomness that must agree with a
single-process run (a VAE's reparameterisation noise, say) is drawn for the global batch from a
generator seeded by the step (:func:`step_seed`) and sliced the same way.

A training loop::

    ctx = init_distributed()  # a single process without torchrun
    batches = ShardedBatches(len(x), 128, ctx.rank, ctx.world_size, seed=0)
    net = Net().to(ctx.device)  # its forward returns the mean loss over a batch
    trainer = ctx.wrap(net)  # DistributedDataParallel, or net itself
    optimizer = torch.optim.Adam(net.parameters())
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        for idx in batches:
            loss = trainer(x[idx])  # the mean over this rank's shard
            optimizer.zero_grad()
            loss.backward()  # the gradients are averaged over the ranks
            optimizer.step()
        ctx.print(f"epoch {epoch}: loss {ctx.all_reduce_mean(loss).item():.3f}")
        if ctx.is_main:
            torch.save(net.state_dict(), "checkpoint.pt")
    del trainer  # the wrapper holds the process group: close() frees the group and its threads
    ctx.close()

launched as ``torchrun --nproc_per_node=4 train.py`` (see the guide "Scaling out with
torchrun" for several nodes).
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import gc
import hashlib
import importlib
import math
import os
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "BACKENDS",
    "DistributedContext",
    "ShardedBatches",
    "average_gradients",
    "default_backend",
    "init_distributed",
    "launched_by_torchrun",
    "parameter_spread",
    "shard_slice",
    "step_seed",
]

_CPU = torch.device("cpu")

#: The process-group backends :func:`init_distributed` accepts.
BACKENDS: tuple[str, ...] = ("gloo", "nccl")


def _check_int(value: Any, name: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_rank(rank: Any, world_size: Any) -> tuple[int, int]:
    world_size = _check_int(world_size, "world_size", 1)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise ValueError(
            f"rank must be an integer in [0, world_size={world_size}), got rank={rank!r}"
        )
    return rank, world_size


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment describes a process of a ``torchrun`` job (``RANK`` and
    ``WORLD_SIZE`` are set), whatever its size.

    Example:
        >>> launched_by_torchrun({"RANK": "1", "WORLD_SIZE": "2"}), launched_by_torchrun({})
        (True, False)
    """
    env = os.environ if environ is None else environ
    return "RANK" in env and "WORLD_SIZE" in env


def default_backend(device: torch.device | str | None = None) -> str:
    """``"nccl"`` for a CUDA device (for ``device=None``: when CUDA is available), else
    ``"gloo"``.

    Example:
        >>> default_backend("cpu")
        'gloo'
    """
    if device is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def step_seed(seed: int, step: int, stream: str = "") -> int:
    """A seed for the random numbers of one global training step: the same on every rank, and
    unrelated streams for different ``(seed, step, stream)`` (a hash, not ``seed + step``);
    ``stream`` names a use, so that two uses of one step draw different numbers.

    Draw a global batch's noise from ``torch.Generator().manual_seed(step_seed(seed, step))``
    on every rank and slice each rank's shard from it (:func:`shard_slice`), and a data-parallel
    run uses the noise a single process would.

    Example:
        >>> step_seed(0, 5) == step_seed(0, 5), step_seed(0, 5) == step_seed(1, 4)
        (True, False)
    """
    for name, value in (("seed", seed), ("step", step)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if not isinstance(stream, str):
        raise ValueError(f"stream must be a string, got {stream!r}")
    key = f"flowguide:{seed}:{step}:{stream}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # below 2**63: any torch generator takes it


def shard_slice(global_batch_size: int, rank: int, world_size: int) -> slice:
    """The positions of rank ``rank``'s shard in a global batch of ``global_batch_size`` items:
    the ``rank``-th of ``world_size`` equal contiguous slices, so the shards of all ranks, in
    rank order, make up the global batch.

    Raises:
        ValueError: when ``global_batch_size`` is not a positive multiple of ``world_size``
            (the message names the sizes that are), or ``rank`` is not in
            ``[0, world_size)``.

    Example:
        >>> shard_slice(8, 1, 4)
        slice(2, 4, None)
        >>> torch.arange(8)[shard_slice(8, 3, 4)]
        tensor([6, 7])
    """
    rank, world_size = _check_rank(rank, world_size)
    _check_int(global_batch_size, "global_batch_size", 1)
    if global_batch_size % world_size:
        below = global_batch_size // world_size * world_size
        options = [n for n in (below, below + world_size) if n > 0]
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by "
            f"world_size={world_size}: every rank takes an equal share of each global batch, "
            f"so the global batch size must be a multiple of {world_size} (e.g. "
            + " or ".join(str(n) for n in options)
            + ")"
        )
    size = global_batch_size // world_size
    return slice(rank * size, (rank + 1) * size)


class ShardedBatches:
    """Mini-batches of indices for data-parallel training, sharded per rank.

    Each epoch shuffles ``range(num_data)`` with a permutation seeded by
    ``step_seed(seed, epoch, "shuffle")`` (the same on every rank), cuts it into
    ``num_data // global_batch_size`` global batches (the incomplete last one is dropped) and
    gives this rank its slice of each (:func:`shard_slice`).
    With ``world_size=1`` the batches are the single-process ones; with more ranks the ranks'
    shards of step ``t``, in rank order, are exactly that global batch. (``torch.utils.data``'s
    ``DistributedSampler`` instead shards the epoch, so a rank's batch is not a slice of the
    single-process batch.)

    Iterating yields this rank's index tensors (int64, shape ``(global_batch_size //
    world_size,)``) for the epoch set by :meth:`set_epoch`; :meth:`indices` gives those of any
    global step (``epoch * len(batches) + i``), for resuming mid-epoch.

    Args:
        num_data: the data set's size :math:`N`.
        global_batch_size: the batch summed over the ranks, at most ``num_data``, a multiple of
            ``world_size``.
        rank, world_size: this process's rank and the number of processes
            (:attr:`DistributedContext.rank`, :attr:`DistributedContext.world_size`).
        seed: seeds the permutations.
        shuffle: ``False`` takes the data in order every epoch.

    Example:
        >>> ranks = [ShardedBatches(10, 4, rank, 2, seed=0) for rank in range(2)]
        >>> len(ranks[0]), list(ranks[0].indices(0).shape)
        (2, [2])
        >>> single = ShardedBatches(10, 4, 0, 1, seed=0)
        >>> bool(torch.equal(torch.cat([b.indices(3) for b in ranks]), single.indices(3)))
        True
    """

    def __init__(
        self,
        num_data: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.num_data = _check_int(num_data, "num_data", 1)
        self.shard = shard_slice(global_batch_size, rank, world_size)
        if global_batch_size > num_data:
            raise ValueError(
                f"global_batch_size={global_batch_size} is larger than the data set "
                f"(num_data={num_data}); use at most {num_data}"
            )
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.seed, self.shuffle = seed, bool(shuffle)
        self.epoch = 0
        self._order: tuple[int, Tensor] | None = None

    def __len__(self) -> int:
        """The number of steps in an epoch."""
        return self.num_data // self.global_batch_size

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch that iterating goes through (each epoch has its own shuffle)."""
        self.epoch = _check_int(epoch, "epoch", 0)

    def _permutation(self, epoch: int) -> Tensor:
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(step_seed(self.seed, epoch, "shuffle"))
                order = torch.randperm(self.num_data, generator=g)
            else:
                order = torch.arange(self.num_data)
            self._order = (epoch, order)
        return self._order[1]

    def global_indices(self, step: int) -> Tensor:
        """The whole global batch of step ``step`` (the same on every rank)."""
        step = _check_int(step, "step", 0)
        epoch, i = divmod(step, len(self))
        b = self.global_batch_size
        return self._permutation(epoch)[i * b : (i + 1) * b]

    def indices(self, step: int) -> Tensor:
        """This rank's shard of the global batch of step ``step``."""
        return self.global_indices(step)[self.shard]

    def __iter__(self) -> Iterator[Tensor]:
        first = self.epoch * len(self)
        for step in range(first, first + len(self)):
            yield self.indices(step)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a data-parallel job, with the few collective operations a
    training loop needs. Made by :func:`init_distributed`; a single-process context
    (``world_size=1``, no process group) makes every method a no-op or the identity, so one
    training loop serves both.

    Attributes:
        rank: this process's rank in ``[0, world_size)``; rank 0 is the *main* process, the one
            that prints, writes checkpoints and results.
        world_size: the number of processes.
        local_rank: the rank on this node (the index of its GPU under ``nccl``).
        device: the device this process computes on.
        backend: ``"gloo"``, ``"nccl"``, or None without a process group.
        owns_group: whether :meth:`close` destroys the process group (it was created by
            :func:`init_distributed`).

    Example:
        >>> ctx = DistributedContext()  # a single process
        >>> ctx.is_main, ctx.world_size, ctx.shard(torch.arange(4)).tolist()
        (True, 1, [0, 1, 2, 3])
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = _CPU
    backend: str | None = None
    owns_group: bool = False

    def __post_init__(self) -> None:
        _check_rank(self.rank, self.world_size)
        if self.backend is None and self.world_size > 1:
            raise ValueError(
                f"world_size={self.world_size} needs a process group (backend 'gloo' or "
                "'nccl'); use init_distributed()"
            )

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether a process group is in use (``backend`` is not None)."""
        return self.backend is not None and dist.is_available() and dist.is_initialized()

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on rank 0 only (flushed, so that lines of a long job show as they come)."""
        if self.is_main:
            kwargs.setdefault("flush", True)
            builtins.print(*args, **kwargs)

    def shard(self, batch: Tensor, dim: int = 0) -> Tensor:
        """This rank's slice of a global batch along ``dim`` (:func:`shard_slice`)."""
        s = shard_slice(batch.shape[dim], self.rank, self.world_size)
        return batch.narrow(dim, s.start, s.stop - s.start)

    def wrap(self, module: nn.Module, **kwargs: Any) -> nn.Module:
        """``module`` in :class:`~torch.nn.parallel.DistributedDataParallel` (which broadcasts
        rank 0's parameters and buffers now and averages the gradients in every backward pass
        through its ``forward``), or ``module`` itself without a process group. ``kwargs`` go to
        ``DistributedDataParallel``. Put the whole loss computation in the module's ``forward``:
        only gradients of a pass through the wrapper are averaged."""
        if not self.active:
            return module
        if self.device.type == "cuda":
            kwargs.setdefault("device_ids", [self.device])
            kwargs.setdefault("output_device", self.device)
        return nn.parallel.DistributedDataParallel(module, **kwargs)

    def all_reduce_mean(self, value: Tensor) -> Tensor:
        """The mean of ``value`` over the ranks (a new, detached tensor; for logging a loss,
        say). Every rank must call it, with a tensor of the same shape."""
        out = value.detach().clone()
        if self.active and self.world_size > 1:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
            out /= self.world_size
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (pickled; a checkpoint that only rank 0 read,
        say). Every rank must call it."""
        if not self.active or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.active and self.world_size > 1:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def close(self) -> None:
        """Destroy the process group if :func:`init_distributed` created it, and make sure it
        is gone, its worker threads joined, before this returns.

        ``destroy_process_group`` only drops ``torch.distributed``'s own references to the
        group; the group (and its threads) is freed when the last reference goes. A group that
        outlives ``close`` is freed while the interpreter shuts down, and a worker thread that
        still releases the last collective then needs the interpreter and aborts the process
        ("terminate called without an active exception"). So ``close`` collects garbage when
        the group survives (a discarded :class:`~torch.nn.parallel.DistributedDataParallel`
        wrapper in a reference cycle, say) and warns (:class:`RuntimeWarning`) when it is
        still referenced after that: drop the wrappers from :meth:`wrap` before calling
        ``close``. Call it once every rank is done with the group (after a :meth:`barrier`).
        """
        if not (self.owns_group and dist.is_available() and dist.is_initialized()):
            return
        group = _weak_default_group()
        dist.destroy_process_group()
        if group is None or group() is None:
            return
        gc.collect()
        if group() is not None:
            warnings.warn(
                "the process group is still referenced after destroy_process_group() (by a "
                "DistributedDataParallel wrapper from wrap(), say), so its worker threads run "
                "until the interpreter exits, where they can abort the process; drop such "
                "references before calling close()",
                RuntimeWarning,
                stacklevel=2,
            )

    def __enter__(self) -> DistributedContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _weak_default_group() -> weakref.ReferenceType[Any] | None:
    """A weak reference to the default process group (None where it cannot be made), to see
    whether destroying the group freed it."""
    try:
        return weakref.ref(dist.group.WORLD)
    except TypeError:  # no group, or a build whose groups take no weak references
        return None


def _import_collective_functions() -> None:
    """Import ``torch.distributed.nn`` before the process group is created.

    Its autograd-aware collectives take ``group=group.WORLD`` as a default argument, which
    Python evaluates once, on import. Imported after ``init_process_group`` (``torch._dynamo``
    imports it, and the first ``torch.optim`` optimizer imports ``torch._dynamo``), ten such
    defaults would hold the default process group until the interpreter exits, so that
    :meth:`DistributedContext.close` could not free it. Imported now, the defaults are None.
    """
    with contextlib.suppress(ImportError):
        importlib.import_module("torch.distributed.nn")


def _env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"the environment variable {name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"the environment variable {name} must be an integer, got {raw!r}"
        ) from None


def init_distributed(
    backend: str | None = None,
    *,
    device: torch.device | str | None = None,
    timeout: datetime.timedelta | None = None,
) -> DistributedContext:
    """Join the process group of a ``torchrun`` job, or describe a single process.

    Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set, see :func:`launched_by_torchrun`) it
    reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, picks the device (``cuda:LOCAL_RANK``
    when the backend is ``nccl``, else the CPU), calls ``torch.cuda.set_device`` for a GPU, and
    initialises the default process group from the environment (``MASTER_ADDR``,
    ``MASTER_PORT``); when a process group exists already it is used as it is. Without
    ``torchrun`` it returns a single-process context (rank 0 of 1, no process group) on
    ``device`` (default the CPU).

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default :func:`default_backend` of the device
            (``nccl`` when CUDA is available, else ``gloo``).
        device: the device to compute on; default as above. ``nccl`` needs a CUDA device.
        timeout: passed to ``torch.distributed.init_process_group``.

    Raises:
        ValueError: an unknown backend, ``nccl`` without a CUDA device, or a malformed
            environment.
        RuntimeError: ``torch.distributed`` or the backend is not available in this build.

    Example:
        >>> ctx = init_distributed()  # not under torchrun: a single process
        >>> ctx.rank, ctx.world_size, ctx.backend
        (0, 1, None)
        >>> ctx.close()
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None (automatic), got {backend!r}")
    if not launched_by_torchrun():
        return DistributedContext(device=torch.device(device or "cpu"))
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed support")
    env = os.environ
    rank, world_size = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
    local_rank = _env_int(env, "LOCAL_RANK", 0)
    _check_rank(rank, world_size)
    if device is None:
        use_cuda = backend == "nccl" or (backend is None and torch.cuda.is_available())
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    device = torch.device(device)
    backend = backend or default_backend(device)
    if backend == "nccl":
        if device.type != "cuda":
            raise ValueError(f"backend='nccl' needs a CUDA device, got device={device}")
        if not dist.is_nccl_available():
            raise RuntimeError("backend='nccl' is not available in this PyTorch build")
        torch.cuda.set_device(device)
    elif not dist.is_gloo_available():
        raise RuntimeError("backend='gloo' is not available in this PyTorch build")
    if dist.is_initialized():
        return DistributedContext(
            dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend()
        )
    options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    _import_collective_functions()
    dist.init_process_group(
        backend, init_method="env://", rank=rank, world_size=world_size, **options
    )
    return DistributedContext(rank, world_size, local_rank, device, backend, owns_group=True)


def _grad_params(parameters: Iterable[Tensor]) -> list[Tensor]:
    params = [p for p in parameters if isinstance(p, Tensor) and p.requires_grad]
    return list({id(p): p for p in params}.values())


def average_gradients(parameters: Iterable[Tensor]) -> None:
    """Average the ``.grad`` of ``parameters`` over the ranks, in place (one all-reduce of a
    flat buffer per device and dtype): the alternative to
    :meth:`DistributedContext.wrap` when the loss is not computed by one module's ``forward``.
    Call it between ``loss.backward()`` and ``optimizer.step()`` on every rank, with the same
    parameters in the same order. A parameter without a gradient on some rank counts as a zero
    gradient there, and every parameter that requires grad has a gradient afterwards. Without a
    process group it does nothing.

    Example:
        >>> w = torch.ones(2, requires_grad=True)
        >>> (3 * w).sum().backward()
        >>> average_gradients([w])  # a single process: unchanged
        >>> w.grad.tolist()
        [3.0, 3.0]
    """
    params = _grad_params(parameters)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    for group in groups.values():
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        start = 0
        for p in group:
            piece = flat[start : start + p.numel()].view_as(p)
            start += p.numel()
            if p.grad is None:
                p.grad = piece.clone()
            else:
                p.grad.copy_(piece)


@torch.no_grad()
def parameter_spread(parameters: Iterable[Tensor]) -> float:
    """The largest absolute difference between any rank's parameters and rank 0's: 0.0 when
    the ranks are in sync, as data-parallel training keeps them. Every rank must call it, with
    parameters of the same shapes; every rank gets the result. 0.0 without a process group.

    Raises:
        ValueError: the ranks hold different numbers of parameter elements.

    Example:
        >>> parameter_spread(nn.Linear(2, 2).parameters())  # a single process
        0.0
    """
    params = [p.detach() for p in parameters]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    device = params[0].device if params else torch.device("cpu")
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    flat = (
        torch.cat([p.reshape(-1).to(device=device, dtype=torch.float64) for p in params])
        if params
        else torch.zeros(0, dtype=torch.float64, device=device)
    )
    sizes = torch.tensor([flat.numel(), -flat.numel()], dtype=torch.float64, device=device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    if sizes[0] != -sizes[1]:
        raise ValueError(
            "the ranks hold different numbers of parameter elements "
            f"(from {int(-sizes[1])} to {int(sizes[0])}); pass the same parameters on every rank"
        )
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    spread = (flat - reference).abs().max() if flat.numel() else flat.new_zeros(())
    if not math.isfinite(spread.item()):  # a NaN on one rank: report it, not 0
        spread = spread.new_tensor(math.inf)
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    return float(spread.item())
