"""Tests for visrl.rollout.scorers with a fake M_org policy (canned generations and log-probs)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from visrl.data.prompts import Prompt
from visrl.rollout.scorers import (
    JudgeAnswerScorer,
    JudgeCropScorer,
    JudgeFailure,
    LikelihoodCropScorer,
    RuleAnswerScorer,
    ScoreItem,
    ScoreResult,
    parse_judge_score,
)

torch.set_num_threads(1)


class FakePolicy:
    """Returns canned replies / log-probs in order and records every call."""

    def __init__(self, replies: Sequence[str] = (), logps: Sequence[float] = ()) -> None:
        self.replies, self.logps = list(replies), list(logps)
        self.generate_calls: list[tuple[list[Prompt], dict[str, Any]]] = []
        self.logprob_calls: list[tuple[list[Prompt], list[str], str]] = []

    def generate(self, prompts: Sequence[Prompt], **kw: Any) -> list[list[str]]:
        self.generate_calls.append((list(prompts), kw))
        return [[r] for r in self.replies[: len(prompts)]]

    def completion_logprobs(
        self, prompts: Sequence[Prompt], completions: Sequence[str], reduction: str = "sum"
    ):
        self.logprob_calls.append((list(prompts), list(completions), reduction))
        return torch.tensor(self.logps[: len(prompts)], dtype=torch.float32)


def _item(i: int = 0, answer: str = "a red cube", gold: str = "red cube") -> ScoreItem:
    return ScoreItem(
        question=f"What is at the top left? ({i})",
        standard_answer=gold,
        answer=answer,
        image=Image.new("RGB", (64, 64), (i, 0, 0)),
        crop=Image.new("RGB", (32, 32), (0, i, 0)),
    )


# ------------------------------------------------------------------------------------ parse_judge_score
@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ('```json {"score": 0.9}```', 0.9),
        ('```json\n{"score": 0.9}\n```', 0.9),
        ("{'score': '0.8'}", 0.8),
        ('{"score": "0.8"}', 0.8),
        ("Score: 1", 1.0),
        ("score: 1.7", 1.0),  # clamped
        ("score = 0.25", 0.25),
        ("The score is 0.4", 0.4),
        ("score: 0.8.", 0.8),  # sentence-final period
        ("-0.2", 0.0),  # bare number, clamped
        ("0.7", 0.7),
        (" 1 \n", 1.0),
        ("`0.3`", 0.3),
        ("85%", 0.85),
        ("score: 85%", 0.85),
        ("score: 4/5", 0.8),
        ("Score: 8 out of 10", 0.8),
        ('{"SCORE": 1e-1}', 0.1),
        ('The answer matches. {"score": 0.6} Hope this helps!', 0.6),
        ('{"score": 0.8, "reason": "close to 0.9"}', 0.8),
        ('Example {"score": 0.8}. My verdict: {"score": 0.8}', 0.8),  # repeated but equal
        ('{"result": {"score": 0.5}}', 0.5),
    ],
)
def test_parse_judge_score_values(reply: str, score: float) -> None:
    value, failure = parse_judge_score(reply)
    assert failure is None
    assert value == pytest.approx(score)


@pytest.mark.parametrize(
    ("reply", "failure"),
    [
        ("", JudgeFailure.EMPTY),
        ("   \n", JudgeFailure.EMPTY),
        ("``````", JudgeFailure.EMPTY),
        (None, JudgeFailure.EMPTY),
        (0.7, JudgeFailure.EMPTY),  # not a string
        ("nan", JudgeFailure.NOT_FINITE),
        ('{"score": NaN}', JudgeFailure.NOT_FINITE),
        ("score: -inf", JudgeFailure.NOT_FINITE),
        ("Infinity", JudgeFailure.NOT_FINITE),
        ("score: 1/0", JudgeFailure.BAD_FRACTION),
        ("{", JudgeFailure.NO_SCORE),
        ('{"score": }', JudgeFailure.NO_SCORE),
        ("the score is high", JudgeFailure.NO_SCORE),
        ("score: 1.2.3", JudgeFailure.NO_SCORE),
        ("I think it is 0.5 or 0.6", JudgeFailure.NO_SCORE),  # prose numbers are not a score
        ("lorem ipsum " * 5000, JudgeFailure.NO_SCORE),
        ('Example {"score": 0.8}. My verdict: {"score": 0.3}', JudgeFailure.AMBIGUOUS),
    ],
)
def test_parse_judge_score_failures(reply: object, failure: JudgeFailure) -> None:
    assert parse_judge_score(reply) == (None, failure)


def test_parse_judge_score_is_fast_on_runaway_replies() -> None:
    start = time.perf_counter()
    for reply in ("score: " * 50_000, "9" * 100_000, "{'score': '" * 20_000, "1.1" * 30_000):
        value, failure = parse_judge_score(reply)
        assert (value is None) != (failure is None)
    assert time.perf_counter() - start < 2.0


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=200)
    | st.from_regex(r"[\s`'\"{}]*score[\"']?\s*[:=]\s*-?[0-9.%/eE]{0,8}.*", fullmatch=True)
)
def test_parse_judge_score_never_raises(reply: str) -> None:
    value, failure = parse_judge_score(reply)
    assert (value is None) != (failure is None)
    if value is not None:
        assert 0.0 <= value <= 1.0
    else:
        assert isinstance(failure, JudgeFailure)


# ------------------------------------------------------------------------------------------ judge scorers
def test_answer_judge_sees_full_image_and_all_fields() -> None:
    items = [_item(0), _item(1, answer="<image> {weird} answer")]
    policy = FakePolicy(replies=['{"score": 0.9}', "I cannot tell"])
    results = JudgeAnswerScorer().score(items, policy)
    assert results == [
        ScoreResult(0.9, None, '{"score": 0.9}'),
        ScoreResult(None, "no_score", "I cannot tell"),
    ]
    assert len(policy.generate_calls) == 1  # one batched call
    prompts, kw = policy.generate_calls[0]
    assert kw["temperature"] == 0.0 and kw["max_new_tokens"] == 32
    for prompt, item in zip(prompts, items):
        assert len(prompt) == 1 and prompt[0].role == "user"
        image, text = prompt[0].parts
        assert image is item.image
        assert item.question in text and item.standard_answer in text and item.answer in text
        assert '{"score": 0.8}' in text  # the example reply, braces unescaped


def test_crop_judge_sees_crop_only_and_not_the_answer() -> None:
    item = _item(3, answer="SECRET-MODEL-ANSWER")
    policy = FakePolicy(replies=["score: 0.1"])
    assert JudgeCropScorer(max_new_tokens=8).score([item], policy) == [ScoreResult(0.1, None, "score: 0.1")]
    (prompt,), kw = policy.generate_calls[0]
    image, text = prompt[0].parts
    assert image is item.crop
    assert item.question in text and item.standard_answer in text
    assert "SECRET-MODEL-ANSWER" not in text
    assert kw["max_new_tokens"] == 8


def test_judge_scorer_edge_cases() -> None:
    policy = FakePolicy(replies=[])
    assert JudgeAnswerScorer().score([], policy) == [] and policy.generate_calls == []
    with pytest.raises(RuntimeError, match="returned 0 replies for 1 items"):
        JudgeAnswerScorer().score([_item()], policy)
    with pytest.raises(ValueError, match="must use only the fields"):
        JudgeCropScorer(template="{question} {answer}")  # the crop judge never sees the answer
    with pytest.raises(ValueError, match="max_new_tokens"):
        JudgeCropScorer(max_new_tokens=0)
    custom = JudgeAnswerScorer(template="Q={question} G={standard_answer} A={answer}")
    custom.score([_item()], FakePolicy(replies=["1"]))


# --------------------------------------------------------------------------------- rule and likelihood
def test_rule_answer_scorer() -> None:
    items = [_item(answer="The red cube."), _item(answer="red cubes"), _item(answer="")]
    # exact: normalised "red cube" == "red cube"; "red cubes" != ; "" !=
    assert [r.score for r in RuleAnswerScorer().score(items, None)] == [1.0, 0.0, 0.0]
    # anls: "the red cube." vs "red cube": lev 5 / 13 -> 0.615; "red cubes" lev 1 / 9 -> 0.889; "" -> 0
    got = [r.score for r in RuleAnswerScorer(metric="anls").score(items, None)]
    assert got == pytest.approx([1 - 5 / 13, 1 - 1 / 9, 0.0])
    with pytest.raises(ValueError, match=r"unknown metric 'f1'.*anls.*exact"):
        RuleAnswerScorer(metric="f1")


def test_likelihood_crop_scorer() -> None:
    items = [_item(i, gold=f"gold {i}") for i in range(5)]
    policy = FakePolicy(logps=[-0.5, math.log(0.25), -math.inf, math.nan, 1e-7])
    results = LikelihoodCropScorer().score(items, policy)
    assert [r.score for r in results] == pytest.approx([math.exp(-0.5), 0.25, 0.0, None, 1.0])
    assert results[3] == ScoreResult(None, "not_finite")
    assert len(policy.logprob_calls) == 1
    prompts, completions, reduction = policy.logprob_calls[0]
    assert completions == [f"gold {i}" for i in range(5)] and reduction == "sum"
    crop, text = prompts[0][0].parts
    assert crop is items[0].crop and text == "\n" + items[0].question  # "<image>\n{question}"


def test_likelihood_crop_scorer_template_and_reduction() -> None:
    item = _item(2)
    policy = FakePolicy(logps=[-1.0])
    scorer = LikelihoodCropScorer(template="{question}\n<image>", reduction="mean")
    assert scorer.score([item], policy)[0].score == pytest.approx(math.exp(-1.0))
    prompts, _, reduction = policy.logprob_calls[0]
    assert prompts[0][0].parts == (item.question + "\n", item.crop) and reduction == "mean"
    for bad in ("{question}", "<image><image>{question}", "<image>{answer}"):
        with pytest.raises(ValueError, match="LikelihoodCropScorer"):
            LikelihoodCropScorer(template=bad)
    with pytest.raises(ValueError, match="reduction"):
        LikelihoodCropScorer(reduction="max")
    with pytest.raises(RuntimeError, match="shape"):
        LikelihoodCropScorer().score([item, item], FakePolicy(logps=[-1.0]))


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["judge", "random", "self"])
def test_every_scorer_config_instantiates(name: str) -> None:
    """``_target_`` is the one registry: each conf/scorer file builds two scorers with a ``score`` method."""
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "scorer" / f"{name}.yaml")
    cfg = OmegaConf.merge({"prompt": {"direct": "{question}\n<image>"}}, {"scorer": cfg})
    for role in ("answer", "crop"):
        scorer = instantiate(cfg.scorer[role])
        assert type(scorer).__module__ == "visrl.rollout.scorers" and callable(scorer.score)


def test_hydra_instantiation() -> None:
    from hydra.utils import instantiate

    scorer = instantiate(
        {
            "_target_": "visrl.rollout.scorers.LikelihoodCropScorer",
            "template": "{question} <image>",
            "reduction": "sum",
        }
    )
    assert isinstance(scorer, LikelihoodCropScorer) and scorer.template == "{question} <image>"
    assert isinstance(instantiate({"_target_": "visrl.rollout.scorers.JudgeCropScorer"}), JudgeCropScorer)


def test_random_scorer_is_seeded_uniform_and_content_keyed() -> None:
    """Same item + seed -> same score; another seed or answer -> another score; all in [0, 1)."""
    from visrl.rollout.scorers import RandomScorer

    a = ScoreItem("q", "gold", "ans", None, None)
    b = ScoreItem("q", "gold", "other", None, None)
    s1, s2 = RandomScorer(seed=1), RandomScorer(seed=2)
    assert s1.score([a])[0].score == s1.score([a])[0].score
    assert s1.score([a])[0].score != s2.score([a])[0].score
    assert s1.score([a])[0].score != s1.score([b])[0].score
    scores = [r.score for r in s1.score([ScoreItem("q", "g", str(i), None, None) for i in range(200)])]
    assert all(0.0 <= x < 1.0 for x in scores) and 0.35 < sum(scores) / len(scores) < 0.65
