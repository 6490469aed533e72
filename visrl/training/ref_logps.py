"""Reference log-probs attached to an iteration's DPO rows: one no-grad pass per iteration, cached, DDP-split.

DPO compares the policy with a frozen reference; its summed log-probs of every row's chosen and rejected
completions do not change while a stage trains, so they are computed once per iteration
(:func:`reference_values`: each pair's shared prompt encoded once, through
:func:`~visrl.training.reference.compute_reference_logps`) and stored on the rows (``Row.ref_logps``).
:func:`attach_reference_logps` caches them in ``iter_k/ref_logps.json`` or, with a
:class:`~visrl.training.reference.ReferenceCache`, keyed by (reference weights, rows, processor), so a
beta / loss sweep over the same iteration data computes them once. With several ranks each computes every
``world``-th row and the values are gathered; only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from visrl.data.hashing import rows_fingerprint
from visrl.data.io import read_json, write_json_atomic
from visrl.data.rows import Row, StepBucketSampler, pair_batch
from visrl.dist import all_gather_objects, barrier, on_rank_zero, rank_world
from visrl.models.fingerprint import model_fingerprint, policy_fingerprint, processor_fingerprint
from visrl.models.protocols import Encoder, Policy
from visrl.training import reference as ref

__all__ = ["attach_reference_logps", "reference_values"]


def reference_values(
    rows: Sequence[Row], model: torch.nn.Module, encoder: Encoder, batch_size: int = 16
) -> list[tuple[float, float]]:
    """Summed ``(log π_ref(chosen), log π_ref(rejected))`` of every row, in row order, no grad, eval mode.

    Batches hold one step, similar lengths (:class:`StepBucketSampler`), and are moved to the model's
    device here. With several ranks each computes every ``world``-th row and the values are gathered, so
    all ranks return the same list.
    """
    rank, world = rank_world()
    mine = list(range(rank, len(rows), world))
    batches = [
        [mine[i] for i in b] for b in StepBucketSampler([rows[i] for i in mine], batch_size, shuffle=False)
    ]
    loader = (
        dataclasses.replace(pb, batch=ref.to_model(pb.batch, model))
        for pb in (pair_batch([rows[i] for i in idx], encoder, with_reference=False) for idx in batches)
    )
    values = ref.compute_reference_logps(model, loader, total=len(mine))  # follows ``batches``
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
    rows: Sequence[Row], model: torch.nn.Module, encoder: Encoder, batch_size: int, path: Path | None
) -> list[tuple[float, float]]:
    """Values from / into a JSON keyed by ``"uid|step"`` and tagged with the reference's fingerprint: rows
    already in it are reused, the others computed; rank 0 writes."""
    tag = policy_fingerprint(model)
    cached: dict[str, list[float]] = {}
    if path is not None and path.exists():
        data = read_json(path)
        cached = data["logps"] if data.get("reference") == tag else {}
    todo = [r for r in rows if f"{r.uid}|{r.step}" not in cached]
    for r, value in zip(todo, reference_values(todo, model, encoder, batch_size)):
        cached[f"{r.uid}|{r.step}"] = list(value)
    if path is not None and todo:
        on_rank_zero(write_json_atomic, path, {"reference": tag, "logps": cached})
    return [tuple(cached[f"{r.uid}|{r.step}"]) for r in rows]  # type: ignore[misc]


def _content_cache(
    rows: Sequence[Row], model: torch.nn.Module, encoder: Encoder, batch_size: int, cache: ref.ReferenceCache
) -> list[tuple[float, float]]:
    """Values from / into ``cache`` under (reference weights, rows, processor) fingerprints; rank 0 writes."""
    key = {
        "model": model_fingerprint(model),
        "rows": rows_fingerprint(rows),
        "processor": processor_fingerprint(encoder),
    }
    if cache.path(key).is_file():
        return cache.get_or_compute(key, lambda: [])  # a hit: read (and key-checked), never computed
    values = reference_values(rows, model, encoder, batch_size)
    on_rank_zero(cache.get_or_compute, key, lambda: values)  # writes atomically
    return values


def attach_reference_logps(
    rows: Sequence[Row],
    reference: Policy | torch.nn.Module,
    encoder: Encoder | None = None,
    batch_size: int = 16,
    cache_path: Path | str | None = None,
    cache: ref.ReferenceCache | None = None,
) -> list[Row]:
    """Set ``row.ref_logps = (log π_ref(chosen), log π_ref(rejected))`` (summed) on every row.

    ``reference`` is a policy (its model and encoder are used) or a model (then pass ``encoder``).
    ``cache`` reuses values across runs keyed by (reference weights, rows, processor); else ``cache_path``
    reads / writes a JSON keyed by ``"uid|step"`` tagged with the reference's fingerprint (a resumed run
    reuses it, another reference recomputes). Either way every rank decides hit or miss alike and only
    rank 0 writes.
    """
    _check_unique(rows)
    model = reference.model if not isinstance(reference, torch.nn.Module) else reference
    if encoder is None:
        if isinstance(reference, torch.nn.Module):
            raise ValueError("attach_reference_logps: pass the encoder when the reference is a bare model")
        encoder = reference.backbone.encoder
    barrier()  # no rank is still writing a cache file while the others look for it
    if cache is not None:
        values = _content_cache(rows, model, encoder, batch_size, cache)
    else:
        values = _per_row_file(rows, model, encoder, batch_size, Path(cache_path) if cache_path else None)
    for r, value in zip(rows, values):
        r.ref_logps = (float(value[0]), float(value[1]))
    return list(rows)
