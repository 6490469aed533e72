"""Tests for visrl.data.boxes (frames, IoU, crops) and visrl.data.box_formats (the BoxFormat text formats)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from visrl.data.box_formats import (
    BoxFormat,
    GridFormat,
    ParseFailure,
    Qwen2VLFormat,
    Qwen25VLFormat,
    SqFloatFormat,
)
from visrl.data.boxes import (
    Box,
    crop_square,
    crop_tight,
    enforce_min_size,
    from_px,
    from_px_xywh,
    from_qwen2vl,
    from_qwen25vl,
    from_sq,
    iou,
    smart_resize,
    sq_text,
    to_px,
    to_px_xywh,
    to_qwen2vl,
    to_qwen25vl,
    to_sq,
)

FAST = settings(max_examples=100, database=None)
FORMATS = [
    SqFloatFormat(),
    Qwen2VLFormat(),
    Qwen2VLFormat(box_start="", box_end=""),
    Qwen25VLFormat(),
    GridFormat(),
]
FORMAT_IDS = ["sq", "qwen2vl", "qwen2vl_bare", "qwen25vl", "grid4"]

unit = st.floats(0.0, 1.0, allow_nan=False)
# aspect ratio <= ~140 so every size is valid for the Qwen processors (they refuse > 200)
sizes = st.tuples(st.integers(28, 4000), st.integers(28, 4000))


@st.composite
def boxes(draw: st.DrawFn, min_side: float = 0.0) -> Box:
    """Ordered boxes inside [0, 1] with each side >= min_side."""
    w = draw(st.floats(min_side, 1.0))
    h = draw(st.floats(min_side, 1.0))
    x1 = draw(st.floats(0.0, 1.0 - w))
    y1 = draw(st.floats(0.0, 1.0 - h))
    return Box(x1, y1, min(1.0, x1 + w), min(1.0, y1 + h))


def close(a: tuple[float, ...], b: tuple[float, ...], tol: float) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------- Box, IoU
def test_box_basics() -> None:
    b = Box(0.1, 0.2, 0.5, 0.6)
    assert b.width == pytest.approx(0.4) and b.height == pytest.approx(0.4)
    assert b.area == pytest.approx(0.16) and b.center == pytest.approx((0.3, 0.4))
    assert b.as_tuple() == (0.1, 0.2, 0.5, 0.6)
    assert Box(0.5, 0.6, 0.1, 0.2).area == 0.0
    assert Box(1.5, -0.2, 0.3, 0.4).clamp() == Box(0.3, 0.0, 1.0, 0.4)
    assert isinstance(Box(0, 0, 1, 1).x2, float)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="finite"):
            Box(0.0, 0.0, bad, 1.0)


@FAST
@given(st.tuples(*[st.floats(-1e6, 1e6)] * 4))
def test_clamp_inside_and_ordered(v: tuple[float, float, float, float]) -> None:
    c = Box(*v).clamp()
    assert 0.0 <= c.x1 <= c.x2 <= 1.0 and 0.0 <= c.y1 <= c.y2 <= 1.0
    assert c.clamp() == c


@FAST
@given(boxes(), boxes())
def test_iou_properties(a: Box, b: Box) -> None:
    v = iou(a, b)
    assert 0.0 <= v <= 1.0
    assert v == iou(b, a)
    if a.area > 0:
        assert iou(a, a) == 1.0


def test_iou_known_values() -> None:
    assert iou(Box(0, 0, 0.5, 0.5), Box(0.25, 0.25, 0.75, 0.75)) == pytest.approx(1 / 7)
    assert iou(Box(0, 0, 0.5, 0.5), Box(0.5, 0.5, 1, 1)) == 0.0
    assert iou(Box(0.3, 0.3, 0.3, 0.3), Box(0.3, 0.3, 0.3, 0.3)) == 0.0  # empty union
    assert iou(Box(0.6, 0, 0.2, 1), Box(0, 0, 1, 1)) == 0.0  # swapped corners have no area


# --------------------------------------------------------------------------------------------- frames
def test_sq_frame_reference_example() -> None:
    """benchmark-formats.md §1d: docvqa q0, W=1695, H=2200, o=252."""
    size = (1695, 2200)
    assert sq_text(from_px([74, 398, 404, 1118], size), size) == "[0.148, 0.181, 0.298, 0.508]"
    wide = (2200, 1695)  # the transposed image pads the other axis
    assert to_sq(from_px([398, 74, 1118, 404], wide), wide) == pytest.approx(
        (398 / 2200, (74 + 252) / 2200, 1118 / 2200, (404 + 252) / 2200)
    )
    assert to_sq(from_px([0, 0, 7, 7], (7, 7)), (7, 7)) == (0.0, 0.0, 1.0, 1.0)


@FAST
@given(sizes, st.lists(st.integers(-100_000, 500_000), min_size=4, max_size=4))
def test_px_round_trip_exact(size: tuple[int, int], hundredths: list[int]) -> None:
    """px with <= 2 decimals (all the det files) survive px -> Box -> px exactly."""
    px = tuple(v / 100 for v in hundredths)
    assert to_px(from_px(px, size), size) == px


@FAST
@given(sizes, boxes())
def test_frame_round_trips(size: tuple[int, int], b: Box) -> None:
    w, h = size
    assert close(from_px(to_px(b, size), size).as_tuple(), b.as_tuple(), 1e-6 / min(w, h) + 1e-12)
    assert close(from_px_xywh(to_px_xywh(b, size), size).as_tuple(), b.as_tuple(), 3e-6 / min(w, h))
    assert close(from_sq(to_sq(b, size), size).as_tuple(), b.as_tuple(), 3e-6 / min(w, h))
    q = to_qwen2vl(b)
    assert all(isinstance(v, int) and 0 <= v <= 1000 for v in q)
    assert close(from_qwen2vl(q).as_tuple(), b.as_tuple(), 0.0005 + 1e-12)
    r = to_qwen25vl(b, size)
    assert r[0] <= w and r[2] <= w and r[1] <= h and r[3] <= h
    back = from_qwen25vl(r, size).as_tuple()
    assert close(back[0::2], b.as_tuple()[0::2], 0.5 / w + 1e-12)
    assert close(back[1::2], b.as_tuple()[1::2], 0.5 / h + 1e-12)


def test_xywh_and_bad_input() -> None:
    assert from_px_xywh([10, 20, 30, 40], (100, 200)) == Box(0.1, 0.1, 0.4, 0.3)
    assert to_px_xywh(Box(0.1, 0.1, 0.4, 0.3), (100, 200)) == (10.0, 20.0, 30.0, 40.0)
    with pytest.raises(ValueError, match="size"):
        from_px([0, 0, 1, 1], (0, 10))
    with pytest.raises(ValueError, match="4 values"):
        from_px([0, 0, 1], (10, 10))


# (height, width, min_pixels, max_pixels) -> (h', w'), computed with transformers 5.23's smart_resize
SMART_RESIZE_CASES = [
    (2200, 1695, 3136, 1003520, (1120, 868)),
    (64, 64, 3136, 1003520, (56, 56)),
    (10, 10, 3136, 1003520, (56, 56)),
    (1, 150, 3136, 1003520, (28, 700)),
    (480, 640, 3136, 1003520, (476, 644)),
    (4000, 3000, 3136, 1003520, (1148, 840)),
    (20000, 100, 3136, 1003520, (14140, 56)),
    (1080, 1920, 3136, 1003520, (728, 1316)),
    (333, 777, 3136, 1003520, (336, 784)),
    (64, 64, 256 * 28 * 28, 1280 * 28 * 28, (448, 448)),
]


@pytest.mark.parametrize("h, w, lo, hi, expected", SMART_RESIZE_CASES)
def test_smart_resize_reference_values(h: int, w: int, lo: int, hi: int, expected: tuple[int, int]) -> None:
    assert smart_resize(h, w, 28, lo, hi) == expected


@pytest.mark.slow
def test_smart_resize_matches_transformers() -> None:
    reference = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    for h in range(1, 3000, 37):
        for w in range(1, 3000, 41):
            if max(h, w) / min(h, w) <= 200:
                assert smart_resize(h, w) == reference.smart_resize(h, w), (h, w)


@FAST
@given(st.integers(1, 20_000), st.integers(1, 20_000))
def test_smart_resize_rule(h: int, w: int) -> None:
    if max(h, w) / min(h, w) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(h, w)
        return
    rh, rw = smart_resize(h, w)
    assert rh % 28 == 0 and rw % 28 == 0 and rh >= 28 and rw >= 28
    assert rh * rw <= 28 * 28 * 1280


# ---------------------------------------------------------------------------------------------- crops
@FAST
@given(boxes(), st.floats(0.0, 1.5), st.floats(0.0, 1.5))
def test_enforce_min_size(b: Box, min_w: float, min_h: float) -> None:
    g = enforce_min_size(b, min_w, min_h)
    assert 0.0 <= g.x1 <= g.x2 <= 1.0 and 0.0 <= g.y1 <= g.y2 <= 1.0
    assert g.width >= min(min_w, 1.0) - 1e-9 and g.height >= min(min_h, 1.0) - 1e-9
    assert g.x1 <= b.x1 + 1e-9 and g.x2 >= b.x2 - 1e-9 and g.y1 <= b.y1 + 1e-9 and g.y2 >= b.y2 - 1e-9
    if b.width >= min_w and b.height >= min_h:
        assert g == b


def coordinate_image(w: int, h: int) -> Image.Image:
    """A 32-bit image whose pixel value is y * w + x, so a crop tells where it came from."""
    return Image.fromarray(np.arange(w * h, dtype=np.int32).reshape(h, w))


def crop_origin(crop: Image.Image, w: int) -> tuple[int, int]:
    v = crop.getpixel((0, 0))
    return v % w, v // w


@FAST
@given(st.tuples(st.integers(1, 300), st.integers(1, 300)), boxes(), st.integers(1, 16))
def test_crop_tight(size: tuple[int, int], b: Box, min_px: int) -> None:
    w, h = size
    crop = crop_tight(coordinate_image(w, h), b, min_px=min_px, max_aspect=20.0)
    cw, ch = crop.size
    assert cw >= min(min_px, w) and ch >= min(min_px, h)
    assert cw <= 20.0 * ch or ch == h
    assert ch <= 20.0 * cw or cw == w
    left, top = crop_origin(crop, w)
    x1, y1, x2, y2 = to_px(b, size)
    assert left <= x1 and top <= y1 and left + cw >= x2 and top + ch >= y2  # covers the box


def test_crop_tight_exact_and_degenerate() -> None:
    img = coordinate_image(100, 50)
    crop = crop_tight(img, from_px([10, 5, 30, 25], (100, 50)))
    assert crop.size == (20, 20) and crop_origin(crop, 100) == (10, 5)
    line = crop_tight(img, Box(0.0, 0.5, 1.0, 0.5))  # zero-height box: min 4 px
    assert line.size == (100, 4)
    point = crop_tight(img, Box(1.0, 1.0, 1.0, 1.0))
    assert point.size == (4, 4) and crop_origin(point, 100) == (96, 46)
    strip = crop_tight(coordinate_image(1000, 1000), Box(0.0, 0.5, 1.0, 0.5))  # aspect <= 100
    assert strip.size == (1000, 10)


def test_crop_square_reference_example() -> None:
    """Visual-CoT's eval crop of docvqa q0 (W=1695, H=2200). The documented crop [0, 398, 718, 1116]
    comes from the benchmark's turn-1 sq text (float px [73.6, 398.2, 403.6, 1117.6]); the exact
    ### pixel box [74, 398, 404, 1118] gives [0, 398, 720, 1118] (half-side 360, not 359)."""
    size = (1695, 2200)
    img = Image.new("L", size)
    from_text = SqFloatFormat().parse("[0.148, 0.181, 0.298, 0.508]", size).box
    crop, px = crop_square(img, from_text)
    assert px == (0, 398, 718, 1116) and crop.size == (718, 718)
    assert crop_square(img, from_px([74, 398, 404, 1118], size))[1] == (0, 398, 720, 1118)
    # a small box gets the 224-px minimum square, shifted inside the bottom-right corner
    assert crop_square(img, from_px([1690, 2190, 1695, 2200], size))[1] == (1471, 1976, 1695, 2200)


@FAST
@given(st.tuples(st.integers(1, 600), st.integers(1, 600)), boxes(), st.integers(1, 150))
def test_crop_square_properties(size: tuple[int, int], b: Box, min_half: int) -> None:
    w, h = size
    crop, (left, top, right, bottom) = crop_square(coordinate_image(w, h), b, min_half_px=min_half)
    assert 0 <= left < right <= w and 0 <= top < bottom <= h
    assert crop.size == (right - left, bottom - top)
    assert crop_origin(crop, w) == (left, top)
    x1, y1, x2, y2 = to_px(b, size)
    assert left <= (x1 + x2) // 2 <= right and top <= (y1 + y2) // 2 <= bottom  # keeps the centre
    if max(x2 - x1, y2 - y1) <= 2 * min_half <= min(w, h):  # small box: the minimum square
        assert crop.size == (2 * min_half, 2 * min_half)


def test_crop_square_rejects_zero_half() -> None:
    with pytest.raises(ValueError, match="min_half_px"):
        crop_square(Image.new("L", (10, 10)), Box(0, 0, 0, 0), min_half_px=0)


# -------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize(
    "fmt, text, expected",
    [
        (SqFloatFormat(), "The box is [0.1, 0.2, 0.5, 0.6].", Box(0.1, 0.2, 0.5, 0.6)),
        (SqFloatFormat(), "[0.5, 0.6, 0.1, 0.2]", Box(0.1, 0.2, 0.5, 0.6)),  # swapped corners
        (SqFloatFormat(), "see [fig. 1]: [[0.1,0.2,0.5,0.6]]", Box(0.1, 0.2, 0.5, 0.6)),
        (SqFloatFormat(), "0.1 , 0.2, 0.5,0.6 .", Box(0.1, 0.2, 0.5, 0.6)),  # bare, VisCoT-style
        (SqFloatFormat(), "[-0.002, 0.2, 1.02, 0.6]", Box(0.0, 0.2, 1.0, 0.6)),  # within slack: clamped
        (Qwen2VLFormat(), "(100,200),(1020,600)", Box(0.1, 0.2, 1.0, 0.6)),
        (Qwen25VLFormat(resized_size=(1000, 500)), '{"bbox_2d": [100, 100, 1020, 510]}', Box(0.1, 0.2, 1, 1)),
        (Qwen2VLFormat(), "<|box_start|>(100,200),(500,600)<|box_end|>", Box(0.1, 0.2, 0.5, 0.6)),
        (Qwen2VLFormat(), "It is at (100, 200), (500, 600).", Box(0.1, 0.2, 0.5, 0.6)),
        (
            Qwen25VLFormat(resized_size=(1000, 500)),
            '```json\n[{"bbox_2d": [100, 100, 500, 300], "label": "a"}]\n```',
            Box(0.1, 0.2, 0.5, 0.6),
        ),
        (Qwen25VLFormat(resized_size=(1000, 500)), "[100, 100, 500, 300]", Box(0.1, 0.2, 0.5, 0.6)),
        (GridFormat(), "[1, 2, 2, 3]", Box(0.25, 0.5, 0.5, 0.75)),
        (GridFormat(grid=10), "box: [3, 1, 0, 10]", Box(0.0, 0.1, 0.3, 1.0)),
    ],
)
def test_parse_examples(fmt: BoxFormat, text: str, expected: Box) -> None:
    result = fmt.parse(text, (100, 100))
    assert result.ok and result.failure is None and result.text == text
    assert close(result.box.as_tuple(), expected.as_tuple(), 1e-9)


@pytest.mark.parametrize(
    "fmt, text, failure",
    [
        (SqFloatFormat(), "  \n", ParseFailure.EMPTY),
        (SqFloatFormat(), "I cannot tell.", ParseFailure.NO_BOX),
        (SqFloatFormat(), "[0.1, 0.2, 0.5]", ParseFailure.WRONG_ARITY),
        (SqFloatFormat(), "[0.1, 0.2, 0.3, 0.4, 0.5]", ParseFailure.WRONG_ARITY),
        (SqFloatFormat(), "[nan, 0.2, 0.5, 0.6]", ParseFailure.NOT_A_NUMBER),
        (SqFloatFormat(), "[1e309, 0.2, 0.5, 0.6]", ParseFailure.NOT_A_NUMBER),
        (SqFloatFormat(), "[0.1, 0.2, , 0.6]", ParseFailure.NOT_A_NUMBER),
        (SqFloatFormat(), "[\u0661, 0.2, 0.5, 0.6]", ParseFailure.NOT_A_NUMBER),  # Arabic-Indic digit
        (SqFloatFormat(), "[0.1, 0.2, 1.5, 0.6]", ParseFailure.OUT_OF_RANGE),
        (SqFloatFormat(), "[-0.1, 0.2, 0.5, 0.6]", ParseFailure.OUT_OF_RANGE),
        (SqFloatFormat(), "[0.1, 0.2, 1.0201, 0.6]", ParseFailure.OUT_OF_RANGE),  # beyond the 2% slack
        (SqFloatFormat(slack=0.0), "[0.1, 0.2, 1.001, 0.6]", ParseFailure.OUT_OF_RANGE),
        (GridFormat(), "[-1, 0, 2, 2]", ParseFailure.OUT_OF_RANGE),
        (SqFloatFormat(), "[0.1, 0.2, 0.1, 0.6]", ParseFailure.DEGENERATE),
        (Qwen2VLFormat(), "<|box_start|><|box_end|>", ParseFailure.NO_BOX),
        (Qwen2VLFormat(), "(100,200,300),(400,500)", ParseFailure.WRONG_ARITY),
        (Qwen2VLFormat(), "(100,200)", ParseFailure.WRONG_ARITY),
        (Qwen2VLFormat(), "(a,b),(c,d)", ParseFailure.NOT_A_NUMBER),
        (Qwen2VLFormat(), "(100,200),(1021,600)", ParseFailure.OUT_OF_RANGE),
        (Qwen25VLFormat(resized_size=(100, 50)), '{"bbox_2d": [0, 0, 100, 52]}', ParseFailure.OUT_OF_RANGE),
        (Qwen25VLFormat(resized_size=(100, 50)), '{"bbox_2d": [0, 0, 100]}', ParseFailure.WRONG_ARITY),
        (GridFormat(), "[1, 2, 2.5, 3]", ParseFailure.NOT_A_NUMBER),
        (GridFormat(), "[1, 2, 5, 3]", ParseFailure.OUT_OF_RANGE),
        (GridFormat(), "[1, 2, 1, 3]", ParseFailure.DEGENERATE),
    ],
)
def test_parse_failures(fmt: BoxFormat, text: str, failure: ParseFailure) -> None:
    result = fmt.parse(text, (100, 100))
    assert result.failure is failure and result.box is None and not result.ok


def test_sq_box_entirely_in_padding_is_degenerate() -> None:
    # W=100, H=50: the sq frame pads 25 px above and below; y in [0, 0.2] is all padding
    assert SqFloatFormat().parse("[0.1, 0.0, 0.5, 0.2]", (100, 50)).failure is ParseFailure.DEGENERATE
    partly = SqFloatFormat().parse("[0.1, 0.0, 0.5, 0.5]", (100, 50))
    assert partly.ok and partly.box.y1 == 0.0 and partly.box.y2 == pytest.approx(0.5)


def test_format_examples() -> None:
    size = (1695, 2200)
    b = from_px([74, 398, 404, 1118], size)
    assert SqFloatFormat().format(b, size) == "[0.148, 0.181, 0.298, 0.508]"
    assert Qwen2VLFormat().format(b, size) == "<|box_start|>(44,181),(238,508)<|box_end|>"
    assert Qwen2VLFormat(box_start="", box_end="").format(b, size) == "(44,181),(238,508)"
    assert Qwen25VLFormat().resized(size) == (868, 1120)
    assert Qwen25VLFormat().format(Box(0, 0, 1, 1), size) == '{"bbox_2d": [0, 0, 868, 1120]}'
    assert Qwen25VLFormat(resized_size=lambda s: (s[0] // 2, s[1] // 2)).resized((100, 60)) == (50, 30)
    grid = GridFormat()
    assert grid.format(Box(0.25, 0.5, 0.5, 0.75), size) == "[1, 2, 2, 3]"  # exact edges stay put
    assert grid.format(Box(0.2, 0.5, 0.51, 0.75), size) == "[0, 2, 3, 3]"  # floor / ceil
    assert grid.format(Box(0.3, 0.3, 0.3, 0.3), size) == "[1, 1, 2, 2]"  # >= 1 cell
    assert grid.format(Box(1.0, 0.0, 1.0, 0.0), size) == "[3, 0, 4, 1]"


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@FAST
@given(size=sizes, b=boxes(min_side=0.05))
def test_format_parse_idempotent(fmt: BoxFormat, size: tuple[int, int], b: Box) -> None:
    """format(parse(format(b))) == format(b), and the parsed box is close to b."""
    if isinstance(fmt, SqFloatFormat):  # 3 decimals of max(W, H): idempotent above 0.002 * max(W, H) px
        assume(min(b.width * size[0], b.height * size[1]) >= 0.003 * max(size))
    text = fmt.format(b, size)
    result = fmt.parse(text, size)
    assert result.ok, (text, result.failure)
    assert fmt.format(result.box, size) == text
    if isinstance(fmt, GridFormat):  # the cells cover the box, up to the snap of values within eps of an edge
        p, tol = result.box, fmt.eps / fmt.grid + 1e-9
        assert p.x1 <= b.x1 + tol and p.y1 <= b.y1 + tol and p.x2 >= b.x2 - tol and p.y2 >= b.y2 - tol
    else:
        assert close(result.box.as_tuple(), b.as_tuple(), resolution(fmt, size) + 1e-9)


def resolution(fmt: BoxFormat, size: tuple[int, int]) -> float:
    """The largest per-axis rounding error (canonical units) of a text format."""
    if isinstance(fmt, SqFloatFormat):
        return 0.0005 * max(size) / min(size)
    if isinstance(fmt, Qwen25VLFormat):
        return 0.5 / min(fmt.resized(size))
    return 0.0005


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@FAST
@given(size=sizes, v=st.tuples(unit, unit, unit, unit))
def test_formats_always_write_a_parseable_box(
    fmt: BoxFormat, size: tuple[int, int], v: tuple[float, ...]
) -> None:
    """No format writes a degenerate box, whatever the input (even a point)."""
    assert fmt.parse(fmt.format(Box(*v), size), size).ok


ADVERSARIAL = [
    "nan",
    "inf",
    "-inf",
    "[nan, nan, nan, nan]",
    "[inf, 0, 1, 1]",
    "[1e309, 0, 0, 1]",
    "[1e-400, 0, 1, 1]",
    "[[[[0.1, 0.2]]]]",
    "[" * 10_000,
    "]" * 10_000,
    "(" * 10_000,
    "[" + ", ".join(["1"] * 100_000) + "]",
    "1" * 100_000,
    "1, " * 50_000,
    "1.1.1.1," * 10_000,
    "\uff10.\uff11, 0.2, 0.3, 0.4",
    "[\U0001d7ce, 0, 1, 1]",
    "<|box_start|>" * 2_000,
    '{"bbox_2d": [' * 2_000,
    '{"bbox_2d": "x"}',
    "\x00[0.1,\x000.2,0.3,0.4]",
    "[0.1, 0.2, 0.3, 0.4",
    "-0.0, -0.0, -0.0, -0.0",
    "[+.5, .5e0, 1., 1E0]",
    "[0x1, 0b1, 1_0, 1j]",
    "(1e999,2),(3,4)",
    "[ , , , ]",
    "[]",
    "()",
    "[-]",
    "[1e, 2e, 3e, 4e]",
    "𝟙𝟚𝟛",
    "٣",
]


def check_result(result: object, text: str) -> None:
    assert result.text == text
    if result.ok:
        b = result.box
        assert 0.0 <= b.x1 < b.x2 <= 1.0 and 0.0 <= b.y1 < b.y2 <= 1.0
    else:
        assert isinstance(result.failure, ParseFailure) and result.box is None


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_parse_adversarial_never_raises(fmt: BoxFormat) -> None:
    for text in ADVERSARIAL:
        check_result(fmt.parse(text, (640, 480)), text)


box_tokens = st.sampled_from(
    ["[", "]", "(", ")", ",", ", ", " ", ".", "-", "+", "e", "0", "1", "5", "9", "0.5", "1000", "nan", "inf",
     "1e309", '"bbox_2d"', ":", "{", "}", "<|box_start|>", "<|box_end|>", "\u0661", "\n"]
)  # fmt: skip


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@settings(max_examples=200, database=None)
@given(text=st.one_of(st.text(), st.lists(box_tokens, max_size=40).map("".join)), size=sizes)
def test_parse_random_text_never_raises(fmt: BoxFormat, text: str, size: tuple[int, int]) -> None:
    check_result(fmt.parse(text, size), text)


def test_formats_hydra_and_pickle() -> None:
    instantiate = pytest.importorskip("hydra.utils").instantiate
    fmt = instantiate({"_target_": "visrl.data.box_formats.Qwen25VLFormat", "resized_size": [56, 56]})
    assert fmt.resized_size == (56, 56) and fmt.resized((640, 480)) == (56, 56)
    assert instantiate({"_target_": "visrl.data.box_formats.GridFormat", "grid": 4}) == GridFormat(4)
    for f in [*FORMATS, fmt]:
        assert isinstance(f, BoxFormat)
        assert pickle.loads(pickle.dumps(f)) == f
    with pytest.raises(ValueError, match="grid"):
        GridFormat(grid=0)
