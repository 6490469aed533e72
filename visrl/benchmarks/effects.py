"""Bootstrap intervals: of a mean, and of a paired difference (after - before) over the same questions.

Used by every benchmark's ``paired_effect`` (the summary's effect of VisRL training, paper §4, as an
interval instead of two point scores). With ``strata`` (e.g. the Visual-CoT dataset of each question)
the resampling is within each stratum and the statistic is the unweighted mean of the stratum means,
which is how Visual-CoT's ``overall`` is defined.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from statistics import fmean

__all__ = ["bootstrap_ci", "paired_bootstrap"]


def bootstrap_ci(values: Sequence[float], n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean."""
    if not values:
        return (0.0, 0.0)
    rng = random.Random(seed)
    k = len(values)
    means = sorted(sum(values[rng.randrange(k)] for _ in range(k)) / k for _ in range(n))
    return (means[int(0.025 * n)], means[int(0.975 * n) - 1])


def _stratified_ci(groups: Sequence[Sequence[float]], n: int, seed: int) -> tuple[float, float]:
    """Percentile 95% interval of the mean of group means, each group resampled within itself."""
    groups = [g for g in groups if g]
    if not groups:
        return (0.0, 0.0)
    rng = random.Random(seed)
    stats = sorted(fmean(sum(g[rng.randrange(len(g))] for _ in g) / len(g) for g in groups) for _ in range(n))
    return (stats[int(0.025 * n)], stats[int(0.975 * n) - 1])


def paired_bootstrap(
    before: Mapping[str, float],
    after: Mapping[str, float],
    n: int = 2000,
    seed: int = 0,
    strata: Mapping[str, str] | None = None,
) -> dict:
    """``{before, after, diff, ci95: [lo, hi], n}`` over the uids scored in both (resampled jointly).

    Without ``strata``: plain means over those uids. With ``strata`` (uid -> group): unweighted mean of
    the group means, the interval from resampling within each group.
    """
    uids = sorted(set(before) & set(after))
    if strata is None:
        diffs = [after[u] - before[u] for u in uids]
        lo, hi = bootstrap_ci(diffs, n=n, seed=seed)
        return {"before": sum(before[u] for u in uids) / max(1, len(uids)),
                "after": sum(after[u] for u in uids) / max(1, len(uids)),
                "diff": sum(diffs) / max(1, len(diffs)), "ci95": [lo, hi], "n": len(uids)}  # fmt: skip
    grouped: dict[str, list[str]] = defaultdict(list)
    for u in uids:
        grouped[strata[u]].append(u)
    names = sorted(grouped)

    def macro(values: Mapping[str, float]) -> float:
        return fmean(fmean(values[u] for u in grouped[g]) for g in names) if names else 0.0

    lo, hi = _stratified_ci([[after[u] - before[u] for u in grouped[g]] for g in names], n, seed)
    b, a = macro(before), macro(after)
    return {"before": b, "after": a, "diff": a - b, "ci95": [lo, hi], "n": len(uids), "strata": len(names)}
