"""LLM judges that grade a free-form answer against the gold answer: the Visual-CoT "GPT score".

The Visual-CoT benchmark (which VisRL §4 evaluates on) scores answers with an LLM judge, following
``llava/eval/eval_cot_score.py`` of deepcs233/Visual-CoT (Apache-2.0) exactly:

* messages: the system prompt :data:`VISCOT_JUDGE_SYSTEM` and the user message
  ``"\\nquestion: %s\\nstandard answer: %s\\nmodel's answer: %s\\n"``; no temperature is sent (the API
  default), model ``gpt-3.5-turbo-1106``;
* up to 3 attempts; after that the reply is the string ``"unknown"``;
* parsing (:func:`parse_score`): lower-case the reply; if it lacks ``score`` or
  ``re.findall(r"score: ([\\d\\.]+)")`` does not find exactly one match, the score is 0; otherwise the
  number clamped to [0, 1]. Departures (the published script crashes on both): a sentence-final period
  is dropped (``"score: 0.8."`` -> 0.8) and a match that is still not a number (``"1.2.3"``) scores 0.

Two clients: :class:`OpenAIJudge` (any OpenAI-compatible ``/chat/completions`` endpoint — OpenAI, vLLM,
SGLang — through ``urllib``, requests in a small thread pool) and :class:`PolicyJudge`
(a local ``VLMPolicy`` prompted text-only; with no model given it is the policy under evaluation, the
"self-judge" setting of VisRL's data generation). :func:`build_judge` turns a config mapping into either.

Why urllib and not the ``openai`` package: the protocol fixes the retry semantics (N attempts, then the
reply ``"unknown"`` scores 0), and a judge fault must never abort an evaluation. The ``openai`` client
retries on its own schedule, raises typed errors per status and needs a key even for local servers; its
one POST is what this client sends, so the library would add a dependency without removing logic. Every
failure here (timeout, refused connection, HTTP 5xx, a body that is not the expected JSON, an empty
reply) is retried with exponential back-off, then counted (``JudgeVerdict.failed``); only refused
credentials (HTTP 401/403) stop, at the first request, since every later answer would score 0.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from visrl.data.prompts import Message
from visrl.models.protocols import Policy

__all__ = [
    "FAILED_REPLY",
    "JUDGE_KINDS",
    "VISCOT_JUDGE_SYSTEM",
    "VISCOT_JUDGE_USER",
    "Judge",
    "JudgeError",
    "JudgeRequest",
    "JudgeVerdict",
    "OpenAIJudge",
    "PolicyJudge",
    "build_judge",
    "judge_answers",
    "parse_score",
]

log = logging.getLogger(__name__)

# Verbatim from Visual-CoT llava/eval/eval_cot_score.py (BASE_PROMPT and PROMPT, Apache-2.0), leading and
# trailing newlines included: the exact wording is part of the protocol (it moves the scores).
VISCOT_JUDGE_SYSTEM = (
    "\nYou are responsible for proofreading the answers, you need to give a score to the model's answer by "
    "referring to the standard answer, based on the given question. The full score is 1 point and the minimum "
    'score is 0 points. Please output the score in the form "score: <score>". The evaluation criteria require '
    "that the closer the model's answer is to the standard answer, the higher the score.\n"
)
VISCOT_JUDGE_USER = "\nquestion: %s\nstandard answer: %s\nmodel's answer: %s\n"
FAILED_REPLY = "unknown"  # what the published client returns once its retries are spent
MAX_WAIT_S = 60.0  # cap of the exponential back-off between attempts

_SCORE_RE = re.compile(r"score: ([\d\.]+)")


class JudgeError(RuntimeError):
    """A judge failure that retrying cannot fix (bad credentials, missing API key, unusable config)."""


@dataclass(frozen=True)
class JudgeRequest:
    """One answer to grade. ``question`` is passed as the protocol defines it (Visual-CoT keeps "<image>\\n")."""

    question: str
    gold: str
    pred: str

    def user_message(self) -> str:
        return VISCOT_JUDGE_USER % (self.question, self.gold, self.pred)


@dataclass(frozen=True)
class JudgeVerdict:
    """The parsed score (0 when unparseable), whether a score was found, the raw reply, and whether the
    request itself failed (every attempt timed out or errored: the reply is ``FAILED_REPLY``)."""

    score: float
    parsed: bool
    reply: str
    failed: bool = False


def _parse(reply: str) -> float | None:
    text = reply.lower()
    if "score" not in text:
        return None
    found = _SCORE_RE.findall(text)
    if len(found) != 1:
        return None
    try:
        value = float(found[0].rstrip("."))  # "0.8." ends a sentence
    except ValueError:  # "1.2.3", "." -- the published script would crash here
        return None
    return min(1.0, max(0.0, value))


def parse_score(reply: str) -> float:
    """The Visual-CoT score of a judge reply: exactly one ``score: <number>`` -> clamp to [0, 1], else 0.

    >>> parse_score("Score: 0.8"), parse_score("score: 3"), parse_score("score: 0.2, score: 0.4")
    (0.8, 1.0, 0.0)
    """
    value = _parse(reply)
    return 0.0 if value is None else value


class Judge(Protocol):
    """A judge turns grading requests into raw replies (``FAILED_REPLY`` when a request failed)."""

    name: str

    def complete(self, requests: Sequence[JudgeRequest]) -> list[str]: ...


def judge_answers(judge: Judge, requests: Sequence[JudgeRequest]) -> list[JudgeVerdict]:
    """Grade ``requests`` with ``judge`` and parse every reply with :func:`parse_score`'s rule."""
    replies = judge.complete(requests)
    if len(replies) != len(requests):
        raise JudgeError(f"judge {judge.name!r} returned {len(replies)} replies for {len(requests)} requests")
    verdicts = []
    for reply in replies:
        value = _parse(reply)
        failed = reply == FAILED_REPLY
        verdicts.append(JudgeVerdict(0.0 if value is None else value, value is not None, reply, failed))
    return verdicts


# transport(url, body, headers, timeout_s) -> response body; raises urllib.error.URLError/HTTPError
Transport = Callable[[str, bytes, dict[str, str], float], bytes]


def urllib_transport(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> bytes:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return response.read()


class OpenAIJudge:
    """Client of an OpenAI-compatible chat endpoint (``POST {base_url}/chat/completions``).

    ``api_key_env`` names the environment variable holding the key (sent as ``Bearer``); ``None`` sends no
    key (local servers). ``temperature``/``max_tokens`` are sent only when set (the protocol sends
    neither). Authentication errors (HTTP 401/403) raise :class:`JudgeError` at once instead of silently
    scoring every answer 0; other errors are retried ``retries`` times in total, waiting
    ``retry_wait_s * 2**k`` (at most ``MAX_WAIT_S``) after the k-th failure, then ``"unknown"``.
    """

    def __init__(
        self,
        base_url: str = "https://api.openai.com/v1",
        model: str = "gpt-3.5-turbo-1106",
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        retries: int = 3,
        retry_wait_s: float = 1.0,
        temperature: float | None = None,
        max_tokens: int | None = None,
        concurrency: int = 4,
        system_prompt: str = VISCOT_JUDGE_SYSTEM,
        transport: Transport | None = None,
    ):
        if retries < 1 or concurrency < 1 or timeout_s <= 0:
            raise ValueError(
                f"OpenAIJudge: need retries >= 1, concurrency >= 1, timeout_s > 0 (got {retries}, "
                f"{concurrency}, {timeout_s})"
            )
        self.name = f"openai:{model}"
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout_s, self.retries, self.retry_wait_s = model, timeout_s, retries, retry_wait_s
        self.temperature, self.max_tokens, self.concurrency = temperature, max_tokens, concurrency
        self.system_prompt = system_prompt
        self.transport = transport or urllib_transport
        self.headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise JudgeError(
                    f"OpenAIJudge: environment variable {api_key_env} (judge.openai.api_key_env) is not set; "
                    "export it, or set judge.openai.api_key_env=null for an endpoint that needs no key"
                )
            self.headers["Authorization"] = f"Bearer {key}"

    def payload(self, request: JudgeRequest) -> dict[str, Any]:
        data: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": request.user_message()},
            ],
        }
        if self.temperature is not None:
            data["temperature"] = self.temperature
        if self.max_tokens is not None:
            data["max_tokens"] = self.max_tokens
        return data

    def reply(self, request: JudgeRequest) -> str:
        """The judge's reply text, or :data:`FAILED_REPLY` after ``retries`` failed attempts."""
        body = json.dumps(self.payload(request)).encode()
        for attempt in range(1, self.retries + 1):
            try:
                raw = self.transport(self.url, body, self.headers, self.timeout_s)
                content = json.loads(raw)["choices"][0]["message"]["content"]
                if not isinstance(content, str) or not content.strip():
                    raise ValueError(f"no reply text in the response (content={content!r:.60})")
                return content
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):
                    raise JudgeError(
                        f"OpenAIJudge: {self.url} refused the credentials (HTTP {e.code})"
                    ) from e
                error: Exception = e
            except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError) as e:
                error = e  # network and timeouts, a broken HTTP reply, a body that is not the JSON expected
            log.warning("judge request %d/%d to %s failed: %s", attempt, self.retries, self.url, error)
            if attempt < self.retries:
                time.sleep(min(self.retry_wait_s * 2 ** (attempt - 1), MAX_WAIT_S))
        return FAILED_REPLY

    def complete(self, requests: Sequence[JudgeRequest]) -> list[str]:
        if self.concurrency == 1 or len(requests) <= 1:
            return [self.reply(r) for r in requests]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self.reply, requests))  # keeps the input order


class PolicyJudge:
    """A local model as judge: a ``VLMPolicy`` given one text-only user turn, greedy decoding.

    The chat types have no system role, so the turn is ``system_prompt.strip() + user message``. With
    ``policy=None`` and ``backbone_path=None`` the judge must be bound (:meth:`bind`) to a policy — the
    benchmark binds the policy under evaluation (a self-judge).
    """

    def __init__(
        self,
        policy: Policy | None = None,
        backbone_path: str | None = None,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        system_prompt: str = VISCOT_JUDGE_SYSTEM,
    ):
        if policy is None and backbone_path:
            from visrl.models.backbone import load_backbone  # lazy: heavy imports
            from visrl.models.policy import VLMPolicy

            policy = VLMPolicy(load_backbone(backbone_path), batch_size=batch_size)
        self.policy = policy
        self.name = f"local:{backbone_path}" if backbone_path else "local:self"
        self.max_new_tokens, self.batch_size, self.system_prompt = max_new_tokens, batch_size, system_prompt

    def bind(self, policy: Policy) -> PolicyJudge:
        if self.policy is None:
            self.policy = policy
        return self

    def complete(self, requests: Sequence[JudgeRequest]) -> list[str]:
        if self.policy is None:
            raise JudgeError("PolicyJudge: no model (give policy=, backbone_path=, or bind() one)")
        replies: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            prompts = [[Message("user", (self.system_prompt.strip() + r.user_message(),))] for r in chunk]
            outs = self.policy.generate(prompts, max_new_tokens=self.max_new_tokens, temperature=0.0)
            replies += [o[0] for o in outs]
        return replies


JUDGE_KINDS = ("none", "openai", "local")


def build_judge(spec: Judge | Mapping[str, Any] | str | None, policy: Policy | None = None) -> Judge | None:
    """A judge from a config mapping with ``kind`` in :data:`JUDGE_KINDS`.

    The client's arguments sit either beside ``kind`` (``{"kind": "openai", "model": ...}``) or in a
    block named after each kind (``{"kind": "openai", "openai": {...}, "local": {...}}``, so a Hydra
    override flips ``judge.kind`` alone); blocks of the other kinds are ignored. ``None``/``"none"`` -> no
    judge; ``"local"`` without a model is bound to ``policy`` (a self-judge). A built judge is returned as
    is (a :class:`PolicyJudge` bound to ``policy``).
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, Mapping):
        return spec.bind(policy) if isinstance(spec, PolicyJudge) and policy is not None else spec
    args = dict(spec)
    kind = args.pop("kind", "none")
    if kind not in JUDGE_KINDS:
        raise ValueError(f"judge config: unknown kind {kind!r}; valid kinds: {', '.join(JUDGE_KINDS)}")
    blocks = {k: args.pop(k) for k in JUDGE_KINDS[1:] if isinstance(args.get(k), Mapping)}
    if kind in blocks:
        if args:
            raise ValueError(f"judge config: give the {kind} fields in judge.{kind} or beside kind, not both "
                             f"(got {sorted(args)} beside it)")  # fmt: skip
        args = dict(blocks[kind])
    if kind == "none":
        if args:
            raise ValueError(f"judge config: kind='none' takes no other fields, got {sorted(args)}")
        return None
    if kind == "openai":
        return OpenAIJudge(**args)
    judge = PolicyJudge(**args)
    return judge.bind(policy) if policy is not None else judge
