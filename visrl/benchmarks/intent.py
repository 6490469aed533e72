"""Intention metrics of the synthetic benchmark: does the focus box follow the question? (VisRL §1)

VisRL's claim is *intention-driven* perception: where the model looks depends on what is asked. Detection
accuracy alone cannot show it when every question names the same kind of object (a model that always boxes
"the red one" scores perfectly). So, for worlds whose scenes hold more than one object a question can name
(``questions`` per object in ``<split>_scenes.json``, written by ``visrl.data.synthetic``):

* a box **lands on** object ``o`` when ``IoU(box, o) > 0.5``, else when the box's centre lies inside ``o``'s
  box; objects sit in distinct grid cells (disjoint boxes), so at most one object has IoU > 0.5 and the
  rule names at most one object. An unparsable box lands nowhere;
* ``intent/named_hit``: share of questions whose ``cot_pred`` box (greedy, the question as asked) lands on
  the named object;
* ``intent/swap_follow``: same image, the box prompt re-asked about ANOTHER nameable object of the scene
  (chosen deterministically from the question's uid): share of questions whose new box lands on that object;
* ``intent/swap_stay``: share whose new box still lands on the originally named object (the box ignores the
  question); ``intent/n``: questions with a swap.

A model that always boxes the same object has ``swap_follow`` ~0 whatever its ``named_hit``; one that follows
the question has both near its detection rate. Worlds with one nameable object per scene get no intent keys.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from visrl.data.boxes import Box, from_px, iou
from visrl.data.io import read_json

LAND_IOU = 0.5  # IoU above which a box lands on an object (strict, as detection accuracy)


@dataclass(frozen=True)
class Referents:
    """The objects of one question's scene: boxes (canonical frame), the question naming each (None when
    no question names it) and the index of the object the recorded question names."""

    boxes: tuple[Box, ...]
    questions: tuple[str | None, ...]
    target: int

    def swap(self, uid: str) -> int:
        """The other nameable object the swap check asks about (deterministic from ``uid``)."""
        others = [i for i, q in enumerate(self.questions) if q is not None and i != self.target]
        return others[zlib.crc32(uid.encode()) % len(others)]


def scenes_path(split_path: Path) -> Path:
    """``<split>_scenes.json`` beside ``<split>.json``."""
    return split_path.with_name(f"{split_path.stem}_scenes.json")


def load_referents(split_path: Path) -> dict[int | str, Referents]:
    """question_id -> :class:`Referents` for the questions with a swap (two or more nameable objects);
    empty when the split has no scenes file or no scene with a second nameable object."""
    path = scenes_path(Path(split_path))
    if not path.is_file():
        return {}
    out: dict[int | str, Referents] = {}
    for row in read_json(path):
        questions = row.get("questions")
        if not questions or sum(q is not None for q in questions) < 2:
            continue
        size = (row["size"], row["size"])
        boxes = tuple(from_px(tuple(o["box_px"]), size) for o in row["objects"])
        out[row["question_id"]] = Referents(boxes, tuple(questions), int(row["target"]))
    return out


def landed_on(box: Box | None, boxes: Sequence[Box]) -> int | None:
    """The index of the object ``box`` lands on (see the module docstring), or None."""
    if box is None:
        return None
    for i, b in enumerate(boxes):
        if iou(box, b) > LAND_IOU:
            return i
    cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
    for i, b in enumerate(boxes):
        if b.x1 <= cx <= b.x2 and b.y1 <= cy <= b.y2:
            return i
    return None


def swap_row(uid: str, ref: Referents, named_box: Box | None, swap_question: str, box_text: str,
             swap_box: Box | None, failure: str | None) -> dict:  # fmt: skip
    """The ``predictions.jsonl`` row (mode ``swap``) of one question's intent check."""
    swapped = ref.swap(uid)
    landed = landed_on(swap_box, ref.boxes)
    return {
        "uid": uid,
        "mode": "swap",
        "question": swap_question,
        "named": ref.target,
        "swapped": swapped,
        "named_landed": landed_on(named_box, ref.boxes),
        "box_text": box_text,
        "box": list(swap_box.as_tuple()) if swap_box is not None else None,
        "landed": landed,
        "named_hit": landed_on(named_box, ref.boxes) == ref.target,
        "swap_follow": landed == swapped,
        "swap_stay": landed == ref.target,
        "parse_failure": failure,
    }


def intent_metrics(rows: Sequence[Mapping]) -> dict[str, float]:
    """``intent/*`` shares over the ``swap`` rows (see the module docstring)."""
    n = max(1, len(rows))
    out = {
        f"intent/{k}": sum(bool(r[k]) for r in rows) / n for k in ("named_hit", "swap_follow", "swap_stay")
    }
    out["intent/n"] = float(len(rows))
    return out
