"""Step-level DPO rows of an iteration's pairs (VisRL §3.4): two encoded rows per :class:`Pair`.

The reference's step-level DPO trains two rows per pair:

* step 1 ``box``: [full view] + question -> (chosen box text, rejected box text);
* step 2 ``answer``: [full view, crop of the CHOSEN box] + question -> (chosen answer, rejected answer).
  The reference scores both answers on the chosen crop even though the rejected one was generated on its
  own crop; ``rejected_own_crop=True`` conditions the rejected answer on its own crop instead (then
  ``Row.rejected_prompt`` holds that second prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from visrl.data.images import crop_view, load_rgb, resolve, to_view
from visrl.data.prompts import PromptTemplates
from visrl.data.rows import Row
from visrl.models.protocols import BackboneView
from visrl.rollout.pairs import Pair

__all__ = ["STEPS", "preference_rows"]

STEPS = ("box", "answer")


def preference_rows(
    pairs: Sequence[Pair],
    image_root: Path | str,
    backbone: BackboneView,
    templates: PromptTemplates,
    steps: Sequence[str] = STEPS,
    rejected_own_crop: bool = False,
) -> list[Row]:
    """Encode the step-1 (``box``) and step-2 (``answer``) DPO rows of every pair (module docstring)."""
    enc, size = backbone.encoder, backbone.image_size
    bad = sorted(set(steps) - set(STEPS))
    if bad:
        raise ValueError(f"preference_rows: unknown steps {bad}; valid: {list(STEPS)}")
    rows: list[Row] = []
    for pair in pairs:
        image = load_rgb(resolve(image_root, pair.image))
        full = to_view(image, size)
        if "box" in steps:
            prompt = enc.encode_prompt(templates.box_prompt(pair.question, full))
            completions = (enc.encode_completion(pair.chosen_step), enc.encode_completion(pair.rejected_step))
            rows.append(Row(prompt, completions, "box", pair.uid))
        if "answer" in steps:
            chosen_crop = crop_view(image, pair.chosen_region, size)
            prompt = enc.encode_prompt(templates.answer_prompt(pair.question, full, chosen_crop))
            rejected_prompt = None
            if rejected_own_crop:
                own = crop_view(image, pair.rejected_region, size)
                rejected_prompt = enc.encode_prompt(templates.answer_prompt(pair.question, full, own))
            completions = (enc.encode_completion(pair.chosen), enc.encode_completion(pair.rejected))
            rows.append(Row(prompt, completions, "answer", pair.uid, rejected_prompt=rejected_prompt))
    return rows
