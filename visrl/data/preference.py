"""Step-level DPO data of one VisRL iteration (paper §3.3-3.4): self-evolved pairs -> encoded rows -> batches.

:meth:`PreferenceDataModule.regenerate` runs the iteration's rollouts with the current policy
(:mod:`visrl.rollout.generator`, resumable) and the reference filter (:mod:`visrl.rollout.dataset`) into
``<run_dir>/iter_k/``, then encodes two rows per pair, as the reference's step-level DPO does
(reference-method.md §2.4):

* step 1 ``box``: [full view] + question -> (chosen box text, rejected box text);
* step 2 ``answer``: [full view, crop of the CHOSEN box] + question -> (chosen answer, rejected answer).
  Both answers are scored on the chosen crop even though the rejected one was generated on its own crop
  (reference-method.md §7.3); ``rejected_own_crop=True`` conditions the rejected answer on its own crop
  instead (then ``Row.rejected_prompt`` holds that second prompt).

Batches hold rows of ONE step (:class:`~visrl.data.rows.StepBucketSampler`: one-image rows are never padded
to two-image length) and put chosen and rejected in ONE forward: ``{"step", "batch", "n", "uids"}`` where
``batch`` collates the B chosen sequences then the B rejected ones (the DPO module splits ``[:n]`` /
``[n:]``), plus ``ref_chosen`` / ``ref_rejected`` [B] when the rows carry precomputed reference log-probs
(:func:`attach_reference_logps`: one no-grad pass per iteration, each pair's shared prompt encoded once by
:func:`~visrl.training.pair_logps.pair_logps`, cached in ``iter_k/ref_logps.json`` or, with
``ref_cache_dir``, in a :class:`~visrl.training.reference.ReferenceCache` keyed by (reference weights,
rows, processor), so a beta / loss sweep over the same iteration data computes them once).

Several processes (``trainer=ddp`` ...; :mod:`visrl.dist`): every rank runs
:meth:`PreferenceDataModule.regenerate`; rank r samples the question chunks ``i % world == r`` into
``candidates.rank{r}.jsonl``, rank 0 merges them into ``candidates.jsonl`` (byte-identical to one
process: chunks are seeded by index) and builds the pairs, the others wait and load the same pairs.
Reference log-probs are split across ranks and gathered; training batches are dealt out per rank.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from visrl.data.boxes import Box
from visrl.data.images import crop_view, load_rgb, resolve, to_view
from visrl.data.io import write_json_atomic
from visrl.data.prompts import PromptTemplates
from visrl.data.records import PreferenceRecord, VisCoTRecord, read_pairs
from visrl.data.rows import Row, RowDataset, StepBucketSampler
from visrl.dist import (
    all_gather_objects,
    barrier,
    is_rank_zero,
    rank_world,
    shard_batches,
    wait_for_file,
)
from visrl.rollout.dataset import (
    CANDIDATES,
    PAIRS,
    REF_LOGPS,
    STATS,
    build_pairs,
    meta_path,
)
from visrl.rollout.filter import FilterConfig
from visrl.rollout.generator import (
    RolloutConfig,
    derive_seed,
    generate_candidates,
    merge_shards,
    model_fingerprint,
    shard_path,
)
from visrl.rollout.scorers import Scorer
from visrl.training import reference as ref

__all__ = [
    "PreferenceDataModule",
    "attach_reference_logps",
    "collate_pairs",
    "iteration_questions",
    "preference_rows",
    "reference_values",
]

log = logging.getLogger(__name__)
STEPS = ("box", "answer")


def _pair_field(pair: PreferenceRecord, key: str) -> Any:
    if key not in pair.raw:
        raise ValueError(
            f"{pair.source}: record {pair.index}: field '{key}': missing (not written by build_pairs?)"
        )
    return pair.raw[key]


def preference_rows(
    pairs: Sequence[PreferenceRecord],
    image_root: Path | str,
    backbone: Any,
    templates: PromptTemplates,
    steps: Sequence[str] = STEPS,
    rejected_own_crop: bool = False,
) -> list[Row]:
    """Encode the step-1 (``box``) and step-2 (``answer``) DPO rows of every pair (see module docstring)."""
    enc, size = backbone.encoder, backbone.image_size
    bad = sorted(set(steps) - set(STEPS))
    if bad:
        raise ValueError(f"preference_rows: unknown steps {bad}; valid: {list(STEPS)}")
    rows: list[Row] = []
    for pair in pairs:
        question, uid = _pair_field(pair, "question"), _pair_field(pair, "uid")
        image = load_rgb(resolve(image_root, _pair_field(pair, "image")))
        full = to_view(image, size)
        if "box" in steps:
            prompt = enc.encode_prompt(templates.box_prompt(question, full))
            completions = (enc.encode_completion(pair.chosen_step), enc.encode_completion(pair.rejected_step))
            rows.append(Row(prompt, completions, "box", uid))
        if "answer" in steps:
            chosen_crop = crop_view(image, Box(*_pair_field(pair, "chosen_box")), size)
            prompt = enc.encode_prompt(templates.answer_prompt(question, full, chosen_crop))
            rejected_prompt = None
            if rejected_own_crop:
                own = crop_view(image, Box(*_pair_field(pair, "rejected_box")), size)
                rejected_prompt = enc.encode_prompt(templates.answer_prompt(question, full, own))
            completions = (enc.encode_completion(pair.chosen), enc.encode_completion(pair.rejected))
            rows.append(Row(prompt, completions, "answer", uid, rejected_prompt=rejected_prompt))
    return rows


def collate_pairs(rows: Sequence[Row], encoder: Any) -> dict[str, Any]:
    """B rows of one step -> ``{"step", "batch", "n", "uids"}`` (+ ``ref_chosen``/``ref_rejected`` [B]).

    ``batch`` is :func:`visrl.training.reference.pair_batch`'s ``encoder.collate`` of 2B sequences,
    right-padded: rows ``[:B]`` chosen, ``[B:]`` rejected (each rejected on its own prompt when the row has
    ``rejected_prompt``).
    """
    steps = {r.step for r in rows}
    if len(steps) != 1:
        raise ValueError(f"collate_pairs: a batch must hold one step, got {sorted(steps)}")
    out: dict[str, Any] = {**ref.pair_batch(rows, encoder), "uids": [r.uid for r in rows]}  # batch: [2B, T]
    with_ref = [r.ref_logps is not None for r in rows]
    if any(with_ref) and not all(with_ref):
        raise ValueError("collate_pairs: some rows of the batch carry reference log-probs and some do not")
    if all(with_ref):
        out["ref_chosen"] = torch.tensor([r.ref_logps[0] for r in rows], dtype=torch.float32)  # [B]
        out["ref_rejected"] = torch.tensor([r.ref_logps[1] for r in rows], dtype=torch.float32)  # [B]
    return out


def reference_values(
    rows: Sequence[Row], model: torch.nn.Module, encoder: Any, batch_size: int = 16
) -> list[tuple[float, float]]:
    """Summed ``(log π_ref(chosen), log π_ref(rejected))`` of every row, in row order, no grad, eval mode.

    Batches hold one step, similar lengths (:class:`StepBucketSampler`), and are moved to the model's
    device here; :func:`~visrl.training.reference.compute_reference_logps` runs them through
    :func:`~visrl.training.pair_logps.pair_logps` (each pair's prompt encoded once). With several ranks
    each computes every ``world``-th row and the values are gathered, so all ranks return the same list.
    """
    rank, world = rank_world()
    mine = list(range(rank, len(rows), world))
    batches = [
        [mine[i] for i in b] for b in StepBucketSampler([rows[i] for i in mine], batch_size, shuffle=False)
    ]
    loader = (
        {**pairs, "batch": ref.to_model(pairs["batch"], model)}
        for pairs in (ref.pair_batch([rows[i] for i in idx], encoder) for idx in batches)
    )
    values = ref.compute_reference_logps(model, loader)  # follows ``batches``
    out: list[tuple[float, float] | None] = [None] * len(rows)
    for part in all_gather_objects(list(zip([i for b in batches for i in b], values))):
        for i, value in part:
            out[i] = value
    missing = [i for i, v in enumerate(out) if v is None]
    if missing:
        raise RuntimeError(f"reference_values: no value for rows {missing[:5]} (ranks disagree on the rows?)")
    return out  # type: ignore[return-value]


def _check_unique(rows: Sequence[Row]) -> None:
    keys = Counter(f"{r.uid}|{r.step}" for r in rows)
    dup = sorted(k for k, n in keys.items() if n > 1)
    if dup:
        raise ValueError(f"attach_reference_logps: rows share uid|step keys {dup[:5]} (duplicate questions?)")


def _per_row_file(
    rows: Sequence[Row], model: torch.nn.Module, encoder: Any, batch_size: int, path: Path | None
) -> list[tuple[float, float]]:
    """Values from / into a JSON keyed by ``"uid|step"`` and tagged with the reference's fingerprint: rows
    already in it are reused, the others computed; rank 0 writes."""
    tag = model_fingerprint(model)
    cached: dict[str, list[float]] = {}
    if path is not None and path.exists():
        data = json.loads(path.read_text())
        cached = data["logps"] if data.get("reference") == tag else {}
    todo = [r for r in rows if f"{r.uid}|{r.step}" not in cached]
    for r, value in zip(todo, reference_values(todo, model, encoder, batch_size)):
        cached[f"{r.uid}|{r.step}"] = list(value)
    if path is not None and todo and is_rank_zero():
        write_json_atomic(path, {"reference": tag, "logps": cached})
    return [tuple(cached[f"{r.uid}|{r.step}"]) for r in rows]


def _content_cache(
    rows: Sequence[Row], model: torch.nn.Module, encoder: Any, batch_size: int, cache: ref.ReferenceCache
) -> list[tuple[float, float]]:
    """Values from / into ``cache`` under (reference weights, rows, processor) fingerprints; rank 0 writes."""
    key = {
        "model": ref.model_fingerprint(model),
        "rows": ref.rows_fingerprint(rows),
        "processor": ref.processor_fingerprint(encoder),
    }
    if cache.path(key).is_file():
        return cache.get_or_compute(key, lambda: [])  # a hit: read (and key-checked), never computed
    values = reference_values(rows, model, encoder, batch_size)
    if is_rank_zero():
        cache.get_or_compute(key, lambda: values)  # writes atomically
    return values


def attach_reference_logps(
    rows: Sequence[Row],
    reference: Any,
    encoder: Any = None,
    batch_size: int = 16,
    cache_path: Path | str | None = None,
    cache: ref.ReferenceCache | None = None,
) -> list[Row]:
    """Set ``row.ref_logps = (log π_ref(chosen), log π_ref(rejected))`` (summed) on every row
    (:func:`reference_values`).

    ``reference`` is a VLMPolicy (its model and encoder are used) or a model (then pass ``encoder``).
    ``cache`` (a :class:`~visrl.training.reference.ReferenceCache`) reuses values across runs keyed by
    (reference weights, rows, processor); else ``cache_path`` reads / writes a JSON keyed by
    ``"uid|step"`` tagged with the reference's fingerprint (a resumed run reuses it, another reference
    recomputes). Either way every rank decides hit or miss alike and only rank 0 writes.
    """
    _check_unique(rows)
    model = getattr(reference, "model", reference)
    encoder = encoder if encoder is not None else reference.backbone.encoder
    barrier()  # no rank is still writing a cache file while the others look for it
    if cache is not None:
        values = _content_cache(rows, model, encoder, batch_size, cache)
    else:
        values = _per_row_file(rows, model, encoder, batch_size, Path(cache_path) if cache_path else None)
    for r, value in zip(rows, values):
        r.ref_logps = (float(value[0]), float(value[1]))
    return list(rows)


def iteration_questions(pool: Sequence[VisCoTRecord], n: int | None, k: int) -> list[VisCoTRecord]:
    """The questions of iteration ``k``: the whole pool (``n`` None), else ``n`` of them, consecutive
    iterations taking consecutive slices of the pool (wrapping around)."""
    if n is None or n >= len(pool):
        return list(pool)
    if n < 1:
        raise ValueError(f"iteration_questions: n must be >= 1 or None, got {n}")
    return [pool[(k * n + j) % len(pool)] for j in range(n)]


class PreferenceDataModule(pl.LightningDataModule):
    """Per-iteration preference data: regenerate with the current policy, then serve step-bucketed pairs.

    ``steps`` selects the rows the train dataloader serves (stage 1: ``("box",)``; stage 2: both).
    ``ref_cache_dir``: where reference log-probs are cached across runs (``${paths.cache_dir}/ref_logps``
    in the pipeline); None keeps them in ``iter_k/ref_logps.json`` only.
    """

    def __init__(
        self,
        run_dir: Path | str,
        pool: Sequence[VisCoTRecord],
        image_root: Path | str,
        templates: PromptTemplates,
        rollout: RolloutConfig,
        filter_cfg: FilterConfig,
        answer_scorer: Scorer,
        crop_scorer: Scorer,
        batch_size: int = 16,
        max_length: int = 512,
        rejected_own_crop: bool = False,
        questions_per_iter: int | None = None,
        steps: Sequence[str] = STEPS,
        seed: int = 0,
        ref_cache_dir: Path | str | None = None,
    ) -> None:
        super().__init__()
        self.run_dir, self.image_root = Path(run_dir), Path(image_root)
        self.pool, self.templates = list(pool), templates
        self.rollout, self.filter_cfg = rollout, filter_cfg
        self.scorers = (answer_scorer, crop_scorer)
        self.batch_size, self.max_length, self.seed = batch_size, max_length, seed
        self.rejected_own_crop, self.questions_per_iter = rejected_own_crop, questions_per_iter
        self.steps = tuple(steps)
        self.ref_cache = ref.ReferenceCache(ref_cache_dir) if ref_cache_dir is not None else None
        self.rows: list[Row] = []
        self.dropped: dict[str, int] = {}
        self.encoder: Any = None
        self.current_dir: Path | None = None

    def iter_dir(self, k: int) -> Path:
        return self.run_dir / f"iter_{k}"

    def regenerate(self, policy: Any, k: int, m_org: Any = None) -> Path:
        """Rollouts of iteration ``k`` by ``policy`` scored by ``m_org`` (default: the policy itself),
        filtered into pairs, encoded into rows. Resumable: finished chunks are reused. Returns iter_k/.

        Every rank calls it (module docstring); a worker whose process group is not up yet (Lightning
        starts workers at the first fit, and a resumed run may regenerate before any fit) waits for the
        pairs rank 0 writes.
        """
        out = self.iter_dir(k)
        rank, world = rank_world()
        if world == 1 and not is_rank_zero():
            wait_for_file(out / STATS)  # written last, atomically, by build_pairs on rank 0
            return self.load(out, policy.backbone)
        questions = iteration_questions(self.pool, self.questions_per_iter, k)
        candidates = self._candidates(policy, m_org if m_org is not None else policy, questions, k)
        if rank == 0:
            _, stats = build_pairs(
                candidates, self.filter_cfg, self.templates, out, self.image_root, records=questions
            )
            drops = {r: n for r, n in stats["drop_reasons"].items() if n}
            log.info(
                "iter %d: %d pairs from %d questions (drops: %s)",
                k,
                stats["pairs"],
                stats["questions"],
                drops,
            )
        barrier()  # the pairs are on disk
        return self.load(out, policy.backbone)

    def _candidates(self, policy: Any, m_org: Any, questions: list[VisCoTRecord], k: int) -> list[dict]:
        """All candidates of iteration ``k`` on rank 0 (``[]`` on the others).

        One process: generate (or finish) ``candidates.jsonl``. Several: each rank its shard, then rank 0
        merges (byte-identical to one process) and removes the shards; a ``candidates.jsonl`` that exists
        already (a finished iteration, or one a single process started) is finished by rank 0 alone.
        """
        rank, world = rank_world()
        path = self.iter_dir(k) / CANDIDATES
        cfg = dataclasses.replace(self.rollout, seed=derive_seed(self.rollout.seed, k))
        args = (policy, m_org, questions, self.templates, cfg, *self.scorers, path, self.image_root)
        if world == 1 or path.exists():  # every rank sees the same: only rank 0 writes it, after a barrier
            return generate_candidates(*args) if rank == 0 else []
        generate_candidates(*args, shard=(rank, world))
        barrier()  # every shard is complete
        if rank != 0:
            return []
        shards = [shard_path(path, r, world) for r in range(world)]
        rows = merge_shards(shards, path)
        for shard in shards:
            shard.unlink()
            meta_path(shard).unlink()
        return rows

    def load(self, iter_dir: Path | str, backbone: Any) -> Path:
        """Encode the rows of an iteration directory's pairs.json with ``backbone``; returns the dir."""
        iter_dir = Path(iter_dir)
        pairs = read_pairs(iter_dir / PAIRS)
        rows = preference_rows(
            pairs, self.image_root, backbone, self.templates, STEPS, self.rejected_own_crop
        )
        self.rows = [r for r in rows if r.length <= self.max_length]
        self.dropped = {s: sum(r.step == s and r.length > self.max_length for r in rows) for s in STEPS}
        if any(self.dropped.values()):
            log.warning("%s: dropped rows longer than %d tokens: %s", iter_dir, self.max_length, self.dropped)
        self.encoder, self.current_dir = backbone.encoder, iter_dir
        return iter_dir

    def rows_for(self, steps: Sequence[str]) -> list[Row]:
        return [r for r in self.rows if r.step in steps]

    def attach_reference_logps(self, reference: Any, batch_size: int | None = None) -> None:
        """Precompute reference log-probs of all rows once per iteration and reference (cached: the
        ``ref_cache_dir`` cache when set, else ``iter_k/ref_logps.json``)."""
        if self.current_dir is None:
            raise RuntimeError(
                "PreferenceDataModule: call regenerate() or load() before attach_reference_logps()"
            )
        attach_reference_logps(
            self.rows,
            reference,
            self.encoder,
            batch_size or self.batch_size,
            cache_path=None if self.ref_cache is not None else self.current_dir / REF_LOGPS,
            cache=self.ref_cache,
        )

    def collate(self, rows: list[Row]) -> dict[str, Any]:
        return collate_pairs(rows, self.encoder)

    def dataloader(self, steps: Sequence[str], shuffle: bool = True) -> DataLoader:
        """Step-bucketed pair batches of ``steps``; with several ranks each gets its share of the batches."""
        rows = self.rows_for(steps)
        if not rows:
            raise ValueError(f"PreferenceDataModule: no rows of steps {list(steps)} in {self.current_dir}")
        sampler = shard_batches(StepBucketSampler(rows, self.batch_size, shuffle=shuffle, seed=self.seed))
        return DataLoader(RowDataset(rows), batch_sampler=sampler, collate_fn=self.collate)

    def train_dataloader(self) -> DataLoader:
        return self.dataloader(self.steps)
