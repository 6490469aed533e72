"""Multi-process helpers: who am I, wait for the others, rank 0 writes, batches per rank, strategy checks.

Why: with several processes (``trainer=ddp`` / ``fsdp`` / ``deepspeed_*``) EVERY process runs the whole
pipeline, SPMD style (paper §3 loop: SFT -> K x (regenerate -> fit -> evaluate)). Lightning's DDP starts the
other processes at the first ``Trainer.fit`` by re-running ``run.py`` with the same overrides (or torchrun /
SLURM start them all at once), and initialises ``torch.distributed`` there; the group then stays up for the
rest of the run. Between fits the processes share work (rollout chunks, reference log-probs), and only
global rank 0 writes a file that the others then read (``on_rank_zero``: rank 0 runs, everyone waits).

Every helper is a no-op without ``torch.distributed`` (one process): the single-process path is unchanged.

Before the group exists a process can still be a worker: Lightning starts workers with ``LOCAL_RANK=r``,
torchrun with ``RANK=r``. :func:`is_rank_zero` reads those (Lightning's own convention), so such a worker
never writes; :func:`rank_world` reports ``(0, 1)`` until the group is up (there is nobody to wait for).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "ShardedBatchSampler",
    "StrategyUnavailableError",
    "all_gather_objects",
    "barrier",
    "check_strategy",
    "is_rank_zero",
    "launcher_rank",
    "on_rank_zero",
    "rank_world",
    "shard_batches",
    "wait_for_file",
]

T = TypeVar("T")
_RANK_ENV = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # Lightning's order (rank_zero_only)
# strategy name prefix -> the package it needs (``deepspeed`` is an optional, GPU-only dependency)
_STRATEGY_PACKAGES = {"deepspeed": "deepspeed"}


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """``(global rank, world size)`` of the initialised default process group, else ``(0, 1)``."""
    if _initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launcher_rank() -> int:
    """This process's global rank as its launcher set it in the environment (0 when none did)."""
    for var in _RANK_ENV:
        value = os.environ.get(var)
        if value:
            return int(value)
    return 0


def launcher_local_rank() -> int:
    """This process's rank on its node as its launcher set it (``LOCAL_RANK``; 0 when none did)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_rank_zero() -> bool:
    """Whether this process is global rank 0: of the process group when it is up, else of the launcher."""
    return rank_world()[0] == 0 if _initialized() else launcher_rank() == 0


def barrier() -> None:
    """Wait until every process of the group gets here (no-op for one process)."""
    if rank_world()[1] > 1:
        dist.barrier()


def on_rank_zero(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Run ``fn(*args, **kwargs)`` on global rank 0 only, then :func:`barrier` on every rank.

    The pattern of "rank 0 writes a file that every rank reads next" (a saved model, a DONE marker).
    Returns ``fn``'s result on rank 0 and None elsewhere. An exception on rank 0 propagates before the
    barrier, so the others fail by the process group's timeout (or Lightning's launcher kills them).
    """
    result = fn(*args, **kwargs) if is_rank_zero() else None
    barrier()
    return result


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for one process."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def wait_for_file(path: Path | str, timeout_s: float = 6 * 3600.0, poll_s: float = 1.0) -> Path:
    """Block until ``path`` exists (a file rank 0 writes atomically) or raise TimeoutError after ``timeout_s``.

    For workers whose process group is not up yet (see the module docstring): they cannot :func:`barrier`.
    """
    path = Path(path)
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"wait_for_file: {path} did not appear within {timeout_s:.0f} s (rank 0 died?)"
            )
        time.sleep(poll_s)
    return path


class ShardedBatchSampler(Sampler[list[int]]):
    """Rank ``rank``'s share of another batch sampler's batches: batches ``rank, rank + world, ...``.

    Every rank draws the SAME epoch of batches from ``inner`` (it must be deterministic given its seed and
    epoch, like :class:`~visrl.data.rows.StepBucketSampler`), pads the list by repeating its first batches
    to a multiple of ``world`` (as ``DistributedSampler`` pads samples), and keeps every ``world``-th. All
    ranks therefore take the same number of optimizer steps, which DDP needs, and together see every batch
    of the epoch (a batch holds rows of one step, so step bucketing survives the sharding).
    """

    def __init__(self, inner: Any, rank: int, world: int) -> None:
        if not (world >= 1 and 0 <= rank < world):
            raise ValueError(f"ShardedBatchSampler: need 0 <= rank < world, got rank={rank}, world={world}")
        self.inner, self.rank, self.world = inner, rank, world

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        batches = list(iter(self.inner))
        if batches and len(batches) % self.world:
            pad = self.world - len(batches) % self.world
            batches += [batches[i % len(batches)] for i in range(pad)]
        return iter(batches[self.rank :: self.world])

    def __len__(self) -> int:
        return -(-len(self.inner) // self.world)


def shard_batches(batch_sampler: Any) -> Any:
    """``batch_sampler`` as is for one process, else wrapped in this rank's :class:`ShardedBatchSampler`.

    Multi-process trainer configs set ``use_distributed_sampler: false`` (Lightning cannot inject its
    sampler into a custom batch sampler), so data modules shard their batches with this themselves.
    """
    rank, world = rank_world()
    return batch_sampler if world == 1 else ShardedBatchSampler(batch_sampler, rank, world)


class StrategyUnavailableError(RuntimeError):
    """The configured trainer strategy / accelerator cannot run here (missing package or device)."""


def check_strategy(trainer: Mapping[str, Any]) -> None:
    """Fail fast, in one line, when ``conf/trainer`` asks for what this machine lacks.

    ``trainer`` is the Trainer keyword mapping (``strategy``, ``accelerator``, ``devices``). Checks: the
    strategy's package (``deepspeed_*`` needs ``deepspeed``), and GPUs for ``accelerator: gpu|cuda``.
    """
    strategy = str(trainer.get("strategy", "auto"))
    for prefix, package in _STRATEGY_PACKAGES.items():
        if strategy.startswith(prefix) and importlib.util.find_spec(package) is None:
            raise StrategyUnavailableError(
                f"trainer.strategy={strategy} needs the '{package}' package, which is not installed "
                f"(pip install {package}; GPU machines only) - or pick trainer=ddp / trainer=default"
            )
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise StrategyUnavailableError(
            f"trainer.accelerator={accelerator} but no CUDA device is visible; use trainer.accelerator=cpu"
        )
