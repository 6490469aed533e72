"""Run several benchmarks on one policy and collect their metrics under ``<name>/...`` keys.

Used by the training pipeline (evaluation after SFT and after every VisRL iteration, paper §4) and by
``python run.py stage=eval``, so both write the same layout::

    out_dir/<name>/predictions.jsonl   out_dir/<name>/metrics.json   (+ whatever the benchmark adds)
    out_dir/metrics.json               all metrics, flat, keys prefixed ``<name>/`` (+ ``<name>/seconds``)
    out_dir/versions.json              ``{name: version}`` of the protocols that produced them
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from visrl.benchmarks.registry import Benchmark
from visrl.data.prompts import PromptTemplates

__all__ = ["evaluate_all"]

log = logging.getLogger(__name__)


def _check_metrics(name: str, metrics: Any) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        raise TypeError(f"benchmark {name!r}: evaluate() returned {type(metrics).__name__}, expected a dict")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"benchmark {name!r}: metric {key!r}={value!r} is not a str -> number entry")
        out[key] = float(value)
    return out


def evaluate_all(
    benchmarks: Mapping[str, Benchmark], policy: Any, templates: PromptTemplates, out_dir: Path
) -> dict[str, float]:
    """Evaluate ``policy`` on every benchmark, each in ``out_dir/<name>/``; return ``{"<name>/<key>": value}``.

    ``<name>/seconds`` (wall time) is added for each benchmark. The combined metrics go to
    ``out_dir/metrics.json`` (flat, like every benchmark's own file), the versions to ``out_dir/versions.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    combined: dict[str, float] = {}
    versions: dict[str, str] = {}
    for name, benchmark in benchmarks.items():
        if not name or "/" in name:
            raise ValueError(f"evaluate_all: invalid benchmark key {name!r} (non-empty, no '/')")
        sub = out_dir / name
        sub.mkdir(parents=True, exist_ok=True)
        log.info("evaluating %s (%s) -> %s", name, benchmark.version, sub)
        start = time.perf_counter()
        metrics = _check_metrics(name, benchmark.evaluate(policy, templates, sub))
        metrics["seconds"] = time.perf_counter() - start
        combined.update({f"{name}/{key}": value for key, value in metrics.items()})
        versions[name] = benchmark.version
    (out_dir / "metrics.json").write_text(json.dumps(combined, indent=2, sort_keys=True) + "\n")
    (out_dir / "versions.json").write_text(json.dumps(versions, indent=2, sort_keys=True) + "\n")
    return combined
