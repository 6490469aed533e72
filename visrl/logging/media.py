"""Images with labelled focus boxes: the one media type the run loggers understand.

VisRL (§3) is about *where* the model looks, so the most useful thing a run can show besides curves is a test
image with the ground-truth box and the boxes the policy predicted (before and after RL). This module holds the
backend-neutral value type, :class:`ImageWithBoxes`, plus the helpers every backend and plot shares:

* :func:`as_xyxy` accepts a canonical :class:`visrl.data.boxes.Box` (anything with ``as_tuple()``) or a plain
  normalised ``[x1, y1, x2, y2]`` sequence and returns a clamped, ordered tuple (predicted boxes may lie outside
  the image or have swapped corners until clamped; drawing them clamped is the honest picture);
* :func:`load_image` opens a path / array / PIL image as RGB;
* :func:`render` burns the boxes into a copy of the image (used by the CSV backend, which has no box overlay).

Nothing here imports W&B or matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["BOX_COLOURS", "BoxLike", "ImageWithBoxes", "as_xyxy", "colour_for", "load_image", "render"]

# A box as the callers hold it: visrl.data.boxes.Box, or normalised xyxy floats.
BoxLike = Any  # visrl.data.boxes.Box (has as_tuple()) or Sequence[float]
XYXY = tuple[float, float, float, float]

# Distinct, colour-blind-safe (Okabe-Ito) colours, assigned to labels in order of first use.
BOX_COLOURS: tuple[str, ...] = ("#009E73", "#E69F00", "#0072B2", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442")


def as_xyxy(box: BoxLike, what: str = "box") -> XYXY:
    """Normalised xyxy of ``box``, clipped into [0, 1] with ordered corners.

    Raises ``ValueError`` naming ``what`` if the box does not have exactly four finite coordinates.
    """
    values = box.as_tuple() if hasattr(box, "as_tuple") else box
    try:
        coords = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: expected a Box or 4 numbers [x1, y1, x2, y2], got {box!r}") from exc
    if len(coords) != 4 or not all(math.isfinite(v) for v in coords):
        raise ValueError(f"{what}: expected 4 finite normalised coordinates [x1, y1, x2, y2], got {box!r}")
    x1, x2 = sorted(min(1.0, max(0.0, v)) for v in (coords[0], coords[2]))
    y1, y2 = sorted(min(1.0, max(0.0, v)) for v in (coords[1], coords[3]))
    return (x1, y1, x2, y2)


def colour_for(index: int) -> str:
    """The palette colour of the ``index``-th label (cycling)."""
    return BOX_COLOURS[index % len(BOX_COLOURS)]


def load_image(image: Image.Image | np.ndarray | str | Path) -> Image.Image:
    """``image`` as an RGB PIL image (paths are opened, arrays are [H, W, 3] or [H, W] uint8)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    with Image.open(path) as img:
        return img.convert("RGB")


@dataclass(frozen=True)
class ImageWithBoxes:
    """An image plus labelled boxes, e.g. ``{"gt": (gt_box, "gt"), "pred": (box, "pred: red")}``.

    ``boxes`` maps a label (the legend entry, stable across images: "gt", "sft", "final") to a pair
    ``(box, caption)``; ``box`` is a canonical Box or normalised xyxy, or None when the model produced no
    parsable box (the label is then kept for the legend but nothing is drawn).
    """

    image: Image.Image | np.ndarray | str | Path
    boxes: Mapping[str, tuple[BoxLike | None, str]] = field(default_factory=dict)
    caption: str = ""

    def normalised_boxes(self) -> dict[str, tuple[XYXY | None, str]]:
        """``label -> (clamped xyxy | None, caption)``; raises ``ValueError`` naming a malformed label."""
        out: dict[str, tuple[XYXY | None, str]] = {}
        for label, entry in self.boxes.items():
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise ValueError(f"ImageWithBoxes.boxes[{label!r}]: expected (box, caption), got {entry!r}")
            box, caption = entry
            out[str(label)] = (
                None if box is None else as_xyxy(box, f"ImageWithBoxes.boxes[{label!r}]"),
                str(caption),
            )
        return out


def render(item: ImageWithBoxes, width: int = 2) -> Image.Image:
    """A copy of the image with every box outlined in its label's colour and the caption above it."""
    image = load_image(item.image).copy()
    draw = ImageDraw.Draw(image)
    w, h = image.size
    for idx, (_, (xyxy, caption)) in enumerate(item.normalised_boxes().items()):
        if xyxy is None:
            continue
        px = (xyxy[0] * w, xyxy[1] * h, xyxy[2] * w, xyxy[3] * h)  # normalised -> pixel corners
        draw.rectangle(px, outline=colour_for(idx), width=width)
        if caption:
            draw.text((px[0] + 1, max(0.0, px[1] - 11)), caption, fill=colour_for(idx))
    return image
