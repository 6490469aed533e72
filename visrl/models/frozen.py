"""M_org: the frozen original model that scores candidates (VisRL §3.3 self-scoring, no external judge).

Under LoRA the frozen model is the adapter-disabled model (no second copy of 7B weights in memory); under
full fine-tuning it is a separate copy loaded from the saved SFT model, in eval mode, without gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from visrl.models.backbone import Backbone, freeze_vision, load_backbone
from visrl.models.policy import VLMPolicy


class AdapterDisabledPolicy(VLMPolicy):
    """A policy that runs every call with the LoRA adapter switched off: the base model's behaviour."""

    @contextmanager
    def _base(self) -> Iterator[None]:
        with self.model.disable_adapter():
            yield

    def generate(self, *args, **kwargs) -> list[list[str]]:
        with self._base():
            return super().generate(*args, **kwargs)

    def completion_logprobs(self, *args, **kwargs) -> torch.Tensor:
        with self._base():
            return super().completion_logprobs(*args, **kwargs)


def frozen_policy(backbone: Backbone, saved: Path, batch_size: int, memo_bytes: int = 0) -> VLMPolicy:
    """The frozen starting model as a policy: adapter-disabled under LoRA, else a copy from ``saved``
    (``memo_bytes``: its vision features memoised, :mod:`visrl.models.vision_memo`)."""
    if backbone.is_lora:
        return AdapterDisabledPolicy(backbone, batch_size=batch_size)
    frozen = load_backbone(saved)
    frozen.model.eval().requires_grad_(False)
    return VLMPolicy(freeze_vision(frozen, memo_bytes), batch_size=batch_size)
