"""``python -m visrl.compare``: the paired difference of two runs on the same questions, and its refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from visrl.compare import compare_runs, config_difference, main


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def _flip(eval_dir: Path, n: int) -> float:
    """Flip ``correct`` on the first ``n`` cot_pred rows; returns the hand-computed accuracy change."""
    path = eval_dir / "predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    preds = [r for r in rows if r["mode"] == "cot_pred"]
    delta = 0
    for r in preds[:n]:
        delta += -1 if r["correct"] else 1
        r["correct"] = not r["correct"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return delta / len(preds)


def test_a_run_against_itself_and_a_hand_edited_copy(tiny_run: Path, tmp_path: Path) -> None:
    evals, same = compare_runs(tiny_run, tiny_run)
    assert evals == ("iter_2/eval", "iter_2/eval")
    assert same["cot_pred/accuracy"]["diff"] == 0.0 and same["cot_pred/accuracy"]["ci95"] == [0.0, 0.0]
    other = _copy(tiny_run, tmp_path / "other")
    expected = _flip(other / "iter_2/eval", 3)
    _, effects = compare_runs(tiny_run, other)
    assert effects["cot_pred/accuracy"]["diff"] == pytest.approx(expected)
    assert effects["cot_pred/accuracy"]["n"] == same["cot_pred/accuracy"]["n"]
    _, sft = compare_runs(tiny_run, other, "sft/eval")  # an earlier evaluation, untouched
    assert sft["cot_pred/accuracy"]["diff"] == 0.0
    shutil.rmtree(other / "iter_2")  # a run that stopped earlier: its own last evaluation is used
    shutil.rmtree(other / "iter_1")
    evals, _ = compare_runs(other, tiny_run)
    assert evals == ("sft/eval", "iter_2/eval")


def test_runs_on_different_questions_are_refused_in_one_line(tiny_run: Path, tmp_path: Path, capsys) -> None:
    other = _copy(tiny_run, tmp_path / "other")
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["data"]["seed"] = cfg["data"]["seed"] + 1
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main([str(tiny_run), str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different questions" in err[0] and "data.seed" in err[0]
    assert main([str(tiny_run), str(tiny_run), "--eval", "iter_9/eval"]) == 2
    assert "iter_9/eval: no finished evaluation" in capsys.readouterr().err


def test_config_difference_names_the_first_differing_key() -> None:
    def cfg(n_objects: int = 3, sft: int = 256, root: str = "/a") -> OmegaConf:
        return OmegaConf.create({"seed": 0, "data": {"seed": 0, "root": root, "world": {"n_objects": n_objects},
                                 "sizes": {"sft": sft, "test": 384}}, "benchmark": {"split": "test"}})  # fmt: skip

    assert config_difference(cfg(), cfg()) is None
    assert config_difference(cfg(), cfg(n_objects=4)) == "data.world.n_objects: 3 vs 4"
    # the training split's size and the cache path do not change the evaluated questions
    assert config_difference(cfg(), cfg(sft=4864, root="/b")) is None


def test_the_cli_prints_a_table_and_writes_json(tiny_run: Path, tmp_path: Path, capsys) -> None:
    assert main([str(tiny_run), str(tiny_run), "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "| cot_pred/accuracy |" in out and "+0.0 [+0.0, +0.0]" in out
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["evals"] == ["iter_2/eval", "iter_2/eval"] and "cot_pred/accuracy" in saved["effects"]
