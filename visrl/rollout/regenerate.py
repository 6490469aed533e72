"""One iteration's preference data (VisRL §3.3): rollouts -> self-scores -> filter -> pairs + statistics.

:func:`regenerate` is the whole data half of an iteration: the current policy samples ``n_boxes``
candidates per question (:mod:`visrl.rollout.generator`: bad-box synthesis, M_org's two self-scores,
resumable), the reference filter keeps one pair per question (:mod:`visrl.rollout.pairs`), and the
statistics are computed (:mod:`visrl.rollout.stats`). It returns them as a :class:`Regenerated`; the files
under ``out_dir`` (``candidates.jsonl``, ``pairs.json``, ``crops/``, ``stats.json``) are the record and the
resume state, never the hand-over.

Several processes (:mod:`visrl.dist`): every rank calls :func:`regenerate`; rank r samples the question
chunks ``i % world == r`` into ``candidates.rank{r}.jsonl``, rank 0 merges them into ``candidates.jsonl``
(byte-identical to one process: chunks are seeded by index), builds the pairs and writes them; the other
ranks wait and read the same pairs and statistics back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from visrl.data.io import read_json, write_json_atomic
from visrl.data.prompts import PromptTemplates
from visrl.data.records import VisCoTRecord
from visrl.dist import barrier, is_rank_zero, rank_world, wait_for_file
from visrl.models.protocols import Policy
from visrl.rollout.candidates import CANDIDATES, Candidate, merge_shards, meta_path, shard_path
from visrl.rollout.filter import FilterConfig
from visrl.rollout.generator import RolloutConfig, generate_candidates
from visrl.rollout.pairs import PAIRS, Pair, load_pairs, save_pairs, select_pairs
from visrl.rollout.scorers import Scorer
from visrl.rollout.stats import STATS, PairStats, compute_stats

__all__ = ["Regenerated", "build_pairs", "iteration_questions", "load_regenerated", "regenerate"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Regenerated:
    """The preference data of one iteration: the kept pairs, the statistics, and where their files are."""

    pairs: list[Pair]
    stats: PairStats
    out_dir: Path


def iteration_questions(pool: Sequence[VisCoTRecord], n: int | None, k: int) -> list[VisCoTRecord]:
    """The questions of iteration ``k``: the whole pool (``n`` None), else ``n`` of them, consecutive
    iterations taking consecutive slices of the pool (wrapping around)."""
    if n is None or n >= len(pool):
        return list(pool)
    if n < 1:
        raise ValueError(f"iteration_questions: n must be >= 1 or None, got {n}")
    return [pool[(k * n + j) % len(pool)] for j in range(n)]


def build_pairs(
    candidates: Sequence[Candidate],
    filter_cfg: FilterConfig,
    templates: PromptTemplates,
    out_dir: Path | str,
    image_root: Path | str,
    records: Sequence[VisCoTRecord] | None = None,
) -> Regenerated:
    """Select the pairs, compute the statistics, write ``pairs.json`` then ``stats.json`` (last: its
    presence says the iteration's data is complete). ``records`` (aligned by ``question_index``) feed only
    the ground-truth analysis of the statistics, never the selection. Deterministic."""
    out_dir = Path(out_dir)
    pairs, decisions = select_pairs(candidates, filter_cfg, templates, out_dir, image_root)
    stats = compute_stats(candidates, decisions, pairs, records)
    save_pairs(pairs, out_dir / PAIRS)
    write_json_atomic(out_dir / STATS, stats.to_json())
    return Regenerated(pairs, stats, out_dir)


def load_regenerated(out_dir: Path | str) -> Regenerated:
    """The pairs and statistics an earlier :func:`build_pairs` wrote under ``out_dir``."""
    out_dir = Path(out_dir)
    stats = PairStats.from_json(read_json(out_dir / STATS), str(out_dir / STATS))
    return Regenerated(load_pairs(out_dir / PAIRS), stats, out_dir)


def _candidates(
    policy: Policy,
    m_org: Policy,
    questions: Sequence[VisCoTRecord],
    templates: PromptTemplates,
    cfg: RolloutConfig,
    scorers: tuple[Scorer, Scorer],
    out_dir: Path,
    image_root: Path | str,
) -> list[Candidate]:
    """All candidates on rank 0 (``[]`` on the others).

    One process: generate (or finish) ``candidates.jsonl``. Several: each rank its shard, then rank 0
    merges (byte-identical to one process) and removes the shards; a ``candidates.jsonl`` that exists
    already (a finished iteration, or one a single process started) is finished by rank 0 alone.
    """
    rank, world = rank_world()
    path = out_dir / CANDIDATES
    args = (policy, m_org, questions, templates, cfg, *scorers, path, image_root)
    label = f"{out_dir.name.replace('_', ' ')} | rollouts"  # iter_2 -> "iter 2 | rollouts"
    if world == 1 or path.exists():  # every rank sees the same: only rank 0 writes it, after a barrier
        return generate_candidates(*args, label=label) if rank == 0 else []
    generate_candidates(*args, shard=(rank, world), label=f"{label} (rank {rank})")
    barrier()  # every shard is complete
    if rank != 0:
        return []
    shards = [shard_path(path, r, world) for r in range(world)]
    merged = merge_shards(shards, path)
    for shard in shards:
        shard.unlink()
        meta_path(shard).unlink()
    return merged


def regenerate(
    policy: Policy,
    m_org: Policy,
    questions: Sequence[VisCoTRecord],
    out_dir: Path | str,
    *,
    templates: PromptTemplates,
    rollout: RolloutConfig,
    filter_cfg: FilterConfig,
    answer_scorer: Scorer,
    crop_scorer: Scorer,
    image_root: Path | str,
) -> Regenerated:
    """Rollouts of ``questions`` by ``policy`` scored by ``m_org``, filtered into pairs (module docstring).

    Resumable: finished chunks are reused and the pairs rebuilt identically. Every rank calls it; a worker
    whose process group is not up yet (Lightning starts workers at the first fit, and a resumed run may
    regenerate before any fit) waits for the statistics rank 0 writes last.
    """
    out_dir = Path(out_dir)
    rank, world = rank_world()
    if world == 1 and not is_rank_zero():
        wait_for_file(out_dir / STATS)
        return load_regenerated(out_dir)
    scorers = (answer_scorer, crop_scorer)
    candidates = _candidates(policy, m_org, questions, templates, rollout, scorers, out_dir, image_root)
    result = None
    if rank == 0:
        result = build_pairs(candidates, filter_cfg, templates, out_dir, image_root, records=questions)
        drops = {r: n for r, n in result.stats.drop_reasons.items() if n}
        log.info(
            "%s: %d pairs from %d questions (drops: %s)",
            out_dir,
            len(result.pairs),
            result.stats.questions,
            drops,
        )
    barrier()  # the pairs are on disk
    return result if result is not None else load_regenerated(out_dir)
