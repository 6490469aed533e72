"""Summed completion log-probabilities of a batch: the quantity every preference loss is built from.

Why: step-level DPO (paper §3, both stages) and the likelihood scorers compare log π(completion | prompt)
between policy and reference. Only completion tokens (``labels != -100``) count, each predicted from the
position before it. The computation is memory-lean: the model returns logits only for the trailing span
that contains completions (``logits_to_keep``), and the log-softmax normaliser is computed only at label
positions, so no [B, T, V] fp32 copy is ever made.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100


def sequence_logps(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Return (sum of completion-token log-probs [B] fp32, number of completion tokens [B] long).

    ``batch`` is a :meth:`VLMEncoder.collate` output with ``labels``; gradients flow when enabled.
    """
    if "labels" not in batch:
        raise KeyError("sequence_logps: the batch has no 'labels' (collate with completions)")
    labels = batch["labels"]  # [B, T]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    valid = labels != IGNORE_INDEX  # [B, T]
    if not bool(valid.any()):
        zeros = torch.zeros(labels.shape[0], device=labels.device)
        return zeros, torch.zeros_like(labels[:, 0])
    seq_len = labels.shape[1]
    first = int(valid.float().argmax(dim=1)[valid.any(dim=1)].min())  # earliest label position
    keep = seq_len - first + 1  # positions first-1 .. T-1 predict tokens first .. T-1 (and one beyond)
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # [B, keep, V]
    targets = labels[:, seq_len - keep + 1 :]  # [B, keep-1], aligned with logits[:, :-1]
    mask = targets != IGNORE_INDEX  # [B, keep-1]
    picked = logits[:, :-1][mask]  # [N, V], N = completion tokens in the batch (model dtype)
    token_ids = targets[mask]  # [N]
    token_logps = picked.gather(-1, token_ids[:, None]).squeeze(-1).float() - torch.logsumexp(
        picked.float(), dim=-1
    )
    rows = mask.nonzero()[:, 0]  # [N] row of each completion token
    sums = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=labels.device).index_add(
        0, rows, token_logps
    )
    return sums, mask.sum(dim=1)
