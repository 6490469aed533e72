"""The one backbone-family table: every per-family difference of LLaVA-1.5, Qwen2-VL and Qwen2.5-VL.

Why: the VisRL recipe (paper §3-§4) runs unchanged on three VLM families that differ only in a handful of
facts: the Hugging Face model and processor classes, how an image becomes placeholder tokens (the encoder),
which strings are image placeholders, which special tokens the model writes itself (Qwen2-VL's
``<|box_start|>``), the vision modules to freeze, the LoRA target, the chat template and the box text format.
Those facts live here, keyed by family name; code elsewhere looks a family up and never branches on its name.

Facts stated from the published checkpoints:

* LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf``): ``LlavaProcessor``; ``<image>``; vision side ``vision_tower`` +
  ``multi_modal_projector``; the published chat template renders every image of a turn before its text
  (``USER: <image>\\n<image>\\nquestion ASSISTANT:``). VisRL's answer prompt is "full image, question, crop",
  so LLaVA prompts are rendered with :data:`LLAVA_TEMPLATE`: the published layout (``ROLE: `` prefixes, text
  followed by a space, ``ASSISTANT:``) with the images kept where the prompt puts them. For a prompt
  ``<image>\\n{question}`` the two templates give the same text.
* Qwen2-VL / Qwen2.5-VL: ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor``; ``<|vision_start|><|image_pad|>
  <|vision_end|>`` per image (the published template keeps images in place); vision side ``visual``; the model
  writes grounding with ``<|box_start|>``/``<|box_end|>`` (Qwen2-VL) and ``<|object_ref_start|>``/
  ``<|object_ref_end|>``. Qwen2.5-VL writes ``{"bbox_2d": [...]}`` in pixels of the processor-resized image.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from visrl.models.encoding import VLMEncoder
from visrl.models.family_encoders import LlavaEncoder, Qwen25Encoder, QwenEncoder

# LoRA on the language model's linear layers only (attention + MLP), never the vision tower: names such as
# ``q_proj`` or ``gate_proj`` also exist in the Qwen2.5-VL vision MLP, so targets are a path regex.
LANGUAGE_MODEL_LORA_REGEX = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# The published llava-1.5 layout with the images left in place (see the module docstring).
LLAVA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{- message['role'].upper() + ': ' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] + ' ' -}}"
    "{%- else -%}{%- set ns = namespace(text='') -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{{- ns.text + ' ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

QWEN_IMAGE_STRINGS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
QWEN_WRITTEN_TOKENS = ("<|box_start|>", "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>")


@dataclass(frozen=True)
class Family:
    """Everything that differs between backbone families (one row of :data:`FAMILIES`)."""

    name: str
    model_class: str  # transformers class name
    processor_class: str  # transformers processor class name, as recorded in a saved processor
    encoder: type[VLMEncoder]
    image_token: str  # the token the processor expands per image
    image_strings: tuple[str, ...]  # strings that make an image slot: never taken from model or question text
    written_tokens: tuple[str, ...]  # special tokens the model itself writes: kept as single tokens
    vision_modules: tuple[str, ...]  # vision tower + projector/merger under ``model.model``
    lora_target_regex: str
    box_format: str  # dotted class of the default box text format
    hub_ids: tuple[str, ...]  # published checkpoints of the family
    id_patterns: tuple[str, ...]  # normalised substrings of a checkpoint id naming the family
    chat_template: str | None = (
        None  # a checkpoint's prompts use this, not its processor's (None: the processor's)
    )
    merged_patch_grid: bool = True  # image tokens cover patch*merge pixels (Qwen), else patch (LLaVA)
    tiny_config: str = ""  # "module:function" building a tiny config (visrl.models.tiny)
    tiny_processor: str = ""  # "module:function" building a tiny processor (visrl.models.processors)
    abs_pos_embed: bool = False  # tiny default: learned absolute positions on merged vision tokens
    video_processor_type: str | None = (
        None  # the processor's video part (saved so AutoProcessor can build it)
    )
    # how get_image_features takes several images: "grid" (patch rows concatenated, one image_grid_thw row
    # each: Qwen) or "stacked" (one image per leading index: LLaVA); see visrl.models.vision_memo
    pixel_layout: str = "grid"


FAMILIES: dict[str, Family] = {
    "llava": Family(
        name="llava",
        model_class="LlavaForConditionalGeneration",
        processor_class="LlavaProcessor",
        encoder=LlavaEncoder,
        image_token="<image>",
        image_strings=("<image>",),
        written_tokens=(),
        vision_modules=("vision_tower", "multi_modal_projector"),
        lora_target_regex=LANGUAGE_MODEL_LORA_REGEX,
        box_format="visrl.data.box_formats.SqFloatFormat",
        hub_ids=("llava-hf/llava-1.5-7b-hf",),
        id_patterns=("llava",),
        chat_template=LLAVA_TEMPLATE,
        merged_patch_grid=False,
        pixel_layout="stacked",
        tiny_config="visrl.models.tiny:llava_config",
        tiny_processor="visrl.models.processors:llava_tiny_processor",
    ),
    "qwen2vl": Family(
        name="qwen2vl",
        model_class="Qwen2VLForConditionalGeneration",
        processor_class="Qwen2VLProcessor",
        encoder=QwenEncoder,
        image_token="<|image_pad|>",
        image_strings=QWEN_IMAGE_STRINGS,
        written_tokens=QWEN_WRITTEN_TOKENS,
        vision_modules=("visual",),
        lora_target_regex=LANGUAGE_MODEL_LORA_REGEX,
        box_format="visrl.data.box_formats.Qwen2VLFormat",
        hub_ids=("Qwen/Qwen2-VL-7B-Instruct",),
        id_patterns=("qwen2.vl",),
        tiny_config="visrl.models.tiny:qwen2vl_config",
        tiny_processor="visrl.models.processors:qwen_tiny_processor",
        abs_pos_embed=True,
        video_processor_type="Qwen2VLVideoProcessor",
    ),
    "qwen25vl": Family(
        name="qwen25vl",
        model_class="Qwen2_5_VLForConditionalGeneration",
        processor_class="Qwen2_5_VLProcessor",
        encoder=Qwen25Encoder,
        image_token="<|image_pad|>",
        image_strings=QWEN_IMAGE_STRINGS,
        written_tokens=QWEN_WRITTEN_TOKENS,
        vision_modules=("visual",),
        lora_target_regex=LANGUAGE_MODEL_LORA_REGEX,
        box_format="visrl.data.box_formats.Qwen25VLFormat",
        hub_ids=("Qwen/Qwen2.5-VL-7B-Instruct",),
        id_patterns=("qwen2.5.vl",),
        tiny_config="visrl.models.tiny:qwen25vl_config",
        tiny_processor="visrl.models.processors:qwen_tiny_processor",
        abs_pos_embed=True,
        video_processor_type="Qwen2VLVideoProcessor",
    ),
}


def get_family(name: str, where: str = "model.family") -> Family:
    """The table row of ``name``; one line naming ``where`` and the valid names otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"{where}: unknown backbone family {name!r}; valid: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(hf_id: str) -> Family:
    """The family of a checkpoint id: a published id, else a pattern of the normalised id."""
    for fam in FAMILIES.values():
        if hf_id in fam.hub_ids:
            return fam
    low = hf_id.lower().replace("_", ".").replace("-", ".")
    # the longest pattern first: "qwen2.5.vl" must not be read as "qwen2.vl"
    for fam in sorted(FAMILIES.values(), key=lambda f: -max(len(p) for p in f.id_patterns)):
        if any(p in low for p in fam.id_patterns):
            return fam
    raise ValueError(
        f"model.hf_id: cannot infer the family of {hf_id!r}; set model.family ({'|'.join(FAMILIES)})"
    )


def model_class(fam: Family) -> type:
    """The transformers model class of ``fam``."""
    import transformers

    return getattr(transformers, fam.model_class)


def resolve(target: str) -> Any:
    """``"module:attr"`` -> the attribute (imported lazily: the table names builders above it)."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def make_encoder(family: str | Family, processor: Any, **kwargs: Any) -> VLMEncoder:
    """The encoder of ``family`` around ``processor`` with the family's image strings; ``chat_template``
    (in ``kwargs``) overrides the processor's (checkpoint loaders pass the family's ``chat_template``)."""
    fam = family if isinstance(family, Family) else get_family(family)
    return fam.encoder(processor, image_strings=fam.image_strings, **kwargs)
