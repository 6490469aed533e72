"""The :class:`Backbone` bundle (model + encoder + box text format), its save/load, and LoRA wrapping.

Why: every stage of the VisRL pipeline (paper §3: SFT warm-up, then per iteration step-level DPO stage 1 on
boxes and stage 2 on answers) hands one object around: the Hugging Face model, the encoder that turns
prompts into its tensors, and the box text format it reads and writes.

``Backbone.save`` writes a directory in the hub layout (config, safetensors, generation config, tokenizer,
processor files recording the real transformers class) plus ``backbone.json``, so that both
:func:`load_backbone` (exact restore: log-probs reproduce bit for bit, the tiny Qwen towers' absolute
position embedding rebuilt before its weights load) and plain ``AutoModelForImageTextToText`` /
``AutoProcessor`` read it. Under LoRA the directory holds the base weights and a standard PEFT adapter in
``adapter/`` (``PeftModel.from_pretrained(base, dir / "adapter")``); merged weights only on request
(``merged/``). The loader keeps ``attn_implementation``, ``device_map`` and gradient checkpointing.

LoRA follows the reference (rank 8, alpha 16, dropout 0, the language model only; the vision tower and the
merger stay frozen); the target regex and the vision modules come from the family table.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedModel

from visrl.models.abspos import ABS_POS_FILE, abs_pos_module, attach_abs_pos_embed
from visrl.models.families import (
    FAMILIES,
    LANGUAGE_MODEL_LORA_REGEX,
    Family,
    get_family,
    make_encoder,
    model_class,
    resolve,
)
from visrl.models.processors import load_processor, save_processor
from visrl.models.protocols import Encoder
from visrl.models.rope_memo import install_rope_memo
from visrl.models.vision_memo import install_vision_memo

__all__ = [
    "LANGUAGE_MODEL_LORA_REGEX",
    "Backbone",
    "apply_lora",
    "freeze_vision",
    "load_backbone",
    "merge_lora",
]

BACKBONE_JSON = "backbone.json"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
# the vision side of each family (tower + projector/merger), by module name: what ``freeze_vision`` freezes
VISION_MODULES: dict[str, tuple[str, ...]] = {name: fam.vision_modules for name, fam in FAMILIES.items()}


@dataclass
class Backbone:
    """A VLM ready for the pipeline: ``model`` (possibly a ``peft.PeftModel``), ``encoder``, ``box_format``."""

    name: str
    model: PreTrainedModel
    encoder: Encoder  # a visrl.models.encoding.VLMEncoder
    box_format: Any  # visrl.data.box_formats.BoxFormat (None only in low-level tests)
    image_size: int | None  # side the pipeline resizes images and crops to; None keeps them as they are
    family: str = ""  # a key of visrl.models.families.FAMILIES
    spec: dict[str, Any] = field(default_factory=dict)  # builder and its arguments (backbone.json)
    lora: dict[str, Any] | None = None  # default apply_lora settings from the model config

    def __post_init__(self) -> None:
        # Qwen's M-RoPE positions, once per distinct row (exact: visrl.models.rope_memo)
        inner = getattr(self.base_model, "model", None) if self.model is not None else None
        if isinstance(inner, torch.nn.Module):
            install_rope_memo(inner)

    @property
    def fam(self) -> Family:
        return get_family(self.family, f"backbone {self.name!r}")

    @property
    def is_lora(self) -> bool:
        return isinstance(self.model, PeftModel)

    @property
    def base_model(self) -> PreTrainedModel:
        """The underlying ``PreTrainedModel`` (LoRA layers still injected when ``is_lora``)."""
        return self.model.get_base_model() if self.is_lora else self.model

    def save(self, path: str | Path, merged: bool = False) -> None:
        """Write the model in the hub layout under ``path`` (+ ``backbone.json``).

        Under LoRA ``path`` holds the base weights and ``path/adapter`` the PEFT adapter; ``merged`` also
        writes a plain merged copy (model + processor) to ``path/merged``.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        _save_plain(self.base_model, path)
        save_processor(self.encoder.processor, self.fam, path)
        if self.is_lora:
            self.model.save_pretrained(path / ADAPTER_DIR)
            _point_adapter_at(path / ADAPTER_DIR, path)
            if merged:
                _save_plain(merged_copy(self.model), path / MERGED_DIR)
                save_processor(self.encoder.processor, self.fam, path / MERGED_DIR)
        meta = {
            "name": self.name,
            "family": self.family,
            "image_size": self.image_size,
            "spec": self.spec,
            "box_format": box_format_spec(self.box_format),
            "abs_pos_embed": abs_pos_module(self.base_model) is not None,
            "adapter": self.is_lora,
            "encoder_kwargs": {"end_of_turn": self.encoder.end_of_turn},
            "lora": self.lora,
        }
        (path / BACKBONE_JSON).write_text(json.dumps(meta, indent=2))


def box_format_spec(box_format: Any) -> dict[str, Any] | None:
    """``{"_target_": "module.Class", **init kwargs}`` of a box format (dataclass fields or ``__dict__``)."""
    if box_format is None:
        return None
    cls = type(box_format)
    if dataclasses.is_dataclass(box_format):
        kwargs = {f.name: getattr(box_format, f.name) for f in dataclasses.fields(box_format) if f.init}
    else:
        kwargs = {k: v for k, v in vars(box_format).items() if not k.startswith("_")}
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    for key, value in kwargs.items():
        try:
            json.dumps(value)
        except TypeError as err:
            raise TypeError(
                f"backbone.json: box_format {cls.__name__}.{key}={value!r} is not JSON-serialisable"
            ) from err
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **kwargs}


# saved by an earlier layout: the formats lived in visrl.data.boxes before visrl.data.box_formats existed
MOVED_MODULES = {"visrl.data.boxes": "visrl.data.box_formats"}


def build_box_format(spec: dict[str, Any] | None) -> Any:
    """Inverse of :func:`box_format_spec` (also for models saved before a format's module moved)."""
    if spec is None:
        return None
    spec = dict(spec)
    module, _, name = spec.pop("_target_").rpartition(".")
    return getattr(importlib.import_module(MOVED_MODULES.get(module, module)), name)(**spec)


def _save_plain(model: PreTrainedModel, out: Path) -> None:
    """``save_pretrained`` of the plain weights: LoRA layers (if injected) and the abs-pos module left out,
    the latter written to its own file; the result loads with the plain transformers class."""
    state = {
        k.replace(".base_layer.", "."): v
        for k, v in model.state_dict().items()
        if ".lora_" not in k and ".abs_pos_embed." not in k
    }
    model.save_pretrained(out, state_dict=state)
    pos = abs_pos_module(model)
    if pos is not None:
        save_file({k: v.contiguous() for k, v in pos.state_dict().items()}, str(out / ABS_POS_FILE))


def _point_adapter_at(adapter: Path, base: Path) -> None:
    """Record the saved base directory as the adapter's base model."""
    file = adapter / "adapter_config.json"
    config = json.loads(file.read_text())
    config["base_model_name_or_path"] = str(base.resolve())
    file.write_text(json.dumps(config, indent=2, sort_keys=True))


def merged_copy(model: PeftModel) -> PreTrainedModel:
    """A plain model with the LoRA deltas merged in; ``model`` itself is left untouched."""
    return copy.deepcopy(model).merge_and_unload()


def _layout(path: Path) -> tuple[Path, Path]:
    """(model dir, processor dir): flat, or the ``model/`` + ``processor/`` layout of earlier saves."""
    return (
        (path / "model", path / "processor") if (path / "model" / "config.json").is_file() else (path, path)
    )


def _load_processor(fam: Family, spec: dict[str, Any], directory: Path) -> Any:
    """Tiny processors are rebuilt from their saved tokenizer (their PIL processor is built in code)."""
    if spec.get("builder") != "tiny":
        return load_processor(fam, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    builder = resolve(fam.tiny_processor)
    return builder(fam, tokenizer, spec["image_size"], spec["patch_size"], spec["merge_size"])


def _encoder(fam: Family, meta: dict[str, Any], directory: Path) -> Any:
    spec = meta["spec"]
    template = None if spec.get("builder") == "tiny" else fam.chat_template  # as load_pretrained does
    return make_encoder(
        fam, _load_processor(fam, spec, directory), chat_template=template, **meta.get("encoder_kwargs", {})
    )


def _load_model(fam: Family, spec: dict[str, Any], directory: Path, dtype: str | None, abs_pos: bool) -> Any:
    torch_dtype = getattr(torch, dtype or spec.get("dtype", "float32"))
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    for key in ("attn_implementation", "device_map"):
        if spec.get(key) is not None:
            kwargs[key] = spec[key]
    model = model_class(fam).from_pretrained(directory, **kwargs)
    if abs_pos:
        attach_abs_pos_embed(model, spec.get("abs_pos_grid", 8))
        state = load_file(str(directory / ABS_POS_FILE))
        model.model.visual.abs_pos_embed.load_state_dict({k: v.to(torch_dtype) for k, v in state.items()})
    if spec.get("gradient_checkpointing"):
        enable_gradient_checkpointing(model)
    return model


def load_backbone(path: str | Path, dtype: str | None = None, merge_adapter: bool = True) -> Backbone:
    """Restore anything written by :meth:`Backbone.save`.

    A LoRA save is returned merged (a plain model, what the pipeline continues from) unless
    ``merge_adapter=False``: then the model is the trainable ``PeftModel`` of the saved adapter.
    """
    path = Path(path)
    meta_file = path / BACKBONE_JSON
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"load_backbone: {meta_file} does not exist (not a directory written by Backbone.save)"
        )
    meta = json.loads(meta_file.read_text())
    fam = get_family(meta["family"], f"{meta_file}: family")
    model_dir, processor_dir = _layout(path)
    model = _load_model(fam, meta["spec"], model_dir, dtype, meta["abs_pos_embed"])
    if meta["adapter"] and (path / ADAPTER_DIR).is_dir():
        model = PeftModel.from_pretrained(model, path / ADAPTER_DIR, is_trainable=not merge_adapter)
        model = model.merge_and_unload() if merge_adapter else model
    return Backbone(
        name=meta["name"],
        model=model,
        encoder=_encoder(fam, meta, processor_dir),
        box_format=build_box_format(meta["box_format"]),
        image_size=meta["image_size"],
        family=meta["family"],
        spec=meta["spec"],
        lora=meta.get("lora"),
    )


def enable_gradient_checkpointing(model: Any) -> None:
    """Activation checkpointing on a model (or PEFT model): recompute activations in the backward pass.

    Non-reentrant, so frozen inputs (LoRA, frozen vision tower) still carry gradients to the adapters.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False


LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "target_regex": None}


def apply_lora(
    backbone: Backbone,
    r: int | None = None,
    alpha: int | None = None,
    dropout: float | None = None,
    target_regex: str | None = None,
) -> Backbone:
    """Wrap the model with a fresh LoRA adapter (language model only unless ``target_regex`` says otherwise).

    Unset arguments fall back to ``backbone.lora`` (the model config's settings), then to the reference's
    r 8, alpha 16, dropout 0. Returns a new :class:`Backbone` sharing the encoder; only LoRA parameters
    are trainable.
    """
    if backbone.is_lora:
        raise ValueError(
            f"apply_lora: backbone {backbone.name!r} already carries a LoRA adapter; merge_lora first"
        )
    given = {"r": r, "alpha": alpha, "dropout": dropout, "target_regex": target_regex}
    unknown = set(backbone.lora or {}) - set(LORA_DEFAULTS)
    if unknown:
        raise ValueError(f"apply_lora: unknown keys {sorted(unknown)} in the model config's lora settings")
    settings = {
        k: v if v is not None else (backbone.lora or {}).get(k, LORA_DEFAULTS[k]) for k, v in given.items()
    }
    r, alpha, dropout = settings["r"], settings["alpha"], settings["dropout"]
    regex = settings["target_regex"] or backbone.fam.lora_target_regex
    names = [n for n, _ in backbone.model.named_modules() if re.fullmatch(regex, n)]
    if not names:
        raise ValueError(f"apply_lora: target_regex {regex!r} matches no module of {backbone.name!r}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=regex, bias="none")
    model = get_peft_model(backbone.model, config)
    return dataclasses.replace(backbone, model=model)


def merge_lora(backbone: Backbone) -> Backbone:
    """Merge the LoRA deltas into the base weights (in place) and return a plain-model Backbone."""
    if not backbone.is_lora:
        return backbone
    return dataclasses.replace(backbone, model=backbone.model.merge_and_unload())


def freeze_vision(backbone: Backbone, memo_bytes: int = 0) -> Backbone:
    """Freeze the vision tower and its projector/merger (the reference's ``freeze_vision_tower=True``);
    ``memo_bytes`` > 0 also memoises their per-image features (:mod:`visrl.models.vision_memo`: exact).

    For the tiny backbones this also matters for learning: trained jointly from random weights at the language
    model's learning rate, the tower washes out which token holds the object, and grounding never leaves its
    plateau (measured: chance after 1 500 steps); frozen, the random tower keeps its features and a lone object
    is located in a few hundred steps (docs/toy-scale-status.md).
    """
    inner = backbone.base_model.model
    for name in backbone.fam.vision_modules:
        getattr(inner, name).requires_grad_(False)
    install_vision_memo(inner, backbone.fam.vision_modules, backbone.fam.pixel_layout, memo_bytes)
    return backbone
