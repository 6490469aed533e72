"""What the stages need of a policy and its encoder, as Protocols (structural types, no inheritance).

Rollouts, scorers, training and benchmarks take these instead of the concrete
:class:`visrl.models.policy.VLMPolicy` / :class:`visrl.models.encoding.VLMEncoder`, so test doubles and
other implementations fit without subclassing; a type checker verifies the concrete classes against them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from torch import Tensor, nn

from visrl.data.box_formats import BoxFormat
from visrl.data.prompts import Prompt

__all__ = ["BackboneView", "Encoder", "Policy"]


class Encoder(Protocol):
    """Turns prompts and completions into token ids and batches (``visrl.models.encoding.VLMEncoder``)."""

    def encode_prompt(self, prompt: Prompt) -> Any: ...  # an EncodedPrompt

    def encode_completion(self, text: str) -> list[int]: ...

    def collate(
        self,
        prompts: Sequence[Any],
        completions: Sequence[list[int]] | None = None,
        padding_side: str = "right",
    ) -> dict[str, Tensor]: ...


class BackboneView(Protocol):
    """The parts of :class:`visrl.models.backbone.Backbone` a stage reads."""

    @property
    def encoder(self) -> Encoder: ...

    @property
    def box_format(self) -> BoxFormat: ...

    @property
    def image_size(self) -> int | None: ...


class Policy(Protocol):
    """A model that writes text for prompts and scores completions (``VLMPolicy``; M_org is one too)."""

    @property
    def backbone(self) -> BackboneView: ...

    @property
    def model(self) -> nn.Module: ...

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        num_return_sequences: int = 1,
        seed: int | None = None,
    ) -> list[list[str]]: ...

    def completion_logprobs(
        self, prompts: Sequence[Prompt], completions: Sequence[str], reduction: str = "sum"
    ) -> Tensor: ...
