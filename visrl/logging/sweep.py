"""Hydra multirun bookkeeping: job status markers, the sweep root, and the running job's identity.

A VisRL sweep (e.g. ``model=a,b objective.beta=0.05,0.1``; paper §4 ablations) is many pipeline runs under one
Hydra sweep directory. ``run.py`` marks each job when it ends, so that ``visrl.report`` can tell complete,
failed and still-running/killed jobs apart without parsing logs, and so that a relaunch can skip finished jobs:

* ``<job_dir>/DONE``   written last by :func:`mark_complete` (``{"files": [...]}``: the final files it vouches for;
  a job is complete only while every one of them exists, so deleting one makes the next run rebuild it);
* ``<job_dir>/FAILED`` written by :func:`mark_failed`: the exception type, message and full traceback.

``run.py`` usage::

    try:
        visrl.pipeline.run(cfg)      # ends with mark_complete(job_dir, final_files) (visrl.runs.RunDir.finish)
    except Exception as exc:
        mark_failed(job_dir, exc)
        raise            # a multirun re-raises after every job ran

:func:`hydra_job_info` reads the Hydra runtime (when there is one) for the W&B group/name defaults.
"""

from __future__ import annotations

import json
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from visrl.data.io import write_json_atomic

__all__ = [
    "DONE",
    "FAILED",
    "HydraJobInfo",
    "JobResult",
    "failure_message",
    "hydra_job_info",
    "find_jobs",
    "is_complete",
    "is_failed",
    "job_status",
    "mark_complete",
    "mark_failed",
    "sweep_group_name",
    "sweep_root_of",
]

DONE = "DONE"
FAILED = "FAILED"
SUMMARY = "summary.json"
MULTIRUN_YAML = "multirun.yaml"  # written by Hydra's sweeper at the root of every sweep dir


def is_complete(job_dir: str | Path) -> bool:
    """True if the job finished: its ``DONE`` marker and every final file it lists exist and are non-empty
    (so deleting ``summary.json`` or a plot makes the next run rebuild it). Imports no torch: ``run.py``
    asks this before loading anything."""
    job_dir = Path(job_dir)
    try:
        files = json.loads((job_dir / DONE).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return False
    return all((job_dir / name).is_file() and (job_dir / name).stat().st_size > 0 for name in files)


def is_failed(job_dir: str | Path) -> bool:
    """True if the job crashed (``FAILED`` marker) and was not completed since."""
    return (Path(job_dir) / FAILED).is_file() and not is_complete(job_dir)


def job_status(job_dir: str | Path) -> str:
    """``"complete"``, ``"failed"`` or ``"incomplete"`` (running, killed, or never started)."""
    if is_complete(job_dir):
        return "complete"
    return "failed" if is_failed(job_dir) else "incomplete"


def mark_complete(job_dir: str | Path, files: list[str]) -> Path:
    """Write ``DONE`` listing the run-relative final ``files`` (removing a stale ``FAILED`` from an earlier
    attempt), atomically and last; returns the marker path."""
    job_dir = Path(job_dir)
    (job_dir / FAILED).unlink(missing_ok=True)
    marker = job_dir / DONE
    write_json_atomic(marker, {"files": sorted(files)})
    return marker


def mark_failed(job_dir: str | Path, exc: BaseException) -> Path:
    """Write ``FAILED`` with ``exc``'s traceback (removing ``DONE``); returns the marker path."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / DONE).unlink(missing_ok=True)
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    marker = job_dir / FAILED
    marker.write_text(text, encoding="utf-8")
    return marker


def failure_message(job_dir: str | Path) -> str:
    """The last non-empty line of ``FAILED`` (``"ExcType: message"``), or "" when there is none."""
    path = Path(job_dir) / FAILED
    if not path.is_file():
        return ""
    lines = [
        ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()
    ]
    return lines[-1] if lines else ""


def sweep_root_of(job_dir: str | Path) -> Path | None:
    """The sweep directory holding ``job_dir`` (nearest ancestor with Hydra's ``multirun.yaml``), or None."""
    job_dir = Path(job_dir).resolve()
    for parent in (job_dir, *job_dir.parents):
        if (parent / MULTIRUN_YAML).is_file():
            return parent
    return None


def sweep_group_name(sweep_dir: str | Path) -> str:
    """The W&B group of a sweep: the sweep dir's name (``multirun/<the sweep command>`` in conf/hydra)."""
    return Path(sweep_dir).name or "sweep"


@dataclass
class JobResult:
    """One job of a sweep, as ``visrl.report`` reads it (here, below the report and its plots)."""

    job_dir: Path
    name: str  # path relative to the sweep dir
    overrides: dict[str, Any]
    status: str
    metrics: dict[str, float] = field(default_factory=dict)  # final iteration + "sft/..." + "effect/..."
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> [lo, hi] (95 %)
    error: str = ""


@dataclass(frozen=True)
class HydraJobInfo:
    """What the running Hydra job says about itself (``None`` fields when Hydra did not set them)."""

    multirun: bool
    sweep_dir: str | None
    override_dirname: str
    job_num: int | None


def hydra_job_info() -> HydraJobInfo | None:
    """The current Hydra job's mode/sweep dir/override string, or None outside ``@hydra.main``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency
        return None
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return HydraJobInfo(
        multirun=multirun,
        sweep_dir=str(hc.sweep.dir) if multirun else None,
        override_dirname=str(hc.job.get("override_dirname", "") or ""),
        job_num=int(hc.job.num) if hc.job.get("num") is not None else None,
    )


def _natural_key(path: Path) -> list[Any]:
    """Sort key with embedded numbers compared as numbers: ``beta=0.05 < beta=0.1``, ``2 < 10``."""
    return [float(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+(?:\.\d+)?)", path.as_posix()))]


def _job_num(job_dir: Path) -> int | None:
    """Hydra's ``hydra.job.num`` from ``.hydra/hydra.yaml`` (the sweep's launch order), if readable."""
    try:
        num = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text(encoding="utf-8"))["hydra"]["job"][
            "num"
        ]
        return int(num)
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def find_jobs(sweep_dir: str | Path) -> list[Path]:
    """Job directories under ``sweep_dir`` (holding ``.hydra/overrides.yaml``), in Hydra's job order, else
    in natural path order."""
    sweep_dir = Path(sweep_dir)
    jobs = [p.parent.parent for p in sweep_dir.rglob("overrides.yaml") if p.parent.name == ".hydra"]

    def key(job: Path) -> tuple[bool, int, list[Any]]:
        num = _job_num(job)
        return (num is None, num or 0, _natural_key(job.relative_to(sweep_dir)))

    return sorted(jobs, key=key)
