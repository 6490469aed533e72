"""What every benchmark provides, and the bookkeeping they share: skipped items, resumable predictions.

A benchmark (VisRL §4 evaluates after SFT and after every iteration) is built from its config by Hydra
``instantiate`` (``_target_`` is the only registry) and provides:

* ``name``, ``version`` (bumped when the protocol changes, so stored numbers stay comparable);
* ``headline``: the key of :meth:`evaluate`'s metrics that summarises the benchmark (the run's
  ``final_metric``);
* ``evaluate(policy, templates, out_dir) -> metrics``: writes ``out_dir/predictions.jsonl`` (appended
  as predictions are made, so an interrupted evaluation resumes) and ``out_dir/metrics.json``;
* ``paired_effect(before_dir, after_dir, n, seed) -> {metric: {before, after, diff, ci95, n}}``: the
  paired bootstrap of after - before over the questions both evaluations scored.

Bad data never aborts an evaluation: an item whose image cannot be read or whose record cannot be used
is a *skipped* row (``{"uid", "skipped": reason, "file", "row", "error"}``) in ``predictions.jsonl``,
counted as ``skipped/<reason>`` in the metrics.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from visrl.data.io import append_lines, read_jsonl, rewrite_lines, write_json_atomic
from visrl.data.prompts import PromptTemplates
from visrl.models.protocols import Policy

__all__ = [
    "Benchmark",
    "Predictions",
    "is_skipped",
    "scored_rows",
    "skip_row",
    "skipped_counts",
    "write_metrics",
]

log = logging.getLogger(__name__)


@runtime_checkable
class Benchmark(Protocol):
    """What every benchmark provides (see the module docstring)."""

    name: str
    version: str

    @property
    def headline(self) -> str: ...

    def evaluate(self, policy: Policy, templates: PromptTemplates, out_dir: Path) -> dict[str, float]:
        """Run the protocol with ``policy``, write predictions and metrics, return the metrics."""
        ...

    def paired_effect(self, before: Path, after: Path, n: int = 2000, seed: int = 0) -> dict[str, dict]:
        """Paired bootstrap of (after - before) per metric, from the two evaluation folders."""
        ...


def skip_row(uid: str, reason: str, file: str | Path, row: int | None, error: str, **extra: Any) -> dict:
    """The predictions.jsonl row of an item that could not be evaluated."""
    return {"uid": uid, **extra, "skipped": reason, "file": str(file), "row": row, "error": error[:300]}


def is_skipped(row: Mapping[str, Any]) -> bool:
    return bool(row.get("skipped"))


def scored_rows(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if not is_skipped(r)]


def skipped_counts(rows: Iterable[Mapping[str, Any]], prefix: str = "") -> dict[str, float]:
    """``{prefix}skipped`` (total) and ``{prefix}skipped/<reason>`` counts of the skipped rows."""
    reasons = Counter(r["skipped"] for r in rows if is_skipped(r))
    out = {f"{prefix}skipped": float(sum(reasons.values()))}
    out.update({f"{prefix}skipped/{k}": float(v) for k, v in sorted(reasons.items())})
    return out


class Predictions:
    """``predictions.jsonl`` of one evaluation, appended as rows are made (one fsynced write per batch).

    Rows already in the file (an interrupted evaluation) are kept and their keys reported ``done``, so the
    caller evaluates only the rest; a torn last line (the crash's signature) is dropped first.
    """

    def __init__(self, path: Path, key: Callable[[Mapping[str, Any]], Hashable] = lambda r: r["uid"]):
        self.path, self.key = Path(path), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines, self.rows, torn = read_jsonl(self.path, allow_torn_tail=True)
        if torn:
            rewrite_lines(self.path, lines)
        if self.rows:
            log.info("%s: resuming with %d rows already written", self.path, len(self.rows))
        self.done = {key(r) for r in self.rows}

    def add(self, rows: Iterable[dict]) -> None:
        rows = [r for r in rows if self.key(r) not in self.done]
        if rows:
            append_lines(self.path, [json.dumps(r) for r in rows])
        self.rows += rows
        self.done.update(self.key(r) for r in rows)


def read_predictions(eval_dir: Path | str) -> list[dict]:
    """The scored rows of ``eval_dir/predictions.jsonl`` (skipped rows left out)."""
    return [
        r
        for r in read_jsonl(Path(eval_dir) / "predictions.jsonl", allow_torn_tail=False)[1]
        if not is_skipped(r)
    ]


def write_metrics(out_dir: Path, metrics: Mapping[str, float]) -> None:
    write_json_atomic(Path(out_dir) / "metrics.json", dict(sorted(metrics.items())))
