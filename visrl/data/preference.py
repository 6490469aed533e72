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
(:func:`attach_reference_logps`, cached in ``iter_k/ref_logps.json``).
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
from visrl.data.records import PreferenceRecord, VisCoTRecord, read_pairs
from visrl.data.rows import Row, RowDataset, StepBucketSampler
from visrl.models.logprobs import sequence_logps
from visrl.prompts import PromptTemplates
from visrl.rollout.dataset import CANDIDATES, PAIRS, REF_LOGPS, build_pairs, write_json_atomic
from visrl.rollout.filter import FilterConfig
from visrl.rollout.generator import RolloutConfig, derive_seed, generate_candidates, model_fingerprint
from visrl.rollout.scorers import Scorer

__all__ = [
    "PreferenceDataModule",
    "attach_reference_logps",
    "collate_pairs",
    "iteration_questions",
    "pair_length",
    "preference_rows",
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


def pair_length(row: Row) -> int:
    """Tokens of the longer of the two sequences (chosen, rejected), each with its own prompt."""
    rejected_prompt = row.rejected_prompt if row.rejected_prompt is not None else row.prompt
    return max(
        len(row.prompt.input_ids) + len(row.completions[0]),
        len(rejected_prompt.input_ids) + len(row.completions[1]),
    )


def collate_pairs(rows: Sequence[Row], encoder: Any) -> dict[str, Any]:
    """B rows of one step -> ``{"step", "batch", "n", "uids"}`` (+ ``ref_chosen``/``ref_rejected`` [B]).

    ``batch`` is ``encoder.collate`` of 2B sequences, right-padded: rows ``[:B]`` chosen, ``[B:]``
    rejected (each rejected on its own prompt when the row has ``rejected_prompt``).
    """
    steps = {r.step for r in rows}
    if len(steps) != 1:
        raise ValueError(f"collate_pairs: a batch must hold one step, got {sorted(steps)}")
    if any(len(r.completions) != 2 for r in rows):
        raise ValueError("collate_pairs: every row needs two completions (chosen, rejected)")
    prompts = [r.prompt for r in rows] + [
        r.rejected_prompt if r.rejected_prompt is not None else r.prompt for r in rows
    ]
    completions = [r.completions[0] for r in rows] + [r.completions[1] for r in rows]
    out: dict[str, Any] = {
        "step": steps.pop(),
        "batch": encoder.collate(prompts, completions, "right"),  # [2B, T]
        "n": len(rows),
        "uids": [r.uid for r in rows],
    }
    with_ref = [r.ref_logps is not None for r in rows]
    if any(with_ref) and not all(with_ref):
        raise ValueError("collate_pairs: some rows of the batch carry reference log-probs and some do not")
    if all(with_ref):
        out["ref_chosen"] = torch.tensor([r.ref_logps[0] for r in rows], dtype=torch.float32)  # [B]
        out["ref_rejected"] = torch.tensor([r.ref_logps[1] for r in rows], dtype=torch.float32)  # [B]
    return out


def _to_model(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    p = next(model.parameters())
    return {k: v.to(p.device, dtype=p.dtype if v.is_floating_point() else None) for k, v in batch.items()}


def attach_reference_logps(
    rows: Sequence[Row],
    reference: Any,
    encoder: Any = None,
    batch_size: int = 16,
    cache_path: Path | str | None = None,
) -> list[Row]:
    """Set ``row.ref_logps = (log π_ref(chosen), log π_ref(rejected))`` (summed) on every row, in no-grad
    batches of one step laid out exactly as training batches.

    ``reference`` is a VLMPolicy (its model and encoder are used) or a model (then pass ``encoder``).
    With ``cache_path`` the values are read from / written to a JSON keyed by ``"uid|step"``, tagged with
    the reference model's fingerprint: a resumed run reuses them, a different reference recomputes.
    """
    keys = Counter(f"{r.uid}|{r.step}" for r in rows)
    dup = sorted(k for k, n in keys.items() if n > 1)
    if dup:
        raise ValueError(f"attach_reference_logps: rows share uid|step keys {dup[:5]} (duplicate questions?)")
    model = getattr(reference, "model", reference)
    encoder = encoder if encoder is not None else reference.backbone.encoder
    tag = model_fingerprint(model)
    cached: dict[str, list[float]] = {}
    if cache_path is not None and Path(cache_path).exists():
        data = json.loads(Path(cache_path).read_text())
        cached = data["logps"] if data.get("reference") == tag else {}
    todo = [r for r in rows if f"{r.uid}|{r.step}" not in cached]
    was_training = model.training
    model.eval()
    try:
        for step in sorted({r.step for r in todo}):
            same = [r for r in todo if r.step == step]
            for start in range(0, len(same), batch_size):
                part = same[start : start + batch_size]
                with torch.no_grad():
                    sums, _ = sequence_logps(
                        model, _to_model(collate_pairs(part, encoder)["batch"], model)
                    )  # [2B]
                for i, r in enumerate(part):
                    cached[f"{r.uid}|{r.step}"] = [float(sums[i]), float(sums[len(part) + i])]
    finally:
        model.train(was_training)
    for r in rows:
        r.ref_logps = tuple(cached[f"{r.uid}|{r.step}"])
    if cache_path is not None and todo:
        write_json_atomic(cache_path, {"reference": tag, "logps": cached})
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
    ) -> None:
        super().__init__()
        self.run_dir, self.image_root = Path(run_dir), Path(image_root)
        self.pool, self.templates = list(pool), templates
        self.rollout, self.filter_cfg = rollout, filter_cfg
        self.scorers = (answer_scorer, crop_scorer)
        self.batch_size, self.max_length, self.seed = batch_size, max_length, seed
        self.rejected_own_crop, self.questions_per_iter = rejected_own_crop, questions_per_iter
        self.steps = tuple(steps)
        self.rows: list[Row] = []
        self.dropped: dict[str, int] = {}
        self.encoder: Any = None
        self.current_dir: Path | None = None

    def iter_dir(self, k: int) -> Path:
        return self.run_dir / f"iter_{k}"

    def regenerate(self, policy: Any, k: int, m_org: Any = None) -> Path:
        """Rollouts of iteration ``k`` by ``policy`` scored by ``m_org`` (default: the policy itself),
        filtered into pairs, encoded into rows. Resumable: finished chunks are reused. Returns iter_k/."""
        out = self.iter_dir(k)
        questions = iteration_questions(self.pool, self.questions_per_iter, k)
        cfg = dataclasses.replace(self.rollout, seed=derive_seed(self.rollout.seed, k))
        candidates = generate_candidates(
            policy,
            m_org if m_org is not None else policy,
            questions,
            self.templates,
            cfg,
            *self.scorers,
            out / CANDIDATES,
            self.image_root,
        )
        _, stats = build_pairs(
            candidates, self.filter_cfg, self.templates, out, self.image_root, records=questions
        )
        log.info(
            "iter %d: %d pairs from %d questions (drops: %s)",
            k,
            stats["pairs"],
            stats["questions"],
            {r: n for r, n in stats["drop_reasons"].items() if n},
        )
        return self.load(out, policy.backbone)

    def load(self, iter_dir: Path | str, backbone: Any) -> Path:
        """Encode the rows of an iteration directory's pairs.json with ``backbone``; returns the dir."""
        iter_dir = Path(iter_dir)
        pairs = read_pairs(iter_dir / PAIRS)
        rows = preference_rows(
            pairs, self.image_root, backbone, self.templates, STEPS, self.rejected_own_crop
        )
        self.rows = [r for r in rows if pair_length(r) <= self.max_length]
        self.dropped = {s: sum(r.step == s and pair_length(r) > self.max_length for r in rows) for s in STEPS}
        if any(self.dropped.values()):
            log.warning("%s: dropped rows longer than %d tokens: %s", iter_dir, self.max_length, self.dropped)
        self.encoder, self.current_dir = backbone.encoder, iter_dir
        return iter_dir

    def rows_for(self, steps: Sequence[str]) -> list[Row]:
        return [r for r in self.rows if r.step in steps]

    def attach_reference_logps(self, reference: Any, batch_size: int | None = None) -> None:
        """Precompute reference log-probs of all rows once (cached in ``iter_k/ref_logps.json``)."""
        if self.current_dir is None:
            raise RuntimeError(
                "PreferenceDataModule: call regenerate() or load() before attach_reference_logps()"
            )
        attach_reference_logps(
            self.rows, reference, self.encoder, batch_size or self.batch_size, self.current_dir / REF_LOGPS
        )

    def collate(self, rows: list[Row]) -> dict[str, Any]:
        return collate_pairs(rows, self.encoder)

    def dataloader(self, steps: Sequence[str], shuffle: bool = True) -> DataLoader:
        rows = self.rows_for(steps)
        if not rows:
            raise ValueError(f"PreferenceDataModule: no rows of steps {list(steps)} in {self.current_dir}")
        sampler = StepBucketSampler(rows, self.batch_size, shuffle=shuffle, seed=self.seed)
        return DataLoader(RowDataset(rows), batch_sampler=sampler, collate_fn=self.collate)

    def train_dataloader(self) -> DataLoader:
        return self.dataloader(self.steps)
