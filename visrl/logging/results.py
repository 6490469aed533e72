"""The results table printed at the end of a run: the README's table, for this run.

One row per evaluated iteration (0 = the SFT warm-up model, k = after VisRL iteration k; paper §3.3) with the
headline metrics of the benchmark (``cot_pred``: the answer from the model's own box, with its 95 % interval
when the benchmark gives one; ``det``: detection accuracy, IoU > 0.5; ``cot_gt``, ``direct``) and the pairs the
iteration trained on, then the paired effect of the last iteration over the SFT model with its bootstrap CI.
Reads only the summary dict the pipeline writes as ``summary.json``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any, TextIO

__all__ = ["RESULT_COLUMNS", "format_results", "print_results"]

# (column header, metric key in summary["iterations"][i]["metrics"]); a column none of the rows has is left out
RESULT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("cot_pred", "cot_pred/accuracy"),
    ("det", "cot_pred/det_acc"),
    ("mean IoU", "cot_pred/mean_iou"),
    ("cot_gt", "cot_gt/accuracy"),
    ("direct", "direct/accuracy"),
    ("pairs", "data/pairs"),
)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _cell(metrics: Mapping[str, Any], key: str) -> str:
    value = _number(metrics.get(key))
    if value is None:
        return ""
    if key.startswith("data/"):
        return f"{value:.0f}"
    lo, hi = _number(metrics.get(f"{key}_ci_lo")), _number(metrics.get(f"{key}_ci_hi"))
    return f"{value:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def _effect_lines(effect: Mapping[str, Any], last: int) -> list[str]:
    lines = []
    for key, e in effect.items():
        if not isinstance(e, Mapping) or _number(e.get("diff")) is None:
            continue
        ci = e.get("ci95") or [None, None]
        lo, hi = (_number(c) for c in ci) if len(ci) == 2 else (None, None)
        interval = f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else ""
        lines.append(
            f"  {key}: {e['before']:.3f} -> {e['after']:.3f}, {e['diff']:+.3f}{interval} (n={e.get('n')})"
        )
    if lines:
        lines.insert(0, f"effect of iteration {last} over SFT (paired bootstrap, 95% CI):")
    return lines


def format_results(summary: Mapping[str, Any]) -> str:
    """The table (markdown rows, as in the README) and the effect lines, as one text."""
    iterations = sorted(summary.get("iterations") or [], key=lambda it: it.get("iter", 0))
    if not iterations:
        return "results: no evaluated iteration"
    present = [(h, k) for h, k in RESULT_COLUMNS if any(k in (it.get("metrics") or {}) for it in iterations)]
    header = ["iteration", *(h for h, _ in present)]
    rows = []
    for it in iterations:
        k, metrics = int(it.get("iter", 0)), it.get("metrics") or {}
        rows.append([f"{k} (SFT)" if k == 0 else str(k), *(_cell(metrics, key) for _, key in present)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in [header, *rows]
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += _effect_lines(summary.get("effect") or {}, int(iterations[-1].get("iter", 0)))
    return "\n".join(lines)


def print_results(summary: Mapping[str, Any], file: TextIO | None = None) -> str:
    """Print :func:`format_results` (to stdout by default) and return it."""
    text = format_results(summary)
    print(text, file=file or sys.stdout, flush=True)
    return text
