"""The Lightning DataModules of the stages: SFT / base rows, and the per-iteration preference data.

* :class:`RowsDataModule` serves single-completion rows (base preparation, SFT warm-up).
* :class:`PreferenceDataModule` is the DataModule that regenerates the preference data between iterations
  (VisRL §3.3): :meth:`~PreferenceDataModule.regenerate` delegates the rollouts, self-scores, filter and
  statistics to :func:`visrl.rollout.regenerate.regenerate` and encodes two DPO rows per pair
  (:mod:`visrl.training.pair_rows`); :meth:`~PreferenceDataModule.attach_reference_logps` adds reference
  log-probs (:mod:`visrl.training.ref_logps`). A stage trains on :meth:`~PreferenceDataModule.for_steps`
  (stage 1: ``("box",)``; stage 2: both steps), a separate read-only :class:`PairDataModule`, so nothing
  is switched on the shared object between stages.

Pair batches hold rows of ONE step (:class:`~visrl.data.rows.StepBucketSampler`: one-image rows are never
padded to two-image length) as a :class:`~visrl.data.rows.PairBatch`. With several ranks each gets its share
of the batches (:func:`visrl.dist.shard_batches`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from visrl.data.prompts import PromptTemplates
from visrl.data.records import VisCoTRecord
from visrl.data.rows import PairBatch, Row, RowDataset, StepBucketSampler, pair_batch
from visrl.data.sft import check_fit, drop_long
from visrl.dist import shard_batches
from visrl.models.protocols import BackboneView, Encoder, Policy
from visrl.rollout.filter import FilterConfig
from visrl.rollout.generator import RolloutConfig, derive_seed
from visrl.rollout.regenerate import Regenerated, iteration_questions, load_regenerated, regenerate
from visrl.rollout.scorers import Scorer
from visrl.training import reference as ref
from visrl.training.pair_rows import STEPS, preference_rows
from visrl.training.ref_logps import attach_reference_logps

__all__ = ["PairDataModule", "PreferenceDataModule", "RowsDataModule"]

log = logging.getLogger(__name__)
REF_LOGPS = "ref_logps.json"


class RowsDataModule(pl.LightningDataModule):
    """Serves encoded rows in step-bucketed batches; the collate function is the backbone encoder's."""

    def __init__(
        self,
        rows: Sequence[Row],
        encoder: Encoder,
        batch_size: int,
        max_length: int = 1024,
        seed: int = 0,
        val_rows: Sequence[Row] = (),
        knob: str = "sft.max_length",
    ) -> None:
        super().__init__()
        self.rows, self.dropped = drop_long(rows, max_length)
        check_fit(rows, self.rows, max_length, knob)  # ``knob``: the config key of max_length, for the error
        self.val_rows, _ = drop_long(val_rows, max_length)
        self.encoder = encoder
        self.batch_size = batch_size
        self.seed = seed

    def collate(self, rows: list[Row]) -> dict:
        return self.encoder.collate([r.prompt for r in rows], [r.completions[0] for r in rows], "right")

    def train_dataloader(self) -> DataLoader:
        sampler = StepBucketSampler(self.rows, self.batch_size, shuffle=True, seed=self.seed)
        return DataLoader(RowDataset(self.rows), batch_sampler=sampler, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_rows:
            return []
        sampler = StepBucketSampler(self.val_rows, self.batch_size, shuffle=False)
        return DataLoader(RowDataset(self.val_rows), batch_sampler=sampler, collate_fn=self.collate)


class PairDataModule(pl.LightningDataModule):
    """Step-bucketed :class:`PairBatch` es of a fixed set of preference rows (one stage's data)."""

    def __init__(self, rows: Sequence[Row], encoder: Encoder, batch_size: int, seed: int = 0) -> None:
        super().__init__()
        self.rows, self.encoder = list(rows), encoder
        self.batch_size, self.seed = batch_size, seed

    def collate(self, rows: list[Row]) -> PairBatch:
        return pair_batch(rows, self.encoder)

    def dataloader(self, shuffle: bool = True) -> DataLoader:
        if not self.rows:
            raise ValueError("PairDataModule: no rows to serve")
        sampler = shard_batches(
            StepBucketSampler(self.rows, self.batch_size, shuffle=shuffle, seed=self.seed)
        )
        return DataLoader(RowDataset(self.rows), batch_sampler=sampler, collate_fn=self.collate)

    def train_dataloader(self) -> DataLoader:
        return self.dataloader()


class PreferenceDataModule(PairDataModule):
    """Per-iteration preference data: regenerate with the current policy, then serve step-bucketed pairs.

    Serves every step's rows itself; :meth:`for_steps` gives one stage's view. ``ref_cache_dir``: where
    reference log-probs are cached across runs (``${paths.cache_dir}/ref_logps`` in the pipeline); None
    keeps them in ``iter_k/ref_logps.json`` only.
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
        seed: int = 0,
        ref_cache_dir: Path | str | None = None,
    ) -> None:
        super().__init__([], None, batch_size, seed)  # type: ignore[arg-type]  # encoder: set by load()
        self.run_dir, self.image_root = Path(run_dir), Path(image_root)
        self.pool, self.templates = list(pool), templates
        self.rollout, self.filter_cfg = rollout, filter_cfg
        self.scorers = (answer_scorer, crop_scorer)
        self.max_length = max_length
        self.rejected_own_crop, self.questions_per_iter = rejected_own_crop, questions_per_iter
        self.ref_cache = ref.ReferenceCache(ref_cache_dir) if ref_cache_dir is not None else None
        self.dropped: dict[str, int] = {}
        self.current: Regenerated | None = None

    def iter_dir(self, k: int) -> Path:
        return self.run_dir / f"iter_{k}"

    def regenerate(self, policy: Policy, k: int, m_org: Policy | None = None) -> Regenerated:
        """Rollouts of iteration ``k`` by ``policy`` scored by ``m_org`` (default: the policy itself),
        filtered into pairs (:func:`visrl.rollout.regenerate.regenerate`), encoded into rows. Resumable."""
        result = regenerate(
            policy,
            m_org if m_org is not None else policy,
            iteration_questions(self.pool, self.questions_per_iter, k),
            self.iter_dir(k),
            templates=self.templates,
            rollout=dataclasses.replace(self.rollout, seed=derive_seed(self.rollout.seed, k)),
            filter_cfg=self.filter_cfg,
            answer_scorer=self.scorers[0],
            crop_scorer=self.scorers[1],
            image_root=self.image_root,
        )
        return self.use(result, policy.backbone)

    def load(self, iter_dir: Path | str, backbone: BackboneView) -> Regenerated:
        """Serve the pairs an earlier run wrote under ``iter_dir``, encoded with ``backbone``."""
        return self.use(load_regenerated(iter_dir), backbone)

    def use(self, data: Regenerated, backbone: BackboneView) -> Regenerated:
        """Encode ``data``'s pairs (rows over ``max_length`` tokens dropped and counted) and serve them."""
        rows = preference_rows(
            data.pairs, self.image_root, backbone, self.templates, STEPS, self.rejected_own_crop
        )
        self.rows = [r for r in rows if r.length <= self.max_length]
        check_fit(rows, self.rows, self.max_length, "dpo.max_length")
        self.dropped = {s: sum(r.step == s and r.length > self.max_length for r in rows) for s in STEPS}
        if any(self.dropped.values()):
            log.warning(
                "%s: dropped rows longer than %d tokens: %s", data.out_dir, self.max_length, self.dropped
            )
        self.encoder, self.current = backbone.encoder, data
        return data

    def for_steps(self, steps: Sequence[str]) -> PairDataModule:
        """The rows of ``steps`` only, as a separate DataModule (one stage's data; may be empty)."""
        return PairDataModule(
            [r for r in self.rows if r.step in steps], self.encoder, self.batch_size, self.seed
        )

    def attach_reference_logps(self, reference: Policy, batch_size: int | None = None) -> None:
        """Precompute reference log-probs of all rows once per iteration and reference (cached: the
        ``ref_cache_dir`` cache when set, else ``iter_k/ref_logps.json``)."""
        if self.current is None:
            raise RuntimeError(
                "PreferenceDataModule: call regenerate() or load() before attach_reference_logps()"
            )
        attach_reference_logps(
            self.rows,
            reference,
            self.encoder,
            batch_size or self.batch_size,
            cache_path=None if self.ref_cache is not None else self.current.out_dir / REF_LOGPS,
            cache=self.ref_cache,
        )
