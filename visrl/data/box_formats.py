"""Box text formats: how each backbone writes a box as text and reads one back from a generation.

The geometry (the canonical :class:`~visrl.data.boxes.Box`, its frames, the crops) is in
:mod:`visrl.data.boxes`; this module is the text side on top of it: one :class:`BoxFormat` per backbone
family (:class:`SqFloatFormat`, :class:`Qwen2VLFormat`, :class:`Qwen25VLFormat`, :class:`GridFormat`;
Hydra ``_target_``s under ``model.box_format``) and the shared, bounded parsing they use. It imports
:mod:`visrl.data.boxes`, never the reverse.

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
from dataclasses import dataclass, replace
from enum import Enum
from typing import Protocol, runtime_checkable

from visrl.data.boxes import (
    Box,
    Size,
    _size,
    enforce_min_size,
    from_qwen2vl,
    from_qwen25vl,
    from_sq,
    smart_resize,
    sq_text,
    to_qwen2vl,
    to_qwen25vl,
)


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
