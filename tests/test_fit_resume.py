"""An interrupted stage resumes from Lightning's own end-of-epoch checkpoint, not from epoch 0.

Why: each VisRL stage (SFT, DPO stage 1 and 2; paper §3.3) is one ``Trainer.fit`` that can run for hours on
a 7B model. ``visrl.training.fit.fit`` writes ``checkpoints/last.ckpt`` (trainable weights, optimizer, loop
state) after every epoch and resumes from it; once the fit completes the checkpoint is removed, so the
caller's ``weights.pt`` is the stage's one store. The labelled progress lines are checked on the way.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from visrl.training.fit import fit, last_checkpoint, trainable_state

torch.set_num_threads(1)


class Tiny(pl.LightningModule):
    """A linear regression whose first layer is frozen (the checkpoint keeps the trainable part only)."""

    def __init__(self, fail_at_epoch: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        self.model[0].requires_grad_(False)
        self.fail_at_epoch = fail_at_epoch
        self.batches_seen = 0

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.current_epoch == self.fail_at_epoch:
            raise RuntimeError("injected crash")
        self.batches_seen += 1
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.model(x), y)  # x [B, 4] -> [B, 1]
        self.log("train/loss", loss)
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable_state(self, checkpoint)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=0.05)


class Data(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(16, 4, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)  # 4 batches per epoch


QUIET = {"accelerator": "cpu", "enable_model_summary": False}


def test_interrupted_stage_resumes_at_its_last_epoch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reference = Tiny()
    fit(reference, Data(), tmp_path / "ref", 3, dict(QUIET), progress_bar=False)

    crashed = Tiny(fail_at_epoch=2)
    with pytest.raises(RuntimeError, match="injected"):
        fit(crashed, Data(), tmp_path / "stage", 3, dict(QUIET), progress_bar=False)
    ckpt = last_checkpoint(tmp_path / "stage")  # epochs 1 and 2 are in it
    assert ckpt is not None
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert set(state) == {"model.1.weight", "model.1.bias"}  # the trainable layer only

    resumed = Tiny()
    with caplog.at_level(logging.INFO, logger="visrl.progress"):
        fit(resumed, Data(), tmp_path / "stage", 3, dict(QUIET), label="iter 2 | stage1")
    assert resumed.batches_seen == 4  # only the third epoch ran
    for a, b in zip(reference.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # same weights as the uninterrupted fit
    assert last_checkpoint(tmp_path / "stage") is None  # the fit completed: no second store of weights
    lines = [r.getMessage() for r in caplog.records if r.name == "visrl.progress"]
    assert lines and all(line.startswith("[iter 2 | stage1 | epoch 3/3]") for line in lines), lines
    assert "done 4/4 batch" in lines[-1] and "loss" in lines[-1]
