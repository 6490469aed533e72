"""Reading run and sweep directories: the functions behind ``notebooks/analysis.ipynb`` and the run plots.

A *run dir* is one pipeline run (``summary.json``, ``metrics.jsonl``, ``sft/eval/``, ``iter_k/eval/``; see
docs/design.md "Run directory"); a *sweep dir* is a Hydra multirun holding job run dirs (``multirun.yaml``,
``*/.hydra/overrides.yaml``). The notebook only calls the section builders here (:func:`overview`,
:func:`summary_tables`, :func:`iteration_figures`, :func:`gallery_figures`; the sweep table is
:func:`visrl.report.sweep_report`) and
:func:`show`; each works for either kind of directory, so the notebook has no logic of its own.

:func:`make_run_plots` writes ``<run_dir>/plots/iterations.png`` and ``plots/gallery.png`` (VisRL §4: accuracy
over iterations; where the boxes moved); the pipeline may call it at the end of a run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visrl.logging.sweep import MULTIRUN_YAML, find_jobs, job_status, sweep_root_of

__all__ = [
    "Section",
    "find_predictions",
    "gallery_figures",
    "gallery_plot",
    "iteration_figures",
    "iterations_plot",
    "load_summary",
    "make_run_plots",
    "overview",
    "resolve_target",
    "runs_of",
    "show",
    "summary_markdown",
    "summary_tables",
]

ENV_VAR = "VISRL_RUN_DIR"
_RUN_MARKERS = ("summary.json", "metrics.jsonl", ".hydra")


@dataclass(frozen=True)
class Section:
    """One displayable piece of the analysis: a title, markdown, and/or a PNG."""

    title: str
    markdown: str = ""
    image: Path | None = None


def is_sweep(path: str | Path) -> bool:
    return (Path(path) / MULTIRUN_YAML).is_file()


def _search_roots(outputs: str | Path | None) -> list[Path]:
    """``outputs/`` (single runs) and ``multirun/`` (sweeps, conf/hydra) of the project, or just ``outputs``."""
    if outputs is not None:
        return [Path(outputs)]
    for base in (Path.cwd(), *Path.cwd().parents):  # the notebook runs from notebooks/
        roots = [base / name for name in ("outputs", "multirun") if (base / name).is_dir()]
        if roots:
            return roots
    raise FileNotFoundError(
        f"no outputs/ or multirun/ directory in {Path.cwd()} or its parents; set ${ENV_VAR}"
    )


def _candidates(root: Path) -> set[Path]:
    """Run dirs and sweep dirs under ``root`` (a job of a sweep counts as its sweep)."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        names = set(dirnames) | set(filenames)
        if MULTIRUN_YAML in names or any(m in names for m in _RUN_MARKERS):
            found.add(sweep_root_of(dirpath) or Path(dirpath).resolve())
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("wandb", "plots", "report")]
    return found


def resolve_target(path: str | Path | None = None, outputs: str | Path | None = None) -> Path:
    """``path``, else ``$VISRL_RUN_DIR``, else the newest run or sweep dir under ``outputs/`` (and ``multirun/``).

    A run that belongs to a sweep resolves to its sweep directory (the notebook then shows the whole sweep).
    """
    chosen = path if path is not None else os.environ.get(ENV_VAR)
    if chosen:
        target = Path(chosen).expanduser()
        if not target.is_dir():
            raise FileNotFoundError(f"run/sweep directory not found: {target}")
        return target
    roots = _search_roots(outputs)
    found = set().union(*(_candidates(root) for root in roots))
    if not found:
        raise FileNotFoundError(f"no run or sweep directory under {[str(r) for r in roots]}; set ${ENV_VAR}")
    return max(found, key=lambda p: p.stat().st_mtime)


def runs_of(target: str | Path) -> list[Path]:
    """The run itself, or a sweep's complete jobs (those with ``summary.json``)."""
    target = Path(target)
    if not is_sweep(target):
        return [target]
    return [
        job for job in find_jobs(target) if job_status(job) == "complete" and (job / "summary.json").is_file()
    ]


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc.msg}, line {exc.lineno})") from exc


def _fmt(value: Any, ci: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    text = f"{value:.4g}"
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        text += f" [{ci[0]:.3g}, {ci[1]:.3g}]"
    return text


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """A markdown table: one row per scalar metric, one column per iteration (0 = SFT), with CIs if present."""
    from visrl.logging.plots import summary_iterations

    iterations = summary_iterations(summary)
    keys = sorted({k for _, m in iterations for k, v in m.items() if not k.endswith("_ci") and _fmt(v, None)})
    header = ["metric", *("SFT" if it == 0 else f"iter {it}" for it, _ in iterations)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        cells = [_fmt(m.get(key), m.get(f"{key}_ci")) for _, m in iterations]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    config = summary.get("config")
    if isinstance(config, Mapping) and config:
        lines.append("\nconfig: " + ", ".join(f"`{k}={v}`" for k, v in config.items()))
    return "\n".join(lines) + "\n"


def _eval_predictions(stage_dir: Path, benchmark: str | None) -> Path | None:
    found = sorted((stage_dir / "eval").rglob("predictions.jsonl")) if (stage_dir / "eval").is_dir() else []
    if benchmark is not None:
        found = [p for p in found if benchmark in p.relative_to(stage_dir).parts] or found
    return found[0] if found else None


def find_predictions(run_dir: str | Path, benchmark: str | None = "synthetic") -> tuple[Path, Path] | None:
    """``(sft, last iteration)`` ``predictions.jsonl`` paths of a run, or None when either is missing."""
    run_dir = Path(run_dir)
    sft = _eval_predictions(run_dir / "sft", benchmark)
    iters = [p for p in run_dir.glob("iter_*") if re.fullmatch(r"iter_\d+", p.name)]
    for it_dir in sorted(iters, key=lambda p: int(p.name[5:]), reverse=True):
        final = _eval_predictions(it_dir, benchmark)
        if final is not None and sft is not None:
            return sft, final
    return None


def iterations_plot(run_dir: str | Path) -> Path | str:
    """Draw ``<run_dir>/plots/iterations.png``; returns its path, or why it cannot be drawn."""
    from visrl.logging.plots import plot_iterations

    run_dir = Path(run_dir)
    try:
        return plot_iterations(load_summary(run_dir), run_dir / "plots" / "iterations.png")
    except (OSError, ValueError) as exc:
        return f"no iteration plot: {exc}"


def gallery_plot(
    run_dir: str | Path,
    image_paths: Mapping[str, str | Path] | None = None,
    n: int = 8,
    image_root: str | Path | None = None,
) -> Path | str:
    """Draw ``<run_dir>/plots/gallery.png`` from the SFT and last-iteration predictions; path or reason.

    Images: ``image_paths`` (uid -> path), else the rows' ``image`` field, relative ones under ``image_root``.
    """
    from visrl.logging.plots import gallery_items_from_predictions, plot_gallery, select_gallery

    run_dir = Path(run_dir)
    preds = find_predictions(run_dir)
    if preds is None:
        return f"no gallery: {run_dir} lacks sft/eval and iter_k/eval predictions.jsonl"
    try:
        items = select_gallery(gallery_items_from_predictions(*preds, image_paths, image_root=image_root), n)
        return plot_gallery(items, run_dir / "plots" / "gallery.png", n=n)
    except (OSError, KeyError, ValueError) as exc:
        return f"no gallery: {exc}"


def make_run_plots(
    run_dir: str | Path,
    image_paths: Mapping[str, str | Path] | None = None,
    n: int = 8,
    image_root: str | Path | None = None,
) -> dict[str, Path | str]:
    """Write ``plots/iterations.png`` and ``plots/gallery.png``; a plot that cannot be made maps to the reason."""
    return {
        "iterations": iterations_plot(run_dir),
        "gallery": gallery_plot(run_dir, image_paths, n, image_root),
    }


def overview(target: str | Path) -> list[Section]:
    """What the target is: a run, or a sweep with its jobs' status counts."""
    target = Path(target)
    if not is_sweep(target):
        return [Section("run", f"**run dir** `{target}`")]
    statuses = [job_status(j) for j in find_jobs(target)]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in ("complete", "failed", "incomplete"))
    return [Section("sweep", f"**sweep dir** `{target}`: {len(statuses)} jobs ({counts})")]


def summary_tables(target: str | Path) -> list[Section]:
    """The metrics-by-iteration table of the run, or of every complete job of a sweep."""
    return [
        Section(run.name, f"### {run.name}\n\n" + summary_markdown(load_summary(run)))
        for run in runs_of(target)
    ]


def iteration_figures(target: str | Path) -> list[Section]:
    """``plots/iterations.png`` for the run (or each complete job), freshly drawn."""
    return [_plot_section(run, "iterations", iterations_plot(run)) for run in runs_of(target)]


def gallery_figures(target: str | Path, image_root: str | Path | None = None, n: int = 8) -> list[Section]:
    """``plots/gallery.png`` (gt / SFT / final boxes) for the run (or each complete job).

    ``image_root``: where the predictions' relative ``image`` paths live (the benchmark's image root).
    """
    return [_plot_section(run, "gallery", gallery_plot(run, None, n, image_root)) for run in runs_of(target)]


def _plot_section(run: Path, which: str, made: Path | str) -> Section:
    if isinstance(made, Path):
        return Section(f"{run.name}: {which}", f"### {run.name}: {which}", made)
    return Section(f"{run.name}: {which}", f"### {run.name}: {which}\n\n_{made}_")


def show(sections: Sequence[Section]) -> None:
    """Display sections in a notebook (markdown, then the image)."""
    from IPython.display import Image, Markdown, display

    for section in sections:
        if section.markdown:
            display(Markdown(section.markdown))
        if section.image is not None:
            display(Image(filename=str(section.image)))
