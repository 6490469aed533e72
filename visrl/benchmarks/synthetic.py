"""The synthetic zoom benchmark, evaluated in the three modes Visual-CoT reports (VisCoT Table 4 rows).

* ``direct``: full image only -> answer (no box);
* ``cot_gt``: crop from the ground-truth box (as the backbone's format writes it) -> answer;
* ``cot_pred``: the model's own box (greedy) -> crop -> answer; an unparsable box falls back to the whole
  image and is counted.

Metrics per mode: answer accuracy (normalised exact match, the same function the ``rule`` RL scorer uses),
box parse rate, mean IoU and detection accuracy at IoU > 0.5 (strict, as Visual-CoT), plus a bootstrap 95%
interval of the accuracy. Writes ``predictions.jsonl`` (appended mode by mode; a record whose image cannot
be read is a skipped row, counted as ``skipped/<reason>``) and ``metrics.json`` under ``out_dir``.

When the split's scenes name more than one object per scene (``visrl.benchmarks.intent``) and ``cot_pred``
is evaluated, a ``swap`` pass re-asks each box prompt about another object of the same image and adds the
``intent/*`` metrics (``named_hit``, ``swap_follow``, ``swap_stay``, ``n``). ``split`` names which split
``split_path`` is (``val`` for tuning, ``test`` for reported numbers; default: the file's stem) and must
match the file's stem when given.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from visrl.benchmarks.base import Predictions, read_predictions, skip_row, skipped_counts
from visrl.benchmarks.effects import bootstrap_ci, paired_bootstrap
from visrl.benchmarks.intent import Referents, intent_metrics, load_referents, swap_row
from visrl.benchmarks.metrics import exact_match
from visrl.data.boxes import Box, iou
from visrl.data.errors import InputError
from visrl.data.images import crop_view, load_rgb, resolve, to_view
from visrl.data.io import write_json_atomic
from visrl.data.prompts import PromptTemplates
from visrl.data.records import VisCoTRecord, read_viscot
from visrl.progress import progress

MODES = ("direct", "cot_gt", "cot_pred")
FULL = Box(0.0, 0.0, 1.0, 1.0)


def summarize(rows: Sequence[dict], mode: str) -> dict[str, float]:
    """Aggregate prediction rows of one mode into flat metrics."""
    correct = [float(r["correct"]) for r in rows]
    out = {f"{mode}/accuracy": sum(correct) / max(1, len(rows)), f"{mode}/n": float(len(rows))}
    lo, hi = bootstrap_ci(correct)
    out[f"{mode}/accuracy_ci_lo"], out[f"{mode}/accuracy_ci_hi"] = lo, hi
    if mode == "cot_pred":
        ious = [r["iou"] if r["iou"] is not None else 0.0 for r in rows]
        out["cot_pred/parse_rate"] = sum(r["parse_failure"] is None for r in rows) / max(1, len(rows))
        out["cot_pred/mean_iou"] = sum(ious) / max(1, len(rows))
        out["cot_pred/det_acc"] = sum(i > 0.5 for i in ious) / max(1, len(rows))
    return out


class SyntheticBenchmark:
    """Held-out synthetic test split, scored in ``modes``."""

    name = "synthetic"
    version = "synthetic-1.0"

    def __init__(self, split_path: str | Path, image_root: str | Path | None = None, limit: int | None = None,
                 modes: Sequence[str] = MODES, max_new_tokens: int = 24, split: str | None = None):  # fmt: skip
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            raise ValueError(f"benchmark.modes: unknown {bad}; valid: {list(MODES)}")
        self.split_path = Path(split_path)
        if split is not None and self.split_path.stem != split:  # a val label on test.json would mislead
            raise ValueError(f"benchmark.split={split!r} but benchmark.split_path is {self.split_path.name}")
        self.split = split or self.split_path.stem
        self.image_root = Path(image_root) if image_root else self.split_path.parent
        self.limit, self.modes, self.max_new_tokens = limit, list(modes), max_new_tokens

    @property
    def headline(self) -> str:
        """``cot_pred/accuracy`` (VisRL's two-step answer), else the last configured mode's accuracy."""
        return f"{self._effect_mode}/accuracy"

    @property
    def _effect_mode(self) -> str:
        return "cot_pred" if "cot_pred" in self.modes else self.modes[-1]

    def records(self) -> list[VisCoTRecord]:
        recs = read_viscot(self.split_path)
        return recs[: self.limit] if self.limit else recs

    def _load(self, recs: list[VisCoTRecord]) -> tuple[list[VisCoTRecord], list[Image.Image], list[dict]]:
        """The records whose image loads, their images, and a skipped row for each of the others."""
        kept, images, skipped = [], [], []
        for rec in recs:
            path = resolve(self.image_root, rec.image_path)
            try:
                images.append(load_rgb(path))
                kept.append(rec)
            except FileNotFoundError as e:
                reason = "image_missing" if not Path(path).is_file() else "image_unreadable"
                skipped.append(skip_row(rec.uid, reason, path, rec.index, str(e), mode="skipped"))
        return kept, images, skipped

    def evaluate(self, policy, templates: PromptTemplates, out_dir: Path) -> dict[str, float]:
        """Score every record in every mode; rows are appended to predictions.jsonl mode by mode (a
        resumed evaluation redoes only the modes not written yet)."""
        preds = Predictions(Path(out_dir) / "predictions.jsonl", key=lambda r: (r["uid"], r["mode"]))
        bb = policy.backbone
        recs, images, skipped = self._load(self.records())
        if not recs:
            raise InputError(f"{self.split_path}: no record has a readable image ({len(skipped)} skipped)")
        preds.add(skipped)
        gts = [r.box(im.size) for r, im in zip(recs, images)]
        fulls = [to_view(im, bb.image_size) for im in images]
        metrics: dict[str, float] = {}
        with progress(
            f"eval | {self.name} {Path(out_dir).parent.name}", total=len(self.modes), unit="mode"
        ) as bar:
            for mode in self.modes:
                if any((r.uid, mode) not in preds.done for r in recs):
                    preds.add(self._mode_rows(mode, policy, templates, recs, images, fulls, gts))
                by_uid = {r["uid"]: r for r in preds.rows if r["mode"] == mode}
                metrics.update(summarize([by_uid[r.uid] for r in recs], mode))
                bar.advance(1)
        metrics.update(self._intent(policy, templates, preds, recs, images, fulls))
        if skipped:
            metrics.update(skipped_counts(preds.rows))
        write_json_atomic(Path(out_dir) / "metrics.json", metrics)
        return metrics

    def _mode_rows(self, mode, policy, templates, recs, images, fulls, gts) -> list[dict]:
        """One prediction row per record in ``mode``."""
        bb = policy.backbone
        boxes, texts, fails = self._boxes(mode, policy, templates, recs, images, fulls, gts)
        if mode == "direct":
            prompts = [templates.direct_prompt(r.question, f) for r, f in zip(recs, fulls)]
        else:
            crops = [crop_view(im, b, bb.image_size) for im, b in zip(images, boxes)]
            prompts = [templates.answer_prompt(r.question, f, c) for r, f, c in zip(recs, fulls, crops)]
        answers = [o[0] for o in policy.generate(prompts, max_new_tokens=self.max_new_tokens)]
        return [
            self._row(mode, r, a, t, b, g, f, self.image_root)
            for r, a, t, b, g, f in zip(recs, answers, texts, boxes, gts, fails)
        ]

    def paired_effect(self, before: Path, after: Path, n: int = 2000, seed: int = 0) -> dict[str, dict]:
        """Paired bootstrap of (after - before): answer accuracy and, for a mode with a box, detection
        accuracy (IoU > 0.5), keyed ``<mode>/accuracy`` and ``<mode>/det_acc``; plus ``intent/named_hit``
        and ``intent/swap_follow`` when both evaluations have swap rows."""
        mode = self._effect_mode
        keys = [(mode, "accuracy", "correct")] + ([(mode, "det_acc", "iou")] if mode != "direct" else [])
        keys += [("swap", k, k) for k in ("named_hit", "swap_follow")]
        out = {}
        for row_mode, metric, key in keys:
            a, b = _values(before, row_mode, key), _values(after, row_mode, key)
            if row_mode != "swap" or (a and b):
                out[f"{'intent' if row_mode == 'swap' else mode}/{metric}"] = paired_bootstrap(a, b, n, seed)
        return out

    def _intent(self, policy, templates, preds: Predictions, recs, images, fulls) -> dict[str, float]:
        """The ``swap`` pass and the ``intent/*`` metrics; {} when no scene has two nameable objects."""
        refs = load_referents(self.split_path) if "cot_pred" in self.modes else {}
        todo = [(r, im, f) for r, im, f in zip(recs, images, fulls) if r.question_id in refs]
        if not todo:
            return {}
        if any((r.uid, "swap") not in preds.done for r, _, _ in todo):
            preds.add(self._swap_rows(policy, templates, preds, todo, refs))
        by_uid = {r["uid"]: r for r in preds.rows if r["mode"] == "swap"}
        return intent_metrics([by_uid[r.uid] for r, _, _ in todo])

    def _swap_rows(self, policy, templates, preds: Predictions, todo, refs: dict[int | str, Referents]):
        """Per question: the box prompt re-asked about another nameable object, its box and where it lands."""
        fmt = policy.backbone.box_format
        named = {r["uid"]: r["box"] for r in preds.rows if r["mode"] == "cot_pred"}
        questions = [refs[r.question_id].questions[refs[r.question_id].swap(r.uid)] for r, _, _ in todo]
        prompts = [templates.box_prompt(q, f) for q, (_, _, f) in zip(questions, todo)]
        texts = [o[0] for o in policy.generate(prompts, max_new_tokens=self.max_new_tokens)]
        rows = []
        for (rec, image, _), question, text in zip(todo, questions, texts):
            parsed = fmt.parse(text, image.size)
            box = named.get(rec.uid)
            rows.append(swap_row(
                rec.uid, refs[rec.question_id], Box(*box) if box is not None else None, question, text,
                parsed.box if parsed.ok else None, None if parsed.ok else parsed.failure.value,
            ))  # fmt: skip
        return rows

    def _boxes(self, mode, policy, templates, recs, images, fulls, gts):
        """Boxes to crop per record, their text and parse failures (None when the box is fine)."""
        fmt = policy.backbone.box_format
        n = len(recs)
        if mode == "direct":
            return [None] * n, [None] * n, [None] * n
        if mode == "cot_gt":
            texts = [fmt.format(g, im.size) for g, im in zip(gts, images)]
        else:
            prompts = [templates.box_prompt(r.question, f) for r, f in zip(recs, fulls)]
            texts = [o[0] for o in policy.generate(prompts, max_new_tokens=self.max_new_tokens)]
        parsed = [fmt.parse(t, im.size) for t, im in zip(texts, images)]
        boxes = [p.box if p.ok else FULL for p in parsed]
        fails = [None if p.ok else p.failure.value for p in parsed]
        return boxes, texts, fails

    @staticmethod
    def _row(mode, rec, answer, box_text, box, gt, failure, image_root) -> dict:
        return {
            "uid": rec.uid,
            "mode": mode,
            "image": resolve(image_root, rec.image_path),
            "question": rec.question,
            "answer": rec.answer,
            "pred": answer,
            "correct": exact_match(answer, rec.answer) == 1.0,
            "box_text": box_text,
            "box": list(box.as_tuple()) if box is not None and failure is None else None,
            "gt_box": list(gt.as_tuple()),
            "iou": iou(box, gt)
            if box is not None and failure is None
            else (0.0 if mode != "direct" else None),
            "parse_failure": failure,
        }


def _values(eval_dir: Path, mode: str, key: str) -> dict[str, float]:
    """uid -> the 0/1 value of ``key`` (``iou`` as IoU > 0.5) for the rows of ``mode`` (booleans as 0/1)."""
    rows = [r for r in read_predictions(eval_dir) if r["mode"] == mode]
    return {r["uid"]: float(r[key] > 0.5) if key == "iou" else float(r[key]) for r in rows}
