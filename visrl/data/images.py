"""Image loading and the model's views of an image (full view and crop), VisRL §3.1 step 2.

Tiny backbones see every image box-filtered to ``image_size`` px square (see ``visrl.data.synthetic``:
the area average is what makes the synthetic detail invisible in the full view); real backbones get the
image unchanged and let their processor resize it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from PIL import Image

from visrl.data.boxes import Box, crop_tight


def open_rgb(path: str | Path) -> Image.Image:
    """Read an image as RGB; an unreadable file raises ``FileNotFoundError`` naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # missing, not an image, truncated
        raise FileNotFoundError(f"cannot read image {path}: {e}") from e


@lru_cache(maxsize=4096)
def load_rgb(path: str) -> Image.Image:
    """:func:`open_rgb`, cached (the small synthetic images are read many times per run)."""
    return open_rgb(path)


def to_view(image: Image.Image, size: int | None) -> Image.Image:
    """The image as the backbone sees it: ``size`` px square by exact area average, or unchanged."""
    if size is None or image.size == (size, size):
        return image
    return image.resize((size, size), Image.BOX)


def crop_view(image: Image.Image, box: Box, size: int | None, min_px: int = 8) -> Image.Image:
    """Crop ``box`` (canonical frame) from the original image and return the backbone's view of it."""
    return to_view(crop_tight(image, box, min_px=min_px), size)


def resolve(root: Path | str, rel: str) -> str:
    return str(Path(root) / rel)
