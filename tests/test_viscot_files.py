"""Box frames and records checked against EVERY record of the 13 real Visual-CoT benchmark files.

The files (``shared/data/viscot_benchmark/``, no images) pair ``benchmark/<name>.json`` (question, turn-1
box string in the sq frame, ``###`` pixel box) with ``benchmark_det/<name>.jsonl`` (pixel box + W, H),
row by row. See ``shared/notes/benchmark-formats.md`` §1 and §8.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from visrl.data.box_formats import ParseFailure, SqFloatFormat
from visrl.data.boxes import crop_square, from_px, from_sq, sq_text, to_px
from visrl.data.records import (
    DetRecord,
    VisCoTRecord,
    join_det,
    read_det,
    read_viscot,
    write_det,
    write_viscot,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "viscot_benchmark"
NAMES = sorted(p.stem for p in (DATA / "benchmark").glob("*.json"))
COUNTS = {"docvqa": 888, "textcap": 853, "textvqa": 526, "dude": 603, "sroie": 686, "infographicsvqa": 360,
          "flickr30k": 1546, "gqa": 978, "openimages": 945, "vsr": 404, "cub": 492, "emotic": 656,
          "visual7w": 1000}  # fmt: skip

pytestmark = pytest.mark.skipif(
    not (DATA / "benchmark").is_dir(), reason=f"Visual-CoT benchmark files not found at {DATA}"
)


def load(name: str) -> list[tuple[VisCoTRecord, DetRecord]]:
    return join_det(
        read_viscot(DATA / "benchmark" / f"{name}.json"), read_det(DATA / "benchmark_det" / f"{name}.jsonl")
    )


def _clamped(det: DetRecord) -> bool:
    """Whether the det box is a clamped box: corners ordered and inside the image (docvqa has 8 with
    swapped corners; a few datasets overshoot the image)."""
    x1, y1, x2, y2 = det.bbox
    return 0 <= x1 <= x2 <= det.width and 0 <= y1 <= y2 <= det.height


def test_all_13_files_present() -> None:
    assert sorted(COUNTS) == NAMES


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_every_record(name: str) -> None:
    """For every row of ``<name>.json`` joined with ``<name>.jsonl`` (same image path, by row):

    1. ``sq_text(from_px(det.bbox, (W, H)), (W, H))`` equals the turn-1 string character for character,
       and so does ``SqFloatFormat().format`` for every det box that is already clamped (ordered corners,
       inside the image), since the format clamps first.
    2. The inverse: the four numbers of the turn-1 string, mapped back with ``from_sq`` and ``to_px``,
       lie within ``0.0005 * max(W, H) + 1e-6`` px of ``det.bbox`` on every coordinate. The string keeps
       3 decimals of a value divided by ``max(W, H)``, so 0.0005 * max(W, H) px is the exact rounding
       bound (1e-6 px is float slack); this is tighter than "within one pixel plus the rounding"
       (``0.0005 * max(W, H) + 1``), and it is NOT a one-pixel bound: on a 2200-px page the string is
       only good to 1.1 px (benchmark-formats.md §8).
    3. ``SqFloatFormat().parse`` gives that same box clamped to the image when every value is within
       the format's 2% slack ([-0.02, 1.02]); the strings further out are ``OUT_OF_RANGE``, and those
       are exactly the 30 dude and 1 textcap records whose det box lies far outside the image.
    4. The ``###`` suffix box equals the det bbox truncated to int (``%d``).
    5. Question and split agree with the det row (``expression`` is the question verbatim).
    """
    pairs = load(name)
    assert len(pairs) == COUNTS[name]
    fmt, bad, out_of_range = SqFloatFormat(), [], 0
    for rec, det in pairs:
        size, m = det.size, max(det.size)
        box = from_px(det.bbox, size)
        if sq_text(box, size) != rec.box_text:
            bad.append((rec.index, "sq_text", rec.box_text))
        if _clamped(det) and fmt.format(box, size) != rec.box_text:
            bad.append((rec.index, "format", rec.box_text))
        inverse = from_sq(json.loads(rec.box_text), size)
        if any(abs(a - b) > 0.0005 * m + 1e-6 for a, b in zip(to_px(inverse, size), det.bbox)):
            bad.append((rec.index, "inverse", rec.box_text, det.bbox, size))
        parsed = fmt.parse(rec.box_text, size)
        if not all(-0.02 <= v <= 1.02 for v in json.loads(rec.box_text)):
            out_of_range += 1
            if parsed.failure is not ParseFailure.OUT_OF_RANGE:
                bad.append((rec.index, "parse", rec.box_text, parsed.failure))
        elif not parsed.ok or parsed.box != inverse.clamp():
            bad.append((rec.index, "parse", rec.box_text, parsed.failure))
        if rec.box_px != tuple(int(v) for v in det.bbox):
            bad.append((rec.index, "###", rec.box_px, det.bbox))
        if (rec.question, rec.split) != (det.expression, det.split):
            bad.append((rec.index, "question", rec.question, det.expression))
    assert not bad, f"{name}: {len(bad)} mismatches, first: {bad[:5]}"
    assert out_of_range == {"dude": 30, "textcap": 1}.get(name, 0)


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_lossless_round_trip(name: str, tmp_path: Path) -> None:
    """Writing what was read gives equal JSON values, and the same bytes with the file's own layout
    (indent 4, except visual7w.json which has none); the det JSONL comes back byte for byte."""
    src = DATA / "benchmark" / f"{name}.json"
    text = src.read_text(encoding="utf-8")
    out = tmp_path / f"{name}.json"
    write_viscot(read_viscot(src), out)
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(text)
    write_viscot(read_viscot(src), out, indent=4 if text.startswith("[\n") else None)
    assert out.read_bytes() == src.read_bytes()
    det_src = DATA / "benchmark_det" / f"{name}.jsonl"
    write_det(read_det(det_src), tmp_path / f"{name}.jsonl")
    assert (tmp_path / f"{name}.jsonl").read_bytes() == det_src.read_bytes()


def test_docvqa_q0_crop() -> None:
    """Visual-CoT's eval crop of docvqa q0 from the real record: [0, 398, 718, 1116] from the turn-1
    string (benchmark-formats.md §2), [0, 398, 720, 1118] from the exact pixel box."""
    rec, det = load("docvqa")[0]
    assert (rec.question_id, det.size, det.bbox) == (0, (1695, 2200), (74, 398, 404, 1118))
    image = Image.new("L", det.size)
    assert crop_square(image, SqFloatFormat().parse(rec.box_text, det.size).box)[1] == (0, 398, 718, 1116)
    assert crop_square(image, rec.box(det.size))[1] == (0, 398, 720, 1118)
