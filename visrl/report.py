"""Sweep report: one table (and one plot per metric) over the jobs of a Hydra multirun.

``python -m visrl.report SWEEP_DIR [--metrics M,...] [--out DIR]`` reads every job directory under
``SWEEP_DIR`` (those with ``.hydra/overrides.yaml``), prints a compact table of the chosen metrics, and writes
``report.md`` (that table), ``report.csv`` (every metric and interval) and ``plots/<metric>.png`` (the chosen
metrics only) to ``DIR`` (default ``SWEEP_DIR/report``). This is how the ablations of VisRL §4 (beta,
iterations, backbone, reward mix) are read off a sweep.

Metrics: the final iteration's from ``summary.json``, the iteration-0 (SFT warm-up) ones prefixed ``sft/``,
and the paired effect (last iteration minus SFT) as ``effect/<metric>``. Intervals come from
``<metric>_ci_lo``/``<metric>_ci_hi`` (the benchmarks' 95 % bootstrap) and the effect's ``ci95``.
``--metrics`` takes names or shell patterns (``'cot_pred/*'``); the default is the headline: every final
metric with an interval, and the effects.

Row per job: the swept overrides (the values that differ between jobs), ``status`` (``complete`` |
``failed`` | ``incomplete``, see :mod:`visrl.logging.sweep`), ``value [lo, hi]`` per chosen metric, and for
a failed job the last line of its ``FAILED`` traceback. A failed or unreadable job is reported in its row.

Plots: a metric against the swept numeric override, one line per combination of the other swept overrides,
error bars from the intervals; a bar chart per job when nothing numeric is swept. Complete jobs only.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from visrl.logging.rundir import Section, is_sweep
from visrl.logging.sweep import JobResult, failure_message, find_jobs, job_status

__all__ = [
    "JobResult",
    "Report",
    "load_job",
    "main",
    "parse_overrides",
    "report_table",
    "select_metrics",
    "write_report",
]

OVERRIDES = Path(".hydra") / "overrides.yaml"


@dataclass
class Report:
    """What :func:`write_report` produced."""

    sweep_dir: Path
    markdown: str
    markdown_path: Path
    csv_path: Path
    plots: list[Path]
    jobs: list[JobResult]
    metrics: list[str]  # the chosen metrics (table and plots)


def parse_overrides(path: str | Path) -> dict[str, Any]:
    """``key -> typed value`` from a Hydra ``overrides.yaml`` (``+``/``~`` dropped; a delete gives None)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = Path(path)
    lines = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    if not isinstance(lines, list):
        raise ValueError(f"{path}: expected a YAML list of override strings")
    out: dict[str, Any] = {}
    parser = OverridesParser.create()
    for idx, line in enumerate(lines):
        try:
            (override,) = parser.parse_overrides([str(line)])
        except Exception as exc:  # hydra raises OverrideParseException; report which line
            raise ValueError(f"{path}: override {idx} {line!r} does not parse: {exc}") from exc
        key = override.key_or_group + (f"@{override.package}" if override.package else "")
        value = None if override.is_delete() else override.value()
        out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    return out


CI_SUFFIXES = ("_ci_lo", "_ci_hi", "_ci")


def _scalars(
    entry: dict[str, Any], prefix: str, metrics: dict[str, float], intervals: dict[str, Any]
) -> None:
    """Numeric metrics of one iteration (intervals apart: ``<m>_ci_lo``/``_ci_hi``, or a ``<m>_ci`` pair)."""
    values = entry["metrics"]
    for key, value in values.items():
        if key.endswith(CI_SUFFIXES) or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metrics[prefix + key] = float(value)
        lo, hi, pair = values.get(f"{key}_ci_lo"), values.get(f"{key}_ci_hi"), values.get(f"{key}_ci")
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            lo, hi = pair
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
            intervals[prefix + key] = (float(lo), float(hi))


def _read_summary(job_dir: Path) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Final, ``sft/`` and ``effect/`` scalar metrics and their intervals from ``summary.json``; raises
    ValueError on a broken file."""
    path = job_dir / "summary.json"
    summary = json.loads(path.read_text(encoding="utf-8"))
    iterations = summary.get("iterations") if isinstance(summary, dict) else None
    if not isinstance(iterations, list) or not iterations:
        raise ValueError(f"{path}: expected a non-empty 'iterations' list")
    for idx, entry in enumerate(iterations):
        if not isinstance(entry, dict) or "iter" not in entry or not isinstance(entry.get("metrics"), dict):
            raise ValueError(f"{path}: iterations[{idx}] needs 'iter' and a 'metrics' object")
    by_iter = sorted(iterations, key=lambda e: int(e["iter"]))
    metrics: dict[str, float] = {}
    intervals: dict[str, tuple[float, float]] = {}
    _scalars(by_iter[-1], "", metrics, intervals)
    if int(by_iter[0]["iter"]) == 0:  # the SFT warm-up was evaluated
        _scalars(by_iter[0], "sft/", metrics, intervals)
    effect = summary.get("effect")
    for key, value in effect.items() if isinstance(effect, dict) else ():
        if isinstance(value, dict) and isinstance(value.get("diff"), (int, float)):
            metrics[f"effect/{key}"] = float(value["diff"])
            ci = value.get("ci95")
            if isinstance(ci, (list, tuple)) and len(ci) == 2:
                intervals[f"effect/{key}"] = (float(ci[0]), float(ci[1]))
    return metrics, intervals


def load_job(job_dir: str | Path, sweep_dir: str | Path) -> JobResult:
    """Read one job; problems (unparsable overrides, a broken summary) go into ``error``, never raise."""
    job_dir, sweep_dir = Path(job_dir), Path(sweep_dir)
    job = JobResult(job_dir, job_dir.relative_to(sweep_dir).as_posix() or ".", {}, job_status(job_dir))
    try:
        job.overrides = parse_overrides(job_dir / OVERRIDES)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        job.error = str(exc)
    if job.status == "failed":
        job.error = job.error or failure_message(job_dir)
    elif (job_dir / "summary.json").is_file():
        try:
            job.metrics, job.intervals = _read_summary(job_dir)
        except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
            job.status, job.error = "incomplete", f"unreadable summary.json: {exc}"
    return job


def swept_keys(jobs: Sequence[JobResult]) -> list[str]:
    """Override keys whose value differs between jobs (first-appearance order)."""
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    return [k for k in keys if len({repr(j.overrides.get(k)) for j in jobs}) > 1]


def select_metrics(jobs: Sequence[JobResult], patterns: Sequence[str] | None = None) -> list[str]:
    """The metrics matching ``patterns`` (names or shell patterns, in pattern order), or by default the
    headline: every final-iteration metric with an interval, then the effects (all final metrics if none
    has an interval)."""
    names = sorted({k for j in jobs for k in j.metrics})
    if patterns:
        chosen = [n for p in patterns for n in names if fnmatch.fnmatchcase(n, p)]
        return list(dict.fromkeys(chosen))
    with_ci = {k for j in jobs for k in j.intervals}
    final = [n for n in names if not n.startswith(("sft/", "effect/"))]
    headline = [n for n in final if n in with_ci] or final
    return headline + [n for n in names if n.startswith("effect/")]


def report_table(
    jobs: Sequence[JobResult], metrics: Sequence[str], compact: bool = True
) -> tuple[list[str], list[list[Any]]]:
    """Columns ``job, <overrides>, status, <metrics>, error``, one row per job. ``compact``: only the swept
    overrides, and ``value [lo, hi]`` strings; else every override and metric, with ``_ci_lo``/``_ci_hi``
    columns (the CSV)."""
    overrides = (
        swept_keys(jobs)
        if compact and len(jobs) > 1
        else list(dict.fromkeys(k for j in jobs for k in j.overrides))
    )
    columns = ["job", *overrides, "status"]
    for metric in metrics:
        columns += [metric] if compact else [metric, f"{metric}_ci_lo", f"{metric}_ci_hi"]
    rows = []
    for j in jobs:
        row: list[Any] = [j.name, *(j.overrides.get(k) for k in overrides), j.status]
        for metric in metrics:
            value, ci = j.metrics.get(metric), j.intervals.get(metric)
            if compact:
                row.append(_with_ci(value, ci))
            else:
                row += [value, *(ci if ci else (None, None))]
        rows.append([*row, j.error])
    return [*columns, "error"], rows


def _with_ci(value: float | None, ci: tuple[float, float] | None) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_report(
    sweep_dir: str | Path, out_dir: str | Path | None = None, metrics: Sequence[str] | None = None
) -> Report:
    """Aggregate the sweep into ``out_dir`` (default ``<sweep_dir>/report``): report.md (the chosen
    ``metrics``, see :func:`select_metrics`), report.csv (all metrics) and the chosen metrics' plots."""
    from visrl.logging.sweep_plots import plot_sweep_metrics

    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory not found: {sweep_dir}")
    job_dirs = find_jobs(sweep_dir)
    if not job_dirs:
        raise ValueError(f"{sweep_dir}: no job directories (no */.hydra/overrides.yaml below it)")
    out = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    jobs = [load_job(d, sweep_dir) for d in job_dirs]
    chosen = select_metrics(jobs, metrics)
    if metrics and not chosen:
        known = sorted({k for j in jobs for k in j.metrics})
        raise ValueError(f"--metrics {','.join(metrics)} matches none of: {', '.join(known) or 'no metrics'}")
    columns, rows = report_table(jobs, chosen)
    counts = {s: sum(j.status == s for j in jobs) for s in ("complete", "failed", "incomplete")}
    header = f"# Sweep report: {sweep_dir}\n\n" + ", ".join(f"{n} {s}" for s, n in counts.items()) + "\n\n"
    markdown = header + to_markdown(columns, rows)
    (out / "report.md").write_text(markdown, encoding="utf-8")
    all_metrics = sorted(
        {k for j in jobs for k in j.metrics}, key=lambda k: (k.startswith(("sft/", "effect/")), k)
    )
    full_columns, full_rows = report_table(jobs, all_metrics, compact=False)
    with (out / "report.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(full_columns)
        writer.writerows([["" if v is None else v for v in row] for row in full_rows])
    plots = plot_sweep_metrics(jobs, swept_keys(jobs), out / "plots", chosen)
    return Report(sweep_dir, markdown, out / "report.md", out / "report.csv", plots, jobs, chosen)


_STATUS_STYLE = {"complete": "green", "failed": "bold red", "incomplete": "yellow"}


def print_report(report: Report) -> None:
    """Print the report table with ``rich`` (cells fold rather than being cut; full width when piped)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 1000))  # a file/pipe: keep every row on one line
    columns, rows = report_table(report.jobs, report.metrics)
    counts = ", ".join(f"{sum(j.status == s for j in report.jobs)} {s}" for s in _STATUS_STYLE)
    table = Table(title=f"Sweep report: {report.sweep_dir} ({counts})", title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    status = columns.index("status")
    for row in rows:
        cells = [Text(_cell(v).replace("\\|", "|")) for v in row]  # Text: no markup parsing of values
        cells[status].stylize(_STATUS_STYLE.get(row[status], ""))
        table.add_row(*cells)
    console.print(table)
    console.print(f"wrote {report.markdown_path}, {report.csv_path} and {len(report.plots)} plot(s)")


def sweep_report(target: str | Path, out_dir: str | Path | None = None) -> list[Section]:
    """The sweep table and per-metric plots (``visrl.report``); a note for a single run."""
    target = Path(target)
    if not is_sweep(target):
        return [Section("sweep report", "_not a sweep directory: no sweep report_")]
    report = write_report(target, out_dir)
    sections = [Section("sweep report", report.markdown)]
    return sections + [Section(p.stem, f"#### {p.stem}", p) for p in report.plots]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visrl.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default SWEEP_DIR/report)")
    parser.add_argument(
        "--metrics",
        default=None,
        help="comma-separated metric names or shell patterns, e.g. 'cot_pred/accuracy,effect/*' "
        "(default: every final metric with a 95%% interval, and the paired effects)",
    )
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        report = write_report(args.sweep_dir, args.out, metrics)
    except (FileNotFoundError, ValueError) as exc:
        print(f"visrl.report: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
