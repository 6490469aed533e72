"""The files of one self-evolution iteration (VisRL §3.3): candidates, preference pairs, crops, statistics.

``<run_dir>/iter_k/`` holds

* ``candidates.jsonl`` -- one JSON row per sampled candidate (box -> crop -> answer -> two M_org scores),
  written chunk by chunk by :mod:`visrl.rollout.generator`; ``candidates.jsonl.meta.json`` records what
  produced it (config, question fingerprint, model fingerprints) so a resumed run cannot mix two runs;
* ``pairs.json`` -- the kept pairs in VisRL's preference layout (``visrl.data.records.PreferenceRecord``:
  images, the step-1 human prompt, chosen/rejected box texts, chosen/rejected answers) plus our own keys
  to rebuild training rows exactly (uid, image path and size, both canonical boxes, scores, crop files);
* ``crops/`` -- PNG crops of every chosen and rejected box (for inspection; training rows re-crop the
  original image, which gives the same pixels);
* ``stats.json`` -- what the iteration produced: parse failures by reason, synthetic bad boxes, yield,
  filter drop reasons, chosen-minus-rejected score margins, chosen-vs-rejected IoU, and -- for analysis
  only -- ground-truth hit rates (``shared/notes/toy-scale-findings.md``, "Trap": a collapse of the
  boxes must be visible at once).

Ground truth is read ONLY by :func:`compute_stats`, for logging; pair selection never sees it.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from visrl.data.boxes import Box, ParseFailure, crop_tight, iou
from visrl.data.images import load_rgb, resolve
from visrl.data.io import read_jsonl, rewrite_lines, write_json_atomic
from visrl.data.prompts import PromptTemplates
from visrl.data.records import (
    PreferenceRecord,
    VisCoTRecord,
    make_preference_record,
    write_pairs,
)
from visrl.rollout.filter import FilterConfig, FilterDecision, ScoredCandidate, count_reasons, select_pair

__all__ = [
    "CANDIDATES",
    "CROPS",
    "PAIRS",
    "REF_LOGPS",
    "STATS",
    "build_pairs",
    "compute_stats",
    "meta_path",
    "open_candidates",
    "resume_candidates",
    "merge_shards",
    "read_candidates",
    "shard_path",
]

log = logging.getLogger(__name__)
CANDIDATES = "candidates.jsonl"
PAIRS = "pairs.json"
STATS = "stats.json"
CROPS = "crops"
REF_LOGPS = "ref_logps.json"
GT_HIT_IOU = 0.5  # Visual-CoT's detection criterion
CROP_MIN_PX = 8  # the min_px of visrl.data.images.crop_view, so saved crops equal the training crops


# ------------------------------------------------------------------------------------------ jsonl files
def shard_path(out_path: Path | str, rank: int, world: int) -> Path:
    """``candidates.jsonl`` for a single process, ``candidates.rank{r}.jsonl`` for rank r of several."""
    out_path = Path(out_path)
    return out_path if world == 1 else out_path.with_name(f"{out_path.stem}.rank{rank}{out_path.suffix}")


def meta_path(path: Path | str) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".meta.json")










def read_candidates(path: Path | str) -> list[dict]:
    """The candidate rows of a complete ``candidates.jsonl`` (a torn last line is an error here)."""
    return read_jsonl(path, allow_torn_tail=False)[1]


def merge_shards(paths: Sequence[Path | str], out: Path | str) -> list[dict]:
    """Merge per-rank candidate files into ``out``, ordered by (question_index, cand).

    Lines are copied verbatim, so the merged file is byte-identical to a single-process run with the
    same seed (chunks are seeded by their index, not by the process that ran them). The shards' meta
    files must agree (except on the shard) and together hold every candidate exactly once.
    """
    if not paths:
        raise ValueError("merge_shards: no shard files given")
    metas = [json.loads(meta_path(p).read_text()) for p in paths]
    base = {k: v for k, v in metas[0].items() if k != "shard"}
    for p, m in zip(paths, metas):
        if {k: v for k, v in m.items() if k != "shard"} != base:
            raise ValueError(f"merge_shards: {meta_path(p)} disagrees with {meta_path(paths[0])}")
    keyed: dict[tuple[int, int], str] = {}
    for p in paths:
        lines, rows, _ = read_jsonl(p, allow_torn_tail=False)
        for line, row in zip(lines, rows):
            key = (row["question_index"], row["cand"])
            if key in keyed:
                raise ValueError(f"merge_shards: {p}: candidate {key} also appears in another shard")
            keyed[key] = line
    expected = base["n_questions"] * base["config"]["n_boxes"]
    if len(keyed) != expected:
        raise ValueError(
            f"merge_shards: the shards hold {len(keyed)} candidates, expected {expected} "
            f"({base['n_questions']} questions x {base['config']['n_boxes']} boxes): a shard is unfinished"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rewrite_lines(out, [keyed[k] for k in sorted(keyed)])
    write_json_atomic(meta_path(out), {**base, "shard": [0, 1]})
    return [json.loads(keyed[k]) for k in sorted(keyed)]


def open_candidates(path: Path, meta: dict) -> None:
    """Check that an existing file was produced by the same run settings; write the meta of a new one."""
    mpath = meta_path(path)
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise ValueError(
                f"{path}: was generated with different settings ({', '.join(diff)} differ, see {mpath}); "
                "use another output path or delete both files to start over"
            )
    elif path.exists() and path.stat().st_size > 0:
        raise ValueError(f"{path}: exists without {mpath.name}; delete it or restore the meta file to resume")
    else:
        write_json_atomic(mpath, meta)
        path.touch()


def resume_candidates(
    path: Path, plan: Sequence[tuple[int, int, int]], n_boxes: int
) -> dict[int, list[dict]]:
    """The complete chunks of ``plan`` ((chunk, first question index, n questions)) already in ``path``,
    as chunk -> rows; a torn tail or an incomplete chunk is cut off the file."""
    lines, rows, torn = read_jsonl(path, allow_torn_tail=True)
    by_chunk: dict[int, list[tuple[str, dict]]] = {}
    for line, row in zip(lines, rows):
        by_chunk.setdefault(row["chunk"], []).append((line, row))
    done: dict[int, list[dict]] = {}
    for c, start, n in plan:
        got = by_chunk.pop(c, [])
        want = [(start + j, k) for j in range(n) for k in range(n_boxes)]
        if [(r["question_index"], r["cand"]) for _, r in got] == want:
            done[c] = [r for _, r in got]
    if by_chunk:
        raise ValueError(f"{path}: holds rows of chunks {sorted(by_chunk)} that this shard does not own")
    kept = sum(len(v) for v in done.values())
    if torn or kept != len(rows):
        log.warning(
            "%s: dropping %d rows of unfinished chunks%s", path, len(rows) - kept, " and a torn line" * torn
        )
        keep = {id(r) for v in done.values() for r in v}
        rewrite_lines(path, [line for line, row in zip(lines, rows) if id(row) in keep])
    return done


# -------------------------------------------------------------------------------------------- pairs
def group_by_question(candidates: Iterable[dict]) -> dict[int, list[dict]]:
    """question_index -> its candidates in generation (cand) order, questions in index order."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for row in candidates:
        groups[row["question_index"]].append(row)
    return {q: sorted(groups[q], key=lambda r: r["cand"]) for q in sorted(groups)}


def _box(row: dict) -> Box | None:
    return None if row["box"] is None else Box(*row["box"])


def _save_crop(row: dict, image_root: Path | str, crops_dir: Path) -> str:
    """Save the crop of a candidate's box as PNG; return its path relative to the iteration dir."""
    name = f"q{row['question_index']:06d}_c{row['cand']:02d}.png"
    image = load_rgb(resolve(image_root, row["image"]))
    crop_tight(image, _box(row), min_px=CROP_MIN_PX).save(crops_dir / name)
    return f"{CROPS}/{name}"


def _pair_record(
    chosen: dict, rejected: dict, templates: PromptTemplates, crops: tuple[str, str]
) -> PreferenceRecord:
    scores = lambda r: {"answer": r["answer_score"], "crop": r["crop_score"]}  # noqa: E731
    extra = {
        "uid": chosen["uid"],
        "question_index": chosen["question_index"],
        "question": chosen["question"],
        "answer_gold": chosen["answer_gold"],
        "image": chosen["image"],
        "image_size": chosen["image_size"],
        "chosen_index": chosen["cand"],
        "rejected_index": rejected["cand"],
        "chosen_box": chosen["box"],
        "rejected_box": rejected["box"],
        "chosen_synthetic": chosen["synthetic"],
        "rejected_synthetic": rejected["synthetic"],
        "chosen_scores": scores(chosen),
        "rejected_scores": scores(rejected),
        "chosen_crop": crops[0],
        "rejected_crop": crops[1],
    }
    return make_preference_record(
        images=[chosen["image"]],
        prompt=templates.box.format(question=chosen["question"]),
        chosen_step=chosen["box_text"],
        rejected_step=rejected["box_text"],
        chosen=chosen["answer"],
        rejected=rejected["answer"],
        extra=extra,
    )


def build_pairs(
    candidates: Sequence[dict],
    filter_cfg: FilterConfig,
    templates: PromptTemplates,
    out_dir: Path | str,
    image_root: Path | str,
    records: Sequence[VisCoTRecord] | None = None,
) -> tuple[list[PreferenceRecord], dict[str, Any]]:
    """Select one pair per question with the reference filter; write pairs.json, crops/ and stats.json.

    Candidates without both scores (unparsable boxes, unreadable judge replies) are ignored by the
    filter, as the reference drops ``None`` scores. ``records`` (the question list the candidates were
    generated from, aligned by ``question_index``) are used ONLY for the ground-truth analysis in
    stats.json, never for selection. Deterministic: rebuilding from the same candidates rewrites the
    same files. In pairs.json, ``images`` / ``image`` are relative to ``image_root`` and the crop paths
    relative to ``out_dir``.
    """
    out_dir = Path(out_dir)
    crops_dir = out_dir / CROPS
    crops_dir.mkdir(parents=True, exist_ok=True)
    decisions: list[FilterDecision] = []
    pairs: list[PreferenceRecord] = []
    for rows in group_by_question(candidates).values():
        scored = [ScoredCandidate(r["cand"], r["answer_score"], r["crop_score"]) for r in rows]
        decision = select_pair(scored, filter_cfg)
        decisions.append(decision)
        if decision.kept:
            by_cand = {r["cand"]: r for r in rows}
            chosen, rejected = by_cand[decision.chosen], by_cand[decision.rejected]
            crops = (_save_crop(chosen, image_root, crops_dir), _save_crop(rejected, image_root, crops_dir))
            pairs.append(_pair_record(chosen, rejected, templates, crops))
    write_pairs(pairs, out_dir / PAIRS)
    stats = compute_stats(candidates, decisions, pairs, records)
    write_json_atomic(out_dir / STATS, stats)
    return pairs, stats


# -------------------------------------------------------------------------------------------- stats
def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _usable(score: float | None) -> bool:
    return score is not None and math.isfinite(score)


def _gt_boxes(candidates: Sequence[dict], records: Sequence[VisCoTRecord]) -> dict[int, Box]:
    """question_index -> ground-truth box (analysis only), checking that the records line up."""
    gt: dict[int, Box] = {}
    for row in candidates:
        q = row["question_index"]
        if q in gt:
            continue
        if q >= len(records):
            raise ValueError(f"stats: candidate question_index {q} but only {len(records)} records given")
        rec = records[q]
        uid = f"{rec.dataset}:{rec.split}:{rec.question_id}"
        if uid != row["uid"]:
            raise ValueError(
                f"stats: record {q} is {uid!r} but the candidates of question {q} are {row['uid']!r}"
            )
        box = rec.box(tuple(row["image_size"]))
        if box is not None:
            gt[q] = box
    return gt


def _gt_stats(
    candidates: Sequence[dict], pairs: Sequence[PreferenceRecord], records
) -> dict[str, Any] | None:
    gt = _gt_boxes(candidates, records)
    if not gt:
        return None
    boxed = [r for r in candidates if r["box"] is not None and r["question_index"] in gt]
    ious = [iou(_box(r), gt[r["question_index"]]) for r in boxed]
    sampled = [v for r, v in zip(boxed, ious) if not r["synthetic"]]
    side = {}
    for name in ("chosen", "rejected"):
        vals = [
            iou(Box(*p.raw[f"{name}_box"]), gt[p.raw["question_index"]])
            for p in pairs
            if p.raw["question_index"] in gt
        ]
        side[f"{name}_mean_iou_gt"] = _mean(vals)
        side[f"{name}_hit_rate"] = _mean([float(v > GT_HIT_IOU) for v in vals])
    return {
        "questions_with_gt": len(gt),
        "candidates_with_box": len(boxed),
        "hit_rate": _mean([float(v > GT_HIT_IOU) for v in ious]),
        "sampled_hit_rate": _mean([float(v > GT_HIT_IOU) for v in sampled]),
        "mean_iou": _mean(ious),
        **side,
    }


def _failure_counts(values: Iterable[str | None]) -> dict[str, int]:
    return dict(sorted(Counter(v for v in values if v is not None).items()))


def compute_stats(
    candidates: Sequence[dict],
    decisions: Sequence[FilterDecision],
    pairs: Sequence[PreferenceRecord],
    records: Sequence[VisCoTRecord] | None = None,
) -> dict[str, Any]:
    """The numbers of stats.json (see the module docstring); means over empty sets are ``None``."""
    n_q, n_c = len(group_by_question(candidates)), len(candidates)
    parse = Counter(r["parse_failure"] for r in candidates if r["parse_failure"] is not None)
    both = [r for r in candidates if _usable(r["answer_score"]) and _usable(r["crop_score"])]
    margin = lambda key: _mean([p.raw["chosen_scores"][key] - p.raw["rejected_scores"][key] for p in pairs])  # noqa: E731
    return {
        "questions": n_q,
        "candidates": n_c,
        "parsed": n_c - sum(parse.values()),
        "parse_rate": (n_c - sum(parse.values())) / n_c if n_c else None,
        "parse_failures": {f.value: parse.get(f.value, 0) for f in ParseFailure},
        "synthetic_bad_boxes": sum(bool(r["synthetic"]) for r in candidates),
        "bad_box_synthesis_failed": sum(bool(r["synthesis_failed"]) for r in candidates),
        "answered": sum(r["answer"] is not None for r in candidates),
        "scored": len(both),
        "score_failures": {
            "answer": _failure_counts(r["answer_score_failure"] for r in candidates),
            "crop": _failure_counts(r["crop_score_failure"] for r in candidates),
        },
        "mean_answer_score": _mean([r["answer_score"] for r in both]),
        "mean_crop_score": _mean([r["crop_score"] for r in both]),
        "pairs": len(pairs),
        "yield": len(pairs) / n_q if n_q else None,
        "drop_reasons": count_reasons(decisions),
        "pairs_with_synthetic_rejected": sum(bool(p.raw["rejected_synthetic"]) for p in pairs),
        "mean_answer_margin": margin("answer"),
        "mean_crop_margin": margin("crop"),
        "mean_iou_chosen_rejected": _mean(
            [iou(Box(*p.raw["chosen_box"]), Box(*p.raw["rejected_box"])) for p in pairs]
        ),
        "gt": _gt_stats(candidates, pairs, records) if records is not None else None,
    }
