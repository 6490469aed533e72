"""The per-family encoders: how an image becomes placeholder tokens and vision tensors.

:class:`~visrl.models.encoding.VLMEncoder` holds everything the families share (chat template, token ids,
caches, collation); each subclass here overrides only ``_process_image`` (vision tensors and the number of
placeholder tokens one image expands to) and ``processed_size`` (the frame box coordinates live in). The
family table (:mod:`visrl.models.families`) names the encoder of each family.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from visrl.models.encoding import VLMEncoder

__all__ = ["LlavaEncoder", "Qwen25Encoder", "QwenEncoder"]


class QwenEncoder(VLMEncoder):
    """Qwen2-VL and Qwen2.5-VL: dynamic-resolution patches, ``image_grid_thw``, ``mm_token_type_ids``."""

    uses_token_types = True

    def _process_image(self, image: Image.Image) -> tuple[dict[str, Tensor], int]:
        image = image.convert("RGB")
        out = self._fast_pixels(image) or self.image_processor(images=[image], return_tensors="pt")
        grid = out["image_grid_thw"]  # [1, 3]
        merge = self.image_processor.merge_size
        n_tokens = int(grid.prod().item()) // (merge * merge)
        return {
            "pixel_values": out["pixel_values"],
            "image_grid_thw": grid,
        }, n_tokens  # [n_patches, D], [1, 3]

    def _fast_pixels(self, image: Image.Image) -> dict[str, Tensor] | None:
        """Bit-exact shortcut of the PIL Qwen processor for an image it would not resize (~10x faster).

        The tiny pipeline resizes every image and crop to ``image_size`` first, so this is the hot path of
        rollouts; anything else (other sizes, other processors) goes through the processor itself.
        """
        from transformers import Qwen2VLImageProcessorPil
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = self.image_processor
        if type(ip) is not Qwen2VLImageProcessorPil or not (ip.do_rescale and ip.do_normalize):
            return None
        w, h = image.size
        patch, merge, temporal = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        size = ip.size
        if (h, w) != smart_resize(h, w, patch * merge, size["shortest_edge"], size["longest_edge"]):
            return None
        pixels = (np.asarray(image).astype(np.float64) * ip.rescale_factor).astype(np.float32)  # [H, W, 3]
        mean = np.array(ip.image_mean, dtype=np.float32)
        std = np.array(ip.image_std, dtype=np.float32)
        pixels = ((pixels - mean) / std).transpose(2, 0, 1)  # [3, H, W]
        patches, gh, gw = ip.patchify(
            pixels, patch_size=patch, merge_size=merge, temporal_patch_size=temporal
        )
        return {
            "pixel_values": torch.from_numpy(np.ascontiguousarray(patches)),  # [gh*gw, 3*T*p*p]
            "image_grid_thw": torch.tensor([[1, gh, gw]], dtype=torch.long),
        }

    def processed_size(self, image: Image.Image) -> tuple[int, int]:
        grid = self.image_features(image)[0]["image_grid_thw"][0]
        patch = self.image_processor.patch_size
        return int(grid[2]) * patch, int(grid[1]) * patch


class Qwen25Encoder(QwenEncoder):
    """Qwen2.5-VL: same tensors as Qwen2-VL (window attention is inside the model)."""


class LlavaEncoder(VLMEncoder):
    """LLaVA(-1.5): fixed-size square images, CLS token dropped by the "default" feature strategy."""

    def __init__(
        self,
        processor: Any,
        end_of_turn: str | None = None,
        cache_size: int = 512,
        pad_to_square: bool = True,
        *,
        cache_bytes: int = 1 << 30,
        chat_template: str | None = None,
        image_strings: Sequence[str] = (),
    ) -> None:
        super().__init__(
            processor,
            end_of_turn,
            cache_size,
            cache_bytes=cache_bytes,
            chat_template=chat_template,
            image_strings=image_strings,
        )
        self.pad_to_square = pad_to_square

    def _square(self, image: Image.Image) -> Image.Image:
        """Pad to a square with the normalisation mean colour (LLaVA's ``expand2square``: ``int(m * 255)``),
        centred."""
        image = image.convert("RGB")
        w, h = image.size
        if w == h or not self.pad_to_square:
            return image
        mean = getattr(self.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        side = max(w, h)
        canvas = Image.new(
            "RGB", (side, side), tuple(int(m * 255) for m in mean)
        )  # LLaVA's own (int, not round)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        return canvas

    def _process_image(self, image: Image.Image) -> tuple[dict[str, Tensor], int]:
        pixels = self.image_processor(images=[self._square(image)], return_tensors="pt")[
            "pixel_values"
        ]  # [1,3,H,W]
        patch = self.processor.patch_size
        n_tokens = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
        n_tokens += getattr(self.processor, "num_additional_image_tokens", 0) or 0
        if getattr(self.processor, "vision_feature_select_strategy", "default") == "default":
            n_tokens -= 1
        return {"pixel_values": pixels}, n_tokens

    def processed_size(self, image: Image.Image) -> tuple[int, int]:
        pixels = self.image_features(image)[0]["pixel_values"]
        return int(pixels.shape[-1]), int(pixels.shape[-2])
