"""The paper's recipe as a user runs it, on tiny random-weight checkpoints of the real classes (hub layout):
``python run.py model=<family> data.root=<Visual-CoT>`` with the recipe's judge scorer (answered by M_org),
Visual-CoT training data and the Visual-CoT benchmark on a mini tree, LoRA adapters saved in the PEFT layout.

``debug=fast`` keeps it seconds-scale: its data sizes cap the Visual-CoT splits (``data.sizes``); the random
model writes no judge score, which must be counted, never fatal. Qwen2-VL runs in the default suite, the other
two families in the slow tier.
"""

from __future__ import annotations

import json

import pytest

FAMILIES = {"qwen2vl": "qwen2vl", "llava": "llava15", "qwen25vl": "qwen25vl"}  # fixture family -> conf/model


@pytest.mark.parametrize(
    "family",
    [pytest.param("qwen2vl"), pytest.param("llava", marks=pytest.mark.slow), pytest.param("qwen25vl", marks=pytest.mark.slow)],
)  # fmt: skip
def test_paper_recipe_iter1_with_judge_on_mini_viscot(
    family, real_checkpoints, viscot_tree, run_visrl, tmp_path
):
    run = tmp_path / "run"
    train = viscot_tree / "train.json"
    result = run_visrl(
        run,
        f"model={FAMILIES[family]}",
        f"model.path={real_checkpoints[family]}",
        "model.dtype=float32",
        "scorer=judge",  # the recipe's scorer (debug=fast would choose random scores)
        "iter=1",
        f"data.root={viscot_tree}",
        f"data.sft={train}",
        f"data.rl={train}",
        "benchmark.datasets=[cub,textvqa]",
        "logger=csv",
    )
    assert result.returncode == 0, result.tail()
    config = (run / "config.yaml").read_text()
    assert "JudgeAnswerScorer" in config and "VisCoTBenchmark" in config and "lora" in config
    rows = [json.loads(line) for line in (run / "iter_1" / "candidates.jsonl").read_text().splitlines()]
    assert rows and all(r["answer_score"] is not None or r["answer_score_failure"] for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert [it["iter"] for it in summary["iterations"]] == [0, 1]
    assert "overall/em" in summary["iterations"][1]["metrics"] and "overall/em" in summary["effect"]
    for stage in ("sft", "iter_1"):
        assert (run / stage / "model" / "adapter" / "adapter_config.json").is_file(), (
            f"{stage}: no PEFT adapter"
        )
    assert (run / "csv" / "tables" / "eval-predictions-iter_1").is_dir(), "no predictions table"
