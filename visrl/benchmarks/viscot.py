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

Box texts in the Visual-CoT format (:class:`~visrl.data.boxes.SqFloatFormat`) are read exactly as
published (:func:`parse_published`: unclamped, unordered). Departures: other backbones' formats (Qwen,
grid) are read with their :class:`~visrl.data.boxes.BoxFormat` and converted to the sq frame;
``prompt_style="templates"`` replaces both prompts with the policy's training ``PromptTemplates`` (box
prompt, then answer prompt with image + crop) for models not trained on the Visual-CoT wording; tiny
backbones see images and crops through ``to_view``; a judge reply of ``"score: 0.8."`` scores 0.8.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

from PIL import Image

from visrl.benchmarks.judge import Judge, JudgeRequest, build_judge, judge_answers
from visrl.benchmarks.metrics import anls, exact_match
from visrl.benchmarks.registry import register_benchmark
from visrl.data.boxes import Box, BoxFormat, ParseFailure, SqFloatFormat, crop_square, from_sq, iou, to_sq
from visrl.data.images import open_rgb, to_view
from visrl.data.prompts import Message, Prompt, PromptTemplates, fill, user
from visrl.data.records import DetRecord, VisCoTRecord, join_det, read_det, read_viscot

__all__ = [
    "GROUPS",
    "SCORED_DATASETS",
    "BoxReading",
    "VisCoTBenchmark",
    "aggregate",
    "detection_iou",
    "load_items",
    "parse_published",
    "read_box",
]

log = logging.getLogger(__name__)

SCORED_DATASETS = ("docvqa", "textcap", "textvqa", "dude", "sroie", "infographicsvqa", "flickr30k", "gqa",
                   "openimages", "vsr", "cub")  # fmt: skip
GROUPS = {"text": ("docvqa", "textcap", "textvqa", "dude", "sroie"), "chart": ("infographicsvqa",),
          "general": ("flickr30k",), "reasoning": ("gqa", "openimages", "vsr"), "fine_grained": ("cub",)}  # fmt: skip
DET_SUFFIX = (
    ". Please provide the bounding box coordinate of the region that can help you answer the question better."
)
ANSWER_PREFIX = "<image>\nPlease answer the question based on the original image and local detail image."
FULL_IMAGE = Box(0.0, 0.0, 1.0, 1.0)
_PATH_ALIASES = (("cot/v7w/", "cot/visual7w/"), ("cot/visual7w/", "cot/v7w/"))
# metric -> the per-record field it averages, per dataset
_MEANS = {"det_acc": "det_correct", "mean_iou": "iou", "em": "em", "anls": "anls", "judge": "judge"}


@dataclass(frozen=True)
class ViscotItem:
    """One question: the benchmark record, its detection row, and its position in the files."""

    dataset: str
    row: int
    record: VisCoTRecord
    det: DetRecord

    @property
    def uid(self) -> str:
        return f"{self.dataset}:{self.row}"


def load_items(root: Path | str, dataset: str, limit: int | None = None) -> list[ViscotItem]:
    """The first ``limit`` rows of ``benchmark/<dataset>.json`` joined by row with ``benchmark_det``."""
    root = Path(root)
    paths = (root / "benchmark" / f"{dataset}.json", root / "benchmark_det" / f"{dataset}.jsonl")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"Visual-CoT benchmark: missing {path} (see docs/benchmarks.md)")
    pairs = join_det(read_viscot(paths[0]), read_det(paths[1]))[:limit]
    return [ViscotItem(dataset, row, rec, det) for row, (rec, det) in enumerate(pairs)]


def resolve_image(root: Path, rel: str) -> Path:
    """``root/rel``, or the other spelling of the v7w/visual7w folder when only that exists."""
    candidates = [root / rel] + [
        root / (new + rel[len(old) :]) for old, new in _PATH_ALIASES if rel.startswith(old)
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"Visual-CoT image not found: tried {', '.join(map(str, candidates))}")


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


def _mean_over(values: Mapping[str, float], names: Sequence[str]) -> float:
    return fmean(values.get(n, 0.0) for n in names)  # a missing dataset counts 0.0, as published


def aggregate(rows: Sequence[Mapping[str, Any]], datasets: Sequence[str]) -> dict[str, float]:
    """Flat metrics from prediction rows: ``<ds>/<metric>``, ``overall/<metric>``, ``group/<g>/<metric>``.

    Means: det_acc, mean_iou, em, anls, judge (when judged). Counts per dataset: n, parse_failures,
    parse_failures/<reason>, gt_degenerate, judge_unparsed. ``overall`` = unweighted mean over the scored
    datasets among ``datasets``; ``overall/det_acc_viscot_avg`` = the published quirk (zeros dropped).
    """
    by_ds: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        by_ds[r["dataset"]].append(r)
    out: dict[str, float] = {}
    means: dict[str, dict[str, float]] = defaultdict(dict)  # metric -> dataset -> mean
    for ds in datasets:
        rs = by_ds.get(ds, [])
        if not rs:
            raise ValueError(f"viscot.aggregate: no predictions for dataset {ds!r}")
        for key, field in _MEANS.items():
            if rs[0].get(field) is not None:
                means[key][ds] = out[f"{ds}/{key}"] = fmean(float(r[field]) for r in rs)
        fails = Counter(r["parse_failure"] for r in rs if r["parse_failure"])
        out[f"{ds}/n"] = float(len(rs))
        out[f"{ds}/parse_failures"] = float(sum(fails.values()))
        out.update({f"{ds}/parse_failures/{k}": float(v) for k, v in sorted(fails.items())})
        out[f"{ds}/gt_degenerate"] = float(sum(r["gt_degenerate"] for r in rs))
        if rs[0].get("judge") is not None:
            out[f"{ds}/judge_unparsed"] = float(sum(not r["judge_parsed"] for r in rs))
    scored = [d for d in SCORED_DATASETS if d in datasets]
    if scored:
        out["overall/n_datasets"] = float(len(scored))
        for key, per in means.items():
            out[f"overall/{key}"] = _mean_over(per, scored)
            for group, members in GROUPS.items():
                present = [d for d in members if d in scored]
                if present:
                    out[f"group/{group}/{key}"] = _mean_over(per, present)
        nonzero = [means["det_acc"][d] for d in scored if means["det_acc"][d]]
        out["overall/det_acc_viscot_avg"] = fmean(nonzero) if nonzero else 0.0
    return out


def results_markdown(metrics: Mapping[str, float], datasets: Sequence[str]) -> str:
    """Two markdown tables in the layout of ``tools/cot_get_result.py`` (answer scores to 3 decimals,
    detection ×100 to 2 decimals) plus the detection-average note."""
    keys = [k for k in ("judge", "em", "anls", "det_acc") if f"{datasets[0]}/{k}" in metrics]
    label = {"judge": "Judge score", "em": "Exact match", "anls": "ANLS", "det_acc": "Det Acc@0.5 (×100)"}

    def cell(key: str, value: float | None) -> str:
        if value is None:
            return "–"
        return f"{100 * value:.2f}" if key == "det_acc" else f"{value:.3f}"

    has_overall = "overall/n_datasets" in metrics
    lines = ["| Metric | " + " | ".join(datasets) + (" | Average |" if has_overall else " |")]
    lines.append("|---" * (len(datasets) + 1 + has_overall) + "|")
    for k in keys:
        row = [cell(k, metrics.get(f"{d}/{k}")) for d in datasets]
        row += [cell(k, metrics.get(f"overall/{k}"))] if has_overall else []
        lines.append(f"| {label[k]} | " + " | ".join(row) + " |")
    if has_overall:
        groups = [g for g in GROUPS if f"group/{g}/{keys[0]}" in metrics]
        lines += ["", "| Metric | " + " | ".join(groups) + " | Average |", "|---" * (len(groups) + 2) + "|"]
        for k in keys:
            row = [cell(k, metrics.get(f"group/{g}/{k}")) for g in groups] + [
                cell(k, metrics[f"overall/{k}"])
            ]
            lines.append(f"| {label[k]} | " + " | ".join(row) + " |")
        lines += ["", f"Detection average as Visual-CoT prints it (datasets at exactly 0 dropped): "
                      f"{100 * metrics['overall/det_acc_viscot_avg']:.3f}"]  # fmt: skip
    return "\n".join(lines) + "\n"


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
        "question": it.record.question, "answer": it.record.answer, "box_text": box_text,
        "box": list(reading.box.as_tuple()) if reading.box else None, "box_sq": list(reading.sq) if reading.sq else None,
        "gt_box": list(it.det.box.as_tuple()), "parse_failure": reading.failure, "iou": box_iou,
        "det_correct": box_iou > 0.5, "gt_degenerate": x2 <= x1 or y2 <= y1, "image_size": list(image_size),
        "crop_px": list(crop_px), "pred": pred, "em": exact_match(pred, it.record.answer),
        "anls": anls(pred, it.record.answer),
    }  # fmt: skip


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@register_benchmark("viscot")
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
        self, policy: Any, templates: PromptTemplates, fmt: BoxFormat, chunk: list[ViscotItem]
    ) -> list[dict]:
        """Both passes for a chunk of items; one prediction row per item (judge fields added later)."""
        size = getattr(getattr(policy, "backbone", None), "image_size", None)
        images = [open_rgb(resolve_image(self.root, it.record.image_path)) for it in chunk]
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
        return [
            _prediction_row(it, im.size, text, reading, crop_px, pred)
            for it, im, text, reading, (_, crop_px), pred in zip(
                chunk, images, box_texts, parsed, crops, preds
            )
        ]

    def _score_with_judge(self, judge: Judge, rows: list[dict]) -> None:
        requests = [JudgeRequest("<image>\n" + r["question"], r["answer"], r["pred"]) for r in rows]
        for r, verdict in zip(rows, judge_answers(judge, requests)):
            r.update(judge=verdict.score, judge_parsed=verdict.parsed, judge_reply=verdict.reply)

    def evaluate(self, policy: Any, templates: PromptTemplates, out_dir: Path) -> dict[str, float]:
        """Run the protocol on every dataset; write predictions.jsonl, metrics.json and results.md."""
        fmt = self.box_format or getattr(getattr(policy, "backbone", None), "box_format", None)
        if fmt is None:
            raise ValueError("viscot: no box format (pass box_format=, or a policy with backbone.box_format)")
        judge = build_judge(self.judge_spec, policy)
        rows: list[dict] = []
        for ds in self.datasets:
            items = load_items(self.root, ds, self.limit)
            ds_rows = []
            for start in range(0, len(items), self.batch_size):
                ds_rows += self._run_chunk(policy, templates, fmt, items[start : start + self.batch_size])
            odd = [r["uid"] for r, it in zip(ds_rows, items) if tuple(r["image_size"]) != it.det.size]
            if odd:  # scored in the det file's frame; crops use the canonical box (fine if only rescaled)
                log.warning(
                    "viscot %s: %d images differ in size from benchmark_det (first %s)", ds, len(odd), odd[0]
                )
            log.info("viscot %s: %d questions answered", ds, len(items))
            rows += ds_rows
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_jsonl(out_dir / "predictions.jsonl", rows)  # kept even if the judge fails below
        if judge is not None:
            self._score_with_judge(judge, rows)
            _write_jsonl(out_dir / "predictions.jsonl", rows)
        metrics = aggregate(rows, self.datasets)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        (out_dir / "results.md").write_text(results_markdown(metrics, self.datasets))
        return metrics
