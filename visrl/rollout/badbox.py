"""Bad-box synthesis for the self-evolution data (VisRL §3.2; the reference's ``data_gen/generate.py``).

Each rollout attempt samples a "good" box A and a second box B for diversity. When B overlaps A
(IoU > 0.05) the reference throws B away and draws a random box of about A's size that does not
overlap A at all (``generate_random_bounding_box`` in VisRL's ``data_gen/generate.py``), so that the
attempt yields one focused and one clearly unfocused crop. This module is that rule, with these
deliberate departures from the reference code:

* **Spread schedule.** Width and height are uniform in ``like``'s size times ``(1 - d, 1 + d)`` with
  ``d = spread + spread_step * (try // step_every)``. The reference increments ``d`` *before* its first
  try (so it effectively starts at 0.4); here the first ``step_every`` tries use ``spread`` itself.
* **Stays in the image.** Sizes are clipped to ``[min_size, 1]`` before the position is drawn uniformly
  in ``[0, 1 - w] x [0, 1 - h]``; the reference lets the width exceed 1 (negative ``x1``) and go to 0.
* **Snapping.** ``snap`` maps a candidate to what the backbone can actually write (e.g. the covering
  cells of :class:`~visrl.data.box_formats.GridFormat`, see :func:`format_snap`); zero overlap is checked
  *after* snapping, so the box the model is trained on really is disjoint from ``good``.
* **Frames.** IoU is the canonical per-axis IoU (:func:`visrl.data.boxes.iou`), not the reference's
  mixed frame (boxes normalised to the square-padded image on one side, to the raw image on the other).
* **No exception.** Running out of tries returns ``None`` (the reference raises, dropping the attempt).

"Zero overlap" means zero intersection *area*: a box touching ``good`` along an edge is accepted, as in
the reference (``x_max <= x_min_std or ...``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from visrl.data.box_formats import BoxFormat
from visrl.data.boxes import Box, Size, iou

__all__ = ["BadBox", "Rng", "Snap", "format_snap", "maybe_replace_bad", "overlaps", "random_disjoint_box"]

Rng = random.Random | np.random.Generator
Snap = Callable[[Box], Box | None]  # None: the candidate cannot be written; the try is rejected


class BadBox(NamedTuple):
    """The rejected-side box of an attempt: ``box`` (None if synthesis failed), ``synthetic`` if drawn here."""

    box: Box | None
    synthetic: bool


def overlaps(a: Box, b: Box) -> bool:
    """True when the intersection of ``a`` and ``b`` has positive area (touching edges do not count)."""
    a, b = a.clamp(), b.clamp()
    return min(a.x2, b.x2) - max(a.x1, b.x1) > 0 and min(a.y2, b.y2) - max(a.y1, b.y1) > 0


def format_snap(fmt: BoxFormat, size: Size) -> Snap:
    """A ``snap`` that round-trips a box through ``fmt`` (format, then parse) for an image of ``size``.

    A box the format cannot represent (e.g. it rounds to zero area) maps to ``None``.
    """

    def snap(box: Box) -> Box | None:
        return fmt.parse(fmt.format(box, size), size).box

    return snap


def _check_args(spread: float, spread_step: float, step_every: int, max_tries: int, min_size: float) -> None:
    if spread < 0 or spread_step < 0:
        raise ValueError(f"badbox: spread and spread_step must be >= 0, got {spread} and {spread_step}")
    if step_every < 1 or max_tries < 1:
        raise ValueError(f"badbox: step_every and max_tries must be >= 1, got {step_every} and {max_tries}")
    if not 0 < min_size <= 1:
        raise ValueError(f"badbox: min_size must be in (0, 1], got {min_size}")


def random_disjoint_box(
    good: Box,
    like: Box,
    rng: Rng,
    spread: float = 0.3,
    spread_step: float = 0.1,
    step_every: int = 20,
    max_tries: int = 100,
    snap: Snap | None = None,
    min_size: float = 0.01,
) -> Box | None:
    """A random box of about ``like``'s size inside [0, 1], with zero overlap with ``good`` (None: not found).

    ``rng`` is a ``random.Random`` or a ``numpy.random.Generator``; each try draws exactly four uniforms
    (w, h, x1, y1), so a seeded generator gives the same box every time.
    """
    _check_args(spread, spread_step, step_every, max_tries, min_size)
    good, like = good.clamp(), like.clamp()
    for attempt in range(max_tries):
        d = spread + spread_step * (attempt // step_every)
        w = min(1.0, max(min_size, float(rng.uniform(like.width * (1 - d), like.width * (1 + d)))))
        h = min(1.0, max(min_size, float(rng.uniform(like.height * (1 - d), like.height * (1 + d)))))
        x1 = float(rng.uniform(0.0, 1.0 - w))
        y1 = float(rng.uniform(0.0, 1.0 - h))
        candidate: Box | None = Box(x1, y1, x1 + w, y1 + h).clamp()  # clamp: float error at the edge
        if snap is not None:
            snapped = snap(candidate)
            candidate = snapped.clamp() if snapped is not None else None
        if candidate is None or candidate.area <= 0 or overlaps(candidate, good):
            continue
        return candidate
    return None


def maybe_replace_bad(
    good: Box,
    bad: Box,
    rng: Rng,
    iou_threshold: float = 0.05,
    like: Box | None = None,
    **synth: object,
) -> BadBox:
    """The reference rule: keep the sampled ``bad`` box unless ``iou(good, bad) > iou_threshold``, in which
    case synthesise a disjoint box of ``like``'s size (default: ``good``'s, as the reference does).

    ``synth`` are the keyword options of :func:`random_disjoint_box` (spread, max_tries, snap, ...). An
    unparseable second box is the caller's decision (the reference drops the whole attempt).
    """
    if not 0 <= iou_threshold <= 1:
        raise ValueError(f"badbox: iou_threshold must be in [0, 1], got {iou_threshold}")
    if iou(good, bad) <= iou_threshold:
        return BadBox(bad, synthetic=False)
    size_like = like if like is not None else good
    box = random_disjoint_box(good, size_like, rng, **synth)  # type: ignore[arg-type]
    return BadBox(box, synthetic=True)
