"""Prompts and completions -> model tensors, one encoder per VLM family.

Why: every consumer of a backbone (SFT and step-level DPO data, rollouts, scorers, benchmarks; paper §3)
turns a :class:`~visrl.data.prompts.Prompt` (turns of text and PIL images) plus a completion string into the
exact tensors the Hugging Face model expects. Families differ only in how an image becomes placeholder
tokens and vision tensors (the per-family subclasses are in :mod:`visrl.models.family_encoders`):

* Qwen2-VL / Qwen2.5-VL: the image processor returns flattened patches ``pixel_values`` [n_patches, C*T*p*p]
  and ``image_grid_thw`` [1, 3]; the chat template writes one ``<|image_pad|>`` per image, which is expanded
  to ``t*h*w / merge²`` copies; ``mm_token_type_ids`` (0 text, 1 image) is required for M-RoPE in both
  forward and generate.
* LLaVA: ``pixel_values`` [1, 3, H, W]; one ``<image>`` becomes ``(H/p)*(W/p) + extra - (1 if CLS dropped)``
  copies. Non-square images are padded to a square (LLaVA-1.5's "pad" aspect mode, the frame VisCoT's
  boxes live in) instead of the processor's centre crop, which would break box coordinates.

The code only uses the processor API (``processor.tokenizer``, ``processor.image_processor``,
``processor.chat_template``, LLaVA's ``patch_size`` / ``num_additional_image_tokens`` /
``vision_feature_select_strategy``), so it serves the tiny and the real 7B processors alike. Processed
pixels are cached per image object, so an image shared by N sampled candidates is processed once, and
token ids per prompt text, so the N answer prompts of a question (same text, other crops) are rendered
and tokenized once.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from visrl.data.prompts import Prompt

IGNORE_INDEX = -100


@dataclass
class EncodedPrompt:
    """A prompt as token ids (image placeholders expanded) plus its vision tensors."""

    input_ids: list[int]
    token_type_ids: list[int] | None  # mm_token_type_ids (0 text, 1 image) for the Qwen families
    vision: dict[str, Tensor]  # e.g. pixel_values, image_grid_thw; concatenated over the prompt's images


class VLMEncoder:
    """Family-independent encoding; subclasses define how one image becomes tensors and tokens.

    Text that is not the template's own (question text, model-written text) never creates special tokens
    it should not: ``image_strings`` (e.g. ``<image>``, ``<|image_pad|>``) written by a model stay plain text,
    so a re-encoded answer can never ask for an image the row does not have, while the family's other special
    tokens a model writes (Qwen2-VL's ``<|box_start|>``) stay single tokens; user (question) text is escaped
    for every special token. ``escaped_texts`` counts the texts that needed it.
    """

    uses_token_types = False

    def __init__(
        self,
        processor: Any,
        end_of_turn: str | None = None,
        cache_size: int = 512,
        *,
        cache_bytes: int = 1 << 30,
        chat_template: str | None = None,
        image_strings: Sequence[str] = (),
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.chat_template = (
            chat_template or getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        )
        if self.chat_template is None:
            raise ValueError(f"{type(self).__name__}: the processor and its tokenizer have no chat template")
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.image_strings = tuple(dict.fromkeys([*image_strings, self.image_token]))
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {})
        self.special_strings = tuple(
            dict.fromkeys([*self.image_strings, *(t.content for t in decoder.values() if t.special)])
        )
        self.escaped_texts = 0  # question or model texts that held a special-token string (escaped)
        if end_of_turn is None:
            vocab = self.tokenizer.get_vocab()
            end_of_turn = "<|im_end|>" if "<|im_end|>" in vocab else self.tokenizer.eos_token
        self.end_of_turn = end_of_turn
        self.end_of_turn_ids: list[int] = self.tokenizer(end_of_turn, add_special_tokens=False).input_ids
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        stops = {self.end_of_turn_ids[-1], self.tokenizer.eos_token_id, self.pad_token_id}
        self.stop_token_ids: list[int] = sorted(i for i in stops if i is not None)
        self._cache: OrderedDict[int, tuple[Image.Image, dict[str, Tensor], int]] = OrderedDict()
        self._cache_size = cache_size
        self._cache_bytes = cache_bytes
        self._cached_bytes = 0
        self._texts: OrderedDict[tuple, list[int]] = OrderedDict()  # conversation text -> token ids

    # ---- per-image work (family specific) -------------------------------------------------------------
    def _process_image(self, image: Image.Image) -> tuple[dict[str, Tensor], int]:
        """One image -> (vision tensors with a leading per-image dim, number of placeholder tokens)."""
        raise NotImplementedError

    def processed_size(self, image: Image.Image) -> tuple[int, int]:
        """(W, H) of the image as the model sees it after processing (Qwen2.5-VL boxes use this frame)."""
        raise NotImplementedError

    def image_features(self, image: Image.Image) -> tuple[dict[str, Tensor], int]:
        """Cached :meth:`_process_image`; the cache keeps the image alive so its id is never reused.

        Least recently used entries go beyond ``cache_size`` images or ``cache_bytes`` of tensors (a chunk
        of rollouts touches its views and every crop several times; large real images are big).
        """
        key = id(image)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is image:
            self._cache.move_to_end(key)
            return hit[1], hit[2]
        vision, n_tokens = self._process_image(image)
        self._cache[key] = (image, vision, n_tokens)
        self._cached_bytes += _nbytes(vision)
        while len(self._cache) > 1 and (
            len(self._cache) > self._cache_size or self._cached_bytes > self._cache_bytes
        ):
            self._cached_bytes -= _nbytes(self._cache.popitem(last=False)[1][1])
        return vision, n_tokens

    # ---- prompts --------------------------------------------------------------------------------------
    @staticmethod
    def conversation(prompt: Prompt) -> list[dict[str, Any]]:
        """Prompt -> chat-template messages with structured content (images keep their place)."""
        messages = []
        for message in prompt:
            content = [
                {"type": "text", "text": p} if isinstance(p, str) else {"type": "image"}
                for p in message.parts
            ]
            messages.append({"role": message.role, "content": content})
        return messages

    def encode_prompt(self, prompt: Prompt) -> EncodedPrompt:
        if not prompt or prompt[-1].role != "user":
            raise ValueError(
                f"{type(self).__name__}.encode_prompt: a prompt must end with a user turn, got {prompt!r}"
            )
        ids = self._prompt_ids(prompt)
        images = [im for message in prompt for im in message.images]
        n_markers = ids.count(self.image_token_id)
        if n_markers != len(images):
            raise ValueError(
                f"{type(self).__name__}.encode_prompt: the rendered prompt has {n_markers} image tokens "
                f"{self.image_token!r} but the prompt holds {len(images)} images (text: {self._render(prompt)[:200]!r})"
            )
        features = [self.image_features(im) for im in images]
        expanded: list[int] = []
        types: list[int] = []
        next_image = 0
        for tok in ids:
            if tok == self.image_token_id:
                n = features[next_image][1]
                expanded.extend([tok] * n)
                types.extend([1] * n)
                next_image += 1
            else:
                expanded.append(tok)
                types.append(0)
        vision = {
            k: torch.cat([f[0][k] for f in features], dim=0) for k in (features[0][0] if features else {})
        }
        return EncodedPrompt(expanded, types if self.uses_token_types else None, vision)

    def _render(self, prompt: Prompt) -> str:
        """The rendered chat text (for messages)."""
        return self.tokenizer.apply_chat_template(
            self.conversation(prompt),
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of the rendered chat (one marker per image), cached by the prompt's text and image
        positions: the K prompts of a question differ only in their images."""
        key = tuple((m.role, tuple(p if isinstance(p, str) else None for p in m.parts)) for m in prompt)
        ids = self._texts.get(key)
        if ids is None:
            ids = self._tokenize_prompt(prompt)
            self._texts[key] = ids
            if len(self._texts) > 4 * self._cache_size:
                self._texts.popitem(last=False)
        else:
            self._texts.move_to_end(key)
        return list(ids)

    def _tokenize_prompt(self, prompt: Prompt) -> list[int]:
        """Render and tokenize; a text part holding a special-token string is cut out of the rendered text
        (a ``\\x00i\\x00`` sentinel) and tokenized escaped (user text: every special token; assistant text:
        the image strings). Prompts without such text take the plain path, unchanged."""
        escaped: list[tuple[str, tuple[str, ...]]] = []
        messages = self.conversation(prompt)
        for message in messages:
            protect = self.image_strings if message["role"] == "assistant" else self.special_strings
            for part in message["content"]:
                if part["type"] == "text" and any(s in part["text"] for s in protect):
                    escaped.append((part["text"], protect))
                    part["text"] = f"\x00{len(escaped) - 1}\x00"
        rendered = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )
        if not escaped:
            return self.tokenizer(rendered, add_special_tokens=True).input_ids
        pieces = re.split("\x00([0-9]+)\x00", rendered)
        ids = self.tokenizer(pieces[0], add_special_tokens=True).input_ids
        for i in range(1, len(pieces), 2):
            ids += self.protected_ids(*escaped[int(pieces[i])])
            ids += self.tokenizer(pieces[i + 1], add_special_tokens=False).input_ids if pieces[i + 1] else []
        return ids

    def protected_ids(self, text: str, protect: Sequence[str]) -> list[int]:
        """Token ids of ``text`` in which every string of ``protect`` is spelled as plain text (counted)."""
        pattern = "(" + "|".join(re.escape(s) for s in protect) + ")"
        pieces = re.split(pattern, text) if protect else [text]
        if len(pieces) > 1:
            self.escaped_texts += 1
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if piece:
                ids += self.tokenizer(
                    piece, add_special_tokens=False, split_special_tokens=bool(i % 2)
                ).input_ids
        return ids

    def encode_completion(self, text: str) -> list[int]:
        """Token ids of model-written ``text`` followed by the end-of-turn token(s).

        The family's own special tokens in it stay single tokens (a Qwen2-VL box is
        ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``); image strings stay text (never an image slot).
        """
        return self.protected_ids(text, self.image_strings) + self.end_of_turn_ids

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Decode generated ids, cut at the first end-of-turn / eos / pad token, stripped.

        Special tokens before the cut are kept (a Qwen2-VL box is written with ``<|box_start|>``).
        """
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        stops = set(self.stop_token_ids)
        cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        return self.tokenizer.decode(ids[:cut], skip_special_tokens=False).strip()

    # ---- batches --------------------------------------------------------------------------------------
    def collate(
        self,
        prompts: Sequence[EncodedPrompt],
        completions: Sequence[list[int]] | None = None,
        padding_side: str = "right",
    ) -> dict[str, Tensor]:
        """Pad token-aligned fields to [B, T]; concatenate vision fields on dim 0; labels -100 off-completion."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"collate: padding_side must be 'left' or 'right', got {padding_side!r}")
        if completions is not None and len(completions) != len(prompts):
            raise ValueError(f"collate: {len(prompts)} prompts but {len(completions)} completions")
        rows, labels, types = [], [], []
        for i, p in enumerate(prompts):
            comp = list(completions[i]) if completions is not None else []
            rows.append(p.input_ids + comp)
            labels.append([IGNORE_INDEX] * len(p.input_ids) + comp)
            types.append((p.token_type_ids or [0] * len(p.input_ids)) + [0] * len(comp))
        width = max(len(r) for r in rows)

        def pad(seqs: list[list[int]], value: int) -> Tensor:
            out = []
            for s in seqs:
                fill = [value] * (width - len(s))
                out.append(fill + s if padding_side == "left" else s + fill)
            return torch.tensor(out, dtype=torch.long)  # [B, T]

        batch = {
            "input_ids": pad(rows, self.pad_token_id),
            "attention_mask": pad([[1] * len(r) for r in rows], 0),
        }
        if self.uses_token_types:
            batch["mm_token_type_ids"] = pad(types, 0)
        if completions is not None:
            batch["labels"] = pad(labels, IGNORE_INDEX)
        keys = {k for p in prompts for k in p.vision}
        for k in sorted(keys):
            batch[k] = torch.cat([p.vision[k] for p in prompts if k in p.vision], dim=0)
        return batch


def _nbytes(vision: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in vision.values())
