"""What one self-evolution iteration produced (``<iter_dir>/stats.json``): :class:`PairStats`.

Parse failures by reason, synthetic bad boxes, yield, filter drop reasons, chosen-minus-rejected score
margins, chosen-vs-rejected IoU, and -- for analysis only -- ground-truth hit rates: a collapse of the
boxes (pairs teaching the model to ignore its crop) must be visible at once, and ground truth shows it
where the self-scores cannot.

Ground truth is read ONLY by :func:`compute_stats`, for logging; pair selection never sees it.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from visrl.data.box_formats import ParseFailure
from visrl.data.boxes import Box, iou
from visrl.data.records import VisCoTRecord
from visrl.rollout.candidates import Candidate
from visrl.rollout.filter import FilterDecision, count_reasons
from visrl.rollout.pairs import Pair

__all__ = ["GT_HIT_IOU", "STATS", "PairStats", "compute_stats"]

STATS = "stats.json"
GT_HIT_IOU = 0.5  # Visual-CoT's detection criterion


@dataclass(frozen=True)
class PairStats:
    """The numbers of stats.json; means over empty sets are ``None``. ``yield_`` is the file's ``yield``."""

    questions: int
    candidates: int
    parsed: int
    parse_rate: float | None
    parse_failures: dict[str, int]  # ParseFailure value -> count
    synthetic_bad_boxes: int
    bad_box_synthesis_failed: int
    answered: int
    scored: int  # candidates with both scores usable
    score_failures: dict[str, dict[str, int]]  # {"answer", "crop"} -> reason -> count
    mean_answer_score: float | None
    mean_crop_score: float | None
    pairs: int
    yield_: float | None  # pairs per question
    drop_reasons: dict[str, int]
    pairs_with_synthetic_rejected: int
    mean_answer_margin: float | None
    mean_crop_margin: float | None
    mean_iou_chosen_rejected: float | None
    gt: dict[str, Any] | None  # ground-truth analysis (see _gt_stats), None without records

    def to_json(self) -> dict[str, Any]:
        return {("yield" if k == "yield_" else k): v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "stats") -> PairStats:
        fields = {("yield" if f.name == "yield_" else f.name): f.name for f in dataclasses.fields(cls)}
        missing = sorted(set(fields) - set(data))
        if missing:
            raise ValueError(f"{where}: missing fields {missing}")
        return cls(**{name: data[key] for key, name in fields.items()})


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _usable(score: float | None) -> bool:
    return score is not None and math.isfinite(score)


def _gt_boxes(candidates: Sequence[Candidate], records: Sequence[VisCoTRecord]) -> dict[int, Box]:
    """question_index -> ground-truth box (analysis only), checking that the records line up."""
    gt: dict[int, Box] = {}
    for c in candidates:
        q = c.question_index
        if q in gt:
            continue
        if q >= len(records):
            raise ValueError(f"stats: candidate question_index {q} but only {len(records)} records given")
        uid = records[q].uid
        if uid != c.uid:
            raise ValueError(f"stats: record {q} is {uid!r} but the candidates of question {q} are {c.uid!r}")
        box = records[q].box(tuple(c.image_size))
        if box is not None:
            gt[q] = box
    return gt


def _gt_stats(
    candidates: Sequence[Candidate], pairs: Sequence[Pair], records: Sequence[VisCoTRecord]
) -> dict[str, Any] | None:
    gt = _gt_boxes(candidates, records)
    if not gt:
        return None
    boxed = [c for c in candidates if c.box is not None and c.question_index in gt]
    ious = [iou(c.region, gt[c.question_index]) for c in boxed]
    sampled = [v for c, v in zip(boxed, ious) if not c.synthetic]
    side = {}
    for name in ("chosen", "rejected"):
        vals = [
            iou(Box(*getattr(p, f"{name}_box")), gt[p.question_index])
            for p in pairs
            if p.question_index in gt
        ]
        side[f"{name}_mean_iou_gt"] = _mean(vals)
        side[f"{name}_hit_rate"] = _mean([float(v > GT_HIT_IOU) for v in vals])
    return {
        "questions_with_gt": len(gt),
        "candidates_with_box": len(boxed),
        "hit_rate": _mean([float(v > GT_HIT_IOU) for v in ious]),
        "sampled_hit_rate": _mean([float(v > GT_HIT_IOU) for v in sampled]),
        "mean_iou": _mean(ious),
        **side,
    }


def _failure_counts(values: Iterable[str | None]) -> dict[str, int]:
    return dict(sorted(Counter(v for v in values if v is not None).items()))


def compute_stats(
    candidates: Sequence[Candidate],
    decisions: Sequence[FilterDecision],
    pairs: Sequence[Pair],
    records: Sequence[VisCoTRecord] | None = None,
) -> PairStats:
    """The iteration's statistics; ``records`` (aligned by ``question_index``) only for the gt analysis."""
    n_q, n_c = len({c.question_index for c in candidates}), len(candidates)
    parse = Counter(c.parse_failure for c in candidates if c.parse_failure is not None)
    both = [c for c in candidates if _usable(c.answer_score) and _usable(c.crop_score)]
    margin = lambda key: _mean([p.chosen_scores[key] - p.rejected_scores[key] for p in pairs])  # noqa: E731
    return PairStats(
        questions=n_q,
        candidates=n_c,
        parsed=n_c - sum(parse.values()),
        parse_rate=(n_c - sum(parse.values())) / n_c if n_c else None,
        parse_failures={f.value: parse.get(f.value, 0) for f in ParseFailure},
        synthetic_bad_boxes=sum(bool(c.synthetic) for c in candidates),
        bad_box_synthesis_failed=sum(bool(c.synthesis_failed) for c in candidates),
        answered=sum(c.answer is not None for c in candidates),
        scored=len(both),
        score_failures={
            "answer": _failure_counts(c.answer_score_failure for c in candidates),
            "crop": _failure_counts(c.crop_score_failure for c in candidates),
        },
        mean_answer_score=_mean([c.answer_score for c in both]),  # type: ignore[misc]
        mean_crop_score=_mean([c.crop_score for c in both]),  # type: ignore[misc]
        pairs=len(pairs),
        yield_=len(pairs) / n_q if n_q else None,
        drop_reasons=count_reasons(decisions),
        pairs_with_synthetic_rejected=sum(bool(p.rejected_synthetic) for p in pairs),
        mean_answer_margin=margin("answer"),
        mean_crop_margin=margin("crop"),
        mean_iou_chosen_rejected=_mean([iou(p.chosen_region, p.rejected_region) for p in pairs]),
        gt=_gt_stats(candidates, pairs, records) if records is not None else None,
    )
