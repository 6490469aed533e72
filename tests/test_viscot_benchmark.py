"""Visual-CoT benchmark: protocol prompts, detection metric, aggregation, files — on the real benchmark files.

The JSON/JSONL files are the real ones (shared/data/viscot_benchmark); images are synthesized at each
record's width × height as solid colours (one colour per image file), which lets a scripted fake policy
recognise the question it is asked and check the exact protocol wording.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from visrl.benchmarks.judge import JudgeRequest
from visrl.benchmarks.viscot import (
    SCORED_DATASETS,
    BoxReading,
    VisCoTBenchmark,
    aggregate,
    detection_iou,
    load_items,
    parse_published,
    read_box,
    resolve_image,
)
from visrl.data.box_formats import GridFormat, Qwen2VLFormat, SqFloatFormat
from visrl.data.boxes import sq_text
from visrl.data.errors import InputError
from visrl.data.prompts import REFERENCE, Prompt
from visrl.data.records import join_det, read_det, read_viscot

torch.set_num_threads(1)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "viscot_benchmark"
needs_data = pytest.mark.skipif(
    not (DATA / "benchmark").is_dir(), reason=f"Visual-CoT files not found at {DATA}"
)
DET_SUFFIX = (
    ". Please provide the bounding box coordinate of the region that can help you answer the question better."
)
ANSWER_PREFIX = "<image>\nPlease answer the question based on the original image and local detail image."
LIMIT = 3  # questions per dataset on the full evaluate() path
COLOURS: dict[str, tuple[int, int, int]] = {}  # image path -> its solid colour (filled by `root`)
items_of = functools.cache(load_items)  # the tests read each dataset once


def _colour(i: int) -> tuple[int, int, int]:
    return (i % 256, (i // 256) % 256, 200)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A benchmark root: the real JSON files plus solid-colour images for the first LIMIT rows."""
    root = tmp_path_factory.mktemp("viscot")
    (root / "benchmark").symlink_to(DATA / "benchmark")
    (root / "benchmark_det").symlink_to(DATA / "benchmark_det")
    for ds in SCORED_DATASETS:
        for item in items_of(root, ds, LIMIT):
            rel = item.record.image_path
            if rel not in COLOURS:
                COLOURS[rel] = _colour(len(COLOURS))
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", item.det.size, COLOURS[rel]).save(root / rel, format="PNG")
    return root


def _conversation(prompt: Prompt) -> tuple[tuple[int, ...], str]:
    """(colour of the first image, the conversation as text) -- the key the scripted policy answers by."""
    return prompt[0].images[0].getpixel((0, 0)), "\n".join(f"{m.role}: {m.text}" for m in prompt)


class ScriptedPolicy:
    """Answers the exact conversations it was given (KeyError on any other prompt: wrong wording)."""

    def __init__(self, replies: dict, box_format=None, image_size=None):
        self.replies = replies
        self.backbone = SimpleNamespace(box_format=box_format or SqFloatFormat(), image_size=image_size)
        self.prompts: list[Prompt] = []

    def generate(self, prompts, max_new_tokens, temperature=0.0, num_return_sequences=1, seed=None):
        assert temperature == 0.0 and num_return_sequences == 1 and max_new_tokens == 128
        self.prompts += prompts
        return [[self.replies[_conversation(p)]] for p in prompts]

    def completion_logprobs(self, prompts, completions, reduction="sum"):
        raise AssertionError("the Visual-CoT protocol never scores completions")


def _script(root: Path, datasets, box_text, answer) -> dict:
    """The published two-pass conversations for the first LIMIT rows, answered by box_text/answer(item)."""
    replies = {}
    for ds in datasets:
        for it in items_of(root, ds, LIMIT):
            colour = COLOURS[it.record.image_path]
            q, box = it.record.question, box_text(it)
            replies[(colour, f"user: <image>\n{it.det.expression.lower()}{DET_SUFFIX}")] = box
            turns = f"user: <image>\n{q}\nassistant: {box}\nuser: {ANSWER_PREFIX}{q} "
            replies[(colour, turns)] = answer(it)
    return replies


def gt_text(item) -> str:
    """The ground truth in the model's text: sq_text of the exact det pixel box (not the rounded turn 1)."""
    return sq_text(item.det.box, item.det.size)


@needs_data
def test_gt_box_hits_every_valid_gt_on_all_records() -> None:
    fmt = SqFloatFormat()
    for ds in SCORED_DATASETS:
        pairs = join_det(
            read_viscot(DATA / "benchmark" / f"{ds}.json"), read_det(DATA / "benchmark_det" / f"{ds}.jsonl")
        )
        hits, degenerate = 0, 0
        for record, det in pairs:
            x1, y1, x2, y2 = det.bbox
            bad_gt = x2 <= x1 or y2 <= y1
            degenerate += bad_gt
            # the exact det box in the model's text, and the benchmark's own (3-decimal) turn-1 string
            for text in (sq_text(det.box, det.size), record.box_text):
                reading = read_box(fmt, text, det.size)
                assert reading.failure is None, (ds, det.index, reading)
                hit = detection_iou(reading.sq, det) > 0.5
                assert hit != bad_gt, (ds, det.index, det.bbox)  # every valid GT is hit; a swapped one never
            hits += hit
        # DocVQA has 8 boxes with swapped corners (vertical text): the published metric can never hit them
        assert degenerate == (8 if ds == "docvqa" else 0), ds
        assert hits == len(pairs) - degenerate


@needs_data
def test_detection_iou_hand_computed() -> None:
    # cub rows 0, 4, 5 with the centre box [.25, .25, .75, .75] (the cot_center ablation box):
    # row 0: 500x357, m=500, o=71; gt sq px [141,158,397,369]; pred [125,125,375,375]
    #        inter 234*211 = 49374; union 62500 + 256*211 - 49374 = 67142
    # row 4: 500x306, o=97; gt [119,139,237,262]; inter 112*123 = 13776; union 62500+118*123-13776 = 63238
    # row 5: 500x333, o=83; gt [18,143,477,382]; inter 250*232 = 58000; union 62500+459*239-58000 = 114201
    dets = read_det(DATA / "benchmark_det" / "cub.jsonl")
    for row, expected in ((0, 49374 / 67142), (4, 13776 / 63238), (5, 58000 / 114201)):
        assert detection_iou((0.25, 0.25, 0.75, 0.75), dets[row]) == pytest.approx(expected, abs=1e-12)
    assert detection_iou(None, dets[0]) == 0.0
    det = read_det(DATA / "benchmark_det" / "docvqa.jsonl")[0]
    assert detection_iou((0.0, 0.0, 0.5, 0.5), det) == pytest.approx(231660 / 1215940, abs=1e-12)
    assert detection_iou((0.5, 0.0, 0.0, 0.5), det) == 0.0  # swapped corners never intersect


@needs_data
def test_evaluate_with_gt_boxes_and_answers(root: Path, tmp_path: Path) -> None:
    policy = ScriptedPolicy(_script(root, SCORED_DATASETS, gt_text, lambda it: it.record.answer))
    bench = VisCoTBenchmark(root=str(root), limit=LIMIT, batch_size=2)
    metrics = bench.evaluate(policy, REFERENCE, tmp_path)
    for ds in SCORED_DATASETS:
        assert metrics[f"{ds}/det_acc"] == 1.0 and metrics[f"{ds}/n"] == LIMIT
        assert metrics[f"{ds}/em"] == 1.0 and metrics[f"{ds}/anls"] == 1.0
        assert metrics[f"{ds}/parse_failures"] == 0.0
    assert metrics["overall/det_acc"] == 1.0 == metrics["overall/det_acc_viscot_avg"]
    assert metrics["overall/n_datasets"] == 11 and metrics["group/reasoning/em"] == 1.0
    assert not any(k.endswith("/judge") for k in metrics)  # no judge configured
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 11 * LIMIT and rows[0]["uid"] == "docvqa:0"
    # docvqa row 0: the published cropwithbbox of "[0.148, 0.181, 0.298, 0.508]" is [0, 398, 718, 1116]
    assert rows[0]["box_text"] == "[0.148, 0.181, 0.298, 0.508]" and rows[0]["crop_px"] == [0, 398, 718, 1116]
    answer_prompt = next(p for p in policy.prompts if len(p) == 3)
    assert [im.size for m in answer_prompt for im in m.images] == [(1695, 2200), (718, 718)]
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    table = (tmp_path / "results.md").read_text()
    assert "| Det Acc@0.5 (×100) | 100.00 |" in table and "| Metric | text | chart |" in table


@needs_data
def test_fixed_centre_box_gives_hand_computed_accuracy(root: Path, tmp_path: Path) -> None:
    # cub rows 0-7 with the centre box: IoU .735 .592 .526 .668 .218 .508 .650 .744 (row 0/4/5 worked out
    # above) -> 7 of 8 hit; row 5 (.508) is a near miss of the strict > 0.5 threshold that still hits.
    dets = read_det(DATA / "benchmark_det" / "cub.jsonl")[:8]
    assert [detection_iou((0.25, 0.25, 0.75, 0.75), d) > 0.5 for d in dets] == [1, 1, 1, 1, 0, 1, 1, 1]
    # textcap rows 0-2 (1024x768): the centre box misses all (IoU .031, .004, .093)
    datasets = ["cub", "textcap"]
    policy = ScriptedPolicy(
        _script(root, datasets, lambda it: "[0.250, 0.250, 0.750, 0.750]", lambda it: "no")
    )
    metrics = VisCoTBenchmark(root, datasets=datasets, limit=LIMIT).evaluate(policy, REFERENCE, tmp_path)
    assert metrics["cub/det_acc"] == 1.0 and metrics["textcap/det_acc"] == 0.0
    assert metrics["cub/mean_iou"] == pytest.approx((49374 / 67142 + 40000 / 67600 + 49750 / 94618) / 3)
    assert metrics["textcap/mean_iou"] == pytest.approx(
        (0.030922929875 + 0.003909346874 + 0.092793829073) / 3
    )
    # only the scored datasets in the run count; the published average drops the dataset at exactly 0
    assert metrics["overall/det_acc"] == 0.5 and metrics["overall/det_acc_viscot_avg"] == 1.0
    assert metrics["group/text/det_acc"] == 0.0 and metrics["group/fine_grained/det_acc"] == 1.0


@needs_data
def test_parse_failures_fall_back_to_the_whole_image_and_are_counted(root: Path, tmp_path: Path) -> None:
    # the third holds a box the lenient format parser finds, but not in the form the protocol reads
    bad = {0: "I cannot tell.", 1: "[0.1, 0.2, 0.3]", 2: "The box is [0.100, 0.200, 0.300, 0.400]"}
    policy = ScriptedPolicy(_script(root, ["gqa"], lambda it: bad[it.row], lambda it: it.record.answer))
    metrics = VisCoTBenchmark(root, datasets=["gqa"], limit=LIMIT).evaluate(policy, REFERENCE, tmp_path)
    assert metrics["gqa/parse_failures"] == 3.0 and metrics["gqa/det_acc"] == 0.0
    assert metrics["gqa/parse_failures/no_box"] == 1.0
    assert metrics["gqa/parse_failures/wrong_arity"] == 1.0
    assert metrics["gqa/parse_failures/not_protocol_format"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    for row, item in zip(rows, items_of(root, "gqa", LIMIT)):
        assert row["box"] is None and row["iou"] == 0.0
        assert row["crop_px"] == [0, 0, *item.det.size]  # the fallback box: the whole image
    # the raw box-pass text still goes into the answer conversation (as published)
    assert metrics["gqa/em"] == 1.0


def test_read_box_follows_the_published_parse() -> None:
    size, fmt = (400, 300), SqFloatFormat()
    assert parse_published("[0.1, 0.2, 0.3, 0.4]") == (0.1, 0.2, 0.3, 0.4)
    assert parse_published("[0.1, 0.2, 0.3, 0.4] .") == (0.1, 0.2, 0.3, 0.4)  # " ." is dropped
    assert parse_published("[0.235, 1.512, 1.003, 1.590]") == (0.235, 1.512, 1.003, 1.590)  # kept as read
    assert parse_published("[0.3, 0.2, 0.1, 0.4]") == (0.3, 0.2, 0.1, 0.4)  # unordered, kept as read
    for text in ("[0.1, 0.2, 0.3, 0.4].", "[0.1,0.2,0.3,0.4]", "[0.1, 0.2, 0.3]", "[nan, 0.2, 0.3, 0.4]", ""):
        assert parse_published(text) is None, text
    reading = read_box(fmt, "[0.000, 0.125, 1.000, 0.875]", size)  # the whole 400x300 image (o = 50)
    assert reading.failure is None and reading.box.as_tuple() == pytest.approx((0, 0, 1, 1))
    assert read_box(fmt, "[0.1,0.2,0.3,0.4]", size) == BoxReading(None, None, "not_protocol_format")
    assert read_box(fmt, "no idea", size) == BoxReading(None, None, "no_box")
    # another backbone's format: parsed by the format, scored in the sq frame
    qwen = read_box(Qwen2VLFormat(), "<|box_start|>(0,0),(500,1000)<|box_end|>", size)
    assert qwen.box.as_tuple() == (0.0, 0.0, 0.5, 1.0)
    assert qwen.sq == pytest.approx((0.0, 0.125, 0.5, 0.875))
    assert read_box(Qwen2VLFormat(), "(1,2)", size).failure == "wrong_arity"


def test_aggregate_hand_computed() -> None:
    rows = []
    det = {ds: (i % 3) / 2 for i, ds in enumerate(SCORED_DATASETS)}  # 0, .5, 1, 0, .5, 1, ...
    for ds in SCORED_DATASETS:
        # two rows per dataset: det hits 2*det[ds] of them; em (1, 0) -> 0.5; judge (0.2, 0.6) -> 0.4
        for k in range(2):
            rows.append({"dataset": ds, "det_correct": k < 2 * det[ds], "iou": 0.3, "em": float(k == 0),
                         "anls": 1.0, "judge": (0.2, 0.6)[k], "judge_parsed": k == 0,
                         "parse_failure": "no_box" if ds == "cub" else None, "gt_degenerate": False})  # fmt: skip
    rows.append(dict(rows[0], dataset="docvqa", em=1.0, det_correct=True, judge=0.4))  # docvqa: 3 rows
    m = aggregate(rows, SCORED_DATASETS)
    assert m["docvqa/det_acc"] == pytest.approx(1 / 3) and m["docvqa/em"] == pytest.approx(2 / 3)
    means = [1 / 3] + [det[ds] for ds in SCORED_DATASETS[1:]]
    assert m["overall/det_acc"] == pytest.approx(sum(means) / 11)  # unweighted over datasets
    assert m["overall/det_acc_viscot_avg"] == pytest.approx(sum(means) / sum(v > 0 for v in means))
    assert m["group/text/det_acc"] == pytest.approx(sum(means[:5]) / 5)
    assert m["group/reasoning/det_acc"] == pytest.approx((det["gqa"] + det["openimages"] + det["vsr"]) / 3)
    assert m["overall/em"] == pytest.approx((2 / 3 + 10 * 0.5) / 11) and m["overall/judge"] == pytest.approx(
        0.4
    )
    assert (
        m["cub/parse_failures"] == 2 and m["cub/parse_failures/no_box"] == 2 and m["gqa/judge_unparsed"] == 1
    )
    no_vsr = aggregate([r for r in rows if r["dataset"] != "vsr"], SCORED_DATASETS)
    assert no_vsr["vsr/n"] == 0 and "vsr/det_acc" not in no_vsr  # counted 0 in overall, as published
    assert no_vsr["overall/det_acc"] == pytest.approx((sum(means) - det["vsr"]) / 11)
    with pytest.raises(InputError, match=r"nothing scorable in root/benchmark/gqa.json \(no rows\)"):
        aggregate([], ["gqa"], {"gqa": Path("root/benchmark/gqa.json")})


@needs_data
def test_judge_and_templates_prompt_style(root: Path, tmp_path: Path) -> None:
    class EchoJudge:
        name = "echo"
        requests: list[JudgeRequest] = []

        def complete(self, requests):
            EchoJudge.requests += requests
            return ["Score: 0.5" if r.pred == r.gold else "garbage" for r in requests]

    items = items_of(root, "vsr", LIMIT)
    replies = {}
    for it in items:
        colour = COLOURS[it.record.image_path]
        replies[(colour, "user: " + REFERENCE.box.format(question=it.record.question))] = gt_text(it)
        answer = it.record.answer if it.row else "wrong"
        replies[(colour, "user: " + REFERENCE.answer.format(question=it.record.question))] = answer
    bench = VisCoTBenchmark(root, datasets=["vsr"], limit=LIMIT, judge=EchoJudge(), prompt_style="templates")
    metrics = bench.evaluate(ScriptedPolicy(replies), REFERENCE, tmp_path)
    assert metrics["vsr/judge"] == pytest.approx(1 / 3) and metrics["vsr/judge_unparsed"] == 1.0
    assert metrics["vsr/det_acc"] == 1.0
    assert EchoJudge.requests[0].question == "<image>\n" + items[0].record.question  # kept as published
    assert "vsr/judge" in metrics and "| Judge score |" in (tmp_path / "results.md").read_text()


def test_bad_input_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="benchmark/gqa.json"):
        load_items(tmp_path, "gqa")
    with pytest.raises(FileNotFoundError, match="cot/v7w/a.jpg.*cot/visual7w/a.jpg"):
        resolve_image(tmp_path, "cot/v7w/a.jpg")
    (tmp_path / "cot" / "visual7w").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "cot" / "visual7w" / "a.jpg")
    assert resolve_image(tmp_path, "cot/v7w/a.jpg") == tmp_path / "cot" / "visual7w" / "a.jpg"
    with pytest.raises(ValueError, match="prompt_style"):
        VisCoTBenchmark(tmp_path, prompt_style="mine")
    with pytest.raises(ValueError, match="no box format"):
        VisCoTBenchmark(tmp_path).evaluate(SimpleNamespace(), REFERENCE, tmp_path)


@needs_data
def test_runs_end_to_end_with_a_real_tiny_policy(root: Path, tmp_path: Path) -> None:
    """The protocol's conversations (3 turns, 2 images) encode and decode with a real tiny backbone."""
    from visrl.models.policy import VLMPolicy
    from visrl.models.tiny import build_tiny

    policy = VLMPolicy(build_tiny("qwen2vl", box_format=GridFormat(4), seed=0), batch_size=4)
    bench = VisCoTBenchmark(
        root, datasets=["gqa", "vsr"], limit=2, max_new_tokens_box=6, max_new_tokens_answer=6
    )
    metrics = bench.evaluate(policy, REFERENCE, tmp_path / "a")
    again = bench.evaluate(policy, REFERENCE, tmp_path / "b")
    assert metrics == again  # greedy: deterministic
    rows = [json.loads(line) for line in (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()]
    assert [r["uid"] for r in rows] == ["gqa:0", "gqa:1", "vsr:0", "vsr:1"]
    assert all(isinstance(r["pred"], str) for r in rows)
    parsed = sum(r["parse_failure"] is None for r in rows if r["dataset"] == "gqa")
    assert metrics["gqa/parse_failures"] == 2 - parsed and metrics["overall/n_datasets"] == 2
