"""Per-image memo of a frozen vision side: each distinct image goes through the tower once per model.

Why: the vision tower and its projector/merger are frozen (the reference's ``freeze_vision_tower``; the tiny
towers stay at their random init), so an image's features never change, yet every forward pass recomputes
them: the base-skill epochs revisit the same images, SFT and both DPO stages run several epochs over the same
rows, and a pair's chosen and rejected rows share one full view. On the tiny backbones the tower is about a
quarter of a training step's time (``experiments/perf/vision_memo_speed.py`` prints the figures).

Exact: an image's patches attend only within that image, so its features do not depend on the batch it is
computed in (tests check bit-equality against the plain model), and a run's numbers do not change.

Scope: installed on the inner model's ``get_image_features`` (what every family's forward calls) by
:func:`install_vision_memo`; while any vision parameter is trainable, or the call is not the plain per-image
form, it calls the original and drops what it holds. Keys are a hash of each image's pixel inputs (shape,
dtype, bytes) and its grid, so a key survives collation and device moves; values are detached features on
the model's device, evicted least recently used beyond ``max_bytes``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

__all__ = ["VisionMemo", "install_vision_memo", "vision_memo_of"]

MEMO_ATTR = "_visrl_vision_memo"

# One image's inputs: (pixel chunk, grid row [1, 3] or None)
ImageInputs = tuple[Tensor, Tensor | None]


def split_grid(pixel_values: Tensor, grid: Tensor) -> list[ImageInputs]:
    """Qwen layout: all images' patch rows concatenated ([sum t*h*w, C*T*P*P]), ``grid`` [N, 3]."""
    sizes = grid.prod(-1).tolist()
    return [(chunk, grid[i : i + 1]) for i, chunk in enumerate(torch.split(pixel_values, sizes))]


def split_stacked(pixel_values: Tensor, grid: Tensor | None) -> list[ImageInputs]:
    """LLaVA layout: one image per leading index ([N, C, H, W])."""
    return [(pixel_values[i : i + 1], None) for i in range(pixel_values.shape[0])]


LAYOUTS: dict[str, Callable[[Tensor, Tensor | None], list[ImageInputs]]] = {
    "grid": split_grid,
    "stacked": split_stacked,
}


def image_key(pixels: Tensor, grid: Tensor | None, extra: str) -> bytes:
    """A digest of one image's inputs (bytes, shape, dtype), its grid and the call's other settings."""
    h = hashlib.sha1(usedforsecurity=False)  # 160 bits; twice blake2b's speed on this data
    h.update(
        f"{tuple(pixels.shape)}|{pixels.dtype}|{None if grid is None else grid.tolist()}|{extra}".encode()
    )
    h.update(pixels.detach().contiguous().cpu().numpy().tobytes())
    return h.digest()


class VisionMemo:
    """Wraps ``get_image_features(pixel_values, [image_grid_thw], **kwargs)`` of a frozen vision side."""

    def __init__(
        self, original: Callable[..., Any], layout: str, params: Sequence[nn.Parameter], max_bytes: int
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"VisionMemo: unknown pixel layout {layout!r}; valid: {sorted(LAYOUTS)}")
        self.original, self.split = original, LAYOUTS[layout]
        self.params, self.max_bytes = list(params), max_bytes
        self.entries: OrderedDict[bytes, Tensor] = OrderedDict()
        self.bytes, self.hits, self.misses = 0, 0, 0

    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.params)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def __call__(self, pixel_values: Tensor, *args: Any, **kwargs: Any) -> Any:
        grid = args[0] if args else kwargs.get("image_grid_thw")
        other = {k: v for k, v in kwargs.items() if k not in ("image_grid_thw", "return_dict")}
        plain = len(args) <= 1 and kwargs.get("return_dict", True) and kwargs.get("image_sizes") is None
        if not (plain and self.frozen()) or any(isinstance(v, Tensor) for v in other.values()):
            self.clear()
            return self.original(pixel_values, *args, **kwargs)
        images = self.split(pixel_values, grid)
        extra = f"{pixel_values.device}|{sorted(other.items())!r}"  # a moved model recomputes on its device
        keys = [image_key(px, g, extra) for px, g in images]
        missing = {k: img for k, img in zip(keys, images) if k not in self.entries}
        if missing:
            self._compute(list(missing), list(missing.values()), grid is not None, other)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        for k in keys:
            self.entries.move_to_end(k)
        features = tuple(self.entries[k] for k in keys)  # before eviction: every key of this call is present
        self._evict()
        return BaseModelOutputWithPooling(pooler_output=features)

    def _compute(self, keys: list[bytes], images: list[ImageInputs], gridded: bool, other: dict) -> None:
        """The missing images in one call of the original (same per-image numbers as the caller's batch)."""
        pixels = torch.cat([px for px, _ in images])
        grid_args = (torch.cat([g for _, g in images]),) if gridded else ()
        with torch.no_grad():
            out = self.original(pixels, *grid_args, return_dict=True, **other).pooler_output
        if len(out) != len(images):
            raise RuntimeError(f"VisionMemo: the tower gave {len(out)} outputs for {len(images)} images")
        for key, feats in zip(keys, out):
            self.entries[key] = feats.detach()
            self.bytes += feats.numel() * feats.element_size()

    def _evict(self) -> None:
        while len(self.entries) > 1 and self.bytes > self.max_bytes:
            old = self.entries.popitem(last=False)[1]
            self.bytes -= old.numel() * old.element_size()


def install_vision_memo(
    inner: nn.Module, vision_modules: Sequence[str], layout: str, max_bytes: int
) -> VisionMemo | None:
    """Memoise ``inner.get_image_features`` (``inner``: the model under ``ForConditionalGeneration``);
    ``max_bytes`` <= 0 removes the memo. Idempotent; returns the memo in place (None when removed)."""
    current = vision_memo_of(inner)
    if max_bytes <= 0:
        if current is not None:
            del inner.get_image_features  # the class method again
            delattr(inner, MEMO_ATTR)
        return None
    if current is not None:
        current.max_bytes = max_bytes
        return current
    params = [p for name in vision_modules for p in getattr(inner, name).parameters()]
    memo = VisionMemo(inner.get_image_features, layout, params, max_bytes)
    inner.get_image_features = memo  # an instance attribute: the forward's self.get_image_features(...)
    setattr(inner, MEMO_ATTR, memo)
    return memo


def vision_memo_of(inner: nn.Module) -> VisionMemo | None:
    """The memo installed on ``inner``, if any."""
    return getattr(inner, MEMO_ATTR, None)
