"""Hydra multirun sweeps of the pipeline: job dirs named from overrides, skip-on-rerun, failure isolation,
and the ``python -m visrl.report`` table and plots.

Why: the paper's ablations (VisRL §4: beta, iterations, backbone, reward) are sweeps, and a sweep of
long jobs must survive one bad job and be relaunchable: ``run.py`` marks each job DONE / FAILED
(``visrl.logging.sweep``) and skips complete jobs; a failed job does not stop the others, and the sweep
exits non-zero once all have run. The sweep directory is named from the sweep command
(``visrl.config.names``), so the same command relaunched skips its finished jobs with no extra variable.

Default suite (~25 s): a 2-job sweep whose FIRST job crashes (``objective.loss=nonexistent``, rejected by
the config schema before any work), so the second one running to completion shows the isolation.
``slow`` (~80 s): the 2x2 ``objective.beta x iter`` sweep.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from visrl.logging.sweep_plots import metric_filename

Cli = Callable[..., Any]  # the `cli` fixture of conftest.py
OK_JOB = "debug-fast+iter-1+objective.loss-sigmoid"
BAD_JOB = "debug-fast+iter-1+objective.loss-nonexistent"
BAD_LINE = "objective.loss='nonexistent' is not allowed"
# rewritten by Hydra / appended by its job logging on every launch, even of a skipped job
LAUNCH_FILES = (".hydra/", "run.log")


def sweep(cli: Cli, sweep_dir: Path, *overrides: str) -> Any:
    return cli("run.py", "-m", "debug=fast", "logger=none", *overrides, f"hydra.sweep.dir={sweep_dir}")


def job_files(job_dir: Path) -> dict[str, tuple[str, int]]:
    """``path -> (sha256, mtime_ns)`` of a job's files, except those Hydra rewrites on every launch."""
    out = {}
    for path in sorted(job_dir.rglob("*")):
        rel = path.relative_to(job_dir).as_posix()
        if path.is_file() and not rel.startswith(LAUNCH_FILES):
            out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out


def read_report(report_dir: Path) -> list[dict[str, str]]:
    with (report_dir / "report.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def check_report(cli: Cli, sweep_dir: Path, swept: tuple[str, ...]) -> list[dict[str, str]]:
    """Run ``python -m visrl.report``; check its files, override columns and one plot per final metric."""
    result = cli("-m", "visrl.report", str(sweep_dir), timeout=300)
    assert result.returncode == 0, result.tail()
    report = sweep_dir / "report"
    rows = read_report(report)
    assert (report / "report.md").read_text().count("\n| ") == len(rows) + 1  # header + one line per job
    for key in swept:
        assert key in rows[0], f"report.csv has no column for the swept override {key!r}: {list(rows[0])}"
    assert "cot_pred/accuracy_ci_lo" in rows[0] and "sft/cot_pred/accuracy" in rows[0]
    # plots only for the headline metrics (those with a 95 % interval), not for the 50-odd data/ counters
    plots = {p.name for p in (report / "plots").glob("*.png")}
    assert metric_filename("cot_pred/accuracy") in plots and metric_filename("data/pairs") not in plots
    assert "cot_pred/accuracy" in result.stdout and "data/pairs" not in result.stdout
    return rows


# ----------------------------------------------------------------------------------------------- 2 jobs
@pytest.fixture(scope="module")
def loss_sweep(cli: Cli, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    sweep_dir = tmp_path_factory.mktemp("sweep") / "loss"
    result = sweep(cli, sweep_dir, "objective.loss=nonexistent,sigmoid", "iter=1")
    return {"dir": sweep_dir, "result": result}


def test_jobs_are_named_from_overrides_and_a_crash_does_not_stop_the_sweep(
    loss_sweep: dict[str, Any],
) -> None:
    sweep_dir, result = loss_sweep["dir"], loss_sweep["result"]
    assert result.returncode == 2, result.tail()  # non-zero: a job failed (an expected error: 2) ...
    assert BAD_LINE in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert jobs == [BAD_JOB, OK_JOB]
    bad, ok = sweep_dir / BAD_JOB, sweep_dir / OK_JOB
    assert BAD_LINE in (bad / "FAILED").read_text()
    assert not (bad / "summary.json").exists() and not (bad / "DONE").exists()
    assert not (bad / "sft").exists(), "a bad objective.loss must fail before any training"
    # ... after the job launched after the crash ran to completion
    assert (ok / "DONE").is_file() and not (ok / "FAILED").exists()
    for name in ("summary.json", "iter_1/DONE", "iter_1/model/backbone.json", "plots/iterations.png"):
        assert (ok / name).is_file(), f"{ok}: missing {name}"
    assert (ok / ".hydra" / "overrides.yaml").is_file()


def test_report_lists_complete_and_failed_jobs(cli: Cli, loss_sweep: dict[str, Any]) -> None:
    rows = check_report(cli, loss_sweep["dir"], ("objective.loss", "iter"))
    by_loss = {row["objective.loss"]: row for row in rows}
    assert by_loss["sigmoid"]["status"] == "complete" and by_loss["sigmoid"]["cot_pred/accuracy"] != ""
    assert by_loss["nonexistent"]["status"] == "failed"
    assert BAD_LINE in by_loss["nonexistent"]["error"]


def test_rerunning_the_sweep_skips_the_complete_job(cli: Cli, loss_sweep: dict[str, Any]) -> None:
    sweep_dir = loss_sweep["dir"]
    before = job_files(sweep_dir / OK_JOB)
    failed_at = (sweep_dir / BAD_JOB / "FAILED").stat().st_mtime_ns
    result = sweep(cli, sweep_dir, "objective.loss=nonexistent,sigmoid", "iter=1")
    assert result.returncode == 2, result.tail()
    assert job_files(sweep_dir / OK_JOB) == before, "the complete job was run again"
    assert "is complete; skipping" in (sweep_dir / OK_JOB / "run.log").read_text()
    assert (sweep_dir / BAD_JOB / "FAILED").stat().st_mtime_ns > failed_at  # retried, and failed again


# ----------------------------------------------------------------------------------------------- 2 x 2
@pytest.mark.slow
def test_beta_by_iterations_sweep(cli: Cli, tmp_path: Path) -> None:
    """The brief's 2x2 sweep: four complete jobs, a report with both override columns, a fast relaunch."""
    sweep_dir = tmp_path / "beta_iter"
    overrides = ("objective.beta=0.05,0.1", "iter=1,2")
    first = sweep(cli, sweep_dir, *overrides)
    assert first.returncode == 0, first.tail()
    expected = {f"debug-fast+iter-{i}+objective.beta-{b}" for i in (1, 2) for b in ("0.05", "0.1")}
    assert {p.name for p in sweep_dir.iterdir() if p.is_dir()} == expected
    for name in expected:
        job = sweep_dir / name
        assert (job / "DONE").is_file(), f"{name} did not complete"
        n_iter = int(name.split("iter-")[1].split("+")[0])
        assert (job / f"iter_{n_iter}" / "DONE").is_file() and not (job / f"iter_{n_iter + 1}").exists()
    rows = check_report(cli, sweep_dir, ("objective.beta", "iter"))
    assert sorted((row["objective.beta"], row["iter"]) for row in rows) == [
        ("0.05", "1"), ("0.05", "2"), ("0.1", "1"), ("0.1", "2")]  # fmt: skip
    assert all(row["status"] == "complete" for row in rows)
    before = {name: job_files(sweep_dir / name) for name in expected}
    again = sweep(cli, sweep_dir, *overrides)
    assert again.returncode == 0, again.tail()
    assert {name: job_files(sweep_dir / name) for name in expected} == before
    assert again.seconds < first.seconds / 2, f"relaunch took {again.seconds:.0f} s vs {first.seconds:.0f} s"
