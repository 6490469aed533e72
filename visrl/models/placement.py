"""Put a backbone on the trainer's device in the configured precision.

Why: after ``Trainer.fit`` Lightning moves the model back to the CPU, and a model reloaded from disk is on the
CPU too; rollouts (paper §3.3), self-scoring, reference log-probs and evaluation must run where training
runs, in the same precision. :func:`place` is the one call the pipeline makes before each such phase.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from visrl.models.backbone import Backbone


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> ``cuda`` when available, else ``cpu``; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_device(backbone: Backbone) -> torch.device:
    """Device of the backbone's first parameter."""
    return next(backbone.model.parameters()).device


def place(
    backbone: Backbone, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = None
) -> Backbone:
    """Move ``backbone.model`` to ``device`` and cast its floating weights to ``dtype`` (None keeps them),
    in place; returns ``backbone``. A model dispatched with a ``device_map`` (accelerate hooks) is left where
    the map put it."""
    model: Any = backbone.model
    if getattr(backbone.base_model, "hf_device_map", None):
        return backbone
    target = resolve_device(device)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if torch_dtype is not None and next(model.parameters()).dtype != torch_dtype:
        cast_weights(backbone.base_model, torch_dtype)
    if model_device(backbone) != target:
        model.to(target)
    return backbone


def cast_weights(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """Cast parameters and persistent buffers to ``dtype``, as ``from_pretrained(dtype=...)`` loads them.

    Non-persistent buffers (rotary ``inv_freq``) stay fp32; ``model.to(dtype)`` would round them, and a
    saved-then-loaded model would then differ from the one built here.
    """
    for module in model.modules():
        for param in module.parameters(recurse=False):
            param.data = param.data.to(dtype)
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = buf.to(dtype)
    model.config.dtype = dtype
    return model
