"""The synthetic zoom benchmark, evaluated in the three modes Visual-CoT reports (VisCoT Table 4 rows).

* ``direct``: full image only -> answer (no box);
* ``cot_gt``: crop from the ground-truth box (as the backbone's format writes it) -> answer;
* ``cot_pred``: the model's own box (greedy) -> crop -> answer; an unparsable box falls back to the whole
  image and is counted.

Metrics per mode: answer accuracy (normalised exact match, the same function the ``rule`` RL scorer uses),
box parse rate, mean IoU and detection accuracy at IoU > 0.5 (strict, as Visual-CoT), plus a bootstrap 95%
interval of the accuracy. Writes ``predictions.jsonl`` and ``metrics.json`` under ``out_dir``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from visrl.benchmarks.metrics import exact_match
from visrl.benchmarks.registry import register_benchmark
from visrl.data.boxes import Box, iou
from visrl.data.images import crop_view, load_rgb, resolve, to_view
from visrl.data.prompts import PromptTemplates
from visrl.data.records import VisCoTRecord, read_viscot

MODES = ("direct", "cot_gt", "cot_pred")
FULL = Box(0.0, 0.0, 1.0, 1.0)


def bootstrap_ci(values: Sequence[float], n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean."""
    if not values:
        return (0.0, 0.0)
    rng = random.Random(seed)
    k = len(values)
    means = sorted(sum(values[rng.randrange(k)] for _ in range(k)) / k for _ in range(n))
    return (means[int(0.025 * n)], means[int(0.975 * n) - 1])


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


@register_benchmark("synthetic")
class SyntheticBenchmark:
    """Held-out synthetic test split, scored in ``modes``."""

    name = "synthetic"
    version = "synthetic-1.0"

    def __init__(self, split_path: str | Path, image_root: str | Path | None = None, limit: int | None = None,
                 modes: Sequence[str] = MODES, max_new_tokens: int = 24):
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise ValueError(f"benchmark.modes: unknown {bad}; valid: {list(MODES)}")
        self.split_path = Path(split_path)
        self.image_root = Path(image_root) if image_root else self.split_path.parent
        self.limit, self.modes, self.max_new_tokens = limit, list(modes), max_new_tokens

    def records(self) -> list[VisCoTRecord]:
        recs = read_viscot(self.split_path)
        return recs[: self.limit] if self.limit else recs

    def evaluate(self, policy, templates: PromptTemplates, out_dir: Path) -> dict[str, float]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        bb = policy.backbone
        recs = self.records()
        images = [load_rgb(resolve(self.image_root, r.image_path)) for r in recs]
        gts = [r.box(im.size) for r, im in zip(recs, images)]
        fulls = [to_view(im, bb.image_size) for im in images]
        rows: list[dict] = []
        metrics: dict[str, float] = {}
        for mode in self.modes:
            boxes, texts, fails = self._boxes(mode, policy, templates, recs, images, fulls, gts)
            if mode == "direct":
                prompts = [templates.direct_prompt(r.question, f) for r, f in zip(recs, fulls)]
            else:
                crops = [crop_view(im, b, bb.image_size) for im, b in zip(images, boxes)]
                prompts = [templates.answer_prompt(r.question, f, c) for r, f, c in zip(recs, fulls, crops)]
            answers = [o[0] for o in policy.generate(prompts, max_new_tokens=self.max_new_tokens)]
            mode_rows = [
                self._row(mode, r, a, t, b, g, f, self.image_root)
                for r, a, t, b, g, f in zip(recs, answers, texts, boxes, gts, fails)
            ]
            metrics.update(summarize(mode_rows, mode))
            rows += mode_rows
        with open(out_dir / "predictions.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics

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
            "uid": f"{rec.dataset}:{rec.split}:{rec.question_id}",
            "mode": mode,
            "image": resolve(image_root, rec.image_path),
            "question": rec.question,
            "answer": rec.answer,
            "pred": answer,
            "correct": exact_match(answer, rec.answer) == 1.0,
            "box_text": box_text,
            "box": list(box.as_tuple()) if box is not None and failure is None else None,
            "gt_box": list(gt.as_tuple()),
            "iou": iou(box, gt) if box is not None and failure is None else (0.0 if mode != "direct" else None),
            "parse_failure": failure,
        }


def _correct_by_uid(eval_dir: Path, mode: str, key: str) -> dict[str, float]:
    out = {}
    with open(Path(eval_dir) / "predictions.jsonl") as fh:
        for line in fh:
            row = json.loads(line)
            if row["mode"] == mode:
                value = row[key]
                out[row["uid"]] = float(value > 0.5) if key == "iou" else float(value)
    return out


def paired_bootstrap(before: Path, after: Path, mode: str = "cot_pred", n: int = 2000, seed: int = 0) -> dict:
    """Paired bootstrap 95% interval of (after - before) for answer accuracy and detection accuracy.

    Both evaluation dirs must hold ``predictions.jsonl`` of the same test items; items are resampled jointly.
    """
    result = {}
    for metric, key in (("accuracy", "correct"), ("det_acc", "iou")):
        a, b = _correct_by_uid(before, mode, key), _correct_by_uid(after, mode, key)
        uids = sorted(set(a) & set(b))
        diffs = [b[u] - a[u] for u in uids]
        lo, hi = bootstrap_ci(diffs, n=n, seed=seed)
        result[f"{mode}/{metric}"] = {"before": sum(a[u] for u in uids) / max(1, len(uids)),
                                      "after": sum(b[u] for u in uids) / max(1, len(uids)),
                                      "diff": sum(diffs) / max(1, len(diffs)), "ci95": [lo, hi], "n": len(uids)}
    return result
