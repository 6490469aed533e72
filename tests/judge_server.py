"""A scripted OpenAI-compatible ``/chat/completions`` server on 127.0.0.1, for the judge client tests.

Why: ``OpenAIJudge`` (``visrl.benchmarks.judge``) talks HTTP through ``urllib``; the tests drive it against a
real socket on the loopback interface, so that the request it sends (path, headers, JSON body) and its
handling of every transport fault (HTTP errors, undecodable bodies, broken status lines, dropped connections,
timeouts) are checked end to end, without the network. One server serves both ``tests/test_judge.py`` (what
the client sends) and ``tests/test_judge_server.py`` (how it survives faults); the ``judge_server`` fixture in
``tests/conftest.py`` starts them and closes them after the test.

The server answers each POST with the next entry of its script:

* ``("ok", text)``: HTTP 200 with ``{"choices": [{"message": {"role": "assistant", "content": text}}]}``;
* ``("status", code)``: HTTP ``code`` with a JSON error body;
* ``("garbage", data)``: HTTP 200 with the raw bytes ``data`` as the body;
* ``("badline", None)``: a line that is not an HTTP status line, then the connection closes;
* ``("drop", None)``: the connection closes without a response;
* ``("sleep", seconds)``: waits, then answers ``("ok", "score: 1")`` (too late for a shorter client timeout).

An exhausted script answers ``("status", 500)``. Every request is recorded (:class:`RecordedRequest`), and
the server refuses to answer more than :data:`MAX_REQUESTS` (a bounded test: the handler raises, the
connection closes).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

MAX_REQUESTS = 64  # the server refuses to answer more than this many requests

FaultKind = Literal["ok", "status", "garbage", "badline", "drop", "sleep"]
Step = tuple[FaultKind, Any]
EXHAUSTED: Step = ("status", 500)
ERROR_BODY = b'{"error": "fault"}'


@dataclass
class RecordedRequest:
    """One POST as the server received it; ``body`` is the parsed JSON, ``None`` when it did not parse."""

    path: str
    headers: dict[str, str]
    body: Any


class ScriptedServer:
    """A ``ThreadingHTTPServer`` on an ephemeral loopback port answering POSTs from ``script`` (see the module
    docstring); ``url`` is its ``.../v1`` base URL, ``requests`` what it received, in order of arrival."""

    def __init__(self, script: list[Step]) -> None:
        self.script: list[Step] = list(script)
        self.requests: list[RecordedRequest] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def count(self) -> int:
        """How many requests arrived (including any refused past :data:`MAX_REQUESTS`)."""
        with self.lock:
            return len(self.requests)

    def next_step(self, request: RecordedRequest) -> Step:
        """Record ``request`` and pop the script entry that answers it."""
        with self.lock:
            self.requests.append(request)
            if len(self.requests) > MAX_REQUESTS:
                raise RuntimeError(f"more than {MAX_REQUESTS} requests: the client does not stop")
            return self.script.pop(0) if self.script else EXHAUSTED

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                kind, arg = server.next_step(RecordedRequest(self.path, dict(self.headers), body))
                if kind == "sleep":
                    time.sleep(float(arg))
                    kind, arg = "ok", "score: 1"  # too late: the client has given up
                if kind == "drop":
                    self.close_connection = True
                elif kind == "badline":
                    self.close_connection = True
                    self.wfile.write(b"NOT-HTTP garbage\r\n\r\n")
                elif kind == "ok":
                    message = {"role": "assistant", "content": arg}
                    self._reply(200, json.dumps({"choices": [{"message": message}]}).encode())
                elif kind == "garbage":
                    self._reply(200, bytes(arg))
                elif kind == "status":
                    self._reply(int(arg), ERROR_BODY)
                else:
                    raise ValueError(f"unknown script entry kind {kind!r}")

            def _reply(self, status: int, payload: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


StartServer = Callable[[list[Step]], ScriptedServer]  # the ``judge_server`` fixture: start one, get it back
