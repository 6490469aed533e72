"""The run directory's bookkeeping, kept out of the method's lines: ownership, steps, weights, faults.

The pipeline reads like the paper because everything that makes a run survivable lives here:

* **one owner**: :class:`RunLock` holds an OS file lock on ``<run_dir>/.lock`` for the life of the process,
  with the holder's pid and host written in it; a second command on the same directory stops at once
  with one line naming the holder. A lock of a dead process is released by the OS, so it is taken over
  without any stale-lock heuristics;
* **steps**: :meth:`RunDir.step` runs a step unless its ``DONE`` marker exists, then (rank 0) saves the
  weights it trained, writes the marker, waits for every rank and fires the ``fail_after`` test hook;
* **one store of stage weights**: the innermost step that trains saves ``<step>/weights.pt`` (trainable
  parameters only: an adapter under LoRA); a skipped step restores the latest weights it recorded, lazily,
  right before the next step that runs, so a resumed run loads weights once;
* **rank 0 writes**: every file is written by global rank 0 (:func:`visrl.dist.on_rank_zero`), then a barrier.

:meth:`RunDir.finish` writes the run's ``DONE`` marker last, listing the final files it vouches for
(:func:`visrl.logging.sweep.is_complete`), so deleting any final file (``summary.json``, ``plots/``) makes the
next run rebuild it from its parts.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from visrl.data.io import read_json, write_json_atomic
from visrl.dist import launcher_rank, on_rank_zero
from visrl.logging.sweep import DONE, mark_complete

log = logging.getLogger(__name__)
T = TypeVar("T")
WEIGHTS = "weights.pt"


class RunDirBusyError(RuntimeError):
    """Another live process owns the run directory (an expected error: one line, exit code 2)."""

    owned_by_another = True  # run.py must not mark the other process's run FAILED


class InjectedFailure(RuntimeError):
    """Raised by the ``fail_after`` test hook right after the named step completed."""


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock`` for as long as this object lives (launcher rank 0 only:
    the other ranks of a multi-process run work in the directory that rank 0 owns)."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if launcher_rank() != 0:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirBusyError(
                f"{self.path.parent}: in use by {holder}; wait for it to finish or stop it (one command per run "
                "directory)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


@contextmanager
def cache_lock(path: Path, single_process: bool) -> Iterator[None]:
    """Hold an exclusive, BLOCKING ``flock`` on ``path`` while a shared cache entry is checked and built.

    Parallel jobs on one machine (a sweep's jobs, the arms of one seed in a study) share the base-model cache:
    without the lock two of them would build the same entry at once, both writing its files. With it the
    second waits and then finds the entry finished. Only for ``single_process`` runs: the ranks of a
    multi-process run build together (their collectives), so none of them may wait on a lock.
    """
    if not single_process:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def save_trainable(model: nn.Module, path: Path) -> None:
    """The parameters that train (the adapter under LoRA), atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, tmp)
    os.replace(tmp, path)


def load_trainable(model: nn.Module, path: Path) -> None:
    """Load weights saved by :func:`save_trainable` into ``model``; a file that does not fit is named."""
    result = model.load_state_dict(torch.load(path, weights_only=True), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: weights do not fit the model: unexpected {result.unexpected_keys[:5]}")


class RunDir:
    """One run directory: resumable steps, their markers and weights, rank-0 writes and the fault hook."""

    def __init__(self, root: Path | str, fail_after: str | None = None) -> None:
        self.root = Path(root)
        self.fail_after = fail_after
        self._latest: str | None = None  # run-relative path of the newest trained weights
        self._pending: tuple[nn.Module, Path] | None = None  # weights to load before the next step runs

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def done(self, name: str) -> bool:
        return (self.root / name / DONE).is_file()

    def step(
        self,
        name: str,
        fn: Callable[[], T],
        *,
        trains: nn.Module | None = None,
        load: Callable[[Path], T] | None = None,
    ) -> T | None:
        """Run ``fn`` as the step ``name`` (its folder ``<run_dir>/<name>``) unless it is already done.

        ``trains``: the module whose trainable weights the step changes; they are saved when the step ends
        (unless a nested step already saved them) and restored when the step is skipped. ``load``: how to
        read a skipped step's result back from its folder (else a skipped step returns None).
        """
        folder = self.root / name
        if self.done(name):
            weights = (read_json(folder / DONE) or {}).get("weights")
            if trains is not None and weights:
                self._latest, self._pending = weights, (trains, self.root / weights)
            return load(folder) if load is not None else None
        self.restore()
        before = self._latest
        result = fn()
        if trains is not None and self._latest == before:  # innermost training step: the one store
            self._latest = f"{name}/{WEIGHTS}"
            on_rank_zero(save_trainable, trains, self.root / self._latest)
        marker = {"weights": self._latest if trains is not None else None}
        on_rank_zero(write_json_atomic, folder / DONE, marker)
        if self.fail_after == name:
            raise InjectedFailure(f"fail_after={name}: injected failure after {name} completed")
        return result

    def restore(self) -> None:
        """Load the weights of the last skipped training step, if any are pending."""
        if self._pending is not None:
            model, path = self._pending
            self._pending = None
            log.info("resuming from %s", path)
            load_trainable(model, path)

    def finish(self, write_final: Callable[[], tuple[T, list[str]]]) -> T | None:
        """Rebuild the final files (idempotent, from the run's parts), then mark the run ``DONE`` last, listing
        them (``write_final`` returns its result and the run-relative files it wrote; rank 0 only)."""
        made = on_rank_zero(write_final)
        if made is None:
            return None
        result, files = made
        on_rank_zero(mark_complete, self.root, files)
        return result
