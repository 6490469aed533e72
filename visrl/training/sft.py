"""SFT warm-up (VisRL §3.2) and tiny base preparation: next-token loss on assistant tokens only.

The module is backbone-agnostic: a batch is whatever the backbone encoder's ``collate`` returns (token
fields + vision fields + ``labels`` with -100 on prompt and padding). The optimizer and scheduler are
Hydra partials (``_partial_: true``) so configs choose them; LoRA vs full fine-tuning is decided before the
module is built (``visrl.models.backbone.apply_lora``) and the optimizer sees only trainable parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch

from visrl.models.logprobs import sequence_logps
from visrl.training.fit import trainable_state


class SFTModule(pl.LightningModule):
    """Supervised fine-tuning on (prompt, completion) rows, mean token NLL over the batch.

    Logs ``train/loss`` and, per step kind present in the batch, ``train/<step>/loss``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
    ):
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return sequence_logps(self.model, batch)  # summed completion log-probs [B], tokens [B]

    def _loss(self, batch: dict) -> torch.Tensor:
        logps, n_tokens = self(batch)
        return -logps.sum() / n_tokens.sum().clamp(min=1)  # token-mean NLL over the batch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["input_ids"].shape[0]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), batch_size=int(batch["input_ids"].shape[0]))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable_state(self, checkpoint)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("SFTModule: the model has no trainable parameters")
        opt = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.1, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to ``min_ratio`` x the peak lr
    (the reference: cosine, warm-up 0.1): transformers' schedule, as the reference's trainer uses it, with the
    warm-up given as a ratio of the fit's steps (a Hydra partial; the module supplies ``total_steps``).
    The warm-up is rounded down: its first step has lr 0, so a fit too short for one warm-up step
    (``total_steps * warmup_ratio < 1``, e.g. ``debug=fast``) gets none rather than a step that learns nothing."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    warmup = int(total_steps * warmup_ratio)
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, min_lr_rate=min_ratio
    )
