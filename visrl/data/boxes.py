"""Boxes: the canonical box, its coordinate frames, IoU, and the crops.

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

The geometry lives here and the text side (how each backbone writes and reads a box: the
:class:`~visrl.data.box_formats.BoxFormat` classes and their parsing) in :mod:`visrl.data.box_formats`,
which builds on this module; this module never imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

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
