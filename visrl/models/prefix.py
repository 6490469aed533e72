"""Shared prompt prefixes of a generation batch: which rows share one, and the padded row layout.

Why: a VisRL rollout chunk (paper §3.3) asks for K samples of every step-1 prompt and answers K step-2
prompts per question that agree up to their crop (same question, same full view). Hugging Face's
``generate`` repeats each prompt K times and prefills every copy. :class:`~visrl.models.policy.VLMPolicy`
instead prefills each shared prefix once and copies its KV cache; this module decides the groups and lays
the rows out as ``[pad][shared prefix][pad][own suffix]`` so that every group's prefix ends at the same
column. Pure list arithmetic on encoded prompts; no model here.

Two prompts share a token only where their texts AND images agree: an image's placeholder tokens are
compared as (image object, offset) keys, so the same text over different crops never matches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from visrl.models.encoding import EncodedPrompt

_SPAN = 1 << 20  # placeholder k of an image with slot s has the identity -(s * _SPAN + k + 1)

Group = tuple[list[int], int]  # (consecutive prompt indices, shared prefix length in tokens)


def image_spans(encoded: EncodedPrompt, n_tokens: Sequence[int], image_token: int) -> list[tuple[int, int]]:
    """(start, length) of each image's placeholder span; lengths delimit spans, so touching spans are fine."""
    spans, pos = [], 0
    for n in n_tokens:
        pos = encoded.input_ids.index(image_token, pos)
        spans.append((pos, n))
        pos += n
    return spans


def identities(
    encoded: Sequence[EncodedPrompt],
    images: Sequence[Sequence[Image.Image]],
    spans: Sequence[Sequence[tuple[int, int]]],
) -> list[list[int]]:
    """Per prompt, its token ids with image placeholders replaced by negative (image object, offset) keys."""
    slots: dict[int, int] = {}
    out = []
    for enc, ims, prompt_spans in zip(encoded, images, spans):
        ident = list(enc.input_ids)
        for im, (start, n) in zip(ims, prompt_spans):
            slot = slots.setdefault(id(im), len(slots))
            ident[start : start + n] = [-(slot * _SPAN + k + 1) for k in range(n)]
        out.append(ident)
    return out


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b`` (at most ``limit``), moved back to the start of an
    image span it would cut: an image is either wholly in a prefix or wholly after it."""
    n = 0
    for x, y in zip(a[:limit], b[:limit]):
        if x != y:
            break
        n += 1
    if n < len(a) and a[n] < 0:
        n -= (-a[n] - 1) % _SPAN  # offset of the span token at n
    return n


def shared_prefix_groups(idents: list[list[int]], copies: int) -> list[Group] | None:
    """Consecutive prompts grouped by a shared prefix, or None when nothing is shared.

    Each prompt stands for ``copies`` rows. A group's prefix is prefilled once and each row prefills the
    rest of its prompt; a prompt joins the current group when that prefills fewer tokens than a group of
    its own would. A prefix always leaves every prompt at least its last token (the position whose
    logits give the first new token).
    """
    groups: list[Group] = []
    for i, ident in enumerate(idents):
        own = common_prefix(ident, ident, len(ident) - 1)  # the prefix of a group of its own
        if groups:
            members, cut = groups[-1]
            new = common_prefix(idents[members[0]], ident, min(cut, len(ident) - 1))
            # prefill tokens if joined: the prefix shrinks by cut - new, every member row's suffix grows
            joined = (new - cut) + len(members) * copies * (cut - new) + copies * (len(ident) - new)
            if new >= 1 and joined < own + copies * (len(ident) - own):
                groups[-1] = (members + [i], new)
                continue
        groups.append(([i], own))
    if any(cut < 1 for _, cut in groups) or (copies == 1 and all(len(m) == 1 for m, _ in groups)):
        return None
    return groups


def shared_layout(
    encoded: Sequence[EncodedPrompt], groups: Sequence[Group], pad: int
) -> tuple[Tensor, Tensor, Tensor, int]:
    """One row per prompt, ``[pad][shared prefix][pad][own suffix]``: input ids, attention mask and token
    types (0 for text and padding) [n, L], and the prefix width P (every group's prefix ends at column P)."""
    width = max(cut for _, cut in groups)
    tail = max(len(encoded[i].input_ids) - cut for members, cut in groups for i in members)
    ids, mask, types = [], [], []
    for members, cut in groups:
        for i in members:
            e = encoded[i]
            own = len(e.input_ids) - cut
            t = e.token_type_ids or [0] * len(e.input_ids)
            gap_p, gap_s = width - cut, tail - own
            ids.append([pad] * gap_p + e.input_ids[:cut] + [pad] * gap_s + e.input_ids[cut:])
            mask.append([0] * gap_p + [1] * cut + [0] * gap_s + [1] * own)
            types.append([0] * gap_p + t[:cut] + [0] * gap_s + t[cut:])
    return (
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(mask, dtype=torch.long),
        torch.tensor(types, dtype=torch.long),
        width,
    )
