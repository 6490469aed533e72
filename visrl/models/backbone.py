"""The :class:`Backbone` bundle (model + encoder + box text format), its save/load, and LoRA wrapping.

Why: every stage of the VisRL pipeline (paper §3: SFT warm-up, then per iteration step-level DPO stage 1 on
boxes and stage 2 on answers) hands one object around: the Hugging Face model, the encoder that turns
prompts into its tensors, and the box text format it reads and writes. ``Backbone.save`` writes a
self-describing directory that :func:`load_backbone` restores exactly (log-probs reproduce bit for bit),
including the tiny Qwen towers' absolute position embedding, which is rebuilt before its weights load.

LoRA follows the reference (rank 8, alpha 16, dropout 0, the language model only; the vision tower and the
merger stay frozen): module names such as ``q_proj`` or ``gate_proj`` also exist in the vision towers
(Qwen2.5-VL's vision MLP), so targets are a regex on the language-model path.
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
from transformers import PreTrainedModel

# A LoRA target on the language model's linear layers only (attention + MLP), never the vision tower.
LANGUAGE_MODEL_LORA_REGEX = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
BACKBONE_JSON = "backbone.json"
ABS_POS_FILE = "abs_pos.safetensors"


@dataclass
class Backbone:
    """A VLM ready for the pipeline: ``model`` (possibly a ``peft.PeftModel``), ``encoder``, ``box_format``."""

    name: str
    model: PreTrainedModel
    encoder: Any  # visrl.models.encoding.VLMEncoder
    box_format: Any  # visrl.data.boxes.BoxFormat (None only in low-level tests)
    image_size: int | None  # side the pipeline resizes images and crops to; None keeps them as they are
    family: str = ""  # "llava" | "qwen2vl" | "qwen25vl"
    spec: dict[str, Any] = field(default_factory=dict)  # builder and its arguments (backbone.json)
    lora: dict[str, Any] | None = None  # default apply_lora settings from the model config

    @property
    def is_lora(self) -> bool:
        return isinstance(self.model, PeftModel)

    @property
    def base_model(self) -> PreTrainedModel:
        """The underlying ``PreTrainedModel`` (LoRA layers still injected when ``is_lora``)."""
        return self.model.get_base_model() if self.is_lora else self.model

    def save(self, path: str | Path, adapter_only: bool = False) -> None:
        """Write weights, config, processor and backbone.json under ``path``.

        A LoRA model is saved merged (a plain model) unless ``adapter_only``: then the base weights and the
        PEFT adapter are written separately and :func:`load_backbone` re-wraps the model.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        adapter = adapter_only and self.is_lora
        if adapter:
            self.model.save_pretrained(path / "adapter")
            plain = _strip_lora(self.model)
        else:
            plain = merged_copy(self.model) if self.is_lora else self.model
        _save_plain(plain, path / "model")
        self.encoder.processor.save_pretrained(path / "processor")
        meta = {
            "name": self.name,
            "family": self.family,
            "image_size": self.image_size,
            "spec": self.spec,
            "box_format": box_format_spec(self.box_format),
            "abs_pos_embed": _abs_pos(plain) is not None,
            "adapter": adapter,
            "processor_class": type(self.encoder.processor).__name__,
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


def build_box_format(spec: dict[str, Any] | None) -> Any:
    """Inverse of :func:`box_format_spec`."""
    if spec is None:
        return None
    spec = dict(spec)
    module, _, name = spec.pop("_target_").rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec)


def _abs_pos(model: PreTrainedModel) -> torch.nn.Module | None:
    from visrl.models.tiny import ABS_POS_ATTR

    visual = getattr(getattr(model, "model", None), "visual", None)
    return getattr(visual, ABS_POS_ATTR, None) if visual is not None else None


def _save_plain(model: PreTrainedModel, out: Path) -> None:
    """``save_pretrained`` without the abs-pos module, whose weights go to their own file."""
    pos = _abs_pos(model)
    if pos is None:
        model.save_pretrained(out)
        return
    state = {k: v for k, v in model.state_dict().items() if ".abs_pos_embed." not in k}
    model.save_pretrained(out, state_dict=state)
    save_file({k: v.contiguous() for k, v in pos.state_dict().items()}, str(out / ABS_POS_FILE))


def _strip_lora(model: PeftModel) -> PreTrainedModel:
    """A plain copy of the base weights of a PEFT model (adapters removed, not merged)."""
    return copy.deepcopy(model).unload()


def merged_copy(model: PeftModel) -> PreTrainedModel:
    """A plain model with the LoRA deltas merged in; ``model`` itself is left untouched."""
    return copy.deepcopy(model).merge_and_unload()


def _model_class(family: str) -> type[PreTrainedModel]:
    import transformers

    names = {
        "llava": "LlavaForConditionalGeneration",
        "qwen2vl": "Qwen2VLForConditionalGeneration",
        "qwen25vl": "Qwen2_5_VLForConditionalGeneration",
    }
    if family not in names:
        raise ValueError(f"backbone.json: unknown family {family!r}; valid: {sorted(names)}")
    return getattr(transformers, names[family])


def _load_processor(meta: dict[str, Any], path: Path) -> Any:
    """Tiny PIL processors are rebuilt from their saved tokenizer (AutoProcessor would need torchvision)."""
    from transformers import AutoTokenizer

    from visrl.models.real import load_processor
    from visrl.models.tiny import build_processor

    spec = meta["spec"]
    if spec.get("builder") != "tiny":
        return load_processor(meta["family"], path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return build_processor(
        meta["family"], tokenizer, spec["image_size"], spec["patch_size"], spec["merge_size"]
    )


def load_backbone(path: str | Path, dtype: str | None = None) -> Backbone:
    """Restore anything written by :meth:`Backbone.save` (abs-pos module rebuilt before its weights load)."""
    from visrl.models.encoding import make_encoder
    from visrl.models.tiny import attach_abs_pos_embed

    path = Path(path)
    meta_file = path / BACKBONE_JSON
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"load_backbone: {meta_file} does not exist (not a directory written by Backbone.save)"
        )
    meta = json.loads(meta_file.read_text())
    torch_dtype = getattr(torch, dtype or meta["spec"].get("dtype", "float32"))
    model = _model_class(meta["family"]).from_pretrained(
        path / "model", dtype=torch_dtype, local_files_only=True
    )
    if meta["abs_pos_embed"]:
        attach_abs_pos_embed(model, meta["spec"].get("abs_pos_grid", 8))
        state = load_file(str(path / "model" / ABS_POS_FILE))
        model.model.visual.abs_pos_embed.load_state_dict({k: v.to(torch_dtype) for k, v in state.items()})
    if meta["adapter"]:
        model = PeftModel.from_pretrained(model, path / "adapter", is_trainable=True)
    processor = _load_processor(meta, path / "processor")
    return Backbone(
        name=meta["name"],
        model=model,
        encoder=make_encoder(meta["family"], processor, **meta.get("encoder_kwargs", {})),
        box_format=build_box_format(meta["box_format"]),
        image_size=meta["image_size"],
        family=meta["family"],
        spec=meta["spec"],
        lora=meta.get("lora"),
    )


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
    regex = settings["target_regex"] or LANGUAGE_MODEL_LORA_REGEX
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


# The vision side of each family (tower + projector/merger), by module name: what ``freeze_vision`` freezes.
VISION_MODULES: dict[str, tuple[str, ...]] = {
    "qwen2vl": ("visual",),
    "qwen25vl": ("visual",),
    "llava": ("vision_tower", "multi_modal_projector"),
}


def freeze_vision(backbone: Backbone) -> Backbone:
    """Freeze the vision tower and its projector/merger (the reference's ``freeze_vision_tower=True``).

    For the tiny backbones this also matters for learning: trained jointly from random weights at the language
    model's learning rate, the tower washes out which token holds the object, and grounding never leaves its
    plateau (measured: chance after 1 500 steps); frozen, the random tower keeps its features and a lone object
    is located in a few hundred steps (docs/toy-scale-status.md).
    """
    names = VISION_MODULES.get(backbone.family)
    if names is None:
        raise ValueError(f"freeze_vision: unknown family {backbone.family!r}; known: {sorted(VISION_MODULES)}")
    inner = backbone.base_model.model
    for name in names:
        getattr(inner, name).requires_grad_(False)
    return backbone
