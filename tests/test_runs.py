"""visrl/runs.py: one owner per run directory, resumable steps with one store of weights, derived completion.

Unit level (no pipeline): the lock across processes (held, refused with the holder named, taken over after
the holder died, even by kill -9), steps that skip when done and restore the weights they trained, the
fault hook, and ``is_complete`` following the files the ``DONE`` marker lists.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from visrl.logging.sweep import DONE, is_complete
from visrl.runs import InjectedFailure, RunDir, RunDirBusyError, RunLock

HOLD = textwrap.dedent(
    """
    import sys, time
    from visrl.runs import RunLock
    RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(60)
    """
)


def hold_lock(root: Path) -> subprocess.Popen:
    """A separate process that takes the run directory's lock and keeps it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_owner_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(RunDirBusyError) as err:
            RunLock(tmp_path).acquire()
        message = str(err.value)
        assert f"pid {holder.pid}" in message and str(tmp_path) in message and "\n" not in message
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    holder = hold_lock(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)  # no clean-up code runs: the OS drops the lock with the process
    holder.wait()
    lock = RunLock(tmp_path).acquire()
    assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()
    lock.release()
    RunLock(tmp_path).acquire().release()  # released: free again


def test_one_process_cannot_hold_the_same_directory_twice(tmp_path: Path) -> None:
    first = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(RunDirBusyError):
            RunLock(tmp_path).acquire()  # flock is per open file: a second open in-process is refused too
    finally:
        first.release()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def test_step_runs_once_and_a_resumed_run_restores_its_weights(tmp_path: Path) -> None:
    model, calls = _model(), []

    def train(delta: float) -> str:
        calls.append(delta)
        with torch.no_grad():
            model.weight.add_(delta)
        return "trained"

    run = RunDir(tmp_path)
    assert run.step("iter_1/stage1", lambda: train(1.0), trains=model) == "trained"
    trained = model.weight.detach().clone()
    assert json.loads((tmp_path / "iter_1/stage1" / DONE).read_text()) == {
        "weights": "iter_1/stage1/weights.pt"
    }

    fresh, resumed = _model(), RunDir(tmp_path)  # a new process: the model starts from its init again
    assert resumed.step("iter_1/stage1", lambda: train(5.0), trains=fresh) is None
    assert calls == [1.0], "a done step ran again"
    assert not torch.equal(fresh.weight, trained), "weights are restored lazily, before the next step runs"
    resumed.step("iter_1/stage2", lambda: calls.append("stage2"), trains=fresh)
    assert torch.equal(torch.load(tmp_path / "iter_1/stage2/weights.pt")["weight"], trained), (
        "stage 2 did not start from stage 1's weights"
    )


def test_an_outer_step_records_the_inner_weights_instead_of_a_second_copy(tmp_path: Path) -> None:
    model = _model()
    run = RunDir(tmp_path)
    run.step("iter_1", lambda: run.step("iter_1/stage1", lambda: None, trains=model), trains=model)
    assert not (tmp_path / "iter_1" / "weights.pt").exists()
    assert json.loads((tmp_path / "iter_1" / DONE).read_text())["weights"] == "iter_1/stage1/weights.pt"
    skipped = RunDir(tmp_path)
    target = _model()
    with torch.no_grad():
        target.weight.zero_()
    skipped.step("iter_1", lambda: pytest.fail("ran again"), trains=target)
    skipped.restore()
    assert torch.equal(target.weight, model.weight)


def test_fail_after_fires_after_the_marker(tmp_path: Path) -> None:
    run = RunDir(tmp_path, fail_after="sft")
    with pytest.raises(InjectedFailure, match="fail_after=sft"):
        run.step("sft", lambda: None)
    assert run.done("sft")
    RunDir(tmp_path, fail_after="sft").step(
        "sft", lambda: pytest.fail("ran again")
    )  # done: no second failure


def test_complete_means_the_marker_and_every_file_it_lists(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert not is_complete(tmp_path)

    def final() -> tuple[str, list[str]]:
        (tmp_path / "summary.json").write_text("{}")
        (tmp_path / "plots").mkdir(exist_ok=True)
        (tmp_path / "plots" / "a.png").write_bytes(b"png")
        return "summary", ["summary.json", "plots/a.png"]

    (tmp_path / "FAILED").write_text("an earlier attempt")
    assert run.finish(final) == "summary"
    assert is_complete(tmp_path) and not (tmp_path / "FAILED").exists()
    for name in ("summary.json", "plots/a.png"):
        saved = (tmp_path / name).read_bytes()
        (tmp_path / name).unlink()
        assert not is_complete(tmp_path), f"complete without {name}"
        (tmp_path / name).write_bytes(saved)
    (tmp_path / "summary.json").write_text("")
    assert not is_complete(tmp_path), "an empty summary.json counted as complete"
    (tmp_path / DONE).write_text("")
    assert not is_complete(tmp_path), "an empty DONE marker counted as complete"


def test_lock_wait_is_immediate(tmp_path: Path) -> None:
    """A refused owner learns it at once (non-blocking lock), not after the holder ends."""
    holder = hold_lock(tmp_path)
    try:
        start = time.perf_counter()
        with pytest.raises(RunDirBusyError):
            RunLock(tmp_path).acquire()
        assert time.perf_counter() - start < 1.0
    finally:
        holder.kill()
        holder.wait()


def test_cache_lock_makes_a_second_builder_wait(tmp_path: Path) -> None:
    """Two builders of one cache entry: the second enters only after the first has left (a sweep's
    parallel jobs of one seed build the base model once); a multi-process run's ranks never wait."""
    import threading
    import time

    from visrl.runs import cache_lock

    order: list[str] = []
    inside = threading.Event()

    def first() -> None:
        with cache_lock(tmp_path / "key.lock", single_process=True):
            inside.set()
            time.sleep(0.3)
            order.append("first leaves")

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(5)
    with cache_lock(tmp_path / "key.lock", single_process=True):
        order.append("second enters")
    thread.join()
    assert order == ["first leaves", "second enters"]
    held, rank = tmp_path / "key.lock", tmp_path / "key.lock"
    with cache_lock(held, single_process=True), cache_lock(rank, single_process=False):  # a rank: no wait
        order.append("rank enters")
    assert order[-1] == "rank enters"
