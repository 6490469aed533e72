"""Answer judges: the Visual-CoT score parser, the OpenAI-compatible client (against the scripted local
server of ``tests/judge_server.py`` and a mocked transport), the local-model judge and the config builder."""

from __future__ import annotations

import json
import urllib.error

import pytest
import torch
from judge_server import StartServer

from visrl.benchmarks.judge import (
    FAILED_REPLY,
    VISCOT_JUDGE_SYSTEM,
    JudgeError,
    JudgeRequest,
    OpenAIJudge,
    PolicyJudge,
    build_judge,
    judge_answers,
    parse_score,
)

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("score: 0.8", 0.8),
        ("Score: 0.75", 0.75),  # lower-cased first
        ("SCORE: 1", 1.0),
        ("score: 3", 1.0),  # clamped to [0, 1]
        ("The answer is close. score: 0.6", 0.6),
        ("score: 0.8.", 0.8),  # a sentence-final period is dropped
        ("score:0.5", 0.0),  # the protocol regex needs "score: "
        ("score: -0.5", 0.0),  # no match: "[\d.]+" cannot start with "-"
        ("score: 0.2\nscore: 0.4", 0.0),  # two matches -> 0
        ("score: 0.5, final score: 0.5", 0.0),  # even when they agree
        ("The score is 0.7", 0.0),  # "score" without the "score: " form
        ("score: .", 0.0),
        ("score: 1.2.3", 0.0),
        ("0.9", 0.0),  # no "score" at all
        ("", 0.0),
        (FAILED_REPLY, 0.0),  # what the client returns when every attempt failed
    ],
)
def test_parse_score(reply: str, score: float) -> None:
    assert parse_score(reply) == pytest.approx(score)


def test_request_message_is_the_published_one() -> None:
    request = JudgeRequest("<image>\nWhat colour?", "red", "Red.")
    assert (
        request.user_message()
        == "\nquestion: <image>\nWhat colour?\nstandard answer: red\nmodel's answer: Red.\n"
    )
    assert VISCOT_JUDGE_SYSTEM.startswith("\nYou are responsible for proofreading the answers")
    assert 'Please output the score in the form "score: <score>".' in VISCOT_JUDGE_SYSTEM


def test_openai_client_against_a_local_server(
    judge_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VISRL_TEST_KEY", "sk-test")
    fake = judge_server([("ok", "score: 0.9"), ("status", 500), ("ok", "Score: 0.3"), ("ok", "no idea")])
    judge = OpenAIJudge(base_url=fake.url + "/", model="judge-x", api_key_env="VISRL_TEST_KEY",
                        timeout_s=5, retry_wait_s=0.0, concurrency=1)  # fmt: skip
    requests = [JudgeRequest("q1", "a", "a"), JudgeRequest("q2", "b", "c"), JudgeRequest("q3", "d", "e")]
    verdicts = judge_answers(judge, requests)
    assert [(v.score, v.parsed) for v in verdicts] == [(0.9, True), (0.3, True), (0.0, False)]
    assert len(fake.requests) == 4  # the 500 was retried
    first = fake.requests[0]
    assert first.path == "/v1/chat/completions" and first.headers["Authorization"] == "Bearer sk-test"
    assert first.body == {
        "model": "judge-x",
        "messages": [
            {"role": "system", "content": VISCOT_JUDGE_SYSTEM},
            {"role": "user", "content": "\nquestion: q1\nstandard answer: a\nmodel's answer: a\n"},
        ],
    }  # no temperature: the API default, as published


def test_openai_client_gives_up_after_the_retries(judge_server: StartServer) -> None:
    fake = judge_server([("status", 500)] * 3 + [("ok", "score: 1")])
    judge = OpenAIJudge(base_url=fake.url, api_key_env=None, retries=3, retry_wait_s=0.0, timeout_s=5)
    assert judge.complete([JudgeRequest("q", "a", "b")]) == [FAILED_REPLY]
    assert len(fake.requests) == 3 and "Authorization" not in fake.requests[0].headers


def test_openai_client_fails_fast_on_bad_credentials(
    judge_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = judge_server([("status", 401)] * 3)
    judge = OpenAIJudge(base_url=fake.url, api_key_env=None, retry_wait_s=0.0, timeout_s=5)
    with pytest.raises(JudgeError, match="HTTP 401"):
        judge.complete([JudgeRequest("q", "a", "b")])
    assert len(fake.requests) == 1
    monkeypatch.delenv("VISRL_MISSING_KEY", raising=False)
    with pytest.raises(JudgeError, match="VISRL_MISSING_KEY"):
        OpenAIJudge(api_key_env="VISRL_MISSING_KEY")


def test_openai_client_with_a_mocked_transport_keeps_order_and_retries_timeouts() -> None:
    attempts: dict[str, int] = {}

    def transport(url: str, body: bytes, headers: dict, timeout_s: float) -> bytes:
        data = json.loads(body)
        assert timeout_s == 2.5 and data["temperature"] == 0.0 and data["max_tokens"] == 8
        question = data["messages"][1]["content"].split("\n")[1]
        attempts[question] = attempts.get(question, 0) + 1
        if question.endswith("slow") and attempts[question] == 1:
            raise urllib.error.URLError(TimeoutError("timed out"))
        if question.endswith("broken"):
            return b'{"choices": []}'  # malformed response: retried, then "unknown"
        return json.dumps({"choices": [{"message": {"content": f"score: 0.{question[-1]}"}}]}).encode()

    judge = OpenAIJudge(api_key_env=None, timeout_s=2.5, retry_wait_s=0.0, temperature=0.0, max_tokens=8,
                        concurrency=3, transport=transport)  # fmt: skip
    questions = [f"question: q{i}" for i in range(1, 8)] + ["question: slow", "question: broken"]
    replies = judge.complete([JudgeRequest(q.removeprefix("question: "), "g", "p") for q in questions])
    assert replies[:7] == [f"score: 0.{i}" for i in range(1, 8)]  # input order despite the thread pool
    assert replies[7] == "score: 0.w" and attempts["question: slow"] == 2
    assert replies[8] == FAILED_REPLY and attempts["question: broken"] == 3


class TextPolicy:
    """Fake VLMPolicy: replies by the grading request it sees."""

    def __init__(self) -> None:
        self.prompts = []

    def generate(self, prompts, max_new_tokens, temperature=0.0, num_return_sequences=1, seed=None):
        assert temperature == 0.0 and max_new_tokens == 32
        self.prompts += prompts
        return [["score: 1" if "model's answer: yes\n" in p[0].text else "score: 0.25"] for p in prompts]


def test_policy_judge_prompts_text_only_and_is_built_from_config() -> None:
    policy = TextPolicy()
    judge = build_judge({"kind": "local", "batch_size": 2}, policy)
    assert isinstance(judge, PolicyJudge) and judge.name == "local:self"
    requests = [JudgeRequest("q", "yes", p) for p in ("yes", "no", "yes")]
    assert [v.score for v in judge_answers(judge, requests)] == [1.0, 0.25, 1.0]
    prompt = policy.prompts[0]
    assert len(prompt) == 1 and prompt[0].role == "user" and not prompt[0].images
    assert prompt[0].text == VISCOT_JUDGE_SYSTEM.strip() + requests[0].user_message()
    with pytest.raises(JudgeError, match="no model"):
        PolicyJudge().complete(requests)


def test_build_judge_variants(monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_judge(None) is None and build_judge("none") is None and build_judge({"kind": "none"}) is None
    judge = build_judge({"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key_env": None})
    assert isinstance(judge, OpenAIJudge) and judge.url == "http://127.0.0.1:9/v1/chat/completions"
    assert build_judge(judge) is judge
    with pytest.raises(ValueError, match="unknown kind 'gpt'.*none, openai, local"):
        build_judge({"kind": "gpt"})
    with pytest.raises(ValueError, match="takes no other fields"):
        build_judge({"kind": "none", "model": "x"})
    # the Hydra layout: one block per kind, `kind` picks the block; the other blocks are ignored
    blocks = {
        "openai": {"model": "judge-y", "api_key_env": None, "retries": 2},
        "local": {"max_new_tokens": 8},
    }
    assert build_judge({"kind": "none", **blocks}) is None
    judge = build_judge({"kind": "openai", **blocks})
    assert judge.name == "openai:judge-y" and judge.retries == 2
    local = build_judge({"kind": "local", **blocks}, TextPolicy())
    assert isinstance(local, PolicyJudge) and local.max_new_tokens == 8
    with pytest.raises(ValueError, match="not both"):
        build_judge({"kind": "openai", "model": "z", **blocks})
    with pytest.raises(ValueError, match="retries >= 1"):
        OpenAIJudge(api_key_env=None, retries=0)
