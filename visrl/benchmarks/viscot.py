"""The Visual-CoT benchmark (Shao et al. 2024), the benchmark VisRL reports (paper §4), run as published.

Data (HF ``deepcs233/Visual-CoT``): ``root/benchmark/<ds>.json`` (questions, answers), the row-aligned
``root/benchmark_det/<ds>.jsonl`` (expression, pixel box, width/height) and the images at
``root/<image path>`` (``cot/<ds>/...``; ``textcap`` lives in ``cot/textvqa/``; ``v7w``/``visual7w``
spellings are both tried). Protocol of deepcs233/Visual-CoT (``model_cot_det_loader.py``,
``model_cot_loader.py``, ``eval_cot_score.py``, ``REC/calculation.py``, ``tools/cot_*get_result.py``):

1. Box pass: one user turn ``"<image>\\n" + expression.lower() + ". Please provide the bounding box
   coordinate of the region that can help you answer the question better."`` (so ``"dealer ?."``), greedy,
   128 new tokens.
2. Answer pass, three turns: user ``"<image>\\n" + question``; assistant = the raw box-pass text; user
   ``"<image>\\nPlease answer the question based on the original image and local detail image." +
   question + " "``. Images: original, then the square crop (``crop_square``, half side >= 112 px) around
   the predicted box. A box that does not parse falls back to the whole image and is counted per reason.
3. Answer score: the judge ("GPT score", :mod:`visrl.benchmarks.judge`; question = ``"<image>\\n" +
   question``), plus offline exact match and ANLS (:mod:`visrl.benchmarks.metrics`).
4. Detection: Acc@IoU>0.5 (strict). Prediction = sq-frame box × max(W, H); target = the det pixel box with
   ``(m - min) // 2`` added on the short axis; continuous IoU. Parse failures are wrong. Faithfully, the 8
   DocVQA ground-truth boxes with swapped corners (vertical text) can never be hit (``gt_degenerate``).
5. Aggregation: per-dataset means; ``overall`` = UNWEIGHTED mean of the scored datasets' means; groups
   Text/Chart/General/Reasoning/Fine-grained = means of their datasets' means. The published detection
   "Average" drops datasets scoring exactly 0; it is reported as ``overall/det_acc_viscot_avg`` beside our
   plain mean ``overall/det_acc``.

Box texts in the Visual-CoT format (:class:`~visrl.data.box_formats.SqFloatFormat`) are read exactly as
published (:func:`parse_published`: unclamped, unordered). Departures: other backbones' formats (Qwen,
grid) are read with their :class:`~visrl.data.box_formats.BoxFormat` and converted to the sq frame;
``prompt_style="templates"`` replaces both prompts with the policy's training ``PromptTemplates`` (box
prompt, then answer prompt with image + crop) for models not trained on the Visual-CoT wording; tiny
backbones see images and crops through ``to_view``; a judge reply of ``"score: 0.8."`` scores 0.8.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from visrl.benchmarks.base import Predictions, is_skipped, read_predictions, scored_rows, write_metrics
from visrl.benchmarks.effects import paired_bootstrap
from visrl.benchmarks.judge import Judge, JudgeRequest, build_judge, judge_answers
from visrl.benchmarks.metrics import anls, exact_match
from visrl.benchmarks.viscot_data import ViscotItem, load_dataset, load_items, open_image, resolve_image
from visrl.benchmarks.viscot_metrics import GROUPS, MEANS, SCORED_DATASETS, aggregate, results_markdown
from visrl.data.box_formats import BoxFormat, ParseFailure, SqFloatFormat
from visrl.data.boxes import Box, crop_square, from_sq, iou, to_sq
from visrl.data.images import to_view
from visrl.data.io import write_text_atomic
from visrl.data.prompts import Message, Prompt, PromptTemplates, fill, user
from visrl.data.records import DetRecord
from visrl.models.protocols import Policy
from visrl.progress import progress

__all__ = [
    "GROUPS",
    "SCORED_DATASETS",
    "BoxReading",
    "VisCoTBenchmark",
    "ViscotItem",
    "aggregate",
    "detection_iou",
    "load_dataset",
    "load_items",
    "parse_published",
    "read_box",
    "resolve_image",
    "results_markdown",
]

log = logging.getLogger(__name__)

DET_SUFFIX = (
    ". Please provide the bounding box coordinate of the region that can help you answer the question better."
)
ANSWER_PREFIX = "<image>\nPlease answer the question based on the original image and local detail image."
FULL_IMAGE = Box(0.0, 0.0, 1.0, 1.0)

# Published values beyond +-SQ_LIMIT padded-square sides are out_of_range (departure): such a box lies
# outside the image or spans ~SQ_LIMIT sides on one axis, so its IoU with a box near the image stays
# < 0.1 (detection unchanged) and its published crop is the whole image or an edge strip; read as
# published, "1e308" overflowed to inf (a crash) and "1e20" gave a 0x0 crop.
SQ_LIMIT = 100.0


def parse_published(text: str) -> tuple[float, float, float, float] | None:
    """The published coordinate parse (``model_cot_loader.py``, ``REC/calculation.py``): drop ``" ."``,
    ``[`` and ``]``, split at ``", "``, ``float`` each piece; ``None`` where that raises. Values are kept
    as read: unordered and outside [0, 1] alike. Departures: exactly 4 finite numbers are required (with
    more, the published detection reads the first 4 and its answer pass crashes)."""
    try:
        values = [float(v) for v in text.replace(" .", "").replace("[", "").replace("]", "").split(", ")]
    except ValueError:
        return None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        return None
    return values[0], values[1], values[2], values[3]


@dataclass(frozen=True)
class BoxReading:
    """A box-pass text as the protocol reads it: ``sq`` (sq-frame values scored by the detection metric),
    ``box`` (canonical, for the crop), or ``failure`` (the reason; then both are None)."""

    sq: tuple[float, float, float, float] | None
    box: Box | None
    failure: str | None


def read_box(fmt: BoxFormat, text: str, size: tuple[int, int]) -> BoxReading:
    """Read a box-pass text. The Visual-CoT text format (:class:`SqFloatFormat`) is read exactly as
    published (:func:`parse_published`, values unclamped, e.g. GT boxes reaching past the image in DUDE);
    a text it rejects fails with the format's own reason, or ``not_protocol_format`` when only the more
    lenient format parser finds a box. Other formats (Qwen, grid) go through ``fmt.parse`` and ``to_sq``."""
    if isinstance(fmt, SqFloatFormat):
        sq = parse_published(text)
        if sq is not None and max(map(abs, sq)) > SQ_LIMIT:
            return BoxReading(None, None, ParseFailure.OUT_OF_RANGE.value)
        if sq is not None:
            return BoxReading(sq, from_sq(sq, size), None)
        failure = fmt.parse(text, size).failure
        return BoxReading(None, None, failure.value if failure else "not_protocol_format")
    parsed = fmt.parse(text, size)
    if parsed.box is None:
        return BoxReading(None, None, parsed.failure.value if parsed.failure else "no_box")
    return BoxReading(to_sq(parsed.box, size), parsed.box, None)


def detection_iou(pred_sq: Sequence[float] | None, det: DetRecord) -> float:
    """IoU of a prediction (sq frame) with the det box in the padded-square pixel frame (``REC/calculation.py``).

    pred × m; target = det px box + ``(m - min) // 2`` on the short axis; continuous IoU. A missing
    prediction scores 0; a box with swapped corners (either side) has no intersection and scores 0.
    """
    if pred_sq is None:
        return 0.0
    w, h = det.size
    m, o = max(w, h), (max(w, h) - min(w, h)) // 2
    p = Box(*(v * m for v in pred_sq))  # [4] sq px
    x1, y1, x2, y2 = det.bbox
    gt = Box(x1, y1 + o, x2, y2 + o) if w > h else Box(x1 + o, y1, x2 + o, y2)  # w == h -> o == 0
    return iou(p, gt)


def _prediction_row(
    it: ViscotItem,
    image_size: tuple[int, int],
    box_text: str,
    reading: BoxReading,
    crop_px: Sequence[int],
    pred: str,
) -> dict[str, Any]:
    """One predictions.jsonl row (the judge fields are added after judging)."""
    x1, y1, x2, y2 = it.det.bbox
    box_iou = detection_iou(reading.sq, it.det)
    return {
        "uid": it.uid, "dataset": it.dataset, "row": it.row, "question_id": it.record.question_id,
        "image": it.record.image_path,  # relative to the benchmark root
        "question": it.record.question, "answer": it.record.answer, "box_text": box_text,
        "box": list(reading.box.as_tuple()) if reading.box else None, "box_sq": list(reading.sq) if reading.sq else None,
        "gt_box": list(it.det.box.as_tuple()), "parse_failure": reading.failure, "iou": box_iou,
        "det_correct": box_iou > 0.5, "gt_degenerate": x2 <= x1 or y2 <= y1, "image_size": list(image_size),
        "crop_px": list(crop_px), "pred": pred, "em": exact_match(pred, it.record.answer),
        "anls": anls(pred, it.record.answer),
    }  # fmt: skip


class VisCoTBenchmark:
    """The Visual-CoT benchmark: box pass, answer pass, judge + rule answer scores, detection accuracy."""

    name = "viscot"
    version = "viscot-1.0"

    def __init__(
        self,
        root: str | Path,
        datasets: Sequence[str] = SCORED_DATASETS,
        limit: int | None = None,
        judge: Judge | Mapping[str, Any] | str | None = None,
        box_format: BoxFormat | None = None,
        prompt_style: str = "published",
        batch_size: int = 16,
        min_half_px: int = 112,
        max_new_tokens_box: int = 128,
        max_new_tokens_answer: int = 128,
    ):
        if prompt_style not in ("published", "templates"):
            raise ValueError(f"viscot: prompt_style must be 'published' or 'templates', got {prompt_style!r}")
        if not datasets or len(set(datasets)) != len(datasets):
            raise ValueError(
                f"viscot: datasets must be a non-empty list without repeats, got {list(datasets)}"
            )
        self.root, self.datasets, self.limit, self.judge_spec = Path(root), list(datasets), limit, judge
        self.box_format, self.prompt_style, self.batch_size = box_format, prompt_style, batch_size
        self.min_half_px, self.max_new_tokens_box = min_half_px, max_new_tokens_box
        self.max_new_tokens_answer = max_new_tokens_answer

    def box_prompt(self, templates: PromptTemplates, item: ViscotItem, view: Image.Image) -> Prompt:
        if self.prompt_style == "templates":
            return templates.box_prompt(item.record.question, view)
        return [user("<image>\n{q}", [view], q=item.det.expression.lower() + DET_SUFFIX)]

    def answer_prompt(
        self,
        templates: PromptTemplates,
        item: ViscotItem,
        view: Image.Image,
        crop: Image.Image,
        box_text: str,
    ) -> Prompt:
        question = item.record.question
        if self.prompt_style == "templates":
            return templates.answer_prompt(question, view, crop)
        return [
            user("<image>\n{q}", [view], q=question),
            Message("assistant", (box_text,)),
            Message("user", fill(ANSWER_PREFIX + "{q} ", [crop], q=question)),
        ]

    def _run_chunk(
        self, policy: Policy, templates: PromptTemplates, fmt: BoxFormat, chunk: list[ViscotItem]
    ) -> list[dict]:
        """Both passes for a chunk of items; one prediction row per item (judge fields added later), or a
        skipped row for an item whose image cannot be read."""
        size = getattr(getattr(policy, "backbone", None), "image_size", None)
        opened = [open_image(self.root, it) for it in chunk]
        skipped = [o for o in opened if isinstance(o, dict)]
        chunk = [it for it, o in zip(chunk, opened) if not isinstance(o, dict)]
        images = [o for o in opened if not isinstance(o, dict)]
        if not chunk:
            return skipped
        views = [to_view(im, size) for im in images]
        prompts = [self.box_prompt(templates, it, v) for it, v in zip(chunk, views)]
        box_texts = [
            o[0] for o in policy.generate(prompts, max_new_tokens=self.max_new_tokens_box, temperature=0.0)
        ]
        parsed = [read_box(fmt, t, it.det.size) for t, it in zip(box_texts, chunk)]
        crops = [crop_square(im, p.box or FULL_IMAGE, self.min_half_px) for im, p in zip(images, parsed)]
        prompts = [
            self.answer_prompt(templates, it, v, to_view(c, size), t)
            for it, v, (c, _), t in zip(chunk, views, crops, box_texts)
        ]
        preds = [
            o[0] for o in policy.generate(prompts, max_new_tokens=self.max_new_tokens_answer, temperature=0.0)
        ]
        return skipped + [
            _prediction_row(it, im.size, text, reading, crop_px, pred)
            for it, im, text, reading, (_, crop_px), pred in zip(
                chunk, images, box_texts, parsed, crops, preds
            )
        ]

    def _score_with_judge(self, judge: Judge, rows: list[dict]) -> None:
        rows = scored_rows(rows)
        requests = [JudgeRequest("<image>\n" + r["question"], r["answer"], r["pred"]) for r in rows]
        for r, verdict in zip(rows, judge_answers(judge, requests) if rows else []):
            r.update(judge=verdict.score, judge_parsed=verdict.parsed, judge_reply=verdict.reply,
                     judge_failed=verdict.failed)  # fmt: skip

    def _run_dataset(self, ds: str, policy: Policy, templates: PromptTemplates, fmt: BoxFormat,
                     judge: Judge | None, preds: Predictions) -> list[str]:  # fmt: skip
        """Evaluate the items of ``ds`` not yet in ``preds``, appending rows chunk by chunk; return
        the uids of the dataset's rows (items and skipped)."""
        items, skipped = load_dataset(self.root, ds, self.limit)
        preds.add(skipped)
        todo = [it for it in items if it.uid not in preds.done]
        with progress(f"eval | viscot {ds}", total=len(todo), unit="q") as bar:
            for start in range(0, len(todo), self.batch_size):
                rows = self._run_chunk(policy, templates, fmt, todo[start : start + self.batch_size])
                if judge is not None:
                    self._score_with_judge(judge, rows)
                preds.add(rows)
                bar.advance(len(rows))
        by_uid = {r["uid"]: r for r in preds.rows}
        odd = [it.uid for it in items if tuple(by_uid[it.uid].get("image_size", it.det.size)) != it.det.size]
        if odd:  # scored in the det file's frame; crops use the canonical box (fine if only rescaled)
            log.warning(
                "viscot %s: %d images differ in size from benchmark_det (first %s)", ds, len(odd), odd[0]
            )
        log.info("viscot %s: %d questions, %d rows skipped", ds, len(items) + len(skipped),
                 sum(is_skipped(by_uid[u]) for u in by_uid if u.startswith(f"{ds}:")))  # fmt: skip
        return [it.uid for it in items] + [r["uid"] for r in skipped]

    def evaluate(self, policy: Policy, templates: PromptTemplates, out_dir: Path) -> dict[str, float]:
        """Run the protocol on every dataset; predictions.jsonl is appended chunk by chunk (a resumed
        evaluation does only the rest), then metrics.json and results.md are written."""
        fmt = self.box_format or getattr(getattr(policy, "backbone", None), "box_format", None)
        if fmt is None:
            raise ValueError("viscot: no box format (pass box_format=, or a policy with backbone.box_format)")
        judge = build_judge(self.judge_spec, policy)
        out_dir = Path(out_dir)
        preds = Predictions(out_dir / "predictions.jsonl")
        wanted: set[str] = set()
        for ds in self.datasets:
            wanted.update(self._run_dataset(ds, policy, templates, fmt, judge, preds))
        files = {ds: self.root / "benchmark" / f"{ds}.json" for ds in self.datasets}
        metrics = aggregate([r for r in preds.rows if r["uid"] in wanted], self.datasets, files)
        write_metrics(out_dir, metrics)
        write_text_atomic(out_dir / "results.md", results_markdown(metrics, self.datasets))
        return metrics

    @property
    def headline(self) -> str:
        """``overall/judge`` (the published "GPT score") when a judge is configured, else ``overall/em``."""
        judged = self.judge_spec not in (None, "none") and not (
            isinstance(self.judge_spec, Mapping) and self.judge_spec.get("kind", "none") == "none"
        )
        return "overall/judge" if judged else "overall/em"

    def paired_effect(self, before: Path, after: Path, n: int = 2000, seed: int = 0) -> dict[str, dict]:
        """Paired bootstrap of (after - before) for ``overall/<metric>`` (det_acc, em, anls, judge when
        both are judged): resampled within each dataset, the statistic the unweighted mean of the
        dataset means, as ``overall`` is defined."""
        rows_b, rows_a = read_predictions(before), read_predictions(after)
        strata = {r["uid"]: r["dataset"] for r in rows_b}
        out = {}
        for key, field in MEANS.items():
            b = {r["uid"]: float(r[field]) for r in rows_b if r.get(field) is not None}
            a = {r["uid"]: float(r[field]) for r in rows_a if r.get(field) is not None}
            if key != "mean_iou" and b and a:
                out[f"overall/{key}"] = paired_bootstrap(b, a, n, seed, strata)
        return out
