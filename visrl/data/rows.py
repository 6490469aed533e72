"""Encoded training rows and step-bucketed batching, shared by SFT, base preparation and step DPO.

A *row* is one prompt with one completion (SFT) or two completions (a DPO pair). Rows carry their
``step`` ("box" for step 1, "answer" for step 2, or a base-skill name) so batches never mix one-image
rows with two-image rows: mixing would pad every short row to the longest and waste most of the compute
(VisRL §3.2 trains the two steps on different inputs).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler


@dataclass
class Row:
    """One prompt and its completion(s), already tokenised.

    ``prompt`` is a ``visrl.models.encoding.EncodedPrompt``; ``completions`` holds one token list for SFT
    and two (chosen, rejected) for preference rows.
    """

    prompt: object
    completions: tuple[list[int], ...]
    step: str
    uid: str = ""
    # preference rows only: the rejected completion's own prompt when it differs from ``prompt`` (step-2
    # ``rejected_own_crop``), and precomputed reference log-probs (chosen, rejected)
    rejected_prompt: object | None = None
    ref_logps: tuple[float, float] | None = None

    @property
    def length(self) -> int:
        """Tokens of the longest sequence the row becomes (each completion with its own prompt)."""
        prompts = [self.prompt] * len(self.completions)
        if self.rejected_prompt is not None:
            prompts[1] = self.rejected_prompt
        return max(len(p.input_ids) + len(c) for p, c in zip(prompts, self.completions))


@dataclass
class PairBatch:
    """B preference rows of ONE step in one forward: what step-level DPO trains on.

    ``batch`` is the encoder's right-padded collate of 2B sequences: rows ``[:n]`` the chosen completions,
    ``[n:]`` the rejected ones (each rejected on its own prompt when the row has ``rejected_prompt``), e.g.
    ``input_ids`` [2B, T]. ``ref_chosen`` / ``ref_rejected`` [B] are the precomputed summed reference
    log-probs when the rows carry them.
    """

    step: str
    n: int
    batch: dict[str, Tensor]
    uids: list[str] = field(default_factory=list)
    ref_chosen: Tensor | None = None  # [B]
    ref_rejected: Tensor | None = None  # [B]

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen is not None and self.ref_rejected is not None

    def to(self, device: torch.device | str) -> PairBatch:
        """The batch with every tensor on ``device`` (Lightning's batch transfer)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PairBatch(
            self.step,
            self.n,
            {k: v.to(device) for k, v in self.batch.items()},
            list(self.uids),
            move(self.ref_chosen),
            move(self.ref_rejected),
        )


class Collator(Protocol):
    """What batching needs of a backbone encoder (``visrl.models.encoding``): its collate function."""

    def collate(
        self, prompts: Sequence[Any], completions: Sequence[list[int]], padding_side: str = "right"
    ) -> dict[str, Tensor]: ...


def pair_batch(rows: Sequence[Row], encoder: Collator, with_reference: bool = True) -> PairBatch:
    """B preference rows of one step -> a :class:`PairBatch` (chosen rows then rejected rows).

    The batch is ``encoder.collate``'d right-padded; reference log-probs are
    attached when every row carries them (a batch mixing rows with and without them is an error).
    """
    steps = {r.step for r in rows}
    if len(steps) != 1:
        raise ValueError(f"pair_batch: a batch must hold one step, got {sorted(steps)}")
    for i, r in enumerate(rows):
        if len(r.completions) != 2:
            raise ValueError(
                f"pair_batch: row {i} (uid {r.uid!r}) has {len(r.completions)} completions, not 2"
            )
    prompts = [r.prompt for r in rows] + [r.rejected_prompt or r.prompt for r in rows]
    completions = [r.completions[0] for r in rows] + [r.completions[1] for r in rows]
    out = PairBatch(
        rows[0].step, len(rows), encoder.collate(prompts, completions, "right"), [r.uid for r in rows]
    )
    with_ref = [r.ref_logps is not None for r in rows]
    if with_reference and any(with_ref) and not all(with_ref):
        raise ValueError("pair_batch: some rows of the batch carry reference log-probs and some do not")
    if with_reference and all(with_ref):
        out.ref_chosen = torch.tensor([r.ref_logps[0] for r in rows], dtype=torch.float32)  # type: ignore[index]
        out.ref_rejected = torch.tensor([r.ref_logps[1] for r in rows], dtype=torch.float32)  # type: ignore[index]
    return out


class RowDataset(Dataset):
    def __init__(self, rows: Sequence[Row]):
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Row:
        return self.rows[i]


class StepBucketSampler(Sampler[list[int]]):
    """Batches of row indices that share a step and have similar lengths.

    Each epoch: shuffle within a step, cut into chunks of ``batch_size * 8``, sort each chunk by length,
    cut into batches, shuffle the batches. Deterministic for a given ``seed`` and epoch.
    """

    def __init__(self, rows: Sequence[Row], batch_size: int, shuffle: bool = True, seed: int = 0):
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.by_step: dict[str, list[int]] = defaultdict(list)
        self.lengths = [r.length for r in rows]
        for i, r in enumerate(rows):
            self.by_step[r.step].append(i)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 100_003 + self.epoch)
        batches: list[list[int]] = []
        for step in sorted(self.by_step):
            idx = list(self.by_step[step])
            if self.shuffle:
                rng.shuffle(idx)
            chunk = self.batch_size * 8
            for c in range(0, len(idx), chunk):
                part = sorted(idx[c : c + chunk], key=self.lengths.__getitem__)
                batches += [part[b : b + self.batch_size] for b in range(0, len(part), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return sum(-(-len(v) // self.batch_size) for v in self.by_step.values())
