"""SFT warm-up data (VisRL §3.2, "SFT on a small box-annotated set"): both steps of the two-step format.

From each Visual-CoT record (synthetic or real) two rows are built:

* step 1 ``box``: [full image] + question -> the record's box written in the backbone's own box format;
* step 2 ``answer``: [full image, crop of the record's box] + question -> the answer.

The step-2 crop is cut from the box *as the model would write it* (formatted then parsed), so a backbone
whose format quantises boxes (the tiny grid format) is taught on the crops it will produce itself.
Rows longer than ``max_length`` tokens are dropped and counted, never truncated (truncation could cut
through image tokens).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from visrl.data.images import crop_view, load_rgb, resolve, to_view
from visrl.data.prompts import PromptTemplates
from visrl.data.records import VisCoTRecord
from visrl.data.rows import Row, RowDataset, StepBucketSampler

log = logging.getLogger(__name__)


def sft_rows(
    records: Sequence[VisCoTRecord],
    image_root: Path | str,
    backbone,
    templates: PromptTemplates,
    steps: Sequence[str] = ("box", "answer"),
) -> list[Row]:
    """Encode the step-1 and step-2 rows of every record that has a box."""
    enc, fmt, size = backbone.encoder, backbone.box_format, backbone.image_size
    rows: list[Row] = []
    for i, rec in enumerate(records):
        if rec.box_px is None:
            raise ValueError(f"SFT record {i} ({rec.dataset}:{rec.question_id}) has no box (image[1] '###' suffix)")
        image = load_rgb(resolve(image_root, rec.image_path))
        box = rec.box(image.size)
        box_text = fmt.format(box, image.size)
        full = to_view(image, size)
        uid = f"{rec.dataset}:{rec.split}:{rec.question_id}"
        if "box" in steps:
            prompt = enc.encode_prompt(templates.box_prompt(rec.question, full))
            rows.append(Row(prompt, (enc.encode_completion(box_text),), "box", uid))
        if "answer" in steps:
            written = fmt.parse(box_text, image.size)
            crop = crop_view(image, written.box if written.ok else box, size)
            prompt = enc.encode_prompt(templates.answer_prompt(rec.question, full, crop))
            rows.append(Row(prompt, (enc.encode_completion(rec.answer),), "answer", uid))
    return rows


def drop_long(rows: Sequence[Row], max_length: int) -> tuple[list[Row], Counter]:
    """Keep rows of at most ``max_length`` tokens; count the dropped ones per step."""
    kept = [r for r in rows if r.length <= max_length]
    dropped = Counter(r.step for r in rows if r.length > max_length)
    if dropped:
        log.warning("dropped %d rows longer than %d tokens: %s", sum(dropped.values()), max_length, dict(dropped))
    return kept, dropped


class RowsDataModule(pl.LightningDataModule):
    """Serves encoded rows in step-bucketed batches; the collate function is the backbone encoder's."""

    def __init__(self, rows: Sequence[Row], encoder, batch_size: int, max_length: int = 1024, seed: int = 0,
                 val_rows: Sequence[Row] = ()):
        super().__init__()
        self.rows, self.dropped = drop_long(rows, max_length)
        if not self.rows:
            raise ValueError(f"no training rows left after dropping rows longer than max_length={max_length}")
        self.val_rows, _ = drop_long(val_rows, max_length)
        self.encoder = encoder
        self.batch_size = batch_size
        self.seed = seed

    def collate(self, rows: list[Row]) -> dict:
        return self.encoder.collate([r.prompt for r in rows], [r.completions[0] for r in rows], "right")

    def train_dataloader(self) -> DataLoader:
        sampler = StepBucketSampler(self.rows, self.batch_size, shuffle=True, seed=self.seed)
        return DataLoader(RowDataset(self.rows), batch_sampler=sampler, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_rows:
            return []
        sampler = StepBucketSampler(self.val_rows, self.batch_size, shuffle=False)
        return DataLoader(RowDataset(self.val_rows), batch_sampler=sampler, collate_fn=self.collate)
