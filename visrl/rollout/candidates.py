"""Candidates of one self-evolution iteration (VisRL §3.3) and their JSONL files, with per-rank sharding.

A :class:`Candidate` is one sampled (box -> crop -> answer -> two M_org scores) attempt for a question. The
generator (:mod:`visrl.rollout.generator`) appends them chunk by chunk to ``<iter_dir>/candidates.jsonl``,
one JSON object per line in the field order of :class:`Candidate`; ``candidates.jsonl.meta.json`` records
what produced the file (config, question fingerprint, model fingerprints) so a resumed run cannot mix two
runs. With several processes rank r writes ``candidates.rank{r}.jsonl`` and :func:`merge_shards` gives the
single-process file byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visrl.data.boxes import Box
from visrl.data.io import read_json, read_jsonl, rewrite_lines, write_json_atomic

__all__ = [
    "CANDIDATES",
    "Candidate",
    "merge_shards",
    "meta_path",
    "open_candidates",
    "read_candidates",
    "resume_candidates",
    "shard_path",
]

log = logging.getLogger(__name__)
CANDIDATES = "candidates.jsonl"


@dataclass
class Candidate:
    """One candidate row of ``candidates.jsonl`` (field order = the file's key order).

    ``box`` is the canonical xyxy box (after bad-box synthesis or the fallback), ``None`` when the sampled
    text did not parse (``parse_failure`` then names why, and there is no answer or score). Scores are
    ``None`` with a ``*_score_failure`` reason when the scorer could not score.
    """

    uid: str
    question_index: int
    cand: int  # index of the candidate among its question's n_boxes
    chunk: int  # the generation chunk it belongs to (resume unit)
    image: str  # path relative to the image root
    image_size: list[int]  # original (W, H)
    question: str
    answer_gold: str
    box_text: str  # the box text trained on (the sampled text, or the synthetic box's text)
    sampled_text: str  # what the policy wrote
    box: list[float] | None
    parse_failure: str | None
    synthetic: bool  # box replaced by a synthetic bad box (or a fallback box)
    synthesis_failed: bool
    answer: str | None
    answer_score: float | None
    answer_score_failure: str | None
    crop_score: float | None
    crop_score_failure: str | None

    @property
    def region(self) -> Box | None:
        return None if self.box is None else Box(*self.box)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, row: Mapping[str, Any], where: str = "candidate") -> Candidate:
        """A candidate from a JSON row; a missing or unknown key is one error naming ``where``."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing, unknown = sorted(set(names) - set(row)), sorted(set(row) - set(names))
        if missing or unknown:
            raise ValueError(f"{where}: missing fields {missing}, unknown fields {unknown}")
        return cls(**{k: row[k] for k in names})


def shard_path(out_path: Path | str, rank: int, world: int) -> Path:
    """``candidates.jsonl`` for a single process, ``candidates.rank{r}.jsonl`` for rank r of several."""
    out_path = Path(out_path)
    return out_path if world == 1 else out_path.with_name(f"{out_path.stem}.rank{rank}{out_path.suffix}")


def meta_path(path: Path | str) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def _parse(path: Path | str, rows: Sequence[dict]) -> list[Candidate]:
    return [Candidate.from_json(r, f"{path}: line {i + 1}") for i, r in enumerate(rows)]


def read_candidates(path: Path | str) -> list[Candidate]:
    """The candidates of a complete ``candidates.jsonl`` (a torn last line is an error here)."""
    return _parse(path, read_jsonl(path, allow_torn_tail=False)[1])


def merge_shards(paths: Sequence[Path | str], out: Path | str) -> list[Candidate]:
    """Merge per-rank candidate files into ``out``, ordered by (question_index, cand).

    Lines are copied verbatim, so the merged file is byte-identical to a single-process run with the
    same seed (chunks are seeded by their index, not by the process that ran them). The shards' meta
    files must agree (except on the shard) and together hold every candidate exactly once.
    """
    if not paths:
        raise ValueError("merge_shards: no shard files given")
    metas = [read_json(meta_path(p)) for p in paths]
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
    return _parse(out, [json.loads(keyed[k]) for k in sorted(keyed)])


def open_candidates(path: Path, meta: dict) -> None:
    """Check that an existing file was produced by the same run settings; write the meta of a new one."""
    mpath = meta_path(path)
    if mpath.exists():
        old = read_json(mpath)
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
) -> dict[int, list[Candidate]]:
    """The complete chunks of ``plan`` ((chunk, first question index, n questions)) already in ``path``,
    as chunk -> candidates; a torn tail or an incomplete chunk is cut off the file."""
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
    return {c: _parse(path, v) for c, v in done.items()}
