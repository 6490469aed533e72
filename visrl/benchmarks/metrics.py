"""Answer metrics shared by the benchmarks and the rule-based RL reward (VisRL §4 / reference-method.md §4).

* :func:`normalize_answer` -- SQuAD-style normalisation: lowercase, drop punctuation, drop the English
  articles ``a``/``an``/``the``, collapse whitespace.
* :func:`exact_match` -- 1.0 iff the normalised prediction equals a normalised gold answer.
* :func:`levenshtein` -- edit distance (insert / delete / substitute, each cost 1).
* :func:`anls` -- Average Normalised Levenshtein Similarity of ST-VQA / DocVQA (Biten et al. 2019):
  ``s = 1 - lev(p, g) / max(|p|, |g|)``, set to 0 when ``s < threshold``, maximised over the golds.

The same functions are the reward of :class:`visrl.rollout.scorers.RuleAnswerScorer` (a benchmark's metric
reused as the RL answer score), so they are pure and never raise on odd strings.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

__all__ = ["anls", "exact_match", "levenshtein", "normalize_answer", "normalize_whitespace"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_whitespace(s: str) -> str:
    """Lowercase, strip and collapse runs of whitespace (the DocVQA ANLS normalisation)."""
    return " ".join(s.lower().split())


def normalize_answer(s: str) -> str:
    """SQuAD-style normalisation: lowercase, remove punctuation, remove articles, collapse whitespace.

    >>> normalize_answer("  The  Red-Car! ")
    'redcar'
    """
    s = s.lower().translate(_PUNCT_TABLE)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _golds(gold: str | Sequence[str]) -> list[str]:
    if isinstance(gold, str):
        return [gold]
    golds = list(gold)
    if not golds:
        raise ValueError("metrics: the list of gold answers is empty")
    return golds


def exact_match(pred: str, gold: str | Sequence[str]) -> float:
    """1.0 if ``normalize_answer(pred)`` equals the normalised gold (any of them, if a list), else 0.0."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in _golds(gold)))


def levenshtein(a: str, b: str) -> int:
    """Edit distance between ``a`` and ``b`` (unit costs), O(|a|·|b|) time, O(min) memory."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete ca
                    current[j - 1] + 1,  # insert cb
                    previous[j - 1] + (ca != cb),  # substitute (free if equal)
                )
            )
        previous = current
    return previous[-1]


def _similarity(pred: str, gold: str) -> float:
    """1 - normalised Levenshtein distance of the whitespace-normalised strings (two empties -> 1.0)."""
    p, g = normalize_whitespace(pred), normalize_whitespace(gold)
    length = max(len(p), len(g))
    if length == 0:
        return 1.0
    return 1.0 - levenshtein(p, g) / length


def anls(pred: str, gold: str | Sequence[str], threshold: float = 0.5) -> float:
    """Normalised Levenshtein similarity of ``pred`` to the closest gold, 0.0 below ``threshold``.

    Strings are compared after :func:`normalize_whitespace` (case-insensitive, punctuation kept), as in
    the DocVQA evaluation script. Unlike that script, the length in the denominator is the length of the
    *normalised* strings (the script uses the raw lengths, which makes stray spaces lower the distance).
    A similarity exactly equal to ``threshold`` is kept.

    >>> anls("kitten", "sitting")  # lev = 3, max len = 7 -> 1 - 3/7
    0.5714285714285714
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"metrics.anls: threshold must be in [0, 1], got {threshold}")
    best = max(_similarity(pred, g) for g in _golds(gold))
    return best if best >= threshold else 0.0
