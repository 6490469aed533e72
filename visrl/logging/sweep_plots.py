"""Per-metric plots of a sweep (used by :mod:`visrl.report`): a metric vs the swept numeric override.

One PNG per final-iteration metric. With a numeric swept override (e.g. ``objective.beta``) the metric is a
line over it, one line per combination of the other swept overrides (e.g. one per ``model``); without one,
one bar per job. Error bars come from the jobs' 95 % intervals (``<metric>_ci_lo``/``_ci_hi`` in
``summary.json``, read by :mod:`visrl.report`) when every drawn job has one. Only
complete jobs are drawn; failed/incomplete ones are listed in the report table instead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from visrl.logging.media import colour_for  # noqa: E402
from visrl.logging.sweep import JobResult  # noqa: E402

__all__ = ["metric_filename", "numeric_key", "plot_sweep_metrics"]


def metric_filename(metric: str) -> str:
    """``eval/synthetic/cot_pred/accuracy`` -> ``eval__synthetic__cot_pred__accuracy.png``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", metric.replace("/", "__")) + ".png"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_key(jobs: Sequence[JobResult], swept: Sequence[str]) -> str | None:
    """The first swept override whose value is a number in every given job, or None."""
    for key in swept:
        if jobs and all(_is_number(j.overrides.get(key)) for j in jobs):
            return key
    return None


def _label(job: JobResult, keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={job.overrides.get(k)}" for k in keys) or job.name


def _yerr(jobs: Sequence[JobResult], metric: str) -> list[list[float]] | None:
    """[2, n] distances to the interval ends, or None unless every job has an interval for ``metric``."""
    if not all(metric in j.intervals for j in jobs):
        return None
    ys = [j.metrics[metric] for j in jobs]
    return [
        [y - j.intervals[metric][0] for y, j in zip(ys, jobs)],
        [j.intervals[metric][1] - y for y, j in zip(ys, jobs)],
    ]


def _lines(ax: Any, jobs: Sequence[JobResult], metric: str, x_key: str, others: Sequence[str]) -> None:
    groups: dict[tuple[str, ...], list[JobResult]] = {}
    for job in jobs:
        groups.setdefault(tuple(repr(job.overrides.get(k)) for k in others), []).append(job)
    for idx, members in enumerate(groups.values()):
        members.sort(key=lambda j: j.overrides[x_key])
        xs = [j.overrides[x_key] for j in members]
        ys = [j.metrics[metric] for j in members]
        label = _label(members[0], others) if others else metric
        ax.errorbar(
            xs, ys, yerr=_yerr(members, metric), fmt="o-", capsize=3, color=colour_for(idx), label=label
        )
    xs_all = [j.overrides[x_key] for j in jobs]
    if min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 50:  # e.g. beta in {0.01, 0.1, 1}
        ax.set_xscale("log")
    ax.set_xlabel(x_key)
    ax.legend(fontsize=8, loc="best")


def _bars(ax: Any, jobs: Sequence[JobResult], metric: str, swept: Sequence[str]) -> None:
    labels = [_label(j, swept) for j in jobs]
    ax.bar(
        range(len(jobs)),
        [j.metrics[metric] for j in jobs],
        yerr=_yerr(jobs, metric),
        capsize=3,
        color=[colour_for(i) for i in range(len(jobs))],
    )
    ax.set_xticks(range(len(jobs)), labels, rotation=30, ha="right", fontsize=8)


def plot_sweep_metrics(
    jobs: Sequence[JobResult], swept: Sequence[str], out_dir: str | Path, metrics: Sequence[str]
) -> list[Path]:
    """One PNG per metric in ``metrics`` that a complete job has, in ``out_dir``; returns the paths written."""
    done = [j for j in jobs if j.status == "complete" and j.metrics]
    metrics = [m for m in metrics if any(m in j.metrics for j in done)]
    out_dir = Path(out_dir)
    if metrics:
        out_dir.mkdir(parents=True, exist_ok=True)
    x_key = numeric_key(done, swept)
    paths = []
    for metric in metrics:
        have = [j for j in done if metric in j.metrics]
        fig, ax = plt.subplots(figsize=(6, 4))
        if x_key is not None:
            _lines(ax, have, metric, x_key, [k for k in swept if k != x_key])
        else:
            _bars(ax, have, metric, swept)
        ax.set_ylabel(metric)
        ax.set_title(metric, fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / metric_filename(metric)
        fig.savefig(path, dpi=100, format="png")
        plt.close(fig)
        paths.append(path)
    return paths
