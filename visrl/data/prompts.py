"""Conversation types and the two-step prompt templates of VisRL (paper §3, Visual-CoT format).

A *prompt* is a list of :class:`Message` turns ending with a user turn; the model answers as the
assistant. Each turn holds text pieces and PIL images in order, so templates decide where the images
go (``<image>`` markers) without any backbone knowing about VisRL.

Templates are configuration (``conf/prompt/*.yaml``): the reference wording (``visrl``) is kept
verbatim; the tiny backbones use a question-first layout (measured at toy scale: with the image first, a
from-scratch tiny model sits on a loss plateau, since it must carry the image tokens until the question tells
it what to look for).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from PIL import Image

IMAGE_MARKER = "<image>"

Part = str | Image.Image


@dataclass(frozen=True)
class Message:
    """One chat turn: ``role`` and its parts (text pieces and images, in order)."""

    role: Literal["user", "assistant"]
    parts: tuple[Part, ...]

    @property
    def images(self) -> list[Image.Image]:
        return [p for p in self.parts if isinstance(p, Image.Image)]

    @property
    def text(self) -> str:
        """The text of the turn with each image shown as ``<image>`` (for logs and hashing)."""
        return "".join(p if isinstance(p, str) else IMAGE_MARKER for p in self.parts)


Prompt = list[Message]


def fill(template: str, images: Sequence[Image.Image], **fields: str) -> tuple[Part, ...]:
    """Format ``template`` with ``fields`` and put ``images`` at its ``<image>`` markers, in order.

    >>> fill("<image>\\n{question}", [img], question="Q?")  # doctest: +SKIP
    (img, "\\nQ?")
    """
    # markers are found in the template before the fields are filled in: a field (a question, a model's
    # answer) that contains "<image>" stays text and never becomes an image slot
    pieces = [piece.format(**fields) for piece in template.split(IMAGE_MARKER)]
    if len(pieces) - 1 != len(images):
        raise ValueError(
            f"prompt template {template!r} has {len(pieces) - 1} {IMAGE_MARKER} markers "
            f"but {len(images)} images were given"
        )
    parts: list[Part] = []
    for i, piece in enumerate(pieces):
        if piece:
            parts.append(piece)
        if i < len(images):
            parts.append(images[i])
    return tuple(parts)


def user(template: str, images: Sequence[Image.Image] = (), **fields: str) -> Message:
    return Message("user", fill(template, images, **fields))


def prompt_text(prompt: Prompt) -> str:
    """A readable one-string view of a prompt (images as ``<image>``)."""
    return "\n".join(f"{m.role}: {m.text}" for m in prompt)


@dataclass(frozen=True)
class PromptTemplates:
    """The two steps of the VisRL format.

    ``box``: step 1, one ``<image>`` (the full image) -> the model writes a box.
    ``answer``: step 2, two ``<image>`` markers (full image, then the crop) -> the model answers.
    ``direct``: one ``<image>``, answer without a box (Visual-CoT's ``direct`` mode).
    """

    box: str
    answer: str
    direct: str = "<image>\n{question}"

    def box_prompt(self, question: str, image: Image.Image) -> Prompt:
        return [user(self.box, [image], question=question)]

    def answer_prompt(self, question: str, image: Image.Image, crop: Image.Image) -> Prompt:
        return [user(self.answer, [image, crop], question=question)]

    def direct_prompt(self, question: str, image: Image.Image) -> Prompt:
        return [user(self.direct, [image], question=question)]


# The reference wording, verbatim: RL generation (VisRL data_gen/generate.py) and stage-2 DPO
# (visrl_stage2/data/aligner.py) share the step-1 prompt; step 2 appends "\n<image>" for the crop, with the
# images in the order [full image, crop].
VISRL_SUFFIX = (
    " Please first provide the bounding box coordinate of the region, then refer to the "
    "corresponding sub-image to answer the question better."
)
REFERENCE = PromptTemplates(
    box="<image>\n{question}" + VISRL_SUFFIX,
    answer="<image>\n{question}" + VISRL_SUFFIX + "\n<image>",
)
