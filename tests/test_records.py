"""Tests for visrl.data.records (VisCoT JSON, detection JSONL) and visrl.data.pair_records (VisRL preference JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visrl.data.boxes import Box
from visrl.data.pair_records import PreferenceRecord, make_preference_record, read_pairs, write_pairs
from visrl.data.records import (
    VISCOT_SUFFIX,
    DetRecord,
    VisCoTRecord,
    join_det,
    make_viscot_record,
    read_det,
    read_viscot,
    write_det,
    write_viscot,
)

# docvqa.json[1] and its det row, verbatim (benchmark-formats.md §1a/1b)
VISCOT_RAW: dict[str, Any] = {
    "dataset": "docvqa",
    "split": "val",
    "question_id": 1,
    "image": ["cot/docvqa/hsyn0081_31.png", "cot/docvqa/hsyn0081_31.png###[2112, 1623, 2142, 1654]"],
    "conversations": [
        {
            "from": "human",
            "value": "<image>\nWhat is the page no mentioned in this document?" + VISCOT_SUFFIX,
        },
        {"from": "gpt", "value": "[0.980, 0.859, 0.994, 0.874]"},
        {"from": "human", "value": "<image>"},
        {"from": "gpt", "value": "31"},
    ],
}
DET_RAW: dict[str, Any] = {
    "img_path": "cot/docvqa/hsyn0081_31.png",
    "expression": "What is the page no mentioned in this document?",
    "bbox": [2112, 1623, 2142, 1654],
    "height": 1695,
    "width": 2156,
    "question_id": 1,
    "split": "val",
}


def copy(raw: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(raw))


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=4))
    return path


# --------------------------------------------------------------------------------------------- VisCoT
def test_viscot_fields_and_byte_exact_round_trip(tmp_path: Path) -> None:
    src = write_json(tmp_path / "docvqa.json", [VISCOT_RAW, VISCOT_RAW])
    records = read_viscot(src)
    r = records[1]
    assert (r.dataset, r.split, r.question_id, r.index, r.source) == ("docvqa", "val", 1, 1, str(src))
    assert r.image_path == "cot/docvqa/hsyn0081_31.png"
    assert r.box_px == (2112, 1623, 2142, 1654) and all(isinstance(v, int) for v in r.box_px)
    assert r.question == "What is the page no mentioned in this document?"
    assert r.answer == "31" and r.box_text == "[0.980, 0.859, 0.994, 0.874]"
    assert r.box((2156, 1695)) == Box(2112 / 2156, 1623 / 1695, 2142 / 2156, 1654 / 1695)
    assert r.raw == VISCOT_RAW and r.extra == {}
    out = tmp_path / "sub" / "out.json"
    write_viscot(records, out)
    assert out.read_bytes() == src.read_bytes()
    write_viscot(records, out, indent=None)
    assert json.loads(out.read_text()) == [VISCOT_RAW, VISCOT_RAW] and "\n" not in out.read_text()


def test_make_viscot_record_matches_the_benchmark_record() -> None:
    made = make_viscot_record(
        dataset="docvqa",
        split="val",
        question_id=1,
        image_path="cot/docvqa/hsyn0081_31.png",
        question="What is the page no mentioned in this document?",
        answer="31",
        box_px=[2112.4, 1623.0, 2142.9, 1654.3],  # %d truncation in the ### suffix
        size=(2156, 1695),
    )
    assert made.raw == VISCOT_RAW
    assert made == VisCoTRecord.from_raw(copy(VISCOT_RAW))


def test_make_viscot_record_options() -> None:
    fields = dict(
        dataset="synth", split="train", question_id="s-0", image_path="img/0.png", question="Q?", answer="A"
    )
    no_box = make_viscot_record(**fields, box_text="[0, 0, 4, 4]")
    assert (
        no_box.box_px is None and no_box.raw["image"] == ["img/0.png"] and no_box.box_text == "[0, 0, 4, 4]"
    )
    extra = make_viscot_record(
        **fields, box_px=[0, 0, 64, 32], size=(64, 32), extra={"width": 64, "uid": "u"}
    )
    assert extra.box_text == "[0.000, 0.250, 1.000, 0.750]"
    assert list(extra.raw)[-2:] == ["width", "uid"] and extra.extra == {"width": 64, "uid": "u"}
    with pytest.raises(ValueError, match="box_text, or box_px and size"):
        make_viscot_record(**fields, box_px=[0, 0, 1, 1])
    with pytest.raises(ValueError, match="overwrite"):
        make_viscot_record(**fields, box_text="[0, 0, 1, 1]", extra={"split": "x"})


@settings(max_examples=100, database=None)
@given(question=st.text(), answer=st.text(), qid=st.one_of(st.integers(), st.text()))
def test_make_viscot_record_round_trips_any_text(question: str, answer: str, qid: int | str) -> None:
    r = make_viscot_record(
        dataset="d", split="s", question_id=qid, image_path="p.png", question=question, answer=answer,
        box_px=[1, 2, 3, 4], size=(10, 10),
    )  # fmt: skip
    back = VisCoTRecord.from_raw(json.loads(json.dumps(r.raw)))
    assert (back.question, back.answer, back.question_id) == (question, answer, qid)
    assert back == r


def _set(path: list[Any], value: Any) -> Any:
    def mutate(raw: dict[str, Any]) -> None:
        target = raw
        for key in path[:-1]:
            target = target[key]
        if value is DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return mutate


DELETE = object()
VISCOT_MUTATIONS = [
    (_set(["dataset"], DELETE), "'dataset': missing"),
    (_set(["question_id"], 1.5), "'question_id': expected"),
    (_set(["image"], "a.png"), "'image': expected"),
    (_set(["image"], ["a", "b", "c"]), "'image': expected 1 or 2"),
    (_set(["image", 1], "a.png[1, 2, 3, 4]"), "'image\\[1\\]': expected 'path###"),
    (_set(["image", 1], "a.png###[1, 2, 3]"), "'image\\[1\\]': expected 4 finite"),
    (_set(["image", 1], "a.png###[1, 2, nan, 4]"), "'image\\[1\\]': expected 4 finite"),
    (_set(["conversations"], []), "'conversations': expected 4 turns"),
    (_set(["conversations", 1, "from"], "human"), "'conversations\\[1\\].from': expected 'gpt'"),
    (_set(["conversations", 3, "value"], None), "'conversations\\[3\\].value': expected a string"),
    (_set(["conversations", 2], "<image>"), "'conversations\\[2\\]': expected a"),
    (_set(["conversations", 0, "value"], "What?" + VISCOT_SUFFIX), "'conversations\\[0\\].value'"),
    (_set(["conversations", 0, "value"], "<image>\nWhat?"), "'conversations\\[0\\].value'"),
    (
        _set(["conversations", 2, "value"], "<image>\nMore"),
        "'conversations\\[2\\].value': expected '<image>'",
    ),
]


@pytest.mark.parametrize("mutate, message", VISCOT_MUTATIONS)
def test_malformed_viscot_names_file_record_field(tmp_path: Path, mutate: Any, message: str) -> None:
    bad = copy(VISCOT_RAW)
    mutate(bad)
    path = write_json(tmp_path / "bad.json", [VISCOT_RAW, bad])
    with pytest.raises(ValueError, match=rf"bad\.json: record 1: field {message}"):
        read_viscot(path)


def test_malformed_viscot_files(tmp_path: Path) -> None:
    (tmp_path / "obj.json").write_text('{"dataset": "x"}')
    with pytest.raises(ValueError, match=r"obj\.json: expected a JSON list"):
        read_viscot(tmp_path / "obj.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        read_viscot(tmp_path / "broken.json")
    write_json(tmp_path / "str.json", ["x"])
    with pytest.raises(ValueError, match=r"str\.json: record 0: field '<record>'"):
        read_viscot(tmp_path / "str.json")


# ------------------------------------------------------------------------------------------------ det
def test_det_round_trip_and_join(tmp_path: Path) -> None:
    det_path = tmp_path / "docvqa.jsonl"
    float_row = {**DET_RAW, "bbox": [2112.5, 1623.25, 2142.0, 1654.75]}
    det_path.write_text(json.dumps(DET_RAW) + "\n\n" + json.dumps(float_row) + "\n")
    dets = read_det(det_path)
    assert [d.index for d in dets] == [0, 1] and dets[1].bbox == (2112.5, 1623.25, 2142.0, 1654.75)
    assert dets[0].size == (2156, 1695) and dets[0].box == Box(
        2112 / 2156, 1623 / 1695, 2142 / 2156, 1654 / 1695
    )
    out = tmp_path / "out.jsonl"
    write_det(dets, out)
    assert out.read_text() == json.dumps(DET_RAW) + "\n" + json.dumps(float_row) + "\n"

    recs = read_viscot(write_json(tmp_path / "docvqa.json", [VISCOT_RAW, VISCOT_RAW]))
    pairs = join_det(recs, dets)
    assert [(r.index, d.index) for r, d in pairs] == [(0, 0), (1, 1)]
    with pytest.raises(ValueError, match=r"docvqa\.json has 1 records but .*docvqa\.jsonl has 2 rows"):
        join_det(recs[:1], dets)
    moved = DetRecord.from_raw({**DET_RAW, "img_path": "cot/docvqa/other.png"}, str(det_path), 1)
    with pytest.raises(ValueError, match=r"row 1: .*docvqa\.json image .* != .*docvqa\.jsonl img_path"):
        join_det(recs, [dets[0], moved])


def test_join_det_knows_the_visual7w_alias() -> None:
    rec = make_viscot_record(
        dataset="v7w", split="val", question_id=0, image_path="cot/v7w/v7w_1.jpg", question="Q", answer="A",
        box_text="[0.1, 0.1, 0.2, 0.2]",
    )  # fmt: skip
    det = DetRecord.from_raw({**DET_RAW, "img_path": "cot/visual7w/v7w_1.jpg"})
    assert join_det([rec], [det]) == [(rec, det)]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bbox": [1, 2, 3]}, "'bbox': expected 4"),
        ({"bbox": [1, 2, 3, True]}, "'bbox': expected 4"),
        ({"bbox": "1, 2, 3, 4"}, "'bbox': expected"),
        ({"width": 0}, "'width/height': must be positive"),
        ({"height": 10.5}, "'height': expected"),
        ({"img_path": None}, "'img_path': expected"),
    ],
)
def test_malformed_det(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(DET_RAW) + "\n" + json.dumps({**DET_RAW, **change}) + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl: record 1: field {message}"):
        read_det(path)


def test_det_invalid_json_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(DET_RAW) + "\n\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: record 1 \(line 3\): not valid JSON"):
        read_det(path)


# ---------------------------------------------------------------------------------------- preference
def make_pair(**extra: Any) -> PreferenceRecord:
    return make_preference_record(
        images=["cot/gqa/1.jpg"],
        prompt="<image>\nWhat is it? Please first provide the bounding box coordinate of the region, then refer to "
        "the corresponding sub-image to answer the question better.",
        chosen_step="[0.1, 0.2, 0.5, 0.6]",
        rejected_step="[0.6, 0.1, 0.9, 0.3]",
        chosen="a dog",
        rejected="a cat",
        extra=extra or None,
    )


def test_preference_layout_and_round_trip(tmp_path: Path) -> None:
    pair = make_pair(uid="gqa:7", scores={"chosen": 1.0, "rejected": 0.0}, crop="crops/7.png")
    assert list(pair.raw) == [
        "images", "conversations", "chosen_step", "rejected_step", "chosen", "rejected", "uid", "scores", "crop",
    ]  # fmt: skip
    assert pair.raw["chosen_step"] == {"from": "gpt", "value": "[0.1, 0.2, 0.5, 0.6]"}
    assert pair.raw["conversations"] == [{"from": "human", "value": pair.prompt}]
    assert pair.images == ("cot/gqa/1.jpg",) and pair.chosen == "a dog" and pair.rejected == "a cat"
    assert pair.extra == {"uid": "gqa:7", "scores": {"chosen": 1.0, "rejected": 0.0}, "crop": "crops/7.png"}
    path = tmp_path / "pairs.json"
    write_pairs([pair, make_pair()], path)
    back = read_pairs(path)
    assert back == [pair, make_pair()] and back[1].index == 1 and back[1].source == str(path)
    assert json.loads(path.read_text()) == [pair.raw, make_pair().raw]
    with pytest.raises(ValueError, match="overwrite"):
        make_pair(chosen="x")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_set(["chosen_step"], DELETE), "'chosen_step': expected a"),
        (_set(["rejected", "from"], "human"), "'rejected.from': expected 'gpt'"),
        (_set(["chosen", "value"], 3), "'chosen.value': expected a string"),
        (_set(["images"], []), "'images': expected a non-empty"),
        (_set(["conversations"], [{"from": "human", "value": "a"}] * 2), "'conversations': expected 1"),
        (_set(["conversations", 0, "from"], "gpt"), "'conversations\\[0\\].from': expected 'human'"),
    ],
)
def test_malformed_pairs(tmp_path: Path, mutate: Any, message: str) -> None:
    bad = copy(make_pair().raw)
    mutate(bad)
    path = write_json(tmp_path / "pairs.json", [make_pair().raw, bad])
    with pytest.raises(ValueError, match=rf"pairs\.json: record 1: field {message}"):
        read_pairs(path)


def test_data_files_errors_are_one_input_error_line(tmp_path: Path) -> None:
    from visrl.data.errors import InputError
    from visrl.data.records import make_viscot_record, write_viscot
    from visrl.data.viscot_files import VisCoTFiles

    rec = make_viscot_record(dataset="d", split="s", question_id=1, image_path="a.jpg", question="q?",
                             answer="a", box_text="[0.1, 0.1, 0.5, 0.5]")  # fmt: skip
    write_viscot([rec], tmp_path / "sft.json")
    write_viscot([rec], tmp_path / "rl.json")
    files = VisCoTFiles(tmp_path, tmp_path / "sft.json", tmp_path / "rl.json")
    with pytest.raises(InputError, match=r"sft.json: records \[0\] \(of 1\) field 'image\[1\]'"):
        files.ensure()
    (tmp_path / "rl.json").write_text("[]")
    with pytest.raises(InputError, match=r"data.sft=.*rl.json: no records"):
        VisCoTFiles(tmp_path, tmp_path / "rl.json", tmp_path / "rl.json").ensure()
    (tmp_path / "rl.json").write_bytes(b"\xff\x00binary")
    with pytest.raises(InputError, match=r"rl.json: not a UTF-8 text file"):
        VisCoTFiles(tmp_path, tmp_path / "rl.json", tmp_path / "rl.json").ensure()
    with pytest.raises(InputError, match=r"data.image_root=.*nowhere is not a directory"):
        VisCoTFiles(tmp_path / "nowhere", tmp_path / "sft.json", tmp_path / "rl.json").ensure()
    assert rec.uid == "d:s:1"
