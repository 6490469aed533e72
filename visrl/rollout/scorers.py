"""Candidate scorers of VisRL's self-evolution data (paper §3.2; the reference's ``data_gen`` scoring step).

Every candidate (box -> crop -> answer) gets two scores in [0, 1] from M_org, the model that judges
(the SFT model, or the previous iteration's): an **answer score** (is the answer right?) and a **crop
score** (does the crop alone hold what the question asks?). :mod:`visrl.rollout.filter` turns them into
preference pairs. Scorers are chosen by config (Hydra ``_target_`` in ``conf/scorer``):

* :class:`JudgeAnswerScorer` / :class:`JudgeCropScorer` -- the reference: M_org is prompted with the two
  judge prompts (paraphrased below) and decodes greedily; the reply ``{"score": x}`` is parsed by
  :func:`parse_judge_score`. The answer judge sees the FULL image, the crop judge the CROP ONLY.
* :class:`RuleAnswerScorer` -- exact match or ANLS against the standard answer
  (:mod:`visrl.benchmarks.metrics`): a benchmark's metric reused as the reward, for models too small
  to follow a judge prompt.
* :class:`LikelihoodCropScorer` -- M_org's probability of the standard answer given the crop alone,
  ``exp(log p(answer | crop, question))`` (``exp`` of the per-token mean with ``reduction="mean"``).

A scorer is ``score(items, policy) -> list[ScoreResult]``; ``policy`` is anything with ``VLMPolicy``'s
``generate`` / ``completion_logprobs`` (docs/design.md). A judge reply that cannot be read is a
:class:`ScoreResult` with ``score=None`` and a ``failure`` reason (counted, never raised); the filter
ignores such candidates, as the reference drops ``None`` scores.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Protocol

from PIL import Image

from visrl.benchmarks.metrics import anls, exact_match
from visrl.data.prompts import IMAGE_MARKER, Message, Prompt, user
from visrl.models.protocols import Policy

__all__ = [
    "ANSWER_JUDGE_PROMPT",
    "CROP_JUDGE_PROMPT",
    "JudgeAnswerScorer",
    "JudgeCropScorer",
    "JudgeFailure",
    "LikelihoodCropScorer",
    "RuleAnswerScorer",
    "ScoreItem",
    "ScoreResult",
    "Scorer",
    "parse_judge_score",
]


@dataclass(frozen=True)
class ScoreItem:
    """One candidate to score: the question, its standard (gold) answer, the model's answer, the full
    image and the crop of the candidate's box (both as the backbone should see them)."""

    question: str
    standard_answer: str
    answer: str
    image: Image.Image
    crop: Image.Image


@dataclass(frozen=True)
class ScoreResult:
    """``score`` in [0, 1], or ``None`` with the ``failure`` reason; ``raw`` is the judge's reply, if any."""

    score: float | None
    failure: str | None
    raw: str | None = None


class Scorer(Protocol):
    name: str

    def score(self, items: Sequence[ScoreItem], policy: Policy) -> list[ScoreResult]: ...


# ------------------------------------------------------------------------------------------ judge parsing
class JudgeFailure(str, Enum):
    """Why a judge reply gave no score."""

    EMPTY = "empty"  # blank reply
    NO_SCORE = "no_score"  # no "score: <number>" and not a bare number
    AMBIGUOUS = "ambiguous"  # several different scores in one reply
    NOT_FINITE = "not_finite"  # nan / inf
    BAD_FRACTION = "bad_fraction"  # "x/0"


_MAX_SCAN = 2048  # only the head of a reply is read (bounds the regex cost of runaway generations)
_NUMBER = r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][+-]?\d+)?(?!\.?\d)|[+-]?(?:nan|inf(?:inity)?)\b"
# a number, optionally a percentage ("85%") or a fraction ("4/5", "8 out of 10")
_VALUE = rf"(?P<num>{_NUMBER})\s*(?:(?P<pct>%)|(?:/|\bout\s+of\b)\s*(?P<den>{_NUMBER}))?"
# 'score' as a key or a label: {"score": 0.9} {'score': '0.8'} score: 1  Score = 0.5  score is 0.7
_KEYED_RE = re.compile(rf"""score["']?\s*(?:[:=]|\bis\b|\bof\b)\s*["']?{_VALUE}""", re.IGNORECASE)
_BARE_RE = re.compile(rf"""["'`]?{_VALUE}["'`]?\.?""", re.IGNORECASE)
_FENCE_RE = re.compile(r"```(?:json)?", re.IGNORECASE)


def _value(match: re.Match[str]) -> float | JudgeFailure:
    num = float(match.group("num"))
    if match.group("pct"):
        num /= 100.0
    elif match.group("den") is not None:
        den = float(match.group("den"))
        if den == 0 or not math.isfinite(den):
            return JudgeFailure.BAD_FRACTION
        num /= den
    return num if math.isfinite(num) else JudgeFailure.NOT_FINITE


def parse_judge_score(text: object) -> tuple[float | None, JudgeFailure | None]:
    """Read a judge's score from its reply; never raises.

    Accepted: JSON (or Python-dict) ``{"score": x}`` anywhere in the reply, inside a ```json fence or
    prose; ``score: x`` / ``score = x`` / ``score is x`` labels; or a reply that is only a number. ``x``
    may be quoted, a percentage (``"85%"`` -> 0.85) or a fraction (``"4/5"``, ``"8 out of 10"``); a
    bare ``85`` is NOT read as a percentage. The value is clamped to [0, 1] (``1.7`` -> 1.0, ``-0.2`` ->
    0.0), like Visual-CoT's judge parser. Several *different* scores in one reply (e.g. the prompt's
    example echoed, then the verdict) are ambiguous and fail; nan / inf fail. Only the first 2048
    characters are read.

    >>> parse_judge_score('```json\\n{"score": 0.9}\\n```'), parse_judge_score("the score is high")
    ((0.9, None), (None, <JudgeFailure.NO_SCORE: 'no_score'>))
    """
    if not isinstance(text, str):
        return None, JudgeFailure.EMPTY
    body = _FENCE_RE.sub(" ", text[:_MAX_SCAN]).strip()
    if not body:
        return None, JudgeFailure.EMPTY
    matches = list(_KEYED_RE.finditer(body))
    if not matches:
        bare = _BARE_RE.fullmatch(body)
        if bare is None:
            return None, JudgeFailure.NO_SCORE
        matches = [bare]
    values = [_value(m) for m in matches]
    failures = [v for v in values if isinstance(v, JudgeFailure)]
    if failures:
        return None, failures[0]
    if len(set(values)) > 1:
        return None, JudgeFailure.AMBIGUOUS
    return min(1.0, max(0.0, float(values[0]))), None  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ judge scorers
# Paraphrases of the two judge prompts of VisRL's data_gen/generate.py (same instructions, same order,
# same example reply); fields: {question}, {standard_answer}, {answer}.
ANSWER_JUDGE_PROMPT = (
    "You are checking answers: score the model's answer against the standard answer, for the given "
    "question and image. The full score is 1 point and the minimum score is 0 points. Reply with the score "
    'only, in JSON format, for example {{"score": 0.8}}, without explaining your reasoning. The closer the '
    "model's answer is to the standard answer, the higher the score.\n\n"
    "Question: {question}\nStandard answer: {standard_answer}\nModel's answer: {answer}"
)
CROP_JUDGE_PROMPT = (
    "You are checking whether the image is relevant to the given question and standard answer: judge "
    "whether the image matches the standard answer. The full score is 1 point and the minimum score is 0 "
    'points. Reply with the score only, in JSON format, for example {{"score": 0.8}}, without explaining '
    "your reasoning. The more fully the image contains the information of the standard answer to the "
    "question, the higher the score.\n\n"
    "Question: {question}\nStandard answer: {standard_answer}"
)


def _check_template(owner: str, template: str, fields: Sequence[str]) -> None:
    try:
        template.format(**{f: "" for f in fields})
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"{owner}: template {template!r} must use only the fields {list(fields)}: {e}"
        ) from e


@dataclass
class _JudgeScorer:
    """Greedy judge by M_org: one user turn ``[image, prompt text]`` per item, ``{"score": x}`` parsed."""

    template: str
    max_new_tokens: int = 32
    name: ClassVar[str] = "judge"
    fields: ClassVar[tuple[str, ...]] = ("question", "standard_answer")  # template fields
    image_field: ClassVar[str] = "image"  # the ScoreItem image the judge sees

    def __post_init__(self) -> None:
        _check_template(type(self).__name__, self.template, self.fields)
        if self.max_new_tokens < 1:
            raise ValueError(f"{type(self).__name__}: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def prompt(self, item: ScoreItem) -> Prompt:
        # Parts are built directly (not with prompts.fill) so that text such as "<image>" inside a model
        # answer stays text instead of breaking the template's image count.
        values = {"question": item.question, "standard_answer": item.standard_answer, "answer": item.answer}
        text = self.template.format(**{f: values[f] for f in self.fields})
        return [Message("user", (getattr(item, self.image_field), text))]

    def score(self, items: Sequence[ScoreItem], policy: Policy) -> list[ScoreResult]:
        if not items:
            return []
        prompts = [self.prompt(item) for item in items]
        outputs = policy.generate(prompts, max_new_tokens=self.max_new_tokens, temperature=0.0)
        if len(outputs) != len(items):
            raise RuntimeError(
                f"{type(self).__name__}: the policy returned {len(outputs)} replies for {len(items)} items"
            )
        results = []
        for out in outputs:
            reply = out[0] if out else ""
            value, failure = parse_judge_score(reply)
            results.append(ScoreResult(value, failure.value if failure else None, reply))
        return results


@dataclass
class JudgeAnswerScorer(_JudgeScorer):
    """Answer score: M_org grades the answer against the standard answer, seeing the FULL image."""

    template: str = ANSWER_JUDGE_PROMPT
    name: ClassVar[str] = "judge_answer"
    fields: ClassVar[tuple[str, ...]] = ("question", "standard_answer", "answer")
    image_field: ClassVar[str] = "image"


@dataclass
class JudgeCropScorer(_JudgeScorer):
    """Crop score: M_org judges whether the CROP ALONE holds the standard answer's information."""

    template: str = CROP_JUDGE_PROMPT
    name: ClassVar[str] = "judge_crop"
    image_field: ClassVar[str] = "crop"


# ------------------------------------------------------------------------------------- rule / likelihood
RULE_METRICS: dict[str, Callable[[str, str], float]] = {"exact": exact_match, "anls": anls}


@dataclass
class RuleAnswerScorer:
    """Answer score by a benchmark metric against the standard answer (no model call)."""

    metric: str = "exact"
    name: ClassVar[str] = "rule_answer"

    def __post_init__(self) -> None:
        if self.metric not in RULE_METRICS:
            raise ValueError(
                f"RuleAnswerScorer: unknown metric {self.metric!r}; valid metrics: {sorted(RULE_METRICS)}"
            )

    def score(self, items: Sequence[ScoreItem], policy: Policy | None = None) -> list[ScoreResult]:
        fn = RULE_METRICS[self.metric]
        return [ScoreResult(float(fn(item.answer, item.standard_answer)), None) for item in items]


@dataclass
class LikelihoodCropScorer:
    """Crop score ``p(standard answer | crop alone, question)`` under M_org, one batched log-prob call.

    ``template`` is a one-image user turn (the crop goes at its ``<image>``) with a ``{question}`` field;
    ``reduction="sum"`` gives the sequence probability, ``"mean"`` the geometric-mean token probability.
    """

    template: str = f"{IMAGE_MARKER}\n{{question}}"
    reduction: str = "sum"
    name: ClassVar[str] = "likelihood_crop"

    def __post_init__(self) -> None:
        if self.template.count(IMAGE_MARKER) != 1:
            raise ValueError(
                f"LikelihoodCropScorer: template {self.template!r} needs exactly one {IMAGE_MARKER} "
                "(the crop)"
            )
        _check_template("LikelihoodCropScorer", self.template, ("question",))
        if self.reduction not in ("sum", "mean"):
            raise ValueError(
                f"LikelihoodCropScorer: reduction must be 'sum' or 'mean', got {self.reduction!r}"
            )

    def score(self, items: Sequence[ScoreItem], policy: Policy) -> list[ScoreResult]:
        if not items:
            return []
        prompts = [[user(self.template, [item.crop], question=item.question)] for item in items]
        answers = [item.standard_answer for item in items]
        logps = policy.completion_logprobs(prompts, answers, reduction=self.reduction)  # [n]
        if tuple(logps.shape) != (len(items),):
            raise RuntimeError(
                f"LikelihoodCropScorer: completion_logprobs returned shape {tuple(logps.shape)} "
                f"for {len(items)} items"
            )
        results = []
        for lp in logps.tolist():
            if math.isnan(lp) or lp == math.inf:
                results.append(ScoreResult(None, JudgeFailure.NOT_FINITE.value))
            else:
                results.append(ScoreResult(min(1.0, math.exp(min(lp, 0.0))), None))  # -inf -> 0.0
        return results


# ------------------------------------------------------------------------------------------------ registry
@dataclass
class RandomScorer:
    """Uniform random scores, seeded by the item's text: a no-information baseline for ablations (does
    self-scoring matter?) and the scorer of plumbing runs (``debug=fast``), where a random model's real scores
    are all equal and the filter would keep nothing."""

    seed: int = 0
    name: ClassVar[str] = "random"

    def score(self, items: Sequence[ScoreItem], policy: Policy | None = None) -> list[ScoreResult]:
        out = []
        for item in items:
            key = f"{self.seed}|{item.question}|{item.standard_answer}|{item.answer}|{_image_key(item.crop)}"
            digest = hashlib.sha256(key.encode()).digest()
            out.append(ScoreResult(int.from_bytes(digest[:8], "big") / 2**64, None))
        return out


def _image_key(image: Any) -> str:
    """A content key of a PIL image (or ``""``) so equal crops get equal random scores."""
    if image is None:
        return ""
    return hashlib.sha256(image.tobytes()).hexdigest()[:16]
