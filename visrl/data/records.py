"""Records: Visual-CoT benchmark/training JSON and Visual-CoT detection JSONL.

VisRL (paper §3-4) trains on Visual-CoT data (question, ground-truth box, answer); the schemas of each reader
are in its docstring (the preference pairs VisRL writes are :mod:`visrl.data.pair_records`).

Every record keeps the object it was read from (``raw``, key order included) and writers re-emit exactly
that, so reading and writing a file is lossless (``write_viscot`` with the file's indent reproduces the
benchmark files byte for byte). The typed fields are views of ``raw``, validated on read
(:mod:`visrl.data.fields`): malformed input raises :class:`~visrl.data.errors.InputError` (a ``ValueError``),
one line naming the file, the record index and the field. New records are built with ``make_viscot_record``,
which goes through the same validation.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visrl.data.boxes import Box, from_px, sq_text
from visrl.data.errors import InputError
from visrl.data.fields import (
    MEMORY,
    each_row,
    field_error,
    get_field,
    load_json_list,
    read_text,
    turn_value,
    with_extra,
)
from visrl.data.io import write_text_atomic

IMAGE_PREFIX = "<image>\n"
VISCOT_SUFFIX = (
    " Please provide the bounding box coordinate of the region that can help you answer the question better."
)
_VISCOT_KEYS = ("dataset", "split", "question_id", "image", "conversations")
_SUFFIX_RE = re.compile(r"(?P<path>.*)###\[(?P<box>[^\[\]]*)\]", re.DOTALL)
# Path spellings that differ between a benchmark file and its detection file (visual7w.json says
# cot/v7w/, visual7w.jsonl says cot/visual7w/).
_PATH_ALIASES = (("cot/visual7w/", "cot/v7w/"),)


# ------------------------------------------------------------------------------------------ VisCoT JSON
@dataclass(frozen=True)
class VisCoTRecord:
    """One Visual-CoT record (§1a): ``image = [path, "path###[x1, y1, x2, y2]"]`` and 4 turns
    (human question + suffix, gpt sq box text, human ``<image>``, gpt answer)."""

    dataset: str
    split: str
    question_id: int | str
    image_path: str
    box_px: tuple[float, float, float, float] | None  # original px from the ### suffix (ints in VisCoT)
    question: str  # without "<image>\n" and without the box-request suffix
    answer: str
    box_text: str  # turn 1, verbatim
    raw: dict[str, Any] = field(repr=False, hash=False)
    source: str = field(default=MEMORY, compare=False)
    index: int = field(default=-1, compare=False)

    @classmethod
    def from_raw(cls, raw: Any, source: str = MEMORY, index: int = -1) -> VisCoTRecord:
        if not isinstance(raw, dict):
            raise field_error(source, index, "<record>", f"expected an object, got {type(raw).__name__}")
        image = get_field(raw, "image", list, source, index)
        if not 1 <= len(image) <= 2 or not all(isinstance(p, str) for p in image):
            raise field_error(source, index, "image", f"expected 1 or 2 path strings, got {image!r:.120}")
        turns = get_field(raw, "conversations", list, source, index)
        if len(turns) != 4:
            raise field_error(source, index, "conversations", f"expected 4 turns, got {len(turns)}")
        roles = ("human", "gpt", "human", "gpt")
        values = [
            turn_value(t, r, source, index, f"conversations[{i}]")
            for i, (t, r) in enumerate(zip(turns, roles))
        ]
        prompt = values[0]
        if not (prompt.startswith(IMAGE_PREFIX) and prompt.endswith(VISCOT_SUFFIX)):
            raise field_error(
                source, index, "conversations[0].value", f"expected '<image>\\n{{question}}{VISCOT_SUFFIX}'"
            )
        if values[2] != "<image>":
            raise field_error(
                source, index, "conversations[2].value", f"expected '<image>', got {values[2]!r:.80}"
            )
        return cls(
            dataset=get_field(raw, "dataset", str, source, index),
            split=get_field(raw, "split", str, source, index),
            question_id=get_field(raw, "question_id", (int, str), source, index),
            image_path=image[0],
            box_px=_suffix_box(image[1], source, index) if len(image) == 2 else None,
            question=prompt[len(IMAGE_PREFIX) : len(prompt) - len(VISCOT_SUFFIX)],
            answer=values[3],
            box_text=values[1],
            raw=raw,
            source=source,
            index=index,
        )

    @property
    def extra(self) -> dict[str, Any]:
        """Keys beyond the VisCoT schema (e.g. written by the synthetic generator)."""
        return {k: v for k, v in self.raw.items() if k not in _VISCOT_KEYS}

    @property
    def uid(self) -> str:
        """The question's one id across data, rollouts, pairs and predictions: ``dataset:split:question_id``."""
        return f"{self.dataset}:{self.split}:{self.question_id}"

    def box(self, size: tuple[int, int]) -> Box | None:
        """The ``###`` pixel box in the canonical frame (needs the original ``(W, H)``)."""
        return None if self.box_px is None else from_px(self.box_px, size)


def _suffix_box(entry: str, source: str, index: int) -> tuple[float, float, float, float]:
    match = _SUFFIX_RE.fullmatch(entry)
    if match is None:
        raise field_error(
            source, index, "image[1]", f"expected 'path###[x1, y1, x2, y2]', got {entry!r:.120}"
        )
    try:
        values = [float(v) for v in match.group("box").split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise field_error(
            source, index, "image[1]", f"expected 4 finite numbers after ###, got {entry!r:.120}"
        )
    return tuple(int(v) if v.is_integer() else v for v in values)  # type: ignore[return-value]


def read_viscot(path: str | Path) -> list[VisCoTRecord]:
    """Read a Visual-CoT list JSON (benchmark file, ``viscot_363k.json``-shaped, or synthetic split)."""
    path = Path(path)
    return [VisCoTRecord.from_raw(raw, str(path), i) for i, raw in enumerate(load_json_list(path))]


def read_viscot_rows(path: str | Path) -> list[VisCoTRecord | InputError]:
    """:func:`read_viscot` for evaluation: a record that cannot be used is its :class:`InputError` in
    place (so one bad record costs one question); a file that is not a JSON list still raises."""
    path = Path(path)
    return each_row(lambda raw, i: VisCoTRecord.from_raw(raw, str(path), i), load_json_list(path))


def write_viscot(records: Iterable[VisCoTRecord], path: str | Path, indent: int | None = 4) -> None:
    """Write records as a list JSON. ``indent=4`` reproduces 12 of the 13 benchmark files byte for
    byte; ``visual7w.json`` was written without indentation (``indent=None``)."""
    write_text_atomic(path, json.dumps([r.raw for r in records], indent=indent))


def make_viscot_record(
    *,
    dataset: str,
    split: str,
    question_id: int | str,
    image_path: str,
    question: str,
    answer: str,
    box_px: Sequence[float] | None = None,
    size: tuple[int, int] | None = None,
    box_text: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> VisCoTRecord:
    """Build a record in the VisCoT format from fields.

    The ``###`` suffix holds ``box_px`` truncated with ``%d`` (as VisCoT does). ``box_text`` defaults to
    the VisCoT sq string of ``box_px`` (computed from the unrounded px, which needs the image ``size``).
    ``extra`` keys are appended after the VisCoT keys and preserved.
    """
    if box_text is None:
        if box_px is None or size is None:
            raise ValueError("make_viscot_record needs box_text, or box_px and size to compute it")
        box_text = sq_text(from_px(box_px, size), size)
    image = [image_path]
    if box_px is not None:
        image.append(f"{image_path}###[{', '.join(str(int(v)) for v in box_px)}]")  # %d: truncate
    turns = [
        {"from": "human", "value": IMAGE_PREFIX + question + VISCOT_SUFFIX},
        {"from": "gpt", "value": box_text},
        {"from": "human", "value": "<image>"},
        {"from": "gpt", "value": answer},
    ]
    base = {
        "dataset": dataset,
        "split": split,
        "question_id": question_id,
        "image": image,
        "conversations": turns,
    }
    return VisCoTRecord.from_raw(with_extra(base, extra))


# ------------------------------------------------------------------------------------------ VisCoT det
@dataclass(frozen=True)
class DetRecord:
    """One Visual-CoT detection row (§1b); row-aligned with the benchmark file of the same name."""

    img_path: str
    expression: str
    bbox: tuple[float, float, float, float]  # original px xyxy, as stored (int or float)
    width: int
    height: int
    question_id: int | str
    split: str
    raw: dict[str, Any] = field(repr=False, hash=False)
    source: str = field(default=MEMORY, compare=False)
    index: int = field(default=-1, compare=False)

    @classmethod
    def from_raw(cls, raw: Any, source: str = MEMORY, index: int = -1) -> DetRecord:
        if not isinstance(raw, dict):
            raise field_error(source, index, "<record>", f"expected an object, got {type(raw).__name__}")
        bbox = get_field(raw, "bbox", list, source, index)
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
        if len(bbox) != 4 or not ok:
            raise field_error(source, index, "bbox", f"expected 4 finite numbers, got {bbox!r:.120}")
        width, height = (get_field(raw, k, int, source, index) for k in ("width", "height"))
        if width <= 0 or height <= 0:
            raise field_error(source, index, "width/height", f"must be positive, got {width}x{height}")
        return cls(
            img_path=get_field(raw, "img_path", str, source, index),
            expression=get_field(raw, "expression", str, source, index),
            bbox=tuple(bbox),  # type: ignore[arg-type]
            width=width,
            height=height,
            question_id=get_field(raw, "question_id", (int, str), source, index),
            split=get_field(raw, "split", str, source, index),
            raw=raw,
            source=source,
            index=index,
        )

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    @property
    def box(self) -> Box:
        return from_px(self.bbox, self.size)


def _det_raws(path: Path) -> list[Any]:
    """The JSON value of each non-blank line; a line that is not JSON is its InputError in place."""
    raws: list[Any] = []
    for line_no, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            raws.append(json.loads(line))
        except json.JSONDecodeError as e:
            raws.append(InputError(f"{path}: record {len(raws)} (line {line_no}): not valid JSON: {e}"))
    return raws


def read_det_rows(path: str | Path) -> list[DetRecord | InputError]:
    """:func:`read_det` with each unusable row as its :class:`InputError` in place."""
    path = Path(path)
    return each_row(lambda raw, i: DetRecord.from_raw(raw, str(path), i), _det_raws(path))


def read_det(path: str | Path) -> list[DetRecord]:
    """Read a detection JSONL; blank lines are skipped, the record index counts non-blank rows."""
    rows = read_det_rows(path)
    for row in rows:
        if isinstance(row, InputError):
            raise row
    return rows  # type: ignore[return-value]


def write_det(records: Iterable[DetRecord], path: str | Path) -> None:
    """One ``json.dumps`` line per record (byte-identical to the benchmark_det files)."""
    write_text_atomic(path, "".join(json.dumps(r.raw) + "\n" for r in records))


def _canonical_path(path: str) -> str:
    for alias, canonical in _PATH_ALIASES:
        if path.startswith(alias):
            return canonical + path[len(alias) :]
    return path


def same_image(record_path: str, det_path: str) -> bool:
    """Whether a benchmark record and a detection row name the same image (v7w/visual7w spellings equal)."""
    return _canonical_path(record_path) == _canonical_path(det_path)


def join_det(
    records: Sequence[VisCoTRecord], dets: Sequence[DetRecord]
) -> list[tuple[VisCoTRecord, DetRecord]]:
    """Pair records with detection rows BY ROW (never by question_id, which predictions set to 0),
    checking that both files have the same length and each row the same image."""
    rec_src = records[0].source if records else MEMORY
    det_src = dets[0].source if dets else MEMORY
    if len(records) != len(dets):
        raise InputError(f"{rec_src} has {len(records)} records but {det_src} has {len(dets)} rows")
    for row, (rec, det) in enumerate(zip(records, dets)):
        if not same_image(rec.image_path, det.img_path):
            raise InputError(
                f"row {row}: {rec_src} image {rec.image_path!r} != {det_src} img_path {det.img_path!r}"
            )
    return list(zip(records, dets))
