"""Learned 2-D absolute positions for the merged vision tokens of the tiny Qwen towers.

Why: the Qwen2-VL / Qwen2.5-VL towers carry only rotary positions, and a from-scratch tiny model then learns
"where is X" very slowly or not at all (measured on the synthetic zoom world). This departure from the
reference models (documented, tiny backbones only) adds a learned grid to the merged vision tokens: a
submodule of the visual tower (saved, trained, LoRA-frozen like the tower) applied by a forward hook; a base
grid is bilinearly resized to each image's merged grid, so crops with other aspect ratios get positions too.
It is saved in its own file (``abs_pos.safetensors``) beside the model weights, so the weights themselves
load with the plain transformers class.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

ABS_POS_ATTR = "abs_pos_embed"
ABS_POS_FILE = "abs_pos.safetensors"


class MergedGridPositionEmbedding(nn.Module):
    """Learned 2-D absolute positions for merged vision tokens, resized to any merged grid."""

    def __init__(self, dim: int, merge_size: int, base_grid: int = 8, init_std: float = 0.02) -> None:
        super().__init__()
        self.merge_size = merge_size
        self.base_grid = base_grid
        self.weight = nn.Parameter(torch.randn(dim, base_grid, base_grid) * init_std)  # [D, g, g]

    def forward(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """``grid_thw`` [N, 3] (patch grid per image) -> [sum_i t_i*h_i*w_i / merge², D], row-major."""
        chunks = []
        for t, h, w in grid_thw.tolist():
            hm, wm = h // self.merge_size, w // self.merge_size
            grid = self.weight
            if (hm, wm) != (self.base_grid, self.base_grid):
                grid = F.interpolate(grid[None], size=(hm, wm), mode="bilinear", align_corners=False)[0]
            chunks.append(grid.flatten(1).T.repeat(t, 1))  # [t*hm*wm, D]
        return torch.cat(chunks, dim=0)


def _add_abs_pos(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook on the Qwen visual tower: ``pooler_output`` [sum_tokens, D] += positions."""
    grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
    if grid_thw is None:
        raise ValueError("tiny.py abs-pos hook: the visual tower was called without grid_thw")
    pos = getattr(module, ABS_POS_ATTR)(grid_thw)
    output.pooler_output = output.pooler_output + pos.to(output.pooler_output.dtype)
    return output


def attach_abs_pos_embed(model: PreTrainedModel, base_grid: int = 8, init_std: float = 0.02) -> None:
    """Register the merged-grid position embedding on ``model.model.visual`` (idempotent)."""
    visual = model.model.visual
    if hasattr(visual, ABS_POS_ATTR):
        return
    dim = model.config.text_config.hidden_size
    merge = model.config.vision_config.spatial_merge_size
    param = next(visual.parameters())
    module = MergedGridPositionEmbedding(dim, merge, base_grid, init_std).to(
        device=param.device, dtype=param.dtype
    )
    visual.add_module(ABS_POS_ATTR, module)
    visual.register_forward_hook(_add_abs_pos, with_kwargs=True)


def abs_pos_module(model: PreTrainedModel) -> nn.Module | None:
    """The attached embedding of ``model``'s visual tower, or None."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    return getattr(visual, ABS_POS_ATTR, None) if visual is not None else None
