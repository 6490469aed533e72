"""One Lightning fit of a stage (base prep, SFT, DPO stage 1 or 2) into its own output folder.

Every stage of the pipeline trains through this one function, so all of them share the trainer
configuration (``conf/trainer``), the labelled progress display and the run logger (global monotonic step).

**Resume inside a stage.** While a stage trains, Lightning writes ``<out_dir>/checkpoints/last.ckpt`` at
the end of every epoch (trainable weights only, so a LoRA run stores adapters, not 7B copies, plus the
optimizer, scheduler and loop state). A fit that finds it resumes from it (``trainer.fit(ckpt_path=...)``):
an interrupted stage continues at its last finished epoch instead of epoch 0. When the fit completes the
checkpoint is deleted: the caller's ``weights.pt`` is then the stage's one store of weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.callbacks.progress import ProgressBar

from visrl.progress import ProgressLine

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


def trainable_state(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint`` body: keep only trainable parameters (and buffers of trainable modules)."""
    keep = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}


class StageProgressBar(ProgressBar):
    """Lightning's progress bar as a :class:`visrl.progress.ProgressLine` labelled with the stage:
    ``[iter 2 | stage1 | epoch 1/2] 40/128 batch 3.1/s ETA 0:41 loss 0.693`` (lines under CI / non-TTY)."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label
        self._bar: ProgressLine | None = None
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        total = self.total_train_batches
        label = f"{self.label} | epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        self._bar = ProgressLine(label, total=None if total == float("inf") else int(total), unit="batch")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._bar is None:
            return
        loss = trainer.callback_metrics.get("train/loss")  # a 0-dim tensor, when the module logs it
        if loss is not None and loss.numel() == 1:
            self._bar.set_postfix(f"loss {float(loss):.4g}")
        self._bar.advance(1)

    def _close(self, failed: bool = False) -> None:
        if self._bar is not None:
            self._bar.close(failed=failed)
            self._bar = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close(failed=True)


def last_checkpoint(out_dir: Path) -> Path | None:
    """The stage's resumable checkpoint, if an earlier fit was interrupted after at least one epoch."""
    path = Path(out_dir) / CHECKPOINT_DIR / LAST
    return path if path.is_file() else None


def fit(
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    out_dir: Path,
    epochs: int,
    trainer_kwargs: dict[str, Any] | None = None,
    logger: Any = None,
    progress_bar: bool = True,
    callbacks: tuple[pl.Callback, ...] = (),
    label: str | None = None,
) -> pl.Trainer:
    """Fit ``module`` for ``epochs`` epochs in ``out_dir`` (resuming from its ``last.ckpt``); returns the trainer.

    ``label`` names the progress display (e.g. ``"iter 2 | stage1"``; default: the folder name).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(trainer_kwargs or {})
    kwargs.setdefault("enable_model_summary", False)
    checkpointing = bool(kwargs.pop("enable_checkpointing", True))
    extra: list[pl.Callback] = list(callbacks)
    if checkpointing:
        extra.append(ModelCheckpoint(dirpath=out_dir / CHECKPOINT_DIR, filename=LAST.removesuffix(".ckpt"),
                                     save_top_k=1, enable_version_counter=False,
                                     save_on_train_epoch_end=True))  # one file, overwritten each epoch  # fmt: skip
    if progress_bar:
        extra.append(StageProgressBar(label or out_dir.name))
    trainer = pl.Trainer(
        max_epochs=epochs,
        default_root_dir=str(out_dir),
        logger=logger if logger is not None else False,
        enable_checkpointing=checkpointing,
        callbacks=extra,
        enable_progress_bar=progress_bar,
        **kwargs,
    )
    resume = last_checkpoint(out_dir) if checkpointing else None
    module.strict_loading = False  # the checkpoint holds the trainable weights only; the rest is in memory
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    if trainer.is_global_zero and not trainer.interrupted:
        shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)  # done: weights.pt is the one store
    return trainer
