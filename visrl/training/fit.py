"""One Lightning fit of a stage (base prep, SFT, DPO stage 1 or 2) into its own output folder.

Every stage of the pipeline trains through this one function, so all of them share the trainer
configuration (``conf/trainer``), checkpointing (``<out_dir>/checkpoints/last.ckpt``, trainable weights
only, so a LoRA run stores adapters, not 7B copies) and the run logger (global monotonic step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


def trainable_state(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint`` body: keep only trainable parameters (and buffers of trainable modules)."""
    keep = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}


def fit(
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    out_dir: Path,
    epochs: int,
    trainer_kwargs: dict[str, Any] | None = None,
    logger: Any = None,
    progress_bar: bool = True,
    callbacks: tuple[pl.Callback, ...] = (),
) -> pl.Trainer:
    """Fit ``module`` for ``epochs`` epochs, checkpointing under ``out_dir``; returns the trainer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ModelCheckpoint(dirpath=out_dir / "checkpoints", save_last=True, save_top_k=0,
                           save_on_train_epoch_end=True)
    kwargs = dict(trainer_kwargs or {})
    kwargs.setdefault("enable_model_summary", False)
    checkpointing = bool(kwargs.pop("enable_checkpointing", True))
    trainer = pl.Trainer(
        max_epochs=epochs,
        default_root_dir=str(out_dir),
        logger=logger if logger is not None else False,
        enable_checkpointing=checkpointing,
        callbacks=[ckpt, *callbacks] if checkpointing else list(callbacks),
        enable_progress_bar=progress_bar,
        **kwargs,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer
