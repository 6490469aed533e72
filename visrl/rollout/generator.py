"""Batched rollouts of the self-evolution loop (VisRL §3.3): candidates per question.

For each RL-pool question the current policy samples ``n_boxes`` focus boxes (step 1), the image is
cropped to each, the policy answers from [full view, crop view] (step 2), and M_org (the frozen starting
model) scores every candidate twice: answer vs. the standard answer, and crop relevance
(:mod:`visrl.rollout.scorers`). :mod:`visrl.rollout.pairs` then filters the candidates into pairs.

How it differs from the reference's one-request-per-candidate loop:

* **Batched.** Questions go in fixed chunks of ``batch_size``; per chunk there is ONE step-1
  ``policy.generate`` call with ``num_return_sequences=n_boxes`` and ONE step-2 call for all answers
  (KV cache, left padding; ``VLMPolicy`` splits into memory-sized batches itself).
* **Deterministic and resumable.** Chunk ``i`` is ``questions[i*bs:(i+1)*bs]`` and its sampling is
  seeded by ``(seed, i)`` only, so results depend neither on where a run resumed nor on which process ran
  the chunk. Each chunk's rows are appended in one write + fsync; a restart drops a torn tail, keeps the
  complete chunks and continues. With ``shard=(rank, world)`` a process runs the chunks ``i % world ==
  rank``; :func:`~visrl.rollout.candidates.merge_shards` gives the single-process file byte for byte.
* **Bad boxes.** Candidates are taken in attempts (0, 1), (2, 3), ...: when the second box of an attempt
  overlaps the first with IoU > ``iou_threshold`` it is replaced by a random box of the first's size with
  zero overlap, snapped to what the backbone can write (:mod:`visrl.rollout.badbox`), ``synthetic: true``.
  Departures: when no disjoint box exists (e.g. the first box covers the image) the sampled box is kept
  and ``synthesis_failed`` counted (the reference drops the attempt); an attempt whose first or second
  box does not parse gets no replacement.
* **Unparsable boxes** stay as candidate rows with their ``parse_failure`` and no answer or scores, so
  parse rates are exact; the filter ignores them, as the reference drops ``None``-scored candidates.

The generator NEVER reads ground-truth boxes: records are reduced to :class:`RolloutQuestion` (uid,
question, answer, image path) on entry.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visrl.data.box_formats import BoxFormat
from visrl.data.boxes import Box, Size
from visrl.data.hashing import text_sha256
from visrl.data.images import crop_view, load_rgb, resolve, to_view
from visrl.data.io import append_lines
from visrl.data.prompts import PromptTemplates
from visrl.data.records import VisCoTRecord
from visrl.models.fingerprint import policy_fingerprint
from visrl.models.protocols import Policy
from visrl.progress import progress
from visrl.rollout.badbox import format_snap, maybe_replace_bad
from visrl.rollout.candidates import Candidate, open_candidates, resume_candidates, shard_path
from visrl.rollout.scorers import ScoreItem, Scorer

__all__ = [
    "BadBoxConfig",
    "RolloutConfig",
    "RolloutQuestion",
    "derive_seed",
    "generate_candidates",
]

log = logging.getLogger(__name__)
_BOXES, _ANSWERS, _BAD = 0, 1, 2  # seed streams of a chunk
META_VERSION = 1


@dataclass(frozen=True)
class BadBoxConfig:
    """Bad-box synthesis (``rollout.bad_box``): on/off, the IoU above which a second box is replaced, and
    the size spread of the random replacement."""

    enabled: bool = True
    iou_threshold: float = 0.05
    spread: float = 0.3


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling settings of one iteration's rollouts (``conf/rollout``)."""

    n_boxes: int = 8
    temperature: float = 1.0
    answer_temperature: float = 1.0
    max_new_tokens: int = 24
    batch_size: int = 64  # questions per chunk (per step-1 generate call)
    bad_box: BadBoxConfig = field(default_factory=BadBoxConfig)
    fallback_box: bool = False  # an unparsable box is replaced by a random one (plumbing runs, weak models)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.bad_box, Mapping):
            object.__setattr__(self, "bad_box", BadBoxConfig(**self.bad_box))
        if self.n_boxes < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"RolloutConfig: n_boxes, batch_size and max_new_tokens must be >= 1, got {self.n_boxes}, "
                f"{self.batch_size}, {self.max_new_tokens}"
            )
        if self.temperature < 0 or self.answer_temperature < 0:
            raise ValueError("RolloutConfig: temperatures must be >= 0")
        if self.n_boxes > 1 and self.temperature == 0:
            raise ValueError("RolloutConfig: n_boxes > 1 needs temperature > 0 (greedy boxes are copies)")
        if self.seed < 0:
            raise ValueError(f"RolloutConfig: seed must be >= 0, got {self.seed}")

    @classmethod
    def from_mapping(
        cls, mapping: Mapping[str, Any], ignore: Sequence[str] = ("questions", "rejected_own_crop")
    ) -> RolloutConfig:
        """Build from the ``rollout`` config group; keys in ``ignore`` are the PreferenceDataModule's
        (questions per iteration, rejected_own_crop); unknown keys fail."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - names - set(ignore))
        if unknown:
            raise ValueError(f"RolloutConfig: unknown keys {unknown}; valid: {sorted(names)}")
        return cls(**{k: v for k, v in mapping.items() if k in names})


@dataclass(frozen=True)
class RolloutQuestion:
    """What the generator may know of an RL-pool record: never its box."""

    uid: str
    question: str
    answer: str
    image_path: str


def as_questions(questions: Sequence[VisCoTRecord | RolloutQuestion]) -> list[RolloutQuestion]:
    return [
        q if isinstance(q, RolloutQuestion) else RolloutQuestion(q.uid, q.question, q.answer, q.image_path)
        for q in questions
    ]


def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixed from non-negative integers (numpy SeedSequence: no correlated streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint32)[0])


def _scorer_id(scorer: Any) -> str:
    return repr(scorer) if dataclasses.is_dataclass(scorer) else type(scorer).__qualname__


# ------------------------------------------------------------------------------------------ one chunk
@dataclass
class _Chunk:
    index: int
    start: int  # question index of its first question
    questions: list[RolloutQuestion]
    images: list[Image.Image]  # originals
    views: list[Image.Image]  # the backbone's full views


def _random_box(rng: random.Random, snap: Any) -> Box:
    """A random box (side 0.2..0.5 of the image) snapped to what the model can write."""
    w, h = rng.uniform(0.2, 0.5), rng.uniform(0.2, 0.5)
    x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    box = Box(x, y, x + w, y + h)
    return snap(box) or box


def _box_fields(
    texts: Sequence[str],
    size: Size,
    fmt: BoxFormat,
    bad: BadBoxConfig,
    rng: random.Random,
    fallback: bool = False,
) -> list[dict]:
    """Parse one question's sampled box texts and apply the bad-box rule to each attempt (pair)."""
    parsed = [fmt.parse(t, size) for t in texts]
    fields = [
        {
            "box_text": t,
            "sampled_text": t,
            "box": p.box,
            "parse_failure": p.failure.value if p.failure else None,
            "synthetic": False,
            "synthesis_failed": False,
        }
        for t, p in zip(texts, parsed)
    ]
    snap = format_snap(fmt, size)
    if fallback:  # keep the failure reason, but explore with a random box the model could have written
        for i, p in enumerate(parsed):
            if p.box is None:
                box = _random_box(rng, snap)
                fields[i].update(box=box, box_text=fmt.format(box, size), synthetic=True)
                parsed[i] = fmt.parse(fields[i]["box_text"], size)
    if not bad.enabled:
        return fields
    for first in range(0, len(parsed) - 1, 2):
        good, second = parsed[first].box, parsed[first + 1].box
        if good is None or second is None:
            continue
        new = maybe_replace_bad(good, second, rng, bad.iou_threshold, spread=bad.spread, snap=snap)
        if new.synthetic and new.box is None:
            fields[first + 1]["synthesis_failed"] = True
        elif new.synthetic:
            fields[first + 1].update(box=new.box, box_text=fmt.format(new.box, size), synthetic=True)
    return fields


def _score(
    items: list[ScoreItem], scorer: Scorer, m_org: Policy, what: str
) -> list[tuple[float | None, str | None]]:
    results = scorer.score(items, m_org) if items else []
    if len(results) != len(items):
        raise RuntimeError(
            f"generator: the {what} scorer returned {len(results)} results for {len(items)} items"
        )
    return [(r.score, r.failure) for r in results]


def _step1(chunk: _Chunk, policy: Policy, templates: PromptTemplates, cfg: RolloutConfig) -> list[dict]:
    """Step 1 for a whole chunk in ONE generate call: sample, parse, bad-box rule; rows in order."""
    box_prompts = [templates.box_prompt(q.question, v) for q, v in zip(chunk.questions, chunk.views)]
    seed = derive_seed(cfg.seed, chunk.index, _BOXES)
    texts = policy.generate(
        box_prompts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        num_return_sequences=cfg.n_boxes,
        seed=seed,
    )
    if len(texts) != len(box_prompts) or any(len(t) != cfg.n_boxes for t in texts):
        raise RuntimeError(f"generator: chunk {chunk.index}: the policy returned the wrong number of boxes")
    fmt = policy.backbone.box_format
    rng = random.Random(derive_seed(cfg.seed, chunk.index, _BAD))
    rows = []
    for j, (q, image) in enumerate(zip(chunk.questions, chunk.images)):
        for c, fields in enumerate(
            _box_fields(texts[j], image.size, fmt, cfg.bad_box, rng, cfg.fallback_box)
        ):
            rows.append(
                {
                    "uid": q.uid,
                    "question_index": chunk.start + j,
                    "cand": c,
                    "chunk": chunk.index,
                    "image": q.image_path,
                    "image_size": list(image.size),
                    "question": q.question,
                    "answer_gold": q.answer,
                    **fields,
                    "answer": None,
                    "answer_score": None,
                    "answer_score_failure": None,
                    "crop_score": None,
                    "crop_score_failure": None,
                }
            )
    return rows


def _step2(
    rows: list[dict],
    chunk: _Chunk,
    policy: Policy,
    m_org: Policy,
    templates: PromptTemplates,
    cfg: RolloutConfig,
    scorers: tuple[Scorer, Scorer],
) -> None:
    """Crop, answer (ONE generate call) and score the chunk's boxed candidates; fills ``rows`` in place.

    The crop score depends on (question, box) only, so a box sampled several times for a question is
    crop-scored once (a confident policy repeats boxes often).
    """
    size = policy.backbone.image_size
    boxed = [r for r in rows if r["box"] is not None]
    crops: dict[tuple[int, tuple[float, ...]], Image.Image] = {}  # (question index, box) -> crop view
    items = []
    for r in boxed:
        j, key = r["question_index"] - chunk.start, (r["question_index"], r["box"].as_tuple())
        if key not in crops:
            crops[key] = crop_view(chunk.images[j], r["box"], size)
        items.append(ScoreItem(r["question"], r["answer_gold"], "", chunk.views[j], crops[key]))
    prompts = [templates.answer_prompt(it.question, it.image, it.crop) for it in items]
    seed = derive_seed(cfg.seed, chunk.index, _ANSWERS)
    answers = (
        policy.generate(
            prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.answer_temperature, seed=seed
        )
        if prompts
        else []
    )
    items = [dataclasses.replace(it, answer=out[0] if out else "") for it, out in zip(items, answers)]
    answer_scores = _score(items, scorers[0], m_org, "answer")
    unique: dict[int, ScoreItem] = {}  # id(crop) -> its first item
    for it in items:
        unique.setdefault(id(it.crop), it)
    by_crop = dict(zip(unique, _score(list(unique.values()), scorers[1], m_org, "crop")))
    for r, it, (a, af) in zip(boxed, items, answer_scores):
        s, sf = by_crop[id(it.crop)]
        r.update(
            answer=it.answer, answer_score=a, answer_score_failure=af, crop_score=s, crop_score_failure=sf
        )


def _run_chunk(
    chunk: _Chunk,
    policy: Policy,
    m_org: Policy,
    templates: PromptTemplates,
    cfg: RolloutConfig,
    scorers: tuple[Scorer, Scorer],
) -> list[Candidate]:
    """Sample, parse, synthesise, crop, answer and score every candidate of one chunk; in order.

    Weights are fixed within a chunk, so each model's vision features of an image (the full view in both
    steps, a crop when answering and when crop-scoring) are computed once (``VLMPolicy.vision_cache``).
    """
    with ExitStack() as stack:
        for model in {id(policy): policy, id(m_org): m_org}.values():
            if hasattr(model, "vision_cache"):
                stack.enter_context(model.vision_cache())
        rows = _step1(chunk, policy, templates, cfg)
        _step2(rows, chunk, policy, m_org, templates, cfg, scorers)
    for row in rows:  # the Box objects (exact pixels kept while cropping) become canonical xyxy lists
        row["box"] = list(row["box"].as_tuple()) if row["box"] is not None else None
    return [Candidate(**row) for row in rows]


# ---------------------------------------------------------------------------------------------- resume
def _plan(
    questions: list[RolloutQuestion], cfg: RolloutConfig, rank: int, world: int
) -> list[tuple[int, int, int]]:
    """(chunk index, first question index, number of questions) of this shard's chunks."""
    bs = cfg.batch_size
    n_chunks = -(-len(questions) // bs)
    return [(c, c * bs, min(bs, len(questions) - c * bs)) for c in range(n_chunks) if c % world == rank]


def generate_candidates(
    policy: Policy,
    m_org: Policy,
    questions: Sequence[VisCoTRecord | RolloutQuestion],
    templates: PromptTemplates,
    cfg: RolloutConfig,
    answer_scorer: Scorer,
    crop_scorer: Scorer,
    out_path: Path | str,
    image_root: Path | str,
    shard: tuple[int, int] = (0, 1),
    *,
    on_chunk: Callable[[int, list[Candidate]], None] | None = None,
    label: str = "rollouts",
) -> list[Candidate]:
    """Generate (or finish generating) the candidates of ``questions``; returns this shard's candidates.

    ``policy`` samples (a :class:`~visrl.models.policy.VLMPolicy`: ``generate`` and ``backbone`` with
    ``box_format`` and ``image_size``); ``m_org`` is what the scorers call. Rows go to ``out_path``
    (``candidates.rank{r}.jsonl`` when ``world > 1``, see :func:`shard_path`). ``on_chunk(index, rows)``
    runs after each chunk is durably written (tests inject crashes there); ``label`` names the progress display
    (candidates/s and ETA).
    """
    rank, world = shard
    if not (world >= 1 and 0 <= rank < world):
        raise ValueError(
            f"generate_candidates: shard must be (rank, world) with 0 <= rank < world, got {shard}"
        )
    qs = as_questions(questions)
    path = shard_path(out_path, rank, world)
    path.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = json.dumps([[q.uid, q.question, q.answer, q.image_path] for q in qs])
    meta = {
        "version": META_VERSION,
        "n_questions": len(qs),
        "questions_sha256": text_sha256(fingerprint),
        "config": dataclasses.asdict(cfg),
        "shard": [rank, world],
        "answer_scorer": _scorer_id(answer_scorer),
        "crop_scorer": _scorer_id(crop_scorer),
        "policy": policy_fingerprint(policy),
        "m_org": policy_fingerprint(m_org),
    }
    open_candidates(path, meta)
    plan = _plan(qs, cfg, rank, world)
    done = resume_candidates(path, plan, cfg.n_boxes)
    size = policy.backbone.image_size
    todo = [(c, start, n) for c, start, n in plan if c not in done]
    with progress(label, total=sum(n for _, _, n in todo) * cfg.n_boxes, unit="cand") as bar:
        for c, start, n in todo:
            images = [load_rgb(resolve(image_root, q.image_path)) for q in qs[start : start + n]]
            chunk = _Chunk(c, start, qs[start : start + n], images, [to_view(im, size) for im in images])
            rows = _run_chunk(chunk, policy, m_org, templates, cfg, (answer_scorer, crop_scorer))
            append_lines(path, [json.dumps(r.to_json()) for r in rows])
            done[c] = rows
            bar.advance(len(rows))
            if on_chunk is not None:
                on_chunk(c, rows)
    return [row for c, _, _ in plan for row in done[c]]
