"""``experiments/intent_study.py table``: the study table from finished runs (two copies of one tiny run)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("intent_study", ROOT / "experiments" / "intent_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["intent_study"] = module
    spec.loader.exec_module(module)
    return module


def test_table_reads_each_arm_and_pairs_each_control(tiny_run: Path, tmp_path: Path) -> None:
    study = _study()
    out = tmp_path / "val"
    for arm in ("intent", "ftx_only"):
        shutil.copytree(tiny_run, study.run_dir(out, arm, 0), ignore=shutil.ignore_patterns(".lock"))
    text = study.table(out, [0, 1], ["intent", "ftx_only"])
    lines = text.splitlines()
    intent_rows = [line for line in lines if line.startswith("| intent | ")]
    assert len(intent_rows) == 2 and "(not finished)" in intent_rows[1]  # seed 1 never ran
    cells = [c.strip() for c in intent_rows[0].strip("|").split("|")]
    assert cells[2] == "0.00 / 0.00"  # the base's locate / colour (debug=fast: untrained)
    assert cells[3].count(" → ") == 2  # SFT -> iteration 1 -> iteration 2
    assert cells[4].startswith(("+", "-")) and cells[6] == "-"  # no swap_follow in the default world
    control = [line for line in lines if line.startswith("| intent − ftx_only | 0 |")]
    assert len(control) == 1 and control[0].count("+0.0 [+0.0, +0.0]") == len(study.METRICS) - 2
