"""Nothing lost under faults, at the level a user meets them: ``python run.py`` killed, raced, half-deleted.

* **kill -9** at a point of a small run (the default suite: during iteration 1's rollouts; the slow tier:
  several points), then the same command again: the same ``summary.json`` and candidates as an
  uninterrupted run, no candidate lost or duplicated;
* **two commands on one run directory**: one runs, the other stops at once with one line naming the holder
  (exit 2) and touches nothing;
* **any final file deleted** from a finished run (``summary.json``, plots, ``DONE``): the same command
  rebuilds it identically from the run's parts;
* **a corrupt step file**: one line naming the file and what to delete.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FAST, RUN_PY, CliResult

ARGS = ("iter=2", "logger=csv")  # the tiny_run fixture's command (conftest.py)


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """``python run.py debug=fast <overrides>`` in its own process group (so kill -9 takes its children)."""
    return subprocess.Popen(
        [sys.executable, str(RUN_PY), *FAST, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=RUN_PY.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before the kill point: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def candidate_keys(path: Path) -> list[tuple]:
    from visrl.data.io import read_jsonl

    return [(row["question_index"], row["cand"]) for row in read_jsonl(path, allow_torn_tail=False)[1]]


def assert_same_run(ours: Path, reference: Path) -> None:
    assert (ours / "summary.json").read_bytes() == (reference / "summary.json").read_bytes()
    for k in (1, 2):
        mine, theirs = ours / f"iter_{k}" / "candidates.jsonl", reference / f"iter_{k}" / "candidates.jsonl"
        keys = candidate_keys(mine)
        assert len(keys) == len(set(keys)), f"iter_{k}: duplicated candidates"
        assert mine.read_bytes() == theirs.read_bytes(), f"iter_{k}/candidates.jsonl differs"


def lines_in(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


KILL_POINTS = {  # name -> (file that marks the moment, lines it must hold)
    "rollouts": ("iter_1/candidates.jsonl", 1),
    "sft": ("sft/model/backbone.json", 0),
    "stage1": ("iter_1/stage1/DONE", 0),
    "eval": ("iter_2/eval/predictions.jsonl", 1),
    "final": ("summary.json", 0),
}


def killed_and_resumed(run_dir: Path, point: str, run_visrl: Callable[..., CliResult]) -> CliResult:
    path, lines = KILL_POINTS[point]
    proc = start(run_dir, *ARGS)
    kill_when(proc, lambda: (run_dir / path).exists() and lines_in(run_dir / path) >= lines)
    return run_visrl(run_dir, *ARGS)


def test_kill_9_during_rollouts_then_resume_equals_uninterrupted(
    tiny_run: Path, run_visrl: Callable[..., CliResult], tmp_path: Path
) -> None:
    result = killed_and_resumed(tmp_path / "run", "rollouts", run_visrl)
    assert result.returncode == 0, result.tail()
    assert_same_run(tmp_path / "run", tiny_run)


@pytest.mark.slow
@pytest.mark.parametrize("point", [p for p in KILL_POINTS if p != "rollouts"])
def test_kill_9_at_every_point_then_resume_equals_uninterrupted(
    point: str, tiny_run: Path, run_visrl: Callable[..., CliResult], tmp_path: Path
) -> None:
    result = killed_and_resumed(tmp_path / "run", point, run_visrl)
    assert result.returncode == 0, result.tail()
    assert_same_run(tmp_path / "run", tiny_run)


def test_two_commands_on_one_run_directory(tiny_run: Path, tmp_path: Path) -> None:
    """The first command is paused (SIGSTOP) while it owns the directory, so the race is certain."""
    run_dir = tmp_path / "run"
    first = start(run_dir, *ARGS)
    lock = run_dir / ".lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and "pid" in lock.read_text()):  # the first command owns the directory
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        second = start(run_dir, *ARGS)
        _, err = second.communicate(timeout=300)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"pid {first.pid}" in errors[0] and "Traceback" not in err, err[-3000:]
    assert not (run_dir / "FAILED").exists(), "the refused command marked the other's run as failed"
    assert_same_run(run_dir, tiny_run)


@pytest.fixture()
def finished_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the finished tiny run (its config names its own folder, so it is re-run in place)."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    for name in ("config.yaml", ".hydra/config.yaml"):
        text = (copy / name).read_text()
        (copy / name).write_text(text.replace(str(tiny_run), str(copy)))
    return copy


@pytest.mark.parametrize(
    "deleted",
    [("summary.json",), ("plots/iterations.png", "plots/gallery.png"), ("DONE", "summary.json", "plots")],
)
def test_deleted_final_files_are_rebuilt_identically(
    deleted: tuple[str, ...], finished_copy: Path, tiny_run: Path, run_visrl: Callable[..., CliResult]
) -> None:
    for name in deleted:
        target = finished_copy / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    result = run_visrl(finished_copy, *ARGS)
    assert result.returncode == 0, result.tail()
    assert (finished_copy / "summary.json").read_bytes() == (tiny_run / "summary.json").read_bytes()
    for plot in ("plots/iterations.png", "plots/gallery.png", "DONE"):
        assert (finished_copy / plot).stat().st_size > 0, f"{plot} not rebuilt"
    rows = (finished_copy / "metrics.jsonl").read_text().count("\n")
    assert rows == (tiny_run / "metrics.jsonl").read_text().count("\n"), "the rebuild logged records again"


def test_corrupt_step_file_is_named_in_one_line(
    finished_copy: Path, run_visrl: Callable[..., CliResult]
) -> None:
    (finished_copy / "summary.json").unlink()
    (finished_copy / "iter_1" / "eval" / "metrics.json").write_text("")
    result = run_visrl(finished_copy, *ARGS)
    assert result.returncode == 2, result.tail()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "iter_1/eval/metrics.json" in errors[0] and "iter_1/eval" in errors[0], (
        result.tail()
    )
    assert "Traceback" not in result.stderr
