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
from dataclasses import dataclass

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
