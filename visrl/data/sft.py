"""SFT warm-up data (VisRL §3.2, "SFT on a small box-annotated set"): both steps of the two-step format.

From each Visual-CoT record (synthetic or real) two rows are built:

* step 1 ``box``: [full image] + question -> the record's box written in the backbone's own box format;
* step 2 ``answer``: [full image, crop of the record's box] + question -> the answer.

The step-2 crop is cut from the box *as the model would write it* (formatted then parsed), so a backbone
whose format quantises boxes (the tiny grid format) is taught on the crops it will produce itself.
Rows longer than ``max_length`` tokens are dropped and counted, never truncated (truncation could cut
through image tokens); :class:`visrl.training.datamodules.RowsDataModule` serves the rows.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from visrl.data.errors import InputError
from visrl.data.images import crop_view, load_rgb, resolve, to_view
from visrl.data.prompts import PromptTemplates
from visrl.data.records import VisCoTRecord
from visrl.data.rows import Row

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
            raise ValueError(
                f"SFT record {i} ({rec.dataset}:{rec.question_id}) has no box (image[1] '###' suffix)"
            )
        image = load_rgb(resolve(image_root, rec.image_path))
        box = rec.box(image.size)
        box_text = fmt.format(box, image.size)
        full = to_view(image, size)
        if "box" in steps:
            prompt = enc.encode_prompt(templates.box_prompt(rec.question, full))
            rows.append(Row(prompt, (enc.encode_completion(box_text),), "box", rec.uid))
        if "answer" in steps:
            written = fmt.parse(box_text, image.size)
            crop = crop_view(image, written.box if written.ok else box, size)
            prompt = enc.encode_prompt(templates.answer_prompt(rec.question, full, crop))
            rows.append(Row(prompt, (enc.encode_completion(rec.answer),), "answer", rec.uid))
    return rows


def drop_long(rows: Sequence[Row], max_length: int) -> tuple[list[Row], Counter]:
    """Keep rows of at most ``max_length`` tokens; count the dropped ones per step."""
    kept = [r for r in rows if r.length <= max_length]
    dropped = Counter(r.step for r in rows if r.length > max_length)
    if dropped:
        log.warning(
            "dropped %d rows longer than %d tokens: %s", sum(dropped.values()), max_length, dict(dropped)
        )
    return kept, dropped


def check_fit(rows: Sequence[Row], kept: Sequence[Row], max_length: int, knob: str) -> None:
    """Stop with ONE line naming the config key when every row is longer than ``max_length`` tokens (images
    are never truncated: a too-small budget would otherwise end in an empty stage hours into a run)."""
    if rows and not kept:
        longest = max(r.length for r in rows)
        raise InputError(
            f"all {len(rows)} rows are longer than {knob}={max_length} tokens (longest {longest}): raise {knob}, "
            "or lower the image budget (model.max_pixels for Qwen backbones)"
        )
