"""Preference pairs of one iteration (VisRL §3.3): the reference filter's choice among a question's candidates.

:func:`select_pairs` keeps at most one (chosen, rejected) :class:`Pair` per question with
:func:`visrl.rollout.filter.select_pair` and saves a PNG crop of both boxes. ``<iter_dir>/pairs.json``
holds them in VisRL's preference layout (:class:`visrl.data.pair_records.PreferenceRecord`: images, the step-1
human prompt, chosen/rejected box texts, chosen/rejected answers) plus our own keys to rebuild training rows
exactly (uid, image path and size, both canonical boxes, scores, crop files). ``crops/`` is for inspection:
training rows re-crop the original image, which gives the same pixels.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visrl.data.boxes import Box, crop_tight
from visrl.data.images import load_rgb, resolve
from visrl.data.pair_records import PreferenceRecord, make_preference_record, read_pairs, write_pairs
from visrl.data.prompts import PromptTemplates
from visrl.rollout.candidates import Candidate
from visrl.rollout.filter import (
    FilterConfig,
    FilterDecision,
    ScoredCandidate,
    over_budget,
    select_pair,
    shuffle_scores,
)

__all__ = ["CROPS", "PAIRS", "Pair", "group_by_question", "load_pairs", "save_pairs", "select_pairs"]

PAIRS = "pairs.json"
CROPS = "crops"
CROP_MIN_PX = 8  # the min_px of visrl.data.images.crop_view, so saved crops equal the training crops


@dataclass(frozen=True)
class Pair:
    """One step-level preference pair: two candidates of one question (chosen beat rejected)."""

    uid: str
    question_index: int
    question: str
    answer_gold: str
    image: str  # relative to the image root
    image_size: list[int]  # original (W, H)
    prompt: str  # the step-1 human prompt (VisRL's ``conversations[0]``)
    chosen_step: str  # box texts
    rejected_step: str
    chosen: str  # answers
    rejected: str
    chosen_index: int  # ``cand`` of each side
    rejected_index: int
    chosen_box: list[float]  # canonical xyxy
    rejected_box: list[float]
    chosen_synthetic: bool
    rejected_synthetic: bool
    chosen_scores: dict[str, float]  # {"answer", "crop"}
    rejected_scores: dict[str, float]
    chosen_crop: str  # PNG paths relative to the iteration directory
    rejected_crop: str

    @property
    def chosen_region(self) -> Box:
        return Box(*self.chosen_box)

    @property
    def rejected_region(self) -> Box:
        return Box(*self.rejected_box)

    def record(self) -> PreferenceRecord:
        """The pair in VisRL's preference layout, our fields as extra keys (pairs.json)."""
        core = {"prompt", "chosen_step", "rejected_step", "chosen", "rejected"}
        extra = {k: v for k, v in vars(self).items() if k not in core}
        return make_preference_record(
            images=[self.image],
            prompt=self.prompt,
            chosen_step=self.chosen_step,
            rejected_step=self.rejected_step,
            chosen=self.chosen,
            rejected=self.rejected,
            extra=extra,
        )

    @classmethod
    def from_record(cls, rec: PreferenceRecord) -> Pair:
        """A pair from a pairs.json record; a missing key is one error naming the file, record and field."""
        fields: dict[str, Any] = {
            "prompt": rec.prompt,
            "chosen_step": rec.chosen_step,
            "rejected_step": rec.rejected_step,
            "chosen": rec.chosen,
            "rejected": rec.rejected,
        }
        for name in cls.__dataclass_fields__:
            if name not in fields:
                if name not in rec.raw:
                    raise ValueError(
                        f"{rec.source}: record {rec.index}: field '{name}': missing (not written by select_pairs?)"
                    )
                fields[name] = rec.raw[name]
        return cls(**fields)


def save_pairs(pairs: Iterable[Pair], path: Path | str) -> None:
    write_pairs([p.record() for p in pairs], path)


def load_pairs(path: Path | str) -> list[Pair]:
    return [Pair.from_record(r) for r in read_pairs(path)]


def group_by_question(candidates: Iterable[Candidate]) -> dict[int, list[Candidate]]:
    """question_index -> its candidates in generation (cand) order, questions in index order."""
    groups: dict[int, list[Candidate]] = defaultdict(list)
    for c in candidates:
        groups[c.question_index].append(c)
    return {q: sorted(groups[q], key=lambda c: c.cand) for q in sorted(groups)}


def _save_crop(c: Candidate, image_root: Path | str, crops_dir: Path) -> str:
    """Save the crop of a candidate's box as PNG; return its path relative to the iteration dir."""
    name = f"q{c.question_index:06d}_c{c.cand:02d}.png"
    image = load_rgb(resolve(image_root, c.image))
    crop_tight(image, c.region, min_px=CROP_MIN_PX).save(crops_dir / name)
    return f"{CROPS}/{name}"


def _scores(c: Candidate) -> dict[str, Any]:
    return {"answer": c.answer_score, "crop": c.crop_score}


def make_pair(
    chosen: Candidate, rejected: Candidate, templates: PromptTemplates, crops: tuple[str, str]
) -> Pair:
    return Pair(
        uid=chosen.uid,
        question_index=chosen.question_index,
        question=chosen.question,
        answer_gold=chosen.answer_gold,
        image=chosen.image,
        image_size=chosen.image_size,
        prompt=templates.box.format(question=chosen.question),
        chosen_step=chosen.box_text,
        rejected_step=rejected.box_text,
        chosen=chosen.answer,  # type: ignore[arg-type]  # scored candidates have answers
        rejected=rejected.answer,  # type: ignore[arg-type]
        chosen_index=chosen.cand,
        rejected_index=rejected.cand,
        chosen_box=chosen.box,  # type: ignore[arg-type]  # scored candidates have boxes
        rejected_box=rejected.box,  # type: ignore[arg-type]
        chosen_synthetic=chosen.synthetic,
        rejected_synthetic=rejected.synthetic,
        chosen_scores=_scores(chosen),
        rejected_scores=_scores(rejected),
        chosen_crop=crops[0],
        rejected_crop=crops[1],
    )


def select_pairs(
    candidates: Sequence[Candidate],
    filter_cfg: FilterConfig,
    templates: PromptTemplates,
    out_dir: Path | str,
    image_root: Path | str,
) -> tuple[list[Pair], list[FilterDecision]]:
    """One pair per question by the reference filter, crops saved under ``out_dir/crops``.

    Candidates without both scores (unparsable boxes, unreadable judge replies) are ignored by the filter,
    as the reference drops ``None`` scores. ``filter_cfg.max_pairs`` keeps the first kept questions only
    (the rest: ``over_budget``); ``filter_cfg.shuffle_scores`` permutes each question's score pairs first
    (the matched random-score control). Deterministic: the same candidates give the same pairs. Returns the pairs
    and every question's filter decision (for the statistics).
    """
    crops_dir = Path(out_dir) / CROPS
    crops_dir.mkdir(parents=True, exist_ok=True)
    decisions: list[FilterDecision] = []
    pairs: list[Pair] = []
    for question, group in group_by_question(candidates).items():
        scored = [ScoredCandidate(c.cand, c.answer_score, c.crop_score) for c in group]
        if filter_cfg.shuffle_scores:  # the matched random-score control
            scored = shuffle_scores(scored, f"{filter_cfg.shuffle_seed}:{question}")
        decision = select_pair(scored, filter_cfg)
        if decision.kept and filter_cfg.max_pairs is not None and len(pairs) >= filter_cfg.max_pairs:
            decision = over_budget()
        decisions.append(decision)
        if decision.kept:
            by_cand: Mapping[int, Candidate] = {c.cand: c for c in group}
            chosen, rejected = by_cand[decision.chosen], by_cand[decision.rejected]
            crops = (_save_crop(chosen, image_root, crops_dir), _save_crop(rejected, image_root, crops_dir))
            pairs.append(make_pair(chosen, rejected, templates, crops))
    return pairs, decisions
