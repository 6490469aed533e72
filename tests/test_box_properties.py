"""Property tests: model-written box text never raises, and every box that parses crops to a non-empty image.

Over every BoxFormat and the Visual-CoT box reader (``read_box``, the published parse), with random text,
random numbers (NaN, inf, 1e308, 1e20, negative, zero-area) in each format's own layout, and image sizes
including aspect ratios beyond 200 (which the Qwen processors refuse). Also the Visual-CoT record reader:
any JSON value is either a record or ONE ``InputError`` line naming the file, the record and the field.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from visrl.benchmarks.viscot import FULL_IMAGE, read_box
from visrl.data.box_formats import (
    BoxFormat,
    GridFormat,
    ParseFailure,
    Qwen2VLFormat,
    Qwen25VLFormat,
    SqFloatFormat,
)
from visrl.data.boxes import crop_square, crop_tight
from visrl.data.errors import InputError
from visrl.data.records import VisCoTRecord, make_viscot_record

FORMATS = [SqFloatFormat(), Qwen2VLFormat(), Qwen25VLFormat(), GridFormat(4)]
IDS = ["sq", "qwen2vl", "qwen25vl", "grid"]
PROPS = settings(max_examples=150, database=None)

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 1e20, 1e308, -1e308, 1000.0, 5e-324, -0.0]),
    st.integers(min_value=-(10**30), max_value=10**30),
)
LAYOUTS = (
    "[{}, {}, {}, {}]",
    "({},{}),({},{})",
    "<|box_start|>({},{}),({},{})<|box_end|>",
    '{{"bbox_2d": [{}, {}, {}, {}]}}',
    "{}, {}, {}, {}",
)
number_texts = st.builds(
    lambda layout, v: layout.format(*v), st.sampled_from(LAYOUTS), st.lists(numbers, min_size=4, max_size=4)
)
texts = st.one_of(st.text(max_size=200), number_texts)
# sizes up to 3000 px a side and aspect ratios up to 3000 (Qwen refuses > 200)
sizes = st.one_of(
    st.tuples(st.integers(1, 3000), st.integers(1, 3000)),
    st.sampled_from([(3000, 1), (1, 3000), (2010, 10), (10, 2010), (201, 1)]),
)


def _image(size: tuple[int, int]) -> Image.Image:
    return Image.new("1", size)  # 1 bit per pixel: cheap at any size


def _nonempty(image: Image.Image) -> None:
    w, h = image.size
    assert w >= 1 and h >= 1


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@PROPS
@given(text=texts, size=sizes)
def test_parse_never_raises_and_every_ok_box_crops(fmt: BoxFormat, text: str, size: tuple[int, int]) -> None:
    result = fmt.parse(text, size)
    if not result.ok:
        assert isinstance(result.failure, ParseFailure) and result.box is None
        return
    b = result.box
    assert all(math.isfinite(v) for v in b.as_tuple())
    assert 0.0 <= b.x1 < b.x2 <= 1.0 and 0.0 <= b.y1 < b.y2 <= 1.0
    image = _image(size)
    _nonempty(crop_tight(image, b))
    _nonempty(crop_square(image, b, 112)[0])


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@PROPS
@given(text=texts, size=sizes)
def test_viscot_read_box_never_raises_and_crops(fmt: BoxFormat, text: str, size: tuple[int, int]) -> None:
    reading = read_box(fmt, text, size)
    assert (reading.failure is None) == (reading.box is not None)
    if reading.sq is not None:
        assert all(math.isfinite(v) and abs(v) <= 100 for v in reading.sq)
    crop, px = crop_square(_image(size), reading.box or FULL_IMAGE, 112)
    _nonempty(crop)
    assert px[2] > px[0] and px[3] > px[1]


@pytest.mark.parametrize(
    ("text", "failure"),
    [
        ("[0.1, 0.2, 1e308, 0.5]", "out_of_range"),
        ("[0, 0, 1e20, 1e20]", "out_of_range"),
        ("[nan, 0.1, 0.2, 0.3]", "not_a_number"),
        ("[0.1, 0.2, inf, 0.5]", "not_a_number"),
    ],
)
def test_issue_texts_are_typed_failures(text: str, failure: str) -> None:
    assert read_box(SqFloatFormat(), text, (640, 480)).failure == failure
    assert SqFloatFormat().parse(text, (640, 480)).failure.value == failure


def test_extreme_aspect_is_no_frame_for_qwen25() -> None:
    result = Qwen25VLFormat().parse('{"bbox_2d": [1, 2, 3, 4]}', (40_000, 100))
    assert result.failure is ParseFailure.NO_FRAME
    assert read_box(Qwen25VLFormat(), "[1, 2, 3, 4]", (40_000, 100)).failure == "no_frame"


def test_zero_area_published_box_still_crops() -> None:
    reading = read_box(SqFloatFormat(), "[0.5, 0.5, 0.5, 0.5]", (640, 480))  # read as published
    crop, px = crop_square(_image((640, 480)), reading.box, 112)
    assert crop.size == (224, 224) and px == (208, 128, 432, 352)


# ---------------------------------------------------------------------------------- the record reader
def _valid_raw() -> dict:
    rec = make_viscot_record(dataset="gqa", split="test", question_id=7, image_path="cot/gqa/a.jpg",
                             question="What?", answer="red", box_px=(1, 2, 30, 40), size=(64, 48))  # fmt: skip
    return rec.raw


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["dataset", "split", "question_id", "image", "conversations"]


@PROPS
@given(value=json_values)
def test_record_reader_random_json_is_a_record_or_one_line(value: object) -> None:
    try:
        VisCoTRecord.from_raw(value, "data/gqa.json", 3)
    except InputError as e:
        assert str(e).startswith("data/gqa.json: record 3: field '") and "\n" not in str(e)


@PROPS
@given(field=st.sampled_from(FIELDS), value=json_values, delete=st.booleans())
def test_record_reader_mutated_record_is_a_record_or_one_line(
    field: str, value: object, delete: bool
) -> None:
    raw = _valid_raw()
    if delete:
        del raw[field]
    else:
        raw[field] = value
    try:
        VisCoTRecord.from_raw(raw, "data/gqa.json", 3)
    except InputError as e:
        assert str(e).startswith(f"data/gqa.json: record 3: field '{field}") and "\n" not in str(e)


@PROPS
@given(box=st.lists(numbers, min_size=0, max_size=6).map(lambda v: ", ".join(map(str, v))))
def test_record_reader_suffix_box_is_a_record_or_one_line(box: str) -> None:
    raw = _valid_raw()
    raw["image"] = ["cot/gqa/a.jpg", f"cot/gqa/a.jpg###[{box}]"]
    try:
        rec = VisCoTRecord.from_raw(raw, "data/gqa.json", 3)
    except InputError as e:
        assert "record 3: field 'image[1]'" in str(e) and "\n" not in str(e)
    else:
        assert all(math.isfinite(v) for v in rec.box_px)
