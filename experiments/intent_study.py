"""The intention-driven study: the intent task, its controls and the realistic scorer, over seeds.

    python experiments/intent_study.py run   [--split val|test] [--seeds 0 1 2] [--arms ...] [--jobs 2]
    python experiments/intent_study.py table [--split val|test] [--seeds 0 1 2] [--arms ...]

``run`` starts one ``python run.py`` per (arm, seed) under ``outputs/intent_study/<split>/<arm>/seed<s>``,
``--jobs`` at a time (each uses one thread; a finished run is skipped and an interrupted one resumes, as
``run.py`` does). ``table`` writes ``outputs/intent_study/<split>/results.md``: per arm and seed the SFT and
final values with the paired effect over SFT, and per control the paired difference ``intent - control`` on
the same questions (``python -m visrl.compare``). Choices are made on ``--split val``; the reported numbers
come from ``--split test``, which is run once, after the choices are frozen.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visrl.compare import compare_runs, format_effect  # noqa: E402 (after the path set-up)

# arm -> the experiment presets it composes (every arm on the intent task, the same pairs budget)
ARMS: dict[str, list[str]] = {
    "intent": ["experiment=intent"],
    "ftx_only": ["experiment=[intent,ablation_ftx_only]"],
    "dpo_only": ["experiment=[intent,ablation_dpo_only]"],
    "shuffled_scores": ["experiment=[intent,ablation_shuffled_scores]"],
    # the supervised upper bound on the same budget: the SFT split + 3 iterations x filter.max_pairs (1536)
    "sft_pool": ["experiment=[intent,ablation_sft_pool]", "data.sizes.sft=4864"],
    "shared_patterns": ["experiment=intent_shared_patterns"],
}
CONTROLS = ("ftx_only", "dpo_only", "shuffled_scores", "sft_pool")  # read against the intent arm
METRICS = ("cot_pred/accuracy", "cot_pred/det_acc", "intent/named_hit", "intent/swap_follow")
EFFECTS = ("cot_pred/accuracy", "cot_pred/det_acc")  # the bar's two effects, columns of the arm table


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / arm / f"seed{seed}"


def launch(out: Path, arm: str, seed: int, split: str) -> tuple[str, int, int]:
    """One ``run.py`` (its log beside the run directory); returns (arm, seed, exit code)."""
    target = run_dir(out, arm, seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    args = [*ARMS[arm], f"seed={seed}", f"benchmark.split={split}", "logger=csv", "threads=1"]
    args.append(f"hydra.run.dir={target}")  # threads=1: the jobs share the cores
    with open(target.parent / f"seed{seed}.log", "ab") as log:
        code = subprocess.call(
            [sys.executable, str(ROOT / "run.py"), *args], stdout=log, stderr=log, cwd=ROOT
        )
    print(f"{arm} seed {seed}: exit {code}", flush=True)
    return arm, seed, code


def base_skills(run: Path) -> str:
    """``locate / colour`` of the run's base model (its first ``base/*`` metrics row), or ``-``."""
    rows = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line)
    found = next((row for row in rows if "base/locate" in row), None)
    return f"{found['base/locate']:.2f} / {found.get('base/colour', float('nan')):.2f}" if found else "-"


def arm_rows(out: Path, arm: str, seeds: list[int]) -> list[str]:
    """Per seed: the base's skills, SFT -> each iteration of ``cot_pred/accuracy``, the paired effects of the
    final evaluation over SFT, ``swap_follow`` SFT -> final, and the pairs of each iteration."""
    rows = []
    for seed in seeds:
        run = run_dir(out, arm, seed)
        if not (run / "summary.json").is_file():
            rows.append(f"| {arm} | {seed} | (not finished) |" + " |" * 5)
            continue
        summary = json.loads((run / "summary.json").read_text())
        its, effect = summary["iterations"], summary.get("effect", {})
        curve = " → ".join(f"{it['metrics'].get('cot_pred/accuracy', float('nan')):.3f}" for it in its)
        pairs = "/".join(str(int(it["metrics"].get("data/pairs", 0))) for it in its[1:]) or "-"
        swap = [it["metrics"].get("intent/swap_follow") for it in (its[0], its[-1])]
        swap_cell = "-" if None in swap else f"{swap[0]:.3f} → {swap[1]:.3f}"
        if "intent/swap_follow" in effect:
            swap_cell += f" ({format_effect(effect['intent/swap_follow'])})"
        cells = [
            base_skills(run),
            curve,
            *(format_effect(effect[m]) if m in effect else "-" for m in EFFECTS),
        ]
        rows.append(f"| {arm} | {seed} | " + " | ".join([*cells, swap_cell, pairs]) + " |")
    return rows


def control_rows(out: Path, seeds: list[int], arms: list[str]) -> list[str]:
    """Per control and seed: the paired difference intent - control at each run's final evaluation."""
    rows = []
    for control in [a for a in CONTROLS if a in arms]:
        for seed in seeds:
            a, b = run_dir(out, control, seed), run_dir(out, "intent", seed)
            if not ((a / "summary.json").is_file() and (b / "summary.json").is_file()):
                continue
            effects = compare_runs(a, b)[1]  # each run's final evaluation (sft_pool: its SFT model)
            rows.append(
                f"| intent − {control} | {seed} | "
                + " | ".join(format_effect(effects[m]) if m in effects else "-" for m in METRICS)
                + " |"
            )
    return rows


def table(out: Path, seeds: list[int], arms: list[str]) -> str:
    head = ("| arm | seed | base `locate` / `colour` | `cot_pred`: SFT → iter 1 … K | `cot_pred` effect |"
            " detection effect | `swap_follow` SFT → final (effect) | pairs per iteration |")  # fmt: skip
    lines = [f"# Intent study ({out.name} split)", "", "Effects: the final evaluation minus the run's SFT model,"
             " paired on the same questions (points [95 % CI]).", "", head, "|" + "---|" * 8]  # fmt: skip
    for arm in arms:
        lines += arm_rows(out, arm, seeds)
    lines += ["", "Controls: the intent arm minus the control, paired on the same questions (points [95 % CI]).",
              "", "| comparison | seed | " + " | ".join(METRICS) + " |", "|" + "---|" * (2 + len(METRICS))]  # fmt: skip
    lines += control_rows(out, seeds, arms)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["run", "table"])
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "intent_study")
    args = parser.parse_args(argv)
    out = args.out / args.split
    if args.action == "run":
        # arm-major: the first arm's runs build their seeds' bases side by side (a base is cached per seed and
        # world; a second run of the same seed waits on its lock), the later arms reuse them
        todo = [(arm, seed) for arm in args.arms for seed in args.seeds]
        with ThreadPoolExecutor(args.jobs) as pool:
            codes = list(pool.map(lambda job: launch(out, *job, args.split), todo))
        return int(any(code for _, _, code in codes))
    text = table(out, args.seeds, args.arms)
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
