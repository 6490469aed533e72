"""Evaluation under bad data and interruption: nothing computed is lost, every bad input is named in one line.

A mini Visual-CoT tree (two datasets, generated records, detection rows and images) and a scripted policy;
faults: random bytes as an image, a missing image, a record missing a field, a det row for another image,
a det file one row short, a binary / empty / empty-list benchmark file, an evaluation killed mid-way and a
torn last line. Also V* and the synthetic benchmark with an unreadable image, and each benchmark's paired
effect on its own predictions (the summary's effect no longer reads the synthetic benchmark's fields).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from visrl.benchmarks.synthetic import SyntheticBenchmark
from visrl.benchmarks.viscot import VisCoTBenchmark
from visrl.benchmarks.vstar import VStarBenchmark
from visrl.data.box_formats import SqFloatFormat
from visrl.data.boxes import from_px, sq_text
from visrl.data.errors import InputError
from visrl.data.prompts import REFERENCE
from visrl.data.records import make_viscot_record, read_det, read_viscot

SIZE = (64, 48)
BOX = (8, 8, 40, 32)


class Scripted:
    """A policy that answers every question ``answer`` and writes the ground-truth box; it can be told
    to die after ``die_after`` generate calls (a kill during evaluation)."""

    def __init__(self, answer: str = "red", die_after: int | None = None):
        self.answer, self.die_after, self.calls, self.prompts = answer, die_after, 0, 0

    def generate(self, prompts, max_new_tokens: int, temperature: float = 0.0) -> list[list[str]]:
        if self.die_after is not None and self.calls >= self.die_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.prompts += len(prompts)
        text = sq_text(from_px(BOX, SIZE), SIZE)
        return [[text if "bounding box" in str(p) else self.answer] for p in prompts]


def write_dataset(root: Path, ds: str, n: int) -> None:
    """``n`` questions of dataset ``ds``: benchmark JSON, det JSONL and one image each."""
    recs, dets = [], []
    for i in range(n):
        rel = f"cot/{ds}/{i}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", SIZE, (i, 100, 200)).save(root / rel)
        recs.append(make_viscot_record(dataset=ds, split="test", question_id=0, image_path=rel,
                                       question=f"q{i}?", answer="red", box_px=BOX, size=SIZE).raw)  # fmt: skip
        dets.append({"img_path": rel, "expression": f"q{i}?", "bbox": list(BOX), "width": SIZE[0],
                     "height": SIZE[1], "question_id": 0, "split": "test"})  # fmt: skip
    (root / "benchmark").mkdir(exist_ok=True)
    (root / "benchmark_det").mkdir(exist_ok=True)
    (root / "benchmark" / f"{ds}.json").write_text(json.dumps(recs, indent=4))
    (root / "benchmark_det" / f"{ds}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dets))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "viscot"
    write_dataset(root, "gqa", 5)
    write_dataset(root, "vsr", 4)
    return root


def bench(root: Path, **kw) -> VisCoTBenchmark:
    return VisCoTBenchmark(root, datasets=["gqa", "vsr"], box_format=SqFloatFormat(), batch_size=2, **kw)


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_random_bytes_image_keeps_every_other_answer(tree: Path, tmp_path: Path) -> None:
    """The issue's reproduction: a vsr image of random bytes used to discard the gqa answers."""
    (tree / "cot/vsr/2.jpg").write_bytes(os.urandom(512))
    (tree / "cot/vsr/3.jpg").unlink()
    metrics = bench(tree).evaluate(Scripted(), REFERENCE, tmp_path / "out")
    rows = rows_of(tmp_path / "out")
    assert len(rows) == 9 and metrics["gqa/n"] == 5 and metrics["vsr/n"] == 2
    assert metrics["gqa/em"] == 1.0 == metrics["vsr/em"] and metrics["vsr/det_acc"] == 1.0
    assert metrics["skipped/image_unreadable"] == 1 and metrics["skipped/image_missing"] == 1
    assert metrics["vsr/skipped/image_unreadable"] == 1 and metrics["skipped"] == 2
    bad = {r["uid"]: r for r in rows if r.get("skipped")}
    assert bad["vsr:2"]["file"].endswith("cot/vsr/2.jpg") and bad["vsr:2"]["row"] == 2
    assert bad["vsr:3"]["skipped"] == "image_missing" and "cot/vsr/3.jpg" in bad["vsr:3"]["error"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == pytest.approx(metrics)


def test_unusable_records_are_skipped_by_reason_with_file_and_row(tree: Path, tmp_path: Path) -> None:
    recs = json.loads((tree / "benchmark/gqa.json").read_text())
    del recs[1]["conversations"]  # a record missing a field
    (tree / "benchmark/gqa.json").write_text(json.dumps(recs))
    dets = (tree / "benchmark_det/gqa.jsonl").read_text().splitlines()
    dets[2] = dets[2].replace("cot/gqa/2.jpg", "cot/gqa/elsewhere.jpg")  # the det row of another image
    dets[3] = "{not json"
    (tree / "benchmark_det/gqa.jsonl").write_text("\n".join(dets[:4]) + "\n")  # one row short
    metrics = bench(tree).evaluate(Scripted(), REFERENCE, tmp_path / "out")
    bad = {r["uid"]: r for r in rows_of(tmp_path / "out") if r.get("skipped")}
    assert {u: r["skipped"] for u, r in bad.items()} == {
        "gqa:1": "bad_record", "gqa:2": "det_mismatch", "gqa:3": "bad_record", "gqa:4": "no_det_row"}  # fmt: skip
    assert bad["gqa:1"]["file"].endswith("benchmark/gqa.json") and bad["gqa:1"]["row"] == 1
    assert "record 1: field 'conversations': missing" in bad["gqa:1"]["error"]
    assert bad["gqa:3"]["file"].endswith("benchmark_det/gqa.jsonl") and "line 4" in bad["gqa:3"]["error"]
    assert metrics["gqa/n"] == 1 and metrics["vsr/n"] == 4 and metrics["skipped/bad_record"] == 2


def test_interrupted_evaluation_resumes_without_redoing_or_losing(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        bench(tree).evaluate(Scripted(die_after=4), REFERENCE, out)  # 2 chunks (4 items) done, then killed
    assert [r["uid"] for r in rows_of(out)] == ["gqa:0", "gqa:1", "gqa:2", "gqa:3"]
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"uid": "gqa:4", "datas')  # a torn last line: the crash's signature
    again = Scripted()
    metrics = bench(tree).evaluate(again, REFERENCE, out)
    uids = [r["uid"] for r in rows_of(out)]
    assert sorted(uids) == sorted(set(uids)) and len(uids) == 9  # nothing duplicated, nothing lost
    assert again.prompts == 2 * 5  # only gqa:4 and the 4 vsr questions, two passes each
    fresh = bench(tree).evaluate(Scripted(), REFERENCE, tmp_path / "fresh")
    assert metrics == fresh


def test_bad_benchmark_files_are_named_in_one_line(tree: Path, tmp_path: Path) -> None:
    gqa = tree / "benchmark/gqa.json"
    gqa.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    with pytest.raises(InputError, match=rf"^{gqa}: not a UTF-8 text file") as e:
        bench(tree).evaluate(Scripted(), REFERENCE, tmp_path / "a")
    assert "\n" not in str(e.value)
    gqa.write_text("")
    with pytest.raises(InputError, match=rf"^{gqa}: empty file"):
        bench(tree).evaluate(Scripted(), REFERENCE, tmp_path / "b")
    gqa.write_text("{}")
    with pytest.raises(InputError, match=rf"^{gqa}: expected a JSON list"):
        read_viscot(gqa)
    (tree / "benchmark_det/vsr.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="benchmark_det/vsr.jsonl: not a UTF-8 text file"):
        read_det(tree / "benchmark_det/vsr.jsonl")


def test_a_dataset_with_nothing_scorable_is_reported_with_its_file(
    tree: Path, tmp_path: Path, caplog
) -> None:
    (tree / "benchmark/gqa.json").write_text("[]")
    metrics = bench(tree).evaluate(Scripted(), REFERENCE, tmp_path / "a")
    assert metrics["gqa/n"] == 0 and metrics["vsr/n"] == 4
    assert metrics["overall/em"] == pytest.approx(0.5)  # gqa counts 0, as published
    assert f"nothing scorable in {tree / 'benchmark/gqa.json'} (no rows)" in caplog.text
    for i in range(4):
        (tree / f"cot/vsr/{i}.jpg").write_bytes(b"")
    with pytest.raises(
        InputError, match=r"nothing scorable in .*gqa.json \(no rows\); .*vsr.json \(4 rows, all skipped\)"
    ):
        bench(tree).evaluate(Scripted(), REFERENCE, tmp_path / "b")


def test_viscot_paired_effect_reads_its_own_predictions(tree: Path, tmp_path: Path) -> None:
    """Bug 13: the summary's effect for a viscot run (no ``mode`` field) used to raise KeyError."""
    (tree / "cot/vsr/1.jpg").write_bytes(b"junk")
    b = bench(tree)
    b.evaluate(Scripted("blue"), REFERENCE, tmp_path / "before")
    b.evaluate(Scripted("red"), REFERENCE, tmp_path / "after")
    effect = b.paired_effect(tmp_path / "before", tmp_path / "after", n=200)
    assert b.headline == "overall/em" and set(effect) == {"overall/det_acc", "overall/em", "overall/anls"}
    em = effect["overall/em"]
    assert (em["before"], em["after"], em["diff"], em["n"], em["strata"]) == (0.0, 1.0, 1.0, 8, 2)
    assert em["ci95"] == [1.0, 1.0] and effect["overall/det_acc"]["diff"] == 0.0


# ------------------------------------------------------------------------------------------- V* and synthetic
class Chooser:
    """V* policy: option 0 is always the most likely; the reply names letter A."""

    def completion_logprobs(self, prompts, completions, reduction: str = "mean"):
        import torch

        return torch.tensor([0.0 if i == 0 else -1.0 for i in _option_index(completions)])

    def generate(self, prompts, max_new_tokens: int, temperature: float = 0.0):
        return [["A"] for _ in prompts]


def _option_index(completions: list[str]) -> list[int]:
    return [int(c[-1]) for c in completions]


def write_vstar(root: Path) -> None:
    for cat in ("direct_attributes", "relative_position"):
        (root / cat).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32)).save(root / cat / f"{i}.jpg")
            (root / cat / f"{i}.json").write_text(json.dumps({"question": "Q?", "options": ["o0", "o1"]}))


def test_vstar_survives_a_bad_image_and_a_bad_annotation(tmp_path: Path) -> None:
    write_vstar(tmp_path / "v")
    (tmp_path / "v/direct_attributes/1.jpg").write_bytes(os.urandom(100))
    (tmp_path / "v/relative_position/2.json").write_text('{"question": "Q?"}')
    b = VStarBenchmark(tmp_path / "v", shuffle_options=False, batch_size=2)
    metrics = b.evaluate(Chooser(), REFERENCE, tmp_path / "out")
    assert metrics["likelihood/n"] == 4 and metrics["likelihood/accuracy"] == 1.0
    assert metrics["skipped/image_unreadable"] == 1 and metrics["skipped/bad_record"] == 1
    effect = b.paired_effect(tmp_path / "out", tmp_path / "out", n=50)
    assert b.headline == "likelihood/accuracy" and effect["likelihood/accuracy"]["n"] == 4


def test_synthetic_skips_a_missing_image(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from visrl.data.box_formats import GridFormat
    from visrl.data.records import write_viscot

    recs = []
    for i in range(3):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{i}.png")
        recs.append(make_viscot_record(dataset="synthetic", split="test", question_id=i, image_path=f"{i}.png",
                                       question="q?", answer="red", box_px=(0, 0, 8, 8), size=(16, 16)))  # fmt: skip
    write_viscot(recs, tmp_path / "test.json")
    (tmp_path / "1.png").unlink()

    class Policy(Scripted):
        backbone = SimpleNamespace(image_size=None, box_format=GridFormat(4))

    b = SyntheticBenchmark(tmp_path / "test.json", modes=["direct", "cot_pred"])
    metrics = b.evaluate(Policy(), REFERENCE, tmp_path / "out")
    assert metrics["cot_pred/n"] == 2 and metrics["skipped/image_missing"] == 1
    assert b.paired_effect(tmp_path / "out", tmp_path / "out")["cot_pred/accuracy"]["n"] == 2
