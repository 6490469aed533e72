"""Reference-model log-probs for step-level DPO: strategies, one-off precomputation, and a disk cache.

Why: DPO (VisRL §3.4) compares the policy with a frozen reference ``π_ref``.
The reference implementation (LoRA) uses the adapter-disabled model; full fine-tuning needs a frozen copy.
Both give the same numbers every epoch, so the pipeline computes them **once per iteration**
(:func:`compute_reference_logps`), stores them on the rows, and trains with :class:`PrecomputedReference`:
no second model in memory, no reference forward per step. :class:`ReferenceCache` keys the values by
(reference model, data, processor) fingerprints, so a beta / loss sweep over the same pairs reuses them.

Strategies return ``(ref_chosen [B], ref_rejected [B])`` for a :class:`~visrl.data.rows.PairBatch`
(``batch``: the encoder's collate of B chosen rows, then the B rejected rows), always without gradients
and with dropout off, through :func:`visrl.training.pair_logps.pair_logps` (prompt shared per pair).
"""

from __future__ import annotations

import copy
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from visrl.data.io import read_json, write_json_atomic
from visrl.data.rows import PairBatch, Row, pair_batch
from visrl.models.protocols import Encoder
from visrl.progress import progress
from visrl.training.pair_logps import pair_logps

__all__ = [
    "AdapterDisabledReference",
    "FrozenCopyReference",
    "PrecomputedReference",
    "ReferenceCache",
    "ReferenceStrategy",
    "compute_reference_logps",
    "to_model",
]


def to_model(batch: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Move a collated batch to the model's device; floating fields (pixels) take the model's dtype."""
    p = next(model.parameters())
    return {k: v.to(p.device, dtype=p.dtype if v.is_floating_point() else None) for k, v in batch.items()}


def _pair_logps_eval(model: nn.Module, pairs: PairBatch, share_prompt: bool) -> tuple[Tensor, Tensor]:
    """No-grad, dropout-off summed log-probs of a pair batch: (chosen [B], rejected [B])."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sums, _ = pair_logps(model, to_model(pairs.batch, model), pairs.n, share_prompt)  # [2B]
    finally:
        model.train(was_training)
    return sums[: pairs.n], sums[pairs.n :]


class ReferenceStrategy(ABC):
    """How a training step gets ``log π_ref`` of its chosen and rejected completions."""

    share_prompt: bool = True

    @abstractmethod
    def logps(self, pairs: PairBatch, policy: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """``(ref_chosen [B], ref_rejected [B])`` summed log-probs for a pair batch, without gradients."""


class AdapterDisabledReference(ReferenceStrategy):
    """The policy with its LoRA adapter disabled (``peft``'s ``disable_adapter()``): the reference's choice.

    ``model`` is the PEFT model; when omitted, the policy passed to :meth:`logps` is used.
    """

    def __init__(self, model: nn.Module | None = None, share_prompt: bool = True) -> None:
        self.model = model
        self.share_prompt = share_prompt

    def logps(self, pairs: PairBatch, policy: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        model = policy if policy is not None else self.model
        if model is None or not hasattr(model, "disable_adapter"):
            raise TypeError(
                "AdapterDisabledReference: the model is not a peft.PeftModel (no disable_adapter()); "
                "use FrozenCopyReference for full fine-tuning"
            )
        with model.disable_adapter():
            return _pair_logps_eval(model, pairs, self.share_prompt)


class FrozenCopyReference(ReferenceStrategy):
    """A frozen copy of the model (eval mode, no gradients) taken at construction: full fine-tuning.

    ``copy=False`` uses ``model`` itself as the reference (e.g. a separately loaded earlier policy). The copy is
    moved to the device of the batch on first use (it is not a submodule the Trainer moves).
    """

    def __init__(self, model: nn.Module, copy: bool = True, share_prompt: bool = True) -> None:
        self.model = _frozen(model, copy)
        self.share_prompt = share_prompt

    def logps(self, pairs: PairBatch, policy: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        device = pairs.batch["input_ids"].device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        return _pair_logps_eval(self.model, pairs, self.share_prompt)


def _frozen(model: nn.Module, make_copy: bool) -> nn.Module:
    """A deep copy in eval mode without gradients, or ``model`` itself untouched (each call runs in eval
    mode and restores the model's mode)."""
    if not make_copy:
        return model
    frozen = copy.deepcopy(model)
    frozen.eval()
    frozen.requires_grad_(False)
    return frozen


class PrecomputedReference(ReferenceStrategy):
    """Reference log-probs carried by the batch (``ref_chosen`` / ``ref_rejected``, [B] each)."""

    def logps(self, pairs: PairBatch, policy: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        if pairs.ref_chosen is None or pairs.ref_rejected is None:
            raise KeyError(
                f"PrecomputedReference: the {pairs.step!r} pair batch has no ref_chosen / ref_rejected; "
                "attach reference log-probs to the rows first (visrl.training.ref_logps."
                "attach_reference_logps) or train with AdapterDisabledReference / FrozenCopyReference"
            )
        return pairs.ref_chosen, pairs.ref_rejected


# ---- precomputation ------------------------------------------------------------------------------------
def _row_batches(rows: Sequence[Row], batch_size: int) -> list[list[int]]:
    """Row indices grouped by step, sorted by length (little padding), cut into batches."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i].step, rows[i].length))
    groups: list[list[int]] = []
    for i in order:
        if groups and rows[groups[-1][0]].step == rows[i].step and len(groups[-1]) < batch_size:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def compute_reference_logps(
    model_or_strategy: nn.Module | ReferenceStrategy,
    rows_or_loader: Sequence[Row] | Iterable[PairBatch],
    encoder: Encoder | None = None,
    batch_size: int = 16,
    label: str = "reference log-probs",
    total: int | None = None,
) -> list[tuple[float, float]]:
    """Summed reference log-probs ``(chosen, rejected)`` per pair, computed once, batched, without gradients
    (``label`` names the progress display; ``total``: the number of pairs a loader yields, for its ETA).

    ``model_or_strategy`` is a model (used as is, in eval mode) or a strategy (a LoRA model's
    ``AdapterDisabledReference(model)``, a ``FrozenCopyReference``). ``rows_or_loader`` is a sequence of
    preference :class:`~visrl.data.rows.Row` s (then ``encoder`` is required; the result follows the rows'
    order) or an iterable of pair batches (the result follows the loader's order).
    """
    if isinstance(model_or_strategy, PrecomputedReference):
        raise TypeError("compute_reference_logps: PrecomputedReference has no model to compute with")
    strategy = model_or_strategy
    if not isinstance(strategy, ReferenceStrategy):
        strategy = FrozenCopyReference(model_or_strategy, copy=False)
    if isinstance(rows_or_loader, Sequence) and (not rows_or_loader or isinstance(rows_or_loader[0], Row)):
        if encoder is None:
            raise ValueError("compute_reference_logps: pass the encoder to compute from rows")
        rows = list(rows_or_loader)
        out: list[tuple[float, float]] = [(0.0, 0.0)] * len(rows)
        with progress(label, total=len(rows), unit="pair") as bar:
            for idx in _row_batches(rows, batch_size):
                chosen, rejected = strategy.logps(
                    pair_batch([rows[i] for i in idx], encoder, with_reference=False)
                )
                for j, i in enumerate(idx):
                    out[i] = (float(chosen[j]), float(rejected[j]))
                bar.advance(len(idx))
        return out
    result: list[tuple[float, float]] = []
    with progress(label, total=total, unit="pair") as bar:
        for pairs in rows_or_loader:
            chosen, rejected = strategy.logps(pairs)
            result += [(float(c), float(r)) for c, r in zip(chosen.tolist(), rejected.tolist())]
            bar.advance(len(chosen))
    return result


# ---- fingerprints and cache ----------------------------------------------------------------------------
class ReferenceCache:
    """Reference log-probs on disk, one JSON file per key: ``<root>/<digest>.json``.

    ``key_parts`` name what the values depend on, e.g. ``{"model": model_fingerprint(ref), "data":
    rows_fingerprint(rows)  (visrl.data.hashing), "processor": processor_fingerprint(encoder)}``; beta, the loss and the stage
    weights are deliberately not part of it (the values do not depend on them).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key_parts: Mapping[str, str]) -> Path:
        key = json.dumps(dict(key_parts), sort_keys=True)
        return self.root / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

    def get_or_compute(
        self, key_parts: Mapping[str, str], fn: Callable[[], list[tuple[float, float]]]
    ) -> list[tuple[float, float]]:
        """The cached values for ``key_parts``, or ``fn()`` written atomically then returned."""
        path = self.path(key_parts)
        if path.is_file():
            data = read_json(path)
            if data.get("key") != dict(key_parts):
                raise ValueError(
                    f"ReferenceCache: {path}: field 'key' {data.get('key')} != {dict(key_parts)}"
                )
            return [tuple(v) for v in data["logps"]]
        values = [(float(c), float(r)) for c, r in fn()]
        write_json_atomic(path, {"key": dict(key_parts), "logps": values})
        return values
