"""Boxes: the canonical box, its coordinate frames, the text formats backbones read/write, IoU, crops.

VisRL (paper §3, the Visual-CoT format) has the model write a focus box as text in step 1; the image is
cropped to it and the model answers from image + crop in step 2. Every backbone family writes boxes in its
own frame, and the reference code mixes frames (its Visual-CoT boxes are in the padded-square frame while
its Qwen prompts expect 0..1000 or resized pixels), so this module keeps ONE canonical frame and converts explicitly at the edges.

Frames (``size`` is always ``(W, H)`` of the ORIGINAL image):

* canonical :class:`Box`: per-axis normalised xyxy, ``(x / W, y / H)``.
* ``px``: original pixels xyxy; ``px_xywh``: original pixels ``[x, y, w, h]`` (V* Bench).
* ``sq`` (VisCoT / LLaVA-1.5 "pad"): the image is centre-padded to a square of side ``m = max(W, H)``
  with offset ``o = (m - min(W, H)) // 2`` on the short axis; coordinates are ``(px + o) / m``.
* ``qwen2vl``: integers 0..1000 per axis.  ``qwen25vl``: absolute pixels on the processor-resized image
  (:func:`smart_resize`).

Text formats (:class:`BoxFormat`) never raise in ``parse``: a malformed generation is a typed
:class:`ParseFailure`, which the benchmarks report as a parse rate. Range policy: swapped corners are
normalised; values up to ``slack`` (default 2% of the frame's range) beyond an edge are clamped to the
image, further out they are ``OUT_OF_RANGE`` (an impossible box is counted, not hidden); a box with no
area left inside the image (e.g. entirely in the sq frame's padding) is ``DEGENERATE``. The slack exists
because Visual-CoT's own ground-truth strings overshoot by up to 0.01 (13 of ~10k records: gqa
``1.002``, emotic ``-0.002``); the 31 strings further out (30 in dude, up to ``5.938``) are wrong
annotations and do not parse.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Protocol, runtime_checkable

from PIL import Image

Size = tuple[int, int]  # (W, H) in pixels
XYXY = tuple[float, float, float, float]

# Pixel coordinates computed from normalised ones are rounded to 1e-6 px (x / W * W is off by an ulp;
# rounding makes 325.59999999999997 read 325.6 and keeps floor divisions in crops stable).
_PX_DECIMALS = 6


@dataclass(frozen=True)
class Box:
    """A box in the canonical frame: per-axis normalised xyxy w.r.t. the original image.

    Coordinates must be finite; they may lie outside [0, 1] or be unordered until :meth:`clamp`.

    ``exact_px`` (set by :func:`from_px`; not compared, not shown) is the ``(pixel xyxy, (W, H))`` the
    box was made from, so converting back at that size is bit-exact. Normalised floats cannot be:
    ``x / W * W != x`` for ~4% of the VisCoT det coordinates, and VisCoT's strings sit on %0.3f ties
    (vsr: 214.08 / 640 = 0.3345) where that last ulp flips the third decimal. It is dropped whenever it
    does not reproduce the coordinates (e.g. after ``dataclasses.replace``).
    """

    x1: float
    y1: float
    x2: float
    y2: float
    exact_px: tuple[XYXY, Size] | None = field(default=None, kw_only=True, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("x1", "y1", "x2", "y2"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(f"Box.{name} must be finite, got {value!r}")
            object.__setattr__(self, name, value)
        if self.exact_px is not None:
            (px1, py1, px2, py2), (w, h) = self.exact_px
            if (px1 / w, py1 / h, px2 / w, py2 / h) != self.as_tuple():
                object.__setattr__(self, "exact_px", None)

    @property
    def width(self) -> float:
        """``x2 - x1`` (negative when the corners are swapped)."""
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        """Area in the canonical frame; 0 for degenerate or swapped boxes."""
        return max(0.0, self.width) * max(0.0, self.height)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2)

    def as_tuple(self) -> XYXY:
        return (self.x1, self.y1, self.x2, self.y2)

    def clamp(self) -> Box:
        """Clip into [0, 1] and order the corners (x1 <= x2, y1 <= y2); ``self`` if already so."""
        if 0.0 <= self.x1 <= self.x2 <= 1.0 and 0.0 <= self.y1 <= self.y2 <= 1.0:
            return self
        x1, x2 = sorted((_clip01(self.x1), _clip01(self.x2)))
        y1, y2 = sorted((_clip01(self.y1), _clip01(self.y2)))
        return Box(x1, y1, x2, y2)


def _clip01(v: float) -> float:
    return min(1.0, max(0.0, v))


def iou(a: Box, b: Box) -> float:
    """Continuous intersection over union (no +1 pixel convention); 0 when the union is empty."""
    ix = min(a.x2, b.x2) - max(a.x1, b.x1)
    iy = min(a.y2, b.y2) - max(a.y1, b.y1)
    inter = max(0.0, ix) * max(0.0, iy)
    union = a.area + b.area - inter
    return min(1.0, inter / union) if union > 0 else 0.0


# ---------------------------------------------------------------------------------------------- frames
def _size(size: Sequence[int]) -> Size:
    w, h = size
    if not (w > 0 and h > 0):
        raise ValueError(f"image size must be positive (W, H), got {tuple(size)!r}")
    return int(w), int(h)


def _four(values: Sequence[float], what: str) -> XYXY:
    if len(values) != 4:
        raise ValueError(f"{what} needs 4 values, got {len(values)}: {list(values)!r}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _snap(v: float) -> float:
    return round(v, _PX_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0


def from_px(xyxy: Sequence[float], size: Sequence[int]) -> Box:
    """Original-pixel xyxy -> canonical box."""
    w, h = _size(size)
    px = _four(xyxy, "pixel xyxy")
    x1, y1, x2, y2 = px
    return Box(x1 / w, y1 / h, x2 / w, y2 / h, exact_px=(px, (w, h)))


def to_px(box: Box, size: Sequence[int]) -> XYXY:
    """Canonical box -> original-pixel xyxy: the exact source px of a :func:`from_px` box at the same
    size, else floats rounded to 1e-6 px."""
    w, h = _size(size)
    if box.exact_px is not None and box.exact_px[1] == (w, h):
        return box.exact_px[0]
    return (_snap(box.x1 * w), _snap(box.y1 * h), _snap(box.x2 * w), _snap(box.y2 * h))


def from_px_xywh(xywh: Sequence[float], size: Sequence[int]) -> Box:
    """V* pixel ``[x, y, w, h]`` -> canonical box."""
    x, y, bw, bh = _four(xywh, "pixel xywh")
    return from_px((x, y, x + bw, y + bh), size)


def to_px_xywh(box: Box, size: Sequence[int]) -> XYXY:
    x1, y1, x2, y2 = to_px(box, size)
    return (x1, y1, _snap(x2 - x1), _snap(y2 - y1))


def _sq_geometry(size: Sequence[int]) -> tuple[int, int, int]:
    """(m, ox, oy): side of the padded square and the offset on each axis (0 on the long axis)."""
    w, h = _size(size)
    m = max(w, h)
    o = (m - min(w, h)) // 2
    return (m, 0, o) if w > h else (m, o, 0)


def to_sq(box: Box, size: Sequence[int]) -> XYXY:
    """Canonical box -> VisCoT padded-square frame ``((px + o) / m)``."""
    m, ox, oy = _sq_geometry(size)
    x1, y1, x2, y2 = to_px(box, size)
    return ((x1 + ox) / m, (y1 + oy) / m, (x2 + ox) / m, (y2 + oy) / m)


def from_sq(xyxy: Sequence[float], size: Sequence[int]) -> Box:
    """VisCoT padded-square frame -> canonical box (``px = v * m - o``); not clamped."""
    m, ox, oy = _sq_geometry(size)
    x1, y1, x2, y2 = _four(xyxy, "sq xyxy")
    px = (_snap(x1 * m - ox), _snap(y1 * m - oy), _snap(x2 * m - ox), _snap(y2 * m - oy))
    return from_px(px, size)


def sq_text(box: Box, size: Sequence[int]) -> str:
    """The VisCoT box string ``'[%0.3f, %0.3f, %0.3f, %0.3f]'`` in the sq frame (reproduces all 13
    benchmark files exactly from their pixel boxes)."""
    return "[" + ", ".join(f"{v:0.3f}" for v in to_sq(box, size)) + "]"


def from_qwen2vl(xyxy_0_1000: Sequence[float]) -> Box:
    x1, y1, x2, y2 = _four(xyxy_0_1000, "qwen2vl xyxy")
    return Box(x1 / 1000, y1 / 1000, x2 / 1000, y2 / 1000)


def to_qwen2vl(box: Box) -> tuple[int, int, int, int]:
    """Canonical box (clamped first) -> Qwen2-VL integers 0..1000."""
    b = box.clamp()
    return tuple(round(v * 1000) for v in b.as_tuple())  # type: ignore[return-value]


def from_qwen25vl(xyxy_px_resized: Sequence[float], resized_size: Sequence[int]) -> Box:
    """Absolute pixels on the processor-resized image -> canonical box (resizing is per-axis)."""
    return from_px(xyxy_px_resized, resized_size)


def to_qwen25vl(box: Box, resized_size: Sequence[int]) -> tuple[int, int, int, int]:
    """Canonical box (clamped first) -> integer pixels on the resized image ``(W', H')``."""
    w, h = _size(resized_size)
    b = box.clamp()
    return (round(b.x1 * w), round(b.y1 * h), round(b.x2 * w), round(b.y2 * h))


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Qwen2-VL / Qwen2.5-VL image-processor resize rule, ``(height, width) -> (h', w')``.

    Same arguments, order and arithmetic as ``transformers``' ``smart_resize`` (kept local: the
    transformers module imports torchvision). Both sides become multiples of ``factor`` (patch_size *
    merge_size), the pixel count lands in [min_pixels, max_pixels], the aspect ratio is kept.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ----------------------------------------------------------------------------------------------- crops
def enforce_min_size(box: Box, min_w: float, min_h: float) -> Box:
    """Clamp, then grow each side to at least ``min_w`` / ``min_h`` (canonical units, capped at 1)
    around the centre, shifted to stay inside [0, 1]."""

    def grow(lo: float, hi: float, need: float) -> tuple[float, float]:
        need = min(max(need, 0.0), 1.0)
        if hi - lo >= need:
            return lo, hi
        c = (lo + hi) / 2
        lo, hi = c - need / 2, c + need / 2
        if lo < 0:
            return 0.0, need
        if hi > 1:
            return 1.0 - need, 1.0
        return lo, hi

    b = box.clamp()
    if b.width >= min_w and b.height >= min_h:
        return b  # unchanged (keeps exact_px)
    x1, x2 = grow(b.x1, b.x2, min_w)
    y1, y2 = grow(b.y1, b.y2, min_h)
    return Box(x1, y1, x2, y2)


def _grow_px(lo: int, hi: int, need: int, limit: int) -> tuple[int, int]:
    """Grow the integer span [lo, hi) to at least ``need`` px (capped at ``limit``) inside [0, limit]."""
    need = min(need, limit)
    if hi - lo >= need:
        return lo, hi
    lo = (lo + hi) // 2 - need // 2
    lo = min(max(lo, 0), limit - need)
    return lo, lo + need


def _image_size(image: Image.Image) -> Size:
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ValueError(f"cannot crop an empty image of size {image.size}")
    return w, h


def crop_tight(image: Image.Image, box: Box, min_px: int = 4, max_aspect: float = 100.0) -> Image.Image:
    """The exact crop of ``box`` (VisRL's crop), outward-rounded to whole pixels.

    A degenerate box never yields an empty or absurd crop: each side is grown around the centre to
    ``min_px`` and the short side to ``long / max_aspect`` (Qwen image processors refuse aspect > 200),
    both capped by the image itself.
    """
    w, h = _image_size(image)
    x1, y1, x2, y2 = to_px(box.clamp(), (w, h))
    left, right = _grow_px(math.floor(x1), math.ceil(x2), max(1, min_px), w)
    top, bottom = _grow_px(math.floor(y1), math.ceil(y2), max(1, min_px), h)
    cw, ch = right - left, bottom - top
    if cw > max_aspect * ch:
        top, bottom = _grow_px(top, bottom, math.ceil(cw / max_aspect), h)
    elif ch > max_aspect * cw:
        left, right = _grow_px(left, right, math.ceil(ch / max_aspect), w)
    return image.crop((left, top, right, bottom))


def _shift_inside(c: float, r: float, limit: int) -> float:
    if c - r < 0:
        c = r
    if c + r > limit:
        c = limit - r
    return c


_FAR_SIDES = 1e6  # px coordinates further out than this many image sides are clipped (crop_square)


def crop_square(
    image: Image.Image, box: Box, min_half_px: int = 112
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Visual-CoT's evaluation crop (``cropwithbbox``): a square of half-side
    ``max((x2-x1)//2, (y2-y1)//2, min_half_px)`` around ``((x1+x2)//2, (y1+y2)//2)`` (floor division
    on float px), shifted to lie inside the image, then clipped to it. Returns the crop and its px box.

    Unlike the reference, a pixel box is not shifted by the square-padding offset (the reference does so
    for pixel input too, which moves ground-truth crops on non-square images).
    """
    if min_half_px < 1:
        raise ValueError(f"min_half_px must be >= 1 so the crop is never empty, got {min_half_px}")
    w, h = _image_size(image)
    m = max(w, h)
    # Coordinates beyond +-_FAR_SIDES image sides are clipped and the half side is capped at m / 2: a
    # square of half side >= m / 2 is the whole image either way, and without the cap float rounding
    # (w - r + r == 0 for r ~ 1e19) made a 0x0 crop out of "[0, 0, 1e20, 1e20]".
    x1, y1, x2, y2 = (min(max(v, -_FAR_SIDES * m), _FAR_SIDES * m) for v in to_px(box, (w, h)))
    r = min(max((x2 - x1) // 2, (y2 - y1) // 2, min_half_px), m / 2)
    cx = _shift_inside((x1 + x2) // 2, r, w)
    cy = _shift_inside((y1 + y2) // 2, r, h)
    px = (int(max(0, cx - r)), int(max(0, cy - r)), int(min(w, cx + r)), int(min(h, cy + r)))
    return image.crop(px), px


# --------------------------------------------------------------------------------------------- parsing
class ParseFailure(str, Enum):
    """Why a generated box text did not yield a box."""

    EMPTY = "empty"  # blank text
    NO_BOX = "no_box"  # nothing box-like in the text
    WRONG_ARITY = "wrong_arity"  # a list of numbers, but not 4 of them
    NOT_A_NUMBER = "not_a_number"  # a list entry is not a finite ASCII number (nan, inf, 1e309, words)
    OUT_OF_RANGE = "out_of_range"  # a value outside the frame's range
    DEGENERATE = "degenerate"  # no area left once corners are ordered and clipped to the image
    NO_FRAME = "no_frame"  # the image has no frame in this format (Qwen2.5-VL: aspect ratio > 200)


@dataclass(frozen=True)
class ParseResult:
    box: Box | None
    failure: ParseFailure | None
    text: str

    @property
    def ok(self) -> bool:
        return self.failure is None


_MAX_SCAN = 4096  # only the head of a generation is searched (a box is ~30 chars; bounds regex cost)
_MAX_GROUPS = 16
_NUM = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_FLOAT_RE = re.compile(_NUM)
_INT_RE = re.compile(r"[+-]?[0-9]+")
_SEP_RE = re.compile(r"\s*,\s*|\s+")
_BRACKET_RE = re.compile(r"\[([^\[\]]*)\]")
_PAREN_RE = re.compile(r"\(([^()]*)\)")
# The look-behind starts a match only at the head of a number: linear, not quadratic, on digit runs.
_BARE4_RE = re.compile(rf"(?<![0-9.])({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})")
_BBOX2D_RE = re.compile(r"[\"']bbox_2d[\"']\s*:\s*\[([^\[\]]*)\]")


def _numbers(content: str, integer: bool) -> list[float] | ParseFailure:
    """Comma/space separated numbers (ASCII digits only); NOT_A_NUMBER on any bad or non-finite entry."""
    pattern = _INT_RE if integer else _FLOAT_RE
    tokens = _SEP_RE.split(content.strip())
    values = []
    for token in tokens:
        if not pattern.fullmatch(token):
            return ParseFailure.NOT_A_NUMBER
        value = float(token)
        if not math.isfinite(value):
            return ParseFailure.NOT_A_NUMBER
        values.append(value)
    return values


def _four_from(content: str, integer: bool) -> list[float] | ParseFailure:
    values = _numbers(content, integer)
    if isinstance(values, list) and len(values) != 4:
        return ParseFailure.WRONG_ARITY
    return values


def _bracket_list(text: str, integer: bool) -> list[float] | ParseFailure:
    """The first ``[a, b, c, d]`` in the text that parses; else the first bracket's failure; with no
    brackets at all, a bare ``a, b, c, d``."""
    first_failure: ParseFailure | None = None
    for i, match in enumerate(_BRACKET_RE.finditer(text)):
        if i >= _MAX_GROUPS:
            break
        values = _four_from(match.group(1), integer)
        if isinstance(values, list):
            return values
        first_failure = first_failure or values
    if first_failure is not None:
        return first_failure
    bare = _BARE4_RE.search(text)
    return _four_from(", ".join(bare.groups()), integer) if bare else ParseFailure.NO_BOX


def _parse(
    text: str,
    extract: Callable[[str], list[float] | ParseFailure],
    max_x: float,
    max_y: float,
    slack: float,
    to_box: Callable[[Sequence[float]], Box],
) -> ParseResult:
    """Shared tail of every format: extract 4 numbers, order corners, range-check with ``slack`` (a
    fraction of the range [0, max]), convert, clamp to the image."""
    if not isinstance(text, str) or not text.strip():
        return ParseResult(None, ParseFailure.EMPTY, text if isinstance(text, str) else "")
    values = extract(text[:_MAX_SCAN])
    if isinstance(values, ParseFailure):
        return ParseResult(None, values, text)
    x1, x2 = sorted(values[0::2])
    y1, y2 = sorted(values[1::2])
    sx, sy = slack * max_x, slack * max_y
    if x1 < -sx or y1 < -sy or x2 > max_x + sx or y2 > max_y + sy:
        return ParseResult(None, ParseFailure.OUT_OF_RANGE, text)
    box = to_box((x1, y1, x2, y2)).clamp()
    if box.width <= 0 or box.height <= 0:
        return ParseResult(None, ParseFailure.DEGENERATE, text)
    return ParseResult(box, None, text)


def _nondegenerate(lo: int, hi: int, limit: int) -> tuple[int, int]:
    """Integer edges with hi >= lo + 1, inside [0, limit]."""
    if hi <= lo:
        hi = lo + 1
    if hi > limit:
        lo, hi = limit - 1, limit
    return lo, hi


# --------------------------------------------------------------------------------------------- formats
@runtime_checkable
class BoxFormat(Protocol):
    """The text a backbone reads/writes for a box. ``parse`` never raises on any text."""

    def format(self, box: Box, size: Size) -> str: ...

    def parse(self, text: str, size: Size) -> ParseResult: ...


@dataclass(frozen=True)
class SqFloatFormat:
    """VisCoT / LLaVA-1.5: ``"[0.148, 0.181, 0.298, 0.508]"`` in the sq frame (values in [0, 1]).

    ``format`` is :func:`sq_text` of the clamped box, except that a side under ``min_side`` (sq units)
    is first grown to it, so that 3 decimals never write a zero-area box (VisCoT's files have none
    under 0.002, so they are reproduced exactly).
    """

    slack: float = 0.02
    min_side: float = 0.002

    def format(self, box: Box, size: Size) -> str:
        m, (w, h) = max(_size(size)), _size(size)
        return sq_text(enforce_min_size(box, self.min_side * m / w, self.min_side * m / h), size)

    def parse(self, text: str, size: Size) -> ParseResult:
        return _parse(
            text, lambda t: _bracket_list(t, False), 1.0, 1.0, self.slack, lambda v: from_sq(v, size)
        )


@dataclass(frozen=True)
class Qwen2VLFormat:
    """Qwen2-VL: ``"<|box_start|>(x1,y1),(x2,y2)<|box_end|>"``, integers 0..1000 per axis.

    Parsing also accepts the bare ``"(x1,y1),(x2,y2)"``; set ``box_start``/``box_end`` to ``""`` to
    write it bare (for tokenizers without the special tokens).
    """

    box_start: str = "<|box_start|>"
    box_end: str = "<|box_end|>"
    slack: float = 0.02

    def format(self, box: Box, size: Size) -> str:
        x1, y1, x2, y2 = to_qwen2vl(box)
        x1, x2 = _nondegenerate(x1, x2, 1000)
        y1, y2 = _nondegenerate(y1, y2, 1000)
        return f"{self.box_start}({x1},{y1}),({x2},{y2}){self.box_end}"

    def _extract(self, text: str) -> list[float] | ParseFailure:
        if self.box_start and self.box_start in text:
            text = text.split(self.box_start, 1)[1]
        groups = [m.group(1) for _, m in zip(range(_MAX_GROUPS), _PAREN_RE.finditer(text))]
        if not groups:
            return ParseFailure.NO_BOX
        pairs = [_numbers(g, integer=False) for g in groups]
        for a, b in zip(pairs, pairs[1:]):  # the first two adjacent 2-number groups
            if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) == 2:
                return a + b
        first = pairs[0]
        return first if isinstance(first, ParseFailure) else ParseFailure.WRONG_ARITY

    def parse(self, text: str, size: Size) -> ParseResult:
        return _parse(text, self._extract, 1000.0, 1000.0, self.slack, from_qwen2vl)


@dataclass(frozen=True)
class Qwen25VLFormat:
    """Qwen2.5-VL: ``'{"bbox_2d": [x1, y1, x2, y2]}'``, absolute pixels on the processor-resized image.

    ``format``/``parse`` take the ORIGINAL size; the resized size is ``resized_size`` when given (a
    fixed ``(W', H')``, e.g. when the pipeline resizes every image first, or a picklable callable
    ``(W, H) -> (W', H')``), else :func:`smart_resize` with ``patch_size * merge_size`` and the pixel
    bounds. Parsing falls back to a bare ``[x1, y1, x2, y2]`` when there is no ``bbox_2d`` key.
    """

    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    resized_size: Sequence[int] | Callable[[Size], Size] | None = None
    slack: float = 0.02

    def __post_init__(self) -> None:
        if self.resized_size is not None and not callable(self.resized_size):
            object.__setattr__(self, "resized_size", _size(tuple(self.resized_size)))

    def with_frame(
        self, patch_size: int, merge_size: int, min_pixels: int, max_pixels: int
    ) -> Qwen25VLFormat:
        """This format in the frame of an image processor with these settings (one source of truth: the
        loader passes the processor's own values, so boxes live in the pixels the model is fed)."""
        return replace(
            self, patch_size=patch_size, merge_size=merge_size, min_pixels=min_pixels, max_pixels=max_pixels
        )

    def resized(self, size: Size) -> Size:
        """``(W, H)`` of the original image -> ``(W', H')`` of what the model sees."""
        if callable(self.resized_size):
            return _size(self.resized_size(_size(size)))
        if self.resized_size is not None:
            return self.resized_size  # type: ignore[return-value]
        w, h = _size(size)
        factor = self.patch_size * self.merge_size
        rh, rw = smart_resize(h, w, factor, self.min_pixels, self.max_pixels)
        return rw, rh

    def format(self, box: Box, size: Size) -> str:
        rw, rh = self.resized(size)
        x1, y1, x2, y2 = to_qwen25vl(box, (rw, rh))
        x1, x2 = _nondegenerate(x1, x2, rw)
        y1, y2 = _nondegenerate(y1, y2, rh)
        return f'{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}'

    @staticmethod
    def _extract(text: str) -> list[float] | ParseFailure:
        match = _BBOX2D_RE.search(text)
        return _four_from(match.group(1), integer=False) if match else _bracket_list(text, False)

    def parse(self, text: str, size: Size) -> ParseResult:
        try:
            rw, rh = self.resized(size)
        except ValueError:  # smart_resize refuses aspect ratios > 200: no box can be read in that frame
            return ParseResult(None, ParseFailure.NO_FRAME, text if isinstance(text, str) else "")
        return _parse(text, self._extract, rw, rh, self.slack, lambda v: from_qwen25vl(v, (rw, rh)))


@dataclass(frozen=True)
class GridFormat:
    """Tiny backbones: ``"[1, 2, 2, 3]"``, integer cell edges 0..grid per axis (one token each).

    ``format`` floors x1/y1 and ceils x2/y2 (so the cells cover the box; exact cell edges stay put) and
    always covers >= 1 cell; ``parse`` returns the cell-edge box. Only integers parse.
    """

    grid: int = 4
    eps: float = 1e-6
    slack: float = 0.0  # integer cells: any slack below 1 / grid is none

    def __post_init__(self) -> None:
        if int(self.grid) < 1:
            raise ValueError(f"GridFormat.grid must be >= 1, got {self.grid}")
        object.__setattr__(self, "grid", int(self.grid))

    def cells(self, box: Box) -> tuple[int, int, int, int]:
        """The covering cell edges ``(x1, y1, x2, y2)`` of ``box`` (clamped first)."""
        g, b = self.grid, box.clamp()
        x1, x2 = _nondegenerate(math.floor(b.x1 * g + self.eps), math.ceil(b.x2 * g - self.eps), g)
        y1, y2 = _nondegenerate(math.floor(b.y1 * g + self.eps), math.ceil(b.y2 * g - self.eps), g)
        return x1, y1, x2, y2

    def format(self, box: Box, size: Size) -> str:
        return "[" + ", ".join(str(c) for c in self.cells(box)) + "]"

    def parse(self, text: str, size: Size) -> ParseResult:
        g = self.grid
        to_box = lambda v: Box(*(c / g for c in v))  # noqa: E731
        return _parse(text, lambda t: _bracket_list(t, True), g, g, self.slack, to_box)
