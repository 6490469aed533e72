"""Every phase on the trainer's device (issue: after ``Trainer.fit`` Lightning moves the model back to the CPU
and a reloaded model starts there): the pipeline's policies are built through ``on_device``, which places the
backbone on this rank's accelerator first."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from visrl import pipeline


@pytest.mark.parametrize(
    ("accelerator", "cuda", "local_rank", "expected"),
    [("auto", True, "1", "cuda:1"), ("gpu", True, None, "cuda:0"), ("auto", False, None, "cpu"), ("cpu", True, "0", "cpu")],
)  # fmt: skip
def test_trainer_device(monkeypatch, accelerator, cuda, local_rank, expected) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert pipeline.trainer_device(OmegaConf.create({"trainer": {"accelerator": accelerator}})) == expected


def test_policies_are_built_on_the_trainer_device(monkeypatch) -> None:
    placed = []
    monkeypatch.setattr(pipeline, "place", lambda backbone, device: placed.append((backbone, device)))
    monkeypatch.setattr(pipeline, "VLMPolicy", lambda backbone, batch_size: ("policy", backbone, batch_size))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    cfg = OmegaConf.create({"trainer": {"accelerator": "auto"}, "rollout": {"batch_size": 4}})
    backbone = object()
    assert pipeline.on_device(cfg, backbone) == ("policy", backbone, 4)
    assert placed == [(backbone, "cuda:3")]
