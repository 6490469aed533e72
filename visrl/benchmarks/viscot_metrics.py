"""Visual-CoT benchmark aggregation: per-dataset means, the unweighted ``overall``, groups, result tables.

As ``eval_cot_score.py`` / ``tools/cot_*get_result.py`` of deepcs233/Visual-CoT: per-dataset means;
``overall`` = UNWEIGHTED mean of the scored datasets' means (a dataset without predictions counts 0);
groups Text/Chart/General/Reasoning/Fine-grained = means of their datasets' means; the published
detection "Average" drops datasets scoring exactly 0 (``overall/det_acc_viscot_avg``). Skipped rows
(unreadable image, unusable record) are counted, never scored.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from visrl.benchmarks.base import is_skipped, scored_rows, skipped_counts
from visrl.data.errors import InputError

__all__ = ["GROUPS", "MEANS", "SCORED_DATASETS", "aggregate", "results_markdown"]

log = logging.getLogger(__name__)

SCORED_DATASETS = ("docvqa", "textcap", "textvqa", "dude", "sroie", "infographicsvqa", "flickr30k", "gqa",
                   "openimages", "vsr", "cub")  # fmt: skip
GROUPS = {"text": ("docvqa", "textcap", "textvqa", "dude", "sroie"), "chart": ("infographicsvqa",),
          "general": ("flickr30k",), "reasoning": ("gqa", "openimages", "vsr"), "fine_grained": ("cub",)}  # fmt: skip
# metric -> the per-record field it averages, per dataset
MEANS = {"det_acc": "det_correct", "mean_iou": "iou", "em": "em", "anls": "anls", "judge": "judge"}


def _mean_over(values: Mapping[str, float], names: Sequence[str]) -> float:
    return fmean(values.get(n, 0.0) for n in names)  # a missing dataset counts 0.0, as published


def _dataset_metrics(ds: str, rs: Sequence[Mapping[str, Any]], means: dict[str, dict[str, float]]) -> dict:
    """Means and counts of one dataset's scored rows (``means[metric][ds]`` filled in passing)."""
    out: dict[str, float] = {f"{ds}/n": float(len(rs))}
    if not rs:
        return out
    for key, field in MEANS.items():
        if rs[0].get(field) is not None:
            means[key][ds] = out[f"{ds}/{key}"] = fmean(float(r[field]) for r in rs)
    fails = Counter(r["parse_failure"] for r in rs if r["parse_failure"])
    out[f"{ds}/parse_failures"] = float(sum(fails.values()))
    out.update({f"{ds}/parse_failures/{k}": float(v) for k, v in sorted(fails.items())})
    out[f"{ds}/gt_degenerate"] = float(sum(r["gt_degenerate"] for r in rs))
    if rs[0].get("judge") is not None:
        out[f"{ds}/judge_unparsed"] = float(sum(not r["judge_parsed"] for r in rs))
        out[f"{ds}/judge_failed"] = float(sum(bool(r.get("judge_failed")) for r in rs))
    return out


def aggregate(
    rows: Sequence[Mapping[str, Any]], datasets: Sequence[str], files: Mapping[str, Path] | None = None
) -> dict[str, float]:
    """Flat metrics from prediction rows: ``<ds>/<metric>``, ``overall/<metric>``, ``group/<g>/<metric>``.

    Means: det_acc, mean_iou, em, anls, judge (when judged). Counts per dataset: n (scored), parse_failures,
    parse_failures/<reason>, gt_degenerate, judge_unparsed, judge_failed, skipped/<reason>; totals
    ``skipped/<reason>``. ``overall`` = unweighted mean over the scored datasets among ``datasets`` (one
    with nothing scorable counts 0, as published, and is logged with its file);
    ``overall/det_acc_viscot_avg`` = the published quirk (zeros dropped). Nothing scorable at all is an
    InputError naming the files.
    """
    by_ds: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        by_ds[r["dataset"]].append(r)
    out: dict[str, float] = {}
    means: dict[str, dict[str, float]] = defaultdict(dict)  # metric -> dataset -> mean
    empty = []
    for ds in datasets:
        scored = scored_rows(by_ds.get(ds, []))
        out.update(_dataset_metrics(ds, scored, means))
        out.update(
            skipped_counts(by_ds.get(ds, []), f"{ds}/") if len(scored) < len(by_ds.get(ds, [])) else {}
        )
        if not scored:
            where = (files or {}).get(ds, ds)
            empty.append(
                f"{where} ({len(by_ds.get(ds, []))} rows, all skipped)"
                if by_ds.get(ds)
                else f"{where} (no rows)"
            )
    if len(empty) == len(datasets):
        raise InputError(f"Visual-CoT benchmark: nothing scorable in {'; '.join(empty)}")
    for where in empty:
        log.warning("viscot: nothing scorable in %s; it counts 0 in the overall means", where)
    if any(is_skipped(r) for r in rows):
        out.update(skipped_counts(rows))
    scored_ds = [d for d in SCORED_DATASETS if d in datasets]
    if scored_ds:
        out["overall/n_datasets"] = float(len(scored_ds))
        for key, per in means.items():
            out[f"overall/{key}"] = _mean_over(per, scored_ds)
            for group, members in GROUPS.items():
                present = [d for d in members if d in scored_ds]
                if present:
                    out[f"group/{group}/{key}"] = _mean_over(per, present)
        nonzero = [v for d in scored_ds if (v := means["det_acc"].get(d, 0.0))]
        out["overall/det_acc_viscot_avg"] = fmean(nonzero) if nonzero else 0.0
    return out


def results_markdown(metrics: Mapping[str, float], datasets: Sequence[str]) -> str:
    """Two markdown tables in the layout of ``tools/cot_get_result.py`` (answer scores to 3 decimals,
    detection ×100 to 2 decimals) plus the detection-average note."""
    keys = [k for k in ("judge", "em", "anls", "det_acc") if any(f"{d}/{k}" in metrics for d in datasets)]
    label = {"judge": "Judge score", "em": "Exact match", "anls": "ANLS", "det_acc": "Det Acc@0.5 (×100)"}

    def cell(key: str, value: float | None) -> str:
        if value is None:
            return "–"
        return f"{100 * value:.2f}" if key == "det_acc" else f"{value:.3f}"

    has_overall = "overall/n_datasets" in metrics
    lines = ["| Metric | " + " | ".join(datasets) + (" | Average |" if has_overall else " |")]
    lines.append("|---" * (len(datasets) + 1 + has_overall) + "|")
    for k in keys:
        row = [cell(k, metrics.get(f"{d}/{k}")) for d in datasets]
        row += [cell(k, metrics.get(f"overall/{k}"))] if has_overall else []
        lines.append(f"| {label[k]} | " + " | ".join(row) + " |")
    if has_overall:
        groups = [g for g in GROUPS if f"group/{g}/{keys[0]}" in metrics]
        lines += ["", "| Metric | " + " | ".join(groups) + " | Average |", "|---" * (len(groups) + 2) + "|"]
        for k in keys:
            row = [cell(k, metrics.get(f"group/{g}/{k}")) for g in groups] + [
                cell(k, metrics[f"overall/{k}"])
            ]
            lines.append(f"| {label[k]} | " + " | ".join(row) + " |")
        lines += ["", f"Detection average as Visual-CoT prints it (datasets at exactly 0 dropped): "
                      f"{100 * metrics['overall/det_acc_viscot_avg']:.3f}"]  # fmt: skip
    return "\n".join(lines) + "\n"
