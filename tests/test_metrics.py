"""Tests for visrl.benchmarks.metrics: every expected value is computed by hand in the comment next to it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from visrl.benchmarks.metrics import anls, exact_match, levenshtein, normalize_answer, normalize_whitespace

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  The  Red-Car! ", "redcar"),  # lower, '-' and '!' dropped, article dropped, spaces collapsed
        ("A cat.", "cat"),
        ("an apple, the pear", "apple pear"),
        ("Theatre", "theatre"),  # 'the' only as a whole word
        ("", ""),
        ("...", ""),
        ("Yes\n", "yes"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_normalize_whitespace_keeps_punctuation() -> None:
    assert normalize_whitespace("  Hello,\t World ") == "hello, world"


def test_exact_match() -> None:
    assert exact_match("The Cat", "cat") == 1.0
    assert exact_match("cat!", "a cat") == 1.0
    assert exact_match("cats", "cat") == 0.0
    assert exact_match("dog", ["cat", "Dog."]) == 1.0  # any gold
    assert exact_match("", "") == 1.0
    with pytest.raises(ValueError, match="empty"):
        exact_match("x", [])


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("flaw", "lawn", 2),  # -f, +n
        ("", "abc", 3),
        ("abc", "", 3),
        ("abc", "abc", 0),
        ("intention", "execution", 5),  # textbook example
        ("ab", "ba", 2),  # no transpositions: two substitutions
    ],
)
def test_levenshtein(a: str, b: str, d: int) -> None:
    assert levenshtein(a, b) == d
    assert levenshtein(b, a) == d


@given(st.text(max_size=12), st.text(max_size=12), st.text(max_size=12))
def test_levenshtein_is_a_metric(a: str, b: str, c: str) -> None:
    assert levenshtein(a, b) == levenshtein(b, a)
    assert (levenshtein(a, b) == 0) == (a == b)
    assert abs(len(a) - len(b)) <= levenshtein(a, b) <= max(len(a), len(b))
    assert levenshtein(a, c) <= levenshtein(a, b) + levenshtein(b, c)


def test_anls_hand_values() -> None:
    assert anls("kitten", "sitting") == pytest.approx(1 - 3 / 7)  # 0.571 >= 0.5 kept
    assert anls("Kitten ", "kitten") == 1.0  # case and outer spaces ignored
    assert anls("abcd", "abxy") == pytest.approx(0.5)  # lev 2 / 4 = 0.5: exactly the threshold, kept
    assert anls("abcd", "axyz") == 0.0  # lev 3 / 4 -> similarity 0.25 < 0.5 -> 0
    assert anls("abcd", "axyz", threshold=0.2) == pytest.approx(0.25)
    assert anls("hello, world", "hello world") == pytest.approx(1 - 1 / 12)  # punctuation counts
    assert anls("", "") == 1.0
    assert anls("", "abc") == 0.0


def test_anls_max_over_golds() -> None:
    # golds: "sitting" -> 4/7, "kitten" -> 1.0, "xyz" -> 0
    assert anls("kitten", ["sitting", "kitten", "xyz"]) == 1.0
    assert anls("kitten", ["xyz", "sitting"]) == pytest.approx(4 / 7)


def test_anls_rejects_bad_threshold() -> None:
    with pytest.raises(ValueError, match="threshold"):
        anls("a", "a", threshold=1.5)


@given(st.text(max_size=20), st.lists(st.text(max_size=20), min_size=1, max_size=3))
def test_anls_in_unit_interval(pred: str, golds: list[str]) -> None:
    s = anls(pred, golds)
    assert s == 0.0 or 0.5 <= s <= 1.0
