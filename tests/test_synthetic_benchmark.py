"""The synthetic benchmark's metrics (visrl/benchmarks/synthetic.py) against hand-computed values.

A fake policy answers from lookup tables, so every metric is known in advance. It is strict: an answer
prompt whose crop is not one the test expects (wrong box, wrong fallback, wrong view size) fails the test, so
the crops themselves are checked too (``cot_gt`` crops the ground-truth box *as GridFormat writes it*,
``cot_pred`` the parsed predicted box, an unparsable box the whole image).

Five crafted records, 256 x 256 noise images, GridFormat(grid=4) (cells of 64 px):

===  ===================  ===============  ===================  ==================================
rec  gt box (px)          cot_pred box     IoU(pred, gt)        answers: direct / cot_gt / cot_pred
===  ===================  ===============  ===================  ==================================
0    (70, 70, 120, 120)   [1, 1, 2, 2]     2500/4096 = 0.6104   wrong / right / right  (same crop)
1    (0, 0, 128, 128)     [1, 0, 3, 2]     8192/24576 = 1/3     right / right / wrong
2    (128, 0, 256, 128)   "the left one"   unparsable -> 0      wrong / right / right  (full image)
3    (128, 128, 256, 256) [2, 2, 4, 4]     1                    right / wrong / wrong  (same crop)
4    (0, 0, 128, 128)     [0, 0, 2, 1]     8192/16384 = 0.5     right / right / wrong
===  ===================  ===============  ===================  ==================================

Hand-computed metrics:

* ``direct/accuracy`` = 3/5 = 0.6; ``cot_gt/accuracy`` = 4/5 = 0.8; ``cot_pred/accuracy`` = 2/5 = 0.4;
* ``cot_pred/parse_rate`` = 4/5 = 0.8 (record 2 has no box);
* ``cot_pred/mean_iou`` = (2500/4096 + 1/3 + 0 + 1 + 0.5) / 5 = 0.488737...;
* ``cot_pred/det_acc`` = 2/5 = 0.4 (records 0 and 3; record 4's IoU is exactly 0.5, not > 0.5).

Record 0's right answer is written "The Horizontal." (exact match normalises case, articles, punctuation).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from visrl.benchmarks.effects import bootstrap_ci
from visrl.benchmarks.synthetic import FULL, SyntheticBenchmark
from visrl.data.box_formats import GridFormat
from visrl.data.boxes import Box
from visrl.data.images import crop_view
from visrl.data.prompts import Prompt, PromptTemplates
from visrl.data.records import make_viscot_record, write_viscot

FMT = GridFormat(grid=4)
SIZE = (256, 256)
VIEW = 64
TEMPLATES = PromptTemplates(
    box="BOX {question}\n<image>",
    answer="ANSWER {question}\n<image>\n<image>",
    direct="DIRECT {question}\n<image>",
)
# (gt px, answer, predicted box text, direct reply, {crop box text: reply}); "FULL" = the whole image
# fmt: off
CASES = [
    ((70, 70, 120, 120), "horizontal", "[1, 1, 2, 2]", "vertical", {"[1, 1, 2, 2]": "The Horizontal."}),
    ((0, 0, 128, 128), "vertical", "[1, 0, 3, 2]", "vertical",
     {"[0, 0, 2, 2]": "vertical", "[1, 0, 3, 2]": "diagonal"}),
    ((128, 0, 256, 128), "diagonal", "the left one", "checkered",
     {"[2, 0, 4, 2]": "diagonal", "FULL": "diagonal"}),
    ((128, 128, 256, 256), "checkered", "[2, 2, 4, 4]", "checkered", {"[2, 2, 4, 4]": "horizontal"}),
    ((0, 0, 128, 128), "horizontal", "[0, 0, 2, 1]", "horizontal",
     {"[0, 0, 2, 2]": "horizontal", "[0, 0, 2, 1]": "vertical"}),
]
# fmt: on
EXPECTED = {
    "direct/accuracy": 3 / 5,
    "cot_gt/accuracy": 4 / 5,
    "cot_pred/accuracy": 2 / 5,
    "cot_pred/parse_rate": 4 / 5,
    "cot_pred/mean_iou": (2500 / 4096 + 1 / 3 + 0 + 1 + 0.5) / 5,
    "cot_pred/det_acc": 2 / 5,
    "direct/n": 5.0,
    "cot_gt/n": 5.0,
    "cot_pred/n": 5.0,
}
EXPECTED_IOU = [2500 / 4096, 1 / 3, 0.0, 1.0, 0.5]


class LookupPolicy:
    """Answers box prompts, direct prompts and (question, crop) answer prompts from tables."""

    def __init__(self, boxes: dict[str, str], direct: dict[str, str], crops: dict[tuple[str, bytes], str]):
        self.backbone = SimpleNamespace(box_format=FMT, image_size=VIEW)
        self.boxes, self.direct, self.crops = boxes, direct, crops

    def generate(
        self,
        prompts: list[Prompt],
        max_new_tokens: int,
        temperature: float = 0.0,
        num_return_sequences: int = 1,
        seed: int | None = None,
    ) -> list[list[str]]:
        assert temperature == 0.0 and num_return_sequences == 1, "the benchmark decodes greedily, once"
        out = []
        for prompt in prompts:
            (turn,) = prompt
            kind, question = turn.text.split("\n")[0].split(" ", 1)
            images = turn.images
            assert images[0].size == (VIEW, VIEW), "the full view is not the backbone's view"
            if kind == "BOX":
                out.append([self.boxes[question]])
            elif kind == "DIRECT":
                out.append([self.direct[question]])
            else:
                key = (question, images[1].tobytes())
                assert key in self.crops, f"{question}: unexpected crop (not from the expected box)"
                out.append([self.crops[key]])
        return out


def crop_box(text: str) -> Box:
    if text == "FULL":
        return FULL
    parsed = FMT.parse(text, SIZE)
    assert parsed.ok, text
    return parsed.box


@pytest.fixture
def crafted(tmp_path: Path) -> tuple[SyntheticBenchmark, LookupPolicy]:
    """The five records written as a VisCoT test split, and the policy of the table above."""
    records, boxes, direct, crops = [], {}, {}, {}
    rng = np.random.default_rng(0)
    for i, (gt, answer, pred_text, direct_reply, crop_replies) in enumerate(CASES):
        question = f"Q{i}: what pattern is on the object?"
        image = Image.fromarray(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8))
        image.save(tmp_path / f"{i}.png")
        records.append(
            make_viscot_record(
                dataset="crafted",
                split="test",
                question_id=i,
                image_path=f"{i}.png",
                question=question,
                answer=answer,
                box_px=gt,
                size=SIZE,
            )
        )
        boxes[question], direct[question] = pred_text, direct_reply
        for text, reply in crop_replies.items():
            crops[(question, crop_view(image, crop_box(text), VIEW).tobytes())] = reply
    write_viscot(records, tmp_path / "test.json")
    return SyntheticBenchmark(tmp_path / "test.json"), LookupPolicy(boxes, direct, crops)


def test_metrics_match_the_hand_computed_values(crafted, tmp_path: Path) -> None:
    bench, policy = crafted
    metrics = bench.evaluate(policy, TEMPLATES, tmp_path / "eval")
    for key, value in EXPECTED.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert not any(
        k.startswith("direct/") and k.split("/")[1] in ("parse_rate", "mean_iou", "det_acc") for k in metrics
    ), "direct mode has no box"
    for mode in ("direct", "cot_gt", "cot_pred"):
        lo, hi = metrics[f"{mode}/accuracy_ci_lo"], metrics[f"{mode}/accuracy_ci_hi"]
        assert 0.0 <= lo <= metrics[f"{mode}/accuracy"] <= hi <= 1.0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics


def test_predictions_file_holds_one_row_per_record_and_mode(crafted, tmp_path: Path) -> None:
    bench, policy = crafted
    bench.evaluate(policy, TEMPLATES, tmp_path / "eval")
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["uid"]) for r in rows] == [
        (m, f"crafted:test:{i}") for m in ("direct", "cot_gt", "cot_pred") for i in range(5)
    ]
    required = {
        "uid",
        "mode",
        "question",
        "answer",
        "pred",
        "correct",
        "box_text",
        "box",
        "gt_box",
        "iou",
        "parse_failure",
    }
    assert all(required <= set(r) for r in rows)
    by = {(r["mode"], int(r["uid"].rsplit(":", 1)[1])): r for r in rows}
    for i, (gt, _, pred_text, _, _) in enumerate(CASES):
        gt_box = [c / 256 for c in gt]
        assert all(by[(m, i)]["gt_box"] == pytest.approx(gt_box) for m in ("direct", "cot_gt", "cot_pred"))
        direct = by[("direct", i)]
        assert (direct["box_text"], direct["box"], direct["iou"], direct["parse_failure"]) == (
            None,
            None,
            None,
            None,
        )
        gt_row = by[("cot_gt", i)]
        assert gt_row["box_text"] == FMT.format(Box(*gt_box), SIZE) and gt_row["parse_failure"] is None
        pred = by[("cot_pred", i)]
        assert pred["box_text"] == pred_text
        assert pred["iou"] == pytest.approx(EXPECTED_IOU[i], abs=1e-12), i
    assert by[("cot_pred", 2)]["box"] is None and by[("cot_pred", 2)]["parse_failure"] == "no_box"
    assert by[("cot_pred", 1)]["box"] == pytest.approx([0.25, 0.0, 0.75, 0.5])
    assert by[("cot_gt", 0)]["iou"] == pytest.approx(2500 / 4096)  # the written (cell) box vs the exact gt
    assert by[("cot_pred", 0)]["pred"] == "The Horizontal." and by[("cot_pred", 0)]["correct"] is True
    assert [by[("cot_gt", i)]["correct"] for i in range(5)] == [True, True, True, False, True]


def test_unknown_mode_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"benchmark\.modes: unknown \['cot_oracle'\]"):
        SyntheticBenchmark(tmp_path / "test.json", modes=("direct", "cot_oracle"))


# ------------------------------------------------------------------------------------ bootstrap
def write_predictions(path: Path, correct: list[int], iou: list[float], extra: list[dict]) -> Path:
    """A hand-written predictions.jsonl: ``cot_pred`` rows u0..u{n-1}, plus ``extra`` rows."""
    path.mkdir(parents=True)
    rows = [
        {"uid": f"u{i}", "mode": "cot_pred", "correct": bool(c), "iou": v}
        for i, (c, v) in enumerate(zip(correct, iou))
    ]
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + extra))
    return path


def test_paired_bootstrap_diff_is_the_hand_computed_difference(tmp_path: Path) -> None:
    """before: correct 1,0,0,1 (0.5), det (IoU > 0.5) 1,0,0,1 (0.5; IoU 0.5 is a miss);
    after: correct 1,1,1,0 (0.75), det 1,1,1,1 (1.0). Diffs: accuracy +0.25, det_acc +0.5.
    Rows of another mode and a uid only in one file are ignored."""
    other = [{"uid": "u0", "mode": "cot_gt", "correct": False, "iou": 0.0}]
    before = write_predictions(tmp_path / "before", [1, 0, 0, 1], [0.6, 0.2, 0.5, 0.9], other)
    after = write_predictions(
        tmp_path / "after",
        [1, 1, 1, 0],
        [0.7, 0.6, 0.51, 0.95],
        [{"uid": "u9", "mode": "cot_pred", "correct": True, "iou": 1.0}],
    )
    bench = SyntheticBenchmark(tmp_path / "test.json")
    result = bench.paired_effect(before, after, n=500, seed=0)
    expected = {"cot_pred/accuracy": (0.5, 0.75, 0.25), "cot_pred/det_acc": (0.5, 1.0, 0.5)}
    assert set(result) == set(expected)
    for key, (b, a, diff) in expected.items():
        r = result[key]
        assert (r["before"], r["after"], r["n"]) == (pytest.approx(b), pytest.approx(a), 4), key
        assert r["diff"] == pytest.approx(diff), key
        lo, hi = r["ci95"]
        assert -1.0 <= lo <= diff <= hi <= 1.0 and lo < hi, key
    same = bench.paired_effect(before, before, n=200)
    assert all(r["diff"] == 0.0 and r["ci95"] == [0.0, 0.0] for r in same.values())


def test_bootstrap_ci() -> None:
    assert bootstrap_ci([1.0] * 7) == (1.0, 1.0)
    lo, hi = bootstrap_ci([0.7] * 10, n=100)
    assert lo == hi == pytest.approx(0.7)  # constant values: a degenerate interval
    assert bootstrap_ci([]) == (0.0, 0.0)
    lo, hi = bootstrap_ci([0.0, 1.0] * 20, n=1000, seed=3)
    assert 0.2 < lo < 0.5 < hi < 0.8
    assert bootstrap_ci([0.0, 1.0] * 20, n=1000, seed=3) == (lo, hi)  # seeded
