"""Log-probs of DPO pairs, with the shared prompt (and its images) encoded once per pair.

Why: step-level DPO (VisRL §3.4) scores two completions of the *same* prompt per pair, and the prompt
dominates the sequence: a box-step prompt holds one image (16 tokens at the tiny scale, ~hundreds for the
7B models), an answer-step prompt two, while a box or an answer is a handful of tokens. The usual DPO
layout (TRL's) concatenates ``[prompt + chosen]`` and ``[prompt + rejected]`` as two rows, so the vision
tower and every decoder layer process each prompt twice.

Here a pair is *packed* into one row ``[prompt | chosen | rejected]`` with a block attention mask:

* prompt and chosen tokens attend causally, as usual;
* rejected tokens attend to the prompt and to earlier rejected tokens, never to chosen tokens;
* rejected tokens take the positions they would have right after the prompt (the same as chosen tokens'),
  for RoPE (LLaVA's Llama) and M-RoPE (Qwen2-VL / Qwen2.5-VL; text after the prompt advances all three
  axes by one);
* the first rejected token is predicted from the last prompt position, like the first chosen token.

Every completion token therefore sees exactly the keys, values and positions it sees in its own
unpacked row: the result is *mathematically identical* to :func:`visrl.models.logprobs.sequence_logps` on
the concatenated batch (numerically equal up to float summation order, tested at 1e-5 in
``tests/test_step_dpo.py``), for the loss and its gradient. It processes ``P + Cc + Cr`` tokens per pair
instead of ``2P + Cc + Cr`` and runs the vision tower once.

When it does not apply, :func:`pair_logps` falls back to the concatenated forward: chosen and rejected
prompts differ (``Row.rejected_prompt``, the "rejected on its own crop" ablation), or the attention kernel
takes no arbitrary 4-D mask (FlashAttention-2 on GPUs; ``sdpa`` and ``eager`` do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from visrl.models.logprobs import IGNORE_INDEX, sequence_logps

__all__ = ["PackedPairs", "pack_pairs", "packed_logps", "pair_logps", "supports_packing"]

TOKEN_FIELDS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "token_type_ids")
PACKABLE_ATTENTION = ("sdpa", "eager")
PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1


@dataclass
class PackedPairs:
    """B pairs packed as ``[prompt | chosen | rejected]`` rows, plus where each completion token is read."""

    inputs: dict[str, Tensor]  # model kwargs: input_ids [B, T], position_ids, mm_token_type_ids, vision
    segments: Tensor  # [B, T] PROMPT / CHOSEN / REJECTED / PAD
    rows: Tensor  # [N] output row of each completion token: pair i -> i (chosen) or B + i (rejected)
    predictors: Tensor  # [N] packed position whose logits predict the token
    batch_index: Tensor  # [N] packed row (pair) of each completion token
    targets: Tensor  # [N] token ids
    n: int  # number of pairs B


def _unwrap(model: nn.Module) -> nn.Module:
    """The ``PreTrainedModel`` under a ``peft.PeftModel`` (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_packing(model: nn.Module) -> bool:
    """Whether the model's attention accepts the custom 4-D mask (``sdpa`` / ``eager``)."""
    config = _unwrap(model).config
    text = getattr(config, "text_config", None)
    impls = {getattr(config, "_attn_implementation", None), getattr(text, "_attn_implementation", None)}
    return (impls - {None}) <= set(PACKABLE_ATTENTION)


def _split_rows(batch: dict[str, Tensor]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Each collated row -> (prompt ids [P], prompt mm types [P], completion ids [C]); padding removed."""
    types = batch.get("mm_token_type_ids")
    out = []
    for i in range(batch["input_ids"].shape[0]):
        valid = batch["attention_mask"][i].bool()  # [T]
        ids, labels = batch["input_ids"][i][valid], batch["labels"][i][valid]
        is_prompt = labels == IGNORE_INDEX
        n_prompt = int(is_prompt.sum())
        if bool(is_prompt[n_prompt:].any()):
            raise ValueError(f"pack_pairs: row {i} has prompt tokens after its completion")
        row_types = types[i][valid][:n_prompt] if types is not None else torch.zeros_like(ids[:n_prompt])
        out.append((ids[:n_prompt], row_types, ids[n_prompt:]))
    return out


def _shared_vision(batch: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """The vision fields of the chosen half, or None when the rejected half holds other images."""
    vision = {}
    for key, value in batch.items():
        if key in TOKEN_FIELDS or not isinstance(value, Tensor):
            continue
        half = value.shape[0] // 2
        if value.shape[0] % 2 or not torch.equal(value[:half], value[half:]):
            return None
        vision[key] = value[:half]
    return vision


def _prompt_positions(
    model: nn.Module, prompts: list[tuple[Tensor, Tensor]], vision: dict[str, Tensor]
) -> Tensor:
    """Position ids of each prompt (right padded): ``[3, B, Pmax]`` M-RoPE or ``[1, B, Pmax]`` 1-D RoPE.

    Qwen models compute M-RoPE positions with their own ``get_rope_index`` (images get 3-D grid positions,
    text continues from the largest one); other models count tokens.
    """
    width = max(len(p) for p, _ in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # [B, Pmax]
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for i, (p, t) in enumerate(prompts):
        ids[i, : len(p)], types[i, : len(p)], mask[i, : len(p)] = p, t, 1
    rope_index = getattr(getattr(_unwrap(model), "model", None), "get_rope_index", None)
    if rope_index is None or "image_grid_thw" not in vision:
        return (torch.arange(width)[None, :] * mask)[None]  # [1, B, Pmax]
    device = vision["image_grid_thw"].device
    positions, _ = rope_index(
        input_ids=ids.to(device),
        mm_token_type_ids=types.to(device),
        image_grid_thw=vision["image_grid_thw"],
        attention_mask=mask.to(device),
    )
    return positions.cpu()  # [3, B, Pmax]


def _layout(rows: list[tuple[Tensor, Tensor, Tensor, Tensor]], positions: Tensor) -> dict[str, Tensor]:
    """Packed tensors of B pairs ``(prompt ids, prompt types, chosen ids, rejected ids)``; see the module doc."""
    n, axes = len(rows), positions.shape[0]
    width = max(len(p) + len(c) + len(r) for p, _, c, r in rows)
    out = {
        "input_ids": torch.zeros(n, width, dtype=torch.long),  # [B, T]
        "mm_token_type_ids": torch.zeros(n, width, dtype=torch.long),  # [B, T]
        "position_ids": torch.zeros(axes, n, width, dtype=torch.long),  # [A, B, T]
        "segments": torch.full((n, width), PAD, dtype=torch.long),  # [B, T]
    }
    rows_out, predictors, pairs, targets = [], [], [], []
    for i, (p, t, c, r) in enumerate(rows):
        P, C, R = len(p), len(c), len(r)
        out["input_ids"][i, : P + C + R] = torch.cat([p, c, r])
        out["mm_token_type_ids"][i, :P] = t
        first = positions[:, i, :P].amax(dim=1, keepdim=True) + 1  # [A, 1] first position after the prompt
        pos = out["position_ids"][:, i]  # [A, T] view
        pos[:, :P] = positions[:, i, :P]
        pos[:, P : P + C] = first + torch.arange(C)  # chosen and rejected both start right after the prompt
        pos[:, P + C : P + C + R] = first + torch.arange(R)
        seg = out["segments"][i]
        seg[:P], seg[P : P + C], seg[P + C : P + C + R] = PROMPT, CHOSEN, REJECTED
        # chosen token j (at P + j) is predicted at P + j - 1; rejected token j at P - 1 (j = 0), else P + C + j - 1
        predictors += [
            P - 1 + torch.arange(C),
            torch.cat([torch.tensor([P - 1]), P + C + torch.arange(max(R - 1, 0))])[:R],
        ]
        rows_out += [torch.full((C,), i), torch.full((R,), n + i)]
        pairs += [torch.full((C + R,), i)]
        targets += [c, r]
    out.update(
        rows=torch.cat(rows_out),
        predictors=torch.cat(predictors),
        batch_index=torch.cat(pairs),
        targets=torch.cat(targets),
    )
    return out


def pack_pairs(model: nn.Module, batch: dict[str, Tensor], n: int) -> PackedPairs | None:
    """Pack a chosen-then-rejected batch of ``2n`` rows into ``n`` rows; None when pairs do not share
    their prompt (token ids or images differ) or the batch has token fields this packing does not carry."""
    if batch["input_ids"].shape[0] != 2 * n:
        raise ValueError(
            f"pack_pairs: the batch has {batch['input_ids'].shape[0]} rows, expected 2 * n = {2 * n}"
        )
    if "token_type_ids" in batch:
        return None
    rows = _split_rows({k: v.cpu() if k in TOKEN_FIELDS else v for k, v in batch.items()})
    chosen, rejected = rows[:n], rows[n:]
    if any(not torch.equal(c[0], r[0]) for c, r in zip(chosen, rejected)):
        return None
    vision = _shared_vision(batch)
    if vision is None:
        return None
    positions = _prompt_positions(model, [(c[0], c[1]) for c in chosen], vision)  # [A, B, Pmax]
    packed = _layout([(*c, r[2]) for c, r in zip(chosen, rejected)], positions)
    device = batch["input_ids"].device
    packed = {k: v.to(device) for k, v in packed.items()}
    inputs = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
    if positions.shape[0] == 1:
        inputs["position_ids"] = inputs["position_ids"][0]  # [B, T] for 1-D RoPE
    if "mm_token_type_ids" in batch:
        inputs["mm_token_type_ids"] = packed["mm_token_type_ids"]
    return PackedPairs(
        inputs={**inputs, **vision},
        segments=packed["segments"],
        rows=packed["rows"],
        predictors=packed["predictors"],
        batch_index=packed["batch_index"],
        targets=packed["targets"],
        n=n,
    )


def _block_mask(segments: Tensor, dtype: torch.dtype, boolean: bool) -> Tensor:
    """``[B, 1, T, T]`` mask: causal, no padding keys, rejected queries never see chosen keys."""
    idx = torch.arange(segments.shape[1], device=segments.device)
    causal = idx[:, None] >= idx[None, :]  # [T, T]
    q, k = segments[:, :, None], segments[:, None, :]  # [B, T, 1], [B, 1, T]
    allowed = causal[None] & (k != PAD) & ~((q == REJECTED) & (k == CHOSEN))  # [B, T, T]
    if boolean:
        return allowed[:, None]
    zero = torch.zeros((), dtype=dtype, device=segments.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def packed_logps(model: nn.Module, packed: PackedPairs) -> tuple[Tensor, Tensor]:
    """(summed completion log-probs [2B] fp32, completion token counts [2B]); rows [:B] chosen, [B:] rejected."""
    config = _unwrap(model).config
    impl = getattr(getattr(config, "text_config", config), "_attn_implementation", "sdpa")
    dtype = next(model.parameters()).dtype
    mask = _block_mask(packed.segments, dtype, boolean=impl == "sdpa")
    width = packed.segments.shape[1]
    first = int(packed.predictors.min()) if packed.predictors.numel() else width - 1
    keep = width - first  # logits for positions first .. T-1 only
    logits = model(**packed.inputs, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
    picked = logits[packed.batch_index, packed.predictors - first]  # [N, V], model dtype
    token_logps = picked.gather(-1, packed.targets[:, None]).squeeze(-1).float() - torch.logsumexp(
        picked.float(), dim=-1
    )  # [N]
    sums = torch.zeros(2 * packed.n, dtype=token_logps.dtype, device=logits.device)
    counts = torch.zeros(2 * packed.n, dtype=torch.long, device=logits.device)
    sums = sums.index_add(0, packed.rows, token_logps)
    counts = counts.index_add(0, packed.rows, torch.ones_like(packed.rows))
    return sums, counts


def pair_logps(
    model: nn.Module, batch: dict[str, Tensor], n: int, share_prompt: bool = True
) -> tuple[Tensor, Tensor]:
    """Summed log-probs [2n] and token counts [2n] of a chosen-then-rejected batch of ``2n`` rows.

    Packs pairs that share their prompt (see the module docstring), else one concatenated forward.
    """
    if share_prompt and supports_packing(model):
        packed = pack_pairs(model, batch, n)
        if packed is not None:
            return packed_logps(model, packed)
    return sequence_logps(model, batch)
