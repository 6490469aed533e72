"""The preference-pair filter of VisRL's self-evolution data (the reference's ``data_gen/filter.py``).

Each question has several candidates (box, crop, answer), each scored twice by M_org: an *answer score*
(how close the answer is to the standard answer) and a *crop score* (does the crop alone hold the
information of the standard answer). Among the candidates whose two scores both exist, a question is kept
only when the answer scores spread from ``<= answer_lo`` to ``>= answer_hi`` (and are not all equal), and

* chosen   = the FIRST candidate whose answer score is the maximum AND whose crop score is ``>= crop_hi``;
* rejected = the FIRST candidate whose answer score is the minimum AND whose crop score is ``<= crop_lo``.

The crop gate is what keeps lucky guesses out of the pairs: a right answer from a crop that shows the
wrong thing would otherwise be "chosen" and teach the model to ignore its crop (in a toy-scale trial
without the gate, whose sampled boxes rarely held the target, answer accuracy with the model's own box fell
from 0.32 to 0.04 in one iteration and the boxes stopped parsing by the second). ``min_margin`` (0 in the reference) additionally
requires ``max - min >= min_margin``. Every drop has a reason string so the share of each reason can be
logged per iteration.

``max_pairs`` (not in the reference) caps the pairs of one iteration: the first ``max_pairs`` kept questions
in question order stay, later ones are dropped as ``over_budget``. Questions are drawn independently, so the
first ones are an unbiased subset; the cap lets controls whose filter keeps different numbers of pairs (random
scores, other thresholds) train on the same pairs budget.

``shuffle_scores`` (a control, not in the reference) permutes the (answer, crop) score pairs among the
candidates of each question before the filter looks at them, seeded by ``shuffle_seed`` and the question.
Whether a question is kept depends only on the multiset of its score pairs, so the same questions are kept
(the same number of pairs, at the default thresholds), but which candidate is chosen or rejected carries no
information: random scores with a matched pair count.

Departure: a non-finite score (nan, inf) is treated like a missing one; the reference would crash or
compare nan as never-equal.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "REASONS",
    "FilterConfig",
    "FilterDecision",
    "ScoredCandidate",
    "count_reasons",
    "over_budget",
    "select_pair",
    "shuffle_scores",
]

KEPT = "kept"
REASONS = (
    KEPT,
    "no_candidates",  # no candidate has both scores
    "all_equal",  # max answer score == min answer score
    "max_below_hi",  # max answer score < answer_hi
    "min_above_lo",  # min answer score > answer_lo
    "margin_below_min",  # max - min < min_margin
    "no_chosen_crop",  # no max-answer candidate has crop score >= crop_hi
    "no_rejected_crop",  # no min-answer candidate has crop score <= crop_lo
    "over_budget",  # kept by the filter, but max_pairs earlier questions were kept already
)


class Scored(Protocol):
    """Anything with an ``index`` and the two scores (e.g. a rollout candidate row)."""

    @property
    def index(self) -> int: ...
    @property
    def answer_score(self) -> float | None: ...
    @property
    def crop_score(self) -> float | None: ...


@dataclass(frozen=True)
class ScoredCandidate:
    """A minimal :class:`Scored`: the candidate's ``index`` within its question and its two scores."""

    index: int
    answer_score: float | None
    crop_score: float | None


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of the filter; the defaults are the reference's (answer and crop: 0.8 / 0.2, no margin,
    no cap on the pairs per iteration)."""

    answer_hi: float = 0.8
    answer_lo: float = 0.2
    crop_hi: float = 0.8
    crop_lo: float = 0.2
    min_margin: float = 0.0
    max_pairs: int | None = None
    shuffle_scores: bool = False
    shuffle_seed: int = 0

    def __post_init__(self) -> None:
        # each threshold applies to a different candidate (chosen vs rejected), so lo > hi is legitimate:
        # crop_hi=0, crop_lo=1 switches the crop gate off (the answer-only ablation)
        for name in ("answer_lo", "answer_hi", "crop_lo", "crop_hi"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"FilterConfig: {name} must be in [0, 1], got {value}")
        if not 0.0 <= self.min_margin <= 1.0:
            raise ValueError(f"FilterConfig: min_margin must be in [0, 1], got {self.min_margin}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ValueError(f"FilterConfig: max_pairs must be >= 1 or null, got {self.max_pairs}")


@dataclass(frozen=True)
class FilterDecision:
    """Outcome for one question: ``chosen`` / ``rejected`` are candidate indices when ``kept``."""

    kept: bool
    chosen: int | None
    rejected: int | None
    reason: str


def _usable(score: float | None) -> bool:
    return score is not None and math.isfinite(score)


def _drop(reason: str) -> FilterDecision:
    return FilterDecision(kept=False, chosen=None, rejected=None, reason=reason)


def select_pair(candidates: Sequence[Scored], config: FilterConfig | None = None) -> FilterDecision:
    """Apply the reference filter to the candidates of ONE question (in their generation order)."""
    cfg = config if config is not None else FilterConfig()
    # (index, answer score, crop score) of the candidates with both scores, in generation order
    scored = [
        (c.index, float(c.answer_score), float(c.crop_score))  # type: ignore[arg-type]
        for c in candidates
        if _usable(c.answer_score) and _usable(c.crop_score)
    ]
    if not scored:
        return _drop("no_candidates")
    hi, lo = max(a for _, a, _ in scored), min(a for _, a, _ in scored)
    if hi == lo:
        return _drop("all_equal")
    if hi < cfg.answer_hi:
        return _drop("max_below_hi")
    if lo > cfg.answer_lo:
        return _drop("min_above_lo")
    if hi - lo < cfg.min_margin:
        return _drop("margin_below_min")
    chosen = next((i for i, a, c in scored if a == hi and c >= cfg.crop_hi), None)
    if chosen is None:
        return _drop("no_chosen_crop")
    rejected = next((i for i, a, c in scored if a == lo and c <= cfg.crop_lo), None)
    if rejected is None:
        return _drop("no_rejected_crop")
    return FilterDecision(kept=True, chosen=chosen, rejected=rejected, reason=KEPT)


def shuffle_scores(candidates: Sequence[Scored], seed: str) -> list[ScoredCandidate]:
    """The candidates of one question with the (answer, crop) score pairs of those the filter can use
    permuted among them (a seeded permutation of ``seed``, e.g. ``"<shuffle_seed>:<question index>"``); a
    candidate without both scores (an unparsable box) keeps its missing score. The control of
    ``shuffle_scores``."""
    usable = [i for i, c in enumerate(candidates) if _usable(c.answer_score) and _usable(c.crop_score)]
    scores = [(c.answer_score, c.crop_score) for c in candidates]
    moved = [scores[i] for i in usable]
    random.Random(seed).shuffle(moved)
    for i, pair in zip(usable, moved, strict=True):
        scores[i] = pair
    return [ScoredCandidate(c.index, a, s) for c, (a, s) in zip(candidates, scores, strict=True)]


def over_budget() -> FilterDecision:
    """The decision of a question the filter kept after ``max_pairs`` others were kept already."""
    return _drop("over_budget")


def count_reasons(decisions: Iterable[FilterDecision]) -> dict[str, int]:
    """How many questions ended with each reason (every reason listed, zeros included), for stats.json."""
    counts = Counter(d.reason for d in decisions)
    return {reason: counts.get(reason, 0) for reason in REASONS}
