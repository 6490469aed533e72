"""Per-row memo of Qwen's multimodal rotary positions (``get_rope_index``): each distinct row computed once.

Why: Qwen2-VL / Qwen2.5-VL compute M-RoPE position ids in a Python loop over the batch's rows, every forward
pass; on the tiny backbones that loop is about a fifth of a training step once the frozen tower's features
are memoised (``experiments/perf/vision_memo_speed.py``). A row's positions depend only on its own tokens
(padding removed), their modality types and its images' grids, and every epoch revisits the same rows, so
each distinct row is computed once, by the model's own function on that row alone.

Exact: positions are integers and the model's loop treats rows independently (padding gets 0, each row's
delta is its own), so the assembled batch equals the model's (tests check equality). Calls with videos or
other extra inputs go to the model's function unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["RopeIndexMemo", "install_rope_memo", "remove_rope_memo"]

MEMO_ATTR = "_visrl_rope_memo"
IMAGE_TYPE = 1  # mm_token_type_ids value of image tokens (0 text, 2 video)


def image_groups(types: list[int]) -> int:
    """Number of image placeholder runs in a row's token types (one run per image)."""
    return sum(1 for i, t in enumerate(types) if t == IMAGE_TYPE and (i == 0 or types[i - 1] != IMAGE_TYPE))


class RopeIndexMemo:
    """Wraps ``get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, ..., attention_mask)``."""

    def __init__(self, original: Callable[..., tuple[Tensor, Tensor]], max_rows: int = 200_000) -> None:
        self.original, self.max_rows = original, max_rows
        self.entries: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()  # row -> ([3, L], delta)
        self.hits, self.misses = 0, 0

    def __call__(
        self,
        input_ids: Tensor,
        mm_token_type_ids: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        if (
            mm_token_type_ids is None
            or video_grid_thw is not None
            or any(v is not None for v in kwargs.values())
        ):
            return self.original(
                input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw, attention_mask=attention_mask, **kwargs,
            )  # fmt: skip
        batch, width = input_ids.shape
        position_ids = torch.zeros(3, batch, width, dtype=input_ids.dtype, device=input_ids.device)
        grids = image_grid_thw.tolist() if image_grid_thw is not None else []
        deltas, used = [], 0
        for b in range(batch):
            valid = attention_mask[b].bool() if attention_mask is not None else slice(None)
            ids, types = input_ids[b][valid], mm_token_type_ids[b][valid]
            n_images = image_groups(types.tolist())
            row_grids = grids[used : used + n_images]
            used += n_images
            positions, delta = self._row(ids, types, row_grids)
            position_ids[:, b, valid] = positions
            deltas.append(delta)
        return position_ids, torch.stack(deltas)[:, None]  # [3, B, T], [B, 1]

    def _row(self, ids: Tensor, types: Tensor, grids: list[list[int]]) -> tuple[Tensor, Tensor]:
        """One unpadded row's positions [3, L] and delta (a scalar), computed alone on a miss."""
        key = (ids.cpu().numpy().tobytes(), types.cpu().numpy().tobytes(), tuple(map(tuple, grids)))
        hit = self.entries.get(key)
        if hit is not None:
            self.hits += 1
            self.entries.move_to_end(key)
            return hit
        self.misses += 1
        grid = torch.tensor(grids, dtype=torch.long, device=ids.device) if grids else None
        positions, delta = self.original(ids[None], mm_token_type_ids=types[None], image_grid_thw=grid)
        value = (positions[:, 0], delta.reshape(()))
        self.entries[key] = value
        if len(self.entries) > self.max_rows:
            self.entries.popitem(last=False)
        return value


def install_rope_memo(inner: nn.Module) -> RopeIndexMemo | None:
    """Memoise ``inner.get_rope_index`` where the model has one (Qwen families); idempotent."""
    if not hasattr(inner, "get_rope_index"):
        return None
    if (memo := getattr(inner, MEMO_ATTR, None)) is not None:
        return memo
    memo = RopeIndexMemo(inner.get_rope_index)
    inner.get_rope_index = memo  # an instance attribute: compute_3d_position_ids calls self.get_rope_index
    setattr(inner, MEMO_ATTR, memo)
    return memo


def remove_rope_memo(inner: nn.Module) -> None:
    """The model's own ``get_rope_index`` again (for speed comparisons)."""
    if getattr(inner, MEMO_ATTR, None) is not None:
        del inner.get_rope_index
        delattr(inner, MEMO_ATTR)
