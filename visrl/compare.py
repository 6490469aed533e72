"""Compare two runs on the same questions: ``python -m visrl.compare BASELINE RUN [--eval iter_3/eval]``.

A control is read against the method on the SAME test questions, so the honest statistic is the paired
difference per question, not two separate intervals: this prints the benchmark's paired bootstrap
(:meth:`Benchmark.paired_effect`, 95 % interval) of ``RUN - BASELINE`` for the headline metrics (the
synthetic benchmark: ``cot_pred`` accuracy and detection, ``intent/named_hit`` and ``intent/swap_follow``).

Both runs must have evaluated the same questions: the config keys that decide them (:data:`SAME`: the
benchmark, and for generated data its seed, world and held-out sizes; not the training splits' sizes nor
cache paths) must be equal, else one line names the first key that differs (e.g. ``data.seed``).
By default each run's final evaluation is used (``iter_3/eval``; ``sft/eval`` for an SFT-only run such as
the supervised upper bound), so the final models are compared; ``--eval iter_1/eval`` picks the same folder
in both. ``--json FILE`` also writes the effects.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from visrl.data.io import write_json_atomic

__all__ = ["compare_runs", "config_difference", "final_eval", "format_effect", "main"]

# what decides the evaluated questions and how they are scored (the synthetic splits are drawn each from its
# own seed, so the SFT and RL sizes do not change the val and test questions)
SAME = ("data._target_", "data.seed", "data.world", "data.sizes.test", "data.sizes.val", "benchmark")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def config_difference(a: DictConfig, b: DictConfig, keys: Sequence[str] = SAME) -> str | None:
    """The first dotted key under ``keys`` whose value differs between two run configs, else None."""
    flat = [_flatten(OmegaConf.to_container(c, resolve=True)) for c in (a, b)]
    for key in keys:
        names = sorted(n for n in set(flat[0]) | set(flat[1]) if n == key or n.startswith(f"{key}."))
        for name in names:
            if flat[0].get(name) != flat[1].get(name):
                return f"{name}: {flat[0].get(name)!r} vs {flat[1].get(name)!r}"
    return None


def _evals(run: Path) -> list[str]:
    """The run's finished evaluations in pipeline order: ``sft/eval``, ``iter_1/eval``, ...."""
    found = ["sft/eval"] if (run / "sft/eval/DONE").exists() else []
    iters = sorted(
        (
            int(m.group(1))
            for p in run.glob("iter_*/eval/DONE")
            if (m := re.match(r"iter_(\d+)$", p.parent.parent.name))
        ),
    )
    return found + [f"iter_{k}/eval" for k in iters]


def final_eval(run: Path) -> str:
    """The run's last finished evaluation folder (``ValueError`` naming the run when it has none)."""
    evals = _evals(run)
    if not evals:
        raise ValueError(f"{run}: no finished evaluation (sft/eval, iter_K/eval)")
    return evals[-1]


def compare_runs(
    baseline: Path, run: Path, eval_dir: str | None = None
) -> tuple[tuple[str, str], dict[str, dict]]:
    """``((baseline's folder, run's folder), {metric: {before, after, diff, ci95, n}})``: ``run`` minus
    ``baseline``, paired by question, on ``eval_dir`` in both or else each run's final evaluation."""
    from hydra.utils import instantiate

    from visrl.pipeline import build_benchmark  # the one way a config becomes a benchmark

    cfgs = [OmegaConf.load(Path(r) / "config.yaml") for r in (baseline, run)]
    if (diff := config_difference(*cfgs)) is not None:
        raise ValueError(f"{baseline} and {run} evaluated different questions ({diff})")
    evals = (eval_dir, eval_dir) if eval_dir else (final_eval(baseline), final_eval(run))
    for r, e in zip((baseline, run), evals, strict=True):
        if not (r / e / "DONE").exists():
            raise ValueError(f"{r / e}: no finished evaluation there")
    benchmark = build_benchmark(cfgs[0], instantiate(cfgs[0].data).ensure())
    return evals, benchmark.paired_effect(baseline / evals[0], run / evals[1])


def format_effect(effect: dict) -> str:
    """A paired effect in points: ``+8.3 [+4.7, +12.0]``."""
    lo, hi = effect["ci95"]
    return f"{100 * effect['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _table(effects: dict[str, dict]) -> str:
    rows = ["| metric | baseline | run | run - baseline [95 % CI] | n |", "|---|---|---|---|---|"]
    for name, e in effects.items():
        rows.append(f"| {name} | {e['before']:.3f} | {e['after']:.3f} | {format_effect(e)} | {e['n']} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visrl.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path, help="run directory of the baseline (e.g. a control)")
    parser.add_argument("run", type=Path, help="run directory compared against it")
    parser.add_argument(
        "--eval", default=None, help="evaluation folder in both runs (default: each one's last)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the effects to this file")
    args = parser.parse_args(argv)
    try:
        evals, effects = compare_runs(args.baseline, args.run, args.eval)
    except (FileNotFoundError, ValueError) as exc:
        print(f"visrl.compare: {exc}", file=sys.stderr)
        return 2
    print(f"{args.run}/{evals[1]} - {args.baseline}/{evals[0]} (paired bootstrap over the same questions)")
    print(_table(effects))
    if args.json is not None:
        write_json_atomic(args.json, {"baseline": str(args.baseline), "run": str(args.run),
                                      "evals": list(evals), "effects": effects})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
