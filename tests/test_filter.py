"""Tests for visrl.rollout.filter on crafted candidate groups (the reference's data_gen/filter.py rule)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from visrl.rollout.filter import (
    REASONS,
    FilterConfig,
    FilterDecision,
    ScoredCandidate,
    count_reasons,
    select_pair,
    shuffle_scores,
)

torch.set_num_threads(1)


def group(*scores: tuple[float | None, float | None]) -> list[ScoredCandidate]:
    """Candidates indexed 0..n-1 from (answer_score, crop_score) pairs."""
    return [ScoredCandidate(i, a, c) for i, (a, c) in enumerate(scores)]


def test_reference_case_kept() -> None:
    d = select_pair(group((0.5, 0.5), (1.0, 0.9), (0.0, 0.1), (0.3, 0.0)))
    assert d == FilterDecision(kept=True, chosen=1, rejected=2, reason="kept")


def test_first_of_ties_is_selected() -> None:
    # max 1.0 at 0, 2, 4 but candidate 0 has a bad crop -> 2; min 0.0 at 1, 3, both crops ok -> 1
    d = select_pair(group((1.0, 0.5), (0.0, 0.1), (1.0, 0.8), (0.0, 0.0), (1.0, 1.0)))
    assert (d.kept, d.chosen, d.rejected) == (True, 2, 1)


def test_indices_are_the_candidates_own() -> None:
    cands = [ScoredCandidate(7, 0.0, 0.0), ScoredCandidate(3, 0.9, 0.9)]
    assert select_pair(cands) == FilterDecision(True, 3, 7, "kept")


@pytest.mark.parametrize(
    ("scores", "reason"),
    [
        ((), "no_candidates"),
        (((None, 0.9), (0.9, None), (None, None)), "no_candidates"),
        (((0.5, 0.9), (0.5, 0.1)), "all_equal"),
        (((1.0, 0.9),), "all_equal"),  # one candidate: max == min
        (((0.7, 0.9), (0.0, 0.1)), "max_below_hi"),
        (((0.9, 0.9), (0.3, 0.1)), "min_above_lo"),
        (((1.0, 0.7), (0.0, 0.1)), "no_chosen_crop"),  # the right answer came from an irrelevant crop
        (((1.0, 0.9), (0.0, 0.3)), "no_rejected_crop"),  # the wrong answer came from a relevant crop
        (((1.0, 0.79), (0.0, 0.21)), "no_chosen_crop"),  # both missing: the first reason is reported
    ],
)
def test_drop_reasons(scores: tuple, reason: str) -> None:
    d = select_pair(group(*scores))
    assert d == FilterDecision(kept=False, chosen=None, rejected=None, reason=reason)


def test_missing_and_nonfinite_scores_are_ignored() -> None:
    # without candidate 0 (answer None) and 3 (crop nan), the max is 0.9 at 2 and the min 0.0 at 1
    d = select_pair(group((None, 1.0), (0.0, 0.0), (0.9, 0.95), (1.0, math.nan), (math.inf, 1.0)))
    assert (d.kept, d.chosen, d.rejected) == (True, 2, 1)


def test_thresholds_are_inclusive() -> None:
    # exactly answer_hi / answer_lo / crop_hi / crop_lo are accepted (>=, <=)
    assert select_pair(group((0.8, 0.8), (0.2, 0.2))).kept


def test_custom_config_and_margin() -> None:
    cands = group((0.6, 0.9), (0.4, 0.1))
    assert select_pair(cands).reason == "max_below_hi"
    loose = FilterConfig(answer_hi=0.5, answer_lo=0.5)
    assert select_pair(cands, loose) == FilterDecision(True, 0, 1, "kept")
    assert (
        select_pair(cands, FilterConfig(answer_hi=0.5, answer_lo=0.5, min_margin=0.3)).reason
        == "margin_below_min"
    )
    strict_crop = FilterConfig(answer_hi=0.5, answer_lo=0.5, crop_hi=0.95)
    assert select_pair(cands, strict_crop).reason == "no_chosen_crop"


@pytest.mark.parametrize(
    "kwargs",
    [{"answer_hi": 1.1}, {"crop_hi": 1.5}, {"crop_lo": -0.1}, {"min_margin": -0.1}],
)
def test_bad_config(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="FilterConfig"):
        FilterConfig(**kwargs)


def test_crop_gate_off_keeps_answer_only_pairs() -> None:
    """crop_hi=0, crop_lo=1 (the answer-only ablation) is valid: any crop score passes both gates."""
    cfg = FilterConfig(crop_hi=0.0, crop_lo=1.0)
    decision = select_pair(group((1.0, 0.1), (0.0, 0.9)), cfg)
    assert decision.kept and (decision.chosen, decision.rejected) == (0, 1)


def test_count_reasons() -> None:
    decisions = [
        select_pair(group((1.0, 0.9), (0.0, 0.1))),
        select_pair(group()),
        select_pair(group((0.5, 0.5), (0.5, 0.5))),
        select_pair(group()),
    ]
    counts = count_reasons(decisions)
    assert list(counts) == list(REASONS)
    assert counts["kept"] == 1 and counts["no_candidates"] == 2 and counts["all_equal"] == 1
    assert sum(counts.values()) == 4


score = st.one_of(st.none(), st.sampled_from([0.0, 0.1, 0.2, 0.5, 0.8, 0.9, 1.0]))


@given(st.lists(st.tuples(score, score), max_size=8))
def test_kept_pairs_satisfy_the_rule(scores: list[tuple[float | None, float | None]]) -> None:
    cands = group(*scores)
    d = select_pair(cands)
    assert d.reason in REASONS
    usable = [c for c in cands if c.answer_score is not None and c.crop_score is not None]
    if not d.kept:
        assert d.chosen is None and d.rejected is None
        return
    hi = max(c.answer_score for c in usable)
    lo = min(c.answer_score for c in usable)
    chosen, rejected = cands[d.chosen], cands[d.rejected]
    assert chosen.answer_score == hi >= 0.8 and chosen.crop_score >= 0.8
    assert rejected.answer_score == lo <= 0.2 and rejected.crop_score <= 0.2
    # the first such candidates
    assert all(not (c.answer_score == hi and c.crop_score >= 0.8) for c in usable if c.index < d.chosen)
    assert all(not (c.answer_score == lo and c.crop_score <= 0.2) for c in usable if c.index < d.rejected)


@given(st.lists(st.tuples(score, score), max_size=8), st.integers(0, 3))
def test_shuffled_scores_keep_the_same_questions(scores: list, seed: int) -> None:
    """The matched random-score control: a permutation of a question's score pairs keeps the question
    exactly when the unshuffled one is kept (the pair count matches), with the same multiset of scores."""
    cands = group(*scores)
    mixed = shuffle_scores(cands, f"{seed}:7")
    assert [c.index for c in mixed] == [c.index for c in cands]
    pairs = sorted(((c.answer_score, c.crop_score) for c in mixed), key=repr)
    assert pairs == sorted(((c.answer_score, c.crop_score) for c in cands), key=repr)
    assert select_pair(mixed).kept == select_pair(cands).kept
    assert shuffle_scores(cands, f"{seed}:7") == mixed  # seeded


def test_shuffled_scores_move_the_choice() -> None:
    """Which candidate is chosen follows the permuted scores, not the candidate (hand-built: the good
    scores sit on candidate 0; over seeds the chosen index takes several values)."""
    cands = group((1.0, 0.9), (0.0, 0.1), (0.5, 0.5), (0.5, 0.5))
    chosen = {select_pair(shuffle_scores(cands, f"s:{q}")).chosen for q in range(40)}
    assert chosen == {0, 1, 2, 3}
