"""The OpenAI-compatible judge client under faults, against a local server on 127.0.0.1.

The server answers from a script, one entry per request: a reply text, an HTTP error, a garbage body, a
broken HTTP status line, a dropped connection, or a delay longer than the client's timeout. Every fault is
retried with exponential back-off, then counted (``JudgeVerdict.failed``) and scored 0, never fatal; a
Visual-CoT evaluation with a failing judge still writes every prediction and counts the failures.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from visrl.benchmarks import judge as judge_module
from visrl.benchmarks.judge import FAILED_REPLY, JudgeRequest, OpenAIJudge, judge_answers

MAX_REQUESTS = 64  # the server refuses to run longer than this (a bounded test)


class FaultServer:
    """``script`` entries: ``("ok", text)``, ``("status", code)``, ``("garbage", bytes)``,
    ``("badline", None)``, ``("drop", None)``, ``("sleep", seconds)``; exhausted -> HTTP 500."""

    def __init__(self, script: list[tuple[str, object]]):
        self.script, self.count, self.lock = list(script), 0, threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                self.rfile.read(int(self.headers["Content-Length"]))
                with outer.lock:
                    outer.count += 1
                    assert outer.count <= MAX_REQUESTS
                    kind, arg = outer.script.pop(0) if outer.script else ("status", 500)
                if kind == "sleep":
                    time.sleep(float(arg))
                    kind, arg = "ok", "score: 1"  # too late: the client has given up
                if kind == "drop":
                    self.close_connection = True
                    return
                if kind == "badline":
                    self.wfile.write(b"NOT-HTTP garbage\r\n\r\n")
                    return
                if kind == "ok":
                    body = json.dumps({"choices": [{"message": {"content": arg}}]}).encode()
                elif kind == "garbage":
                    body = arg
                else:
                    body = b'{"error": "fault"}'
                try:
                    self.send_response(200 if kind in ("ok", "garbage") else int(arg))
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator:
    servers: list[FaultServer] = []

    def start(script: list[tuple[str, object]]) -> FaultServer:
        servers.append(FaultServer(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def client(url: str, **kw) -> OpenAIJudge:
    args = {"base_url": url, "api_key_env": None, "timeout_s": 0.3, "retries": 3, "retry_wait_s": 0.0,
            "concurrency": 1} | kw  # fmt: skip
    return OpenAIJudge(**args)


FAULTS = {
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
def test_each_fault_is_retried_then_succeeds(serve, fault: str) -> None:
    server = serve([FAULTS[fault], ("ok", "score: 0.7")])
    verdict = judge_answers(client(server.url), [JudgeRequest("q", "a", "b")])[0]
    assert (verdict.score, verdict.parsed, verdict.failed) == (0.7, True, False)
    assert server.count == 2


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_persisting_is_counted_not_fatal(serve, fault: str) -> None:
    server = serve([FAULTS[fault]] * 2)
    verdict = judge_answers(client(server.url, retries=2), [JudgeRequest("q", "a", "b")])[0]
    assert (verdict.score, verdict.parsed, verdict.failed, verdict.reply) == (0.0, False, True, FAILED_REPLY)
    assert server.count == 2


def test_unparseable_scores_are_counted_apart_from_failures(serve) -> None:
    server = serve([("ok", "score: 1.2.3"), ("ok", "I think it is fine"), ("ok", "score: 0.2, score: 0.4")])
    verdicts = judge_answers(client(server.url), [JudgeRequest(f"q{i}", "a", "b") for i in range(3)])
    assert [(v.score, v.parsed, v.failed) for v in verdicts] == [(0.0, False, False)] * 3
    assert server.count == 3  # a reply that says no score is an answer, not a fault: not retried


def test_back_off_doubles_between_attempts(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(judge_module.time, "sleep", waits.append)
    server = serve([("status", 500)] * 4)
    client(server.url, retries=4, retry_wait_s=0.5).complete([JudgeRequest("q", "a", "b")])
    assert waits == [0.5, 1.0, 2.0] and server.count == 4
    monkeypatch.setattr(judge_module, "MAX_WAIT_S", 0.75)
    waits.clear()
    capped = serve([("status", 500)] * 3)
    client(capped.url, retries=3, retry_wait_s=0.5).complete([JudgeRequest("q", "a", "b")])
    assert waits == [0.5, 0.75]


def test_visual_cot_evaluation_with_a_failing_judge_counts_and_continues(serve, tmp_path: Path) -> None:
    from test_eval_faults import Scripted, bench, rows_of, write_dataset

    from visrl.data.prompts import REFERENCE

    root = tmp_path / "viscot"
    write_dataset(root, "gqa", 2)
    write_dataset(root, "vsr", 2)
    server = serve([("ok", "score: 1"), ("status", 500), ("status", 500), ("ok", "no score"), ("sleep", 0.8),
                    ("sleep", 0.8)])  # fmt: skip
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
