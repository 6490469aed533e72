"""The OpenAI-compatible judge client under faults, against a local server on 127.0.0.1.

The server answers from a script, one entry per request: a reply text, an HTTP error, a garbage body, a
broken HTTP status line, a dropped connection, or a delay longer than the client's timeout. Every fault is
retried with exponential back-off, then counted (``JudgeVerdict.failed``) and scored 0, never fatal; a
Visual-CoT evaluation with a failing judge still writes every prediction and counts the failures. The server
is ``tests/judge_server.py`` (the ``judge_server`` fixture).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from judge_server import StartServer, Step

from visrl.benchmarks import judge as judge_module
from visrl.benchmarks.judge import FAILED_REPLY, JudgeRequest, OpenAIJudge, judge_answers


def client(url: str, **kw: Any) -> OpenAIJudge:
    args = {"base_url": url, "api_key_env": None, "timeout_s": 0.3, "retries": 3, "retry_wait_s": 0.0,
            "concurrency": 1} | kw  # fmt: skip
    return OpenAIJudge(**args)


FAULTS: dict[str, Step] = {
    "timeout": ("sleep", 0.8),
    "http_500": ("status", 500),
    "http_503": ("status", 503),
    "garbage_body": ("garbage", b"\x00\xffnot json at all"),
    "json_without_choices": ("garbage", b'{"id": 1}'),
    "empty_content": ("ok", ""),
    "bad_status_line": ("badline", None),
    "dropped_connection": ("drop", None),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_is_retried_then_succeeds(judge_server: StartServer, fault: str) -> None:
    server = judge_server([FAULTS[fault], ("ok", "score: 0.7")])
    verdict = judge_answers(client(server.url), [JudgeRequest("q", "a", "b")])[0]
    assert (verdict.score, verdict.parsed, verdict.failed) == (0.7, True, False)
    assert server.count == 2


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_persisting_is_counted_not_fatal(judge_server: StartServer, fault: str) -> None:
    server = judge_server([FAULTS[fault]] * 2)
    verdict = judge_answers(client(server.url, retries=2), [JudgeRequest("q", "a", "b")])[0]
    assert (verdict.score, verdict.parsed, verdict.failed, verdict.reply) == (0.0, False, True, FAILED_REPLY)
    assert server.count == 2


def test_unparseable_scores_are_counted_apart_from_failures(judge_server: StartServer) -> None:
    server = judge_server(
        [("ok", "score: 1.2.3"), ("ok", "I think it is fine"), ("ok", "score: 0.2, score: 0.4")]
    )
    verdicts = judge_answers(client(server.url), [JudgeRequest(f"q{i}", "a", "b") for i in range(3)])
    assert [(v.score, v.parsed, v.failed) for v in verdicts] == [(0.0, False, False)] * 3
    assert server.count == 3  # a reply that says no score is an answer, not a fault: not retried


def test_back_off_doubles_between_attempts(
    judge_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []
    monkeypatch.setattr(judge_module.time, "sleep", waits.append)
    server = judge_server([("status", 500)] * 4)
    client(server.url, retries=4, retry_wait_s=0.5).complete([JudgeRequest("q", "a", "b")])
    assert waits == [0.5, 1.0, 2.0] and server.count == 4
    monkeypatch.setattr(judge_module, "MAX_WAIT_S", 0.75)
    waits.clear()
    capped = judge_server([("status", 500)] * 3)
    client(capped.url, retries=3, retry_wait_s=0.5).complete([JudgeRequest("q", "a", "b")])
    assert waits == [0.5, 0.75]


def test_visual_cot_evaluation_with_a_failing_judge_counts_and_continues(
    judge_server: StartServer, tmp_path: Path
) -> None:
    from test_eval_faults import Scripted, bench, rows_of, write_dataset

    from visrl.data.prompts import REFERENCE

    root = tmp_path / "viscot"
    write_dataset(root, "gqa", 2)
    write_dataset(root, "vsr", 2)
    server = judge_server([("ok", "score: 1"), ("status", 500), ("status", 500), ("ok", "no score"),
                           ("sleep", 0.8), ("sleep", 0.8)])  # fmt: skip
    judge = {"kind": "openai", "base_url": server.url, "api_key_env": None, "timeout_s": 0.3, "retries": 2,
             "retry_wait_s": 0.0, "concurrency": 1}  # fmt: skip
    metrics = bench(root, judge=judge).evaluate(Scripted(), REFERENCE, tmp_path / "out")
    assert len(rows_of(tmp_path / "out")) == 4
    assert (
        metrics["gqa/judge"] == 0.5
        and metrics["gqa/judge_failed"] == 1
        and metrics["gqa/judge_unparsed"] == 1
    )
    assert (
        metrics["vsr/judge_failed"] == 1
        and metrics["vsr/judge_unparsed"] == 2
        and metrics["overall/judge"] == 0.25
    )
