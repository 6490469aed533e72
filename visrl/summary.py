"""The run's final files, derived from its parts: ``summary.json`` and ``plots/``.

Nothing here accumulates state: every call rebuilds the same files from the per-step outputs
(``sft/eval/metrics.json``, ``iter_k/eval/metrics.json``, ``iter_k/stats.json``, the predictions files), so
any subset of final files can be deleted and the next run of the same command restores them identically.

``summary.json``: ``{"iterations": [{"iter": 0, "metrics": {...}}, ...], "final_metric": <headline metric of
the last evaluation>, "effect": <paired-bootstrap differences, last vs first evaluation, with 95 % CIs>}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visrl.benchmarks.base import Benchmark
from visrl.data.io import read_json, write_json_atomic
from visrl.logging.rundir import make_run_plots

SUMMARY = "summary.json"


def flat_numbers(stats: dict, prefix: str) -> dict[str, float]:
    """Numeric leaves of a nested dict as ``prefix/a/b`` keys (for logging ``stats.json``)."""
    out: dict[str, float] = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            out.update(flat_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def build_summary(root: Path, benchmark: Benchmark, evals: list[str]) -> dict[str, Any]:
    """The summary of the evaluations ``evals`` (run-relative folders, iteration 0 first): the benchmark's
    headline metric of the last one and its paired effect, last vs first."""
    iterations = []
    for k, name in enumerate(evals):
        metrics = read_json(root / name / "metrics.json", recover=root / name)
        stats = (root / name).parent / "stats.json"  # iter_k/stats.json: the iteration's pair statistics
        if k > 0 and stats.is_file():
            metrics = {**metrics, **flat_numbers(read_json(stats, recover=stats.parent), "data/")}
        iterations.append({"iter": k, "metrics": metrics})
    summary: dict[str, Any] = {"iterations": iterations}
    summary["final_metric"] = iterations[-1]["metrics"].get(benchmark.headline)
    if len(iterations) > 1:
        summary["effect"] = benchmark.paired_effect(root / evals[0], root / evals[-1])
    return summary


def write_final_files(root: Path, benchmark: Benchmark, evals: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Write ``summary.json`` and the plots; returns the summary and the run-relative files written."""
    summary = build_summary(root, benchmark, evals)
    write_json_atomic(root / SUMMARY, summary)
    plots = make_run_plots(root)
    made = [str(Path(p).relative_to(root)) for p in plots.values() if isinstance(p, Path)]
    return summary, [SUMMARY, *made]
