"""Two-stage step-level DPO (VisRL §3.4) as one LightningModule; the stages are data (step weights).

The reference implementation trains each iteration in two stages on the same preference pairs:

* stage 1, weights ``{"box": 1.0}``: ``L1 = L_DPO(x1 = (I, q); b_w, b_l)``;
* stage 2, weights ``{"box": 0.5, "answer": 0.5}``:
  ``L2 = 0.5 L_DPO(x1; b_w, b_l) + 0.5 L_DPO(x2 = (I, q, c(b_w)); a_w, a_l)``.

A batch holds the pairs of ONE step (a :class:`~visrl.data.rows.PairBatch`, served by
:mod:`visrl.training.datamodules`), so one-image box prompts are never padded to two-image answer prompts.
The loss of a batch is :func:`visrl.losses.step_dpo_loss` of its one step: ``weights[step] * mean_B(L_DPO)``. Over an epoch that visits every pair's box row and
answer row once, the sum of these batch losses is ``sum_pairs (0.5 L_box + 0.5 L_answer) / B``: the
reference's per-example 0.5/0.5 objective, in expectation over the order of batches (each optimizer step
sees one step's term, the epoch sees both).

Per step: one forward for chosen + rejected, with each pair's prompt and images encoded once
(:func:`visrl.training.pair_logps.pair_logps`), reference log-probs read from the batch when precomputed
(:mod:`visrl.training.reference`) or else from the reference strategy, then
:func:`visrl.losses.preference_loss` and :func:`visrl.losses.step_dpo_loss`. A step with weight 0, or absent from ``weights``, is skipped
(``training_step`` returns None and Lightning's automatic optimisation skips backward and the update).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from visrl.data.rows import PairBatch
from visrl.losses import (
    PREFERENCE_LOSSES,
    PreferenceLossOutput,
    check_step_weights,
    preference_loss,
    sft_term,
    step_dpo_loss,
)
from visrl.training.fit import trainable_state
from visrl.training.pair_logps import pair_logps
from visrl.training.reference import PrecomputedReference, ReferenceStrategy, to_model

__all__ = ["StepDPOModule", "StepOutput"]


@dataclass
class StepOutput:
    """Everything one pair batch yields: the weighted loss and TRL-named metrics."""

    loss: Tensor  # scalar, differentiable: weight * (mean DPO loss + ftx * mean SFT term)
    out: PreferenceLossOutput  # per-example losses [B] and rewards [B]
    chosen_logps: Tensor  # [B] policy summed log-probs, detached
    rejected_logps: Tensor  # [B], detached
    sft: Tensor | None = None  # [B] SFT term of the chosen completions (ftx > 0), detached

    def metrics(self) -> dict[str, Tensor]:
        """Batch means under TRL's names (``rewards/chosen`` ... ``logps/rejected``) plus the step's loss."""
        margins = self.out.chosen_rewards - self.out.rejected_rewards  # [B]
        m = {
            "loss": self.out.losses.detach().mean(),
            "rewards/chosen": self.out.chosen_rewards.mean(),
            "rewards/rejected": self.out.rejected_rewards.mean(),
            "rewards/margins": margins.mean(),
            "rewards/accuracies": (margins > 0).float().mean(),
            "logps/chosen": self.chosen_logps.mean(),
            "logps/rejected": self.rejected_logps.mean(),
        }
        if self.sft is not None:
            m["sft"] = self.sft.mean()
        return m


class StepDPOModule(pl.LightningModule):
    """Step-level DPO on step-bucketed pair batches; one module for both stages (``weights``).

    Args:
        model: the policy (a ``PreTrainedModel`` or a ``peft.PeftModel``); only its trainable parameters
            are optimised and checkpointed.
        optimizer, scheduler: Hydra partials, as in :class:`visrl.training.sft.SFTModule`.
        weights: step -> weight; stage 1 ``{"box": 1.0}``, stage 2 ``{"box": 0.5, "answer": 0.5}``.
        loss, beta, label_smoothing: the preference loss (:data:`visrl.losses.PREFERENCE_LOSSES`).
        ftx: weight of the SFT term (mean token NLL of the chosen completion); 0 in the reference. It is
            part of the step's objective, so the step weight multiplies it too.
        reference: where reference log-probs come from when a batch carries none; default
            :class:`~visrl.training.reference.PrecomputedReference` (the batch must carry them).
        share_prompt: encode each pair's prompt once (exact; see :mod:`visrl.training.pair_logps`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        weights: Mapping[str, float] | None = None,
        loss: str = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        ftx: float = 0.0,
        reference: ReferenceStrategy | None = None,
        pref: float = 1.0,
        share_prompt: bool = True,
    ) -> None:
        super().__init__()
        if loss not in PREFERENCE_LOSSES:
            raise ValueError(f"StepDPOModule: unknown loss {loss!r}; valid: {sorted(PREFERENCE_LOSSES)}")
        if not (math.isfinite(ftx) and ftx >= 0):
            raise ValueError(f"StepDPOModule: ftx must be finite and >= 0, got {ftx}")
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.weights = check_step_weights(weights if weights is not None else {"box": 1.0}, "StepDPOModule")
        self.loss_name, self.beta, self.label_smoothing, self.ftx = loss, beta, label_smoothing, ftx
        self.pref = pref  # weight of the preference term (0: the ftx-only control)
        self.reference = reference if reference is not None else PrecomputedReference()
        self.share_prompt = share_prompt

    def forward(self, pairs: PairBatch) -> tuple[Tensor, Tensor]:
        """Policy summed log-probs [2B] and completion token counts [2B] (chosen rows, then rejected)."""
        return pair_logps(self.model, to_model(pairs.batch, self.model), pairs.n, self.share_prompt)

    def reference_logps(self, pairs: PairBatch) -> tuple[Tensor, Tensor]:
        """``(ref_chosen [B], ref_rejected [B])``: from the batch when precomputed, else the strategy."""
        if pairs.ref_chosen is not None and pairs.ref_rejected is not None:
            return pairs.ref_chosen, pairs.ref_rejected
        return self.reference.logps(pairs, policy=self.model)

    def step_output(self, pairs: PairBatch) -> StepOutput:
        """Loss and metrics of one pair batch of a weighted step."""
        step, n = pairs.step, int(pairs.n)
        logps, n_tokens = self(pairs)  # [2B], [2B]
        chosen, rejected = logps[:n], logps[n:]  # [B] each
        ref_chosen, ref_rejected = self.reference_logps(pairs)
        device = chosen.device
        out = preference_loss(
            self.loss_name,
            chosen,
            rejected,
            ref_chosen.to(device, torch.float32),
            ref_rejected.to(device, torch.float32),
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            chosen_n_tokens=n_tokens[:n],
            rejected_n_tokens=n_tokens[n:],
        )
        sft = sft_term(chosen, n_tokens[:n]) if self.ftx else None  # [B]
        loss = step_dpo_loss(
            {step: out}, {step: self.weights[step]}, None if sft is None else {step: sft}, self.ftx, self.pref
        )
        return StepOutput(
            loss,
            out,
            chosen.detach(),
            rejected.detach(),
            None if sft is None else sft.detach(),
        )

    def _weighted(self, pairs: PairBatch) -> bool:
        if not isinstance(pairs, PairBatch):
            raise TypeError(
                f"StepDPOModule: a batch must be a visrl.data.rows.PairBatch, got {type(pairs).__name__}"
            )
        return self.weights.get(pairs.step, 0.0) > 0

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, PairBatch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _log_step(self, split: str, pairs: PairBatch, result: StepOutput) -> None:
        n, step = int(pairs.n), pairs.step
        on_step = split == "train"
        for key, value in result.metrics().items():
            self.log(f"{split}/{step}/{key}", value, batch_size=n, on_step=on_step, on_epoch=not on_step)
        self.log(
            f"{split}/loss",
            result.loss.detach(),
            batch_size=n,
            on_step=on_step,
            on_epoch=not on_step,
            prog_bar=on_step,
        )

    def training_step(self, pairs: PairBatch, batch_idx: int) -> Tensor | None:
        if not self._weighted(pairs):
            if self._trainer is not None and self.trainer.world_size > 1:
                raise ValueError(
                    f"StepDPOModule: a {pairs.step!r} batch has no weight in {self.weights}; Lightning cannot "
                    "skip batches under distributed training: serve only weighted steps from the DataModule"
                )
            return None  # automatic optimisation: no backward, no update for this batch
        result = self.step_output(pairs)
        self._log_step("train", pairs, result)
        return result.loss

    def validation_step(self, pairs: PairBatch, batch_idx: int) -> None:
        if self._weighted(pairs):
            self._log_step("val", pairs, self.step_output(pairs))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable_state(self, checkpoint)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("StepDPOModule: the model has no trainable parameters")
        opt = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
