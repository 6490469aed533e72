"""Processors of every backbone: built for the tiny models, loaded from a checkpoint, saved as the real class.

Why: the encoder (:mod:`visrl.models.encoding`) needs a processor with a tokenizer, an image processor and a
chat template. ``AutoProcessor`` builds the Qwen processors with a video processor that imports
``torchvision``; where that is missing, the PIL image processor, the tokenizer and the template are assembled
into a processor without a video processor (:class:`NoVideoQwen2VLProcessor`). Saved processors always record
the real transformers class (``Qwen2VLProcessor``, ...), so a plain ``AutoProcessor.from_pretrained(saved)``
returns the family's processor (given torchvision) instead of silently falling back to a tokenizer.

``min_pixels`` / ``max_pixels`` (Qwen) are applied here to the image processor; the box format reads them
back from it (:func:`qwen_pixel_bounds`), so the processor and the box frame share one source of truth.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    LlavaProcessor,
    ProcessorMixin,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

from visrl.models.families import Family

_CLASS_FILES = ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json")


class _NoVideoProcessorMixin:
    """Shared init for the Qwen processors without a video processor (torchvision is not installable)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = None
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class NoVideoQwen2VLProcessor(_NoVideoProcessorMixin, Qwen2VLProcessor):
    """Qwen2-VL processor with the PIL image processor and no video processor."""


class NoVideoQwen2_5_VLProcessor(_NoVideoProcessorMixin, Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor with the PIL image processor and no video processor."""


_NO_VIDEO = {"Qwen2VLProcessor": NoVideoQwen2VLProcessor, "Qwen2_5_VLProcessor": NoVideoQwen2_5_VLProcessor}


def llava_tiny_processor(
    fam: Family, tokenizer: Any, image_size: int, patch_size: int, merge_size: int
) -> Any:
    """LLaVA processor of a tiny backbone: CLIP-style PIL processor resizing to ``image_size`` squared."""
    side = {"height": image_size, "width": image_size}
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size=side, crop_size=side, do_center_crop=False),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def qwen_tiny_processor(
    fam: Family, tokenizer: Any, image_size: int, patch_size: int, merge_size: int
) -> Any:
    """Qwen processor of a tiny backbone (pixels bounded so an ``image_size`` square is kept as is)."""
    factor = patch_size * merge_size
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=factor * factor,
        max_pixels=max(image_size * image_size, factor * factor),
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=2,
    )
    return _NO_VIDEO[fam.processor_class](image_processor, tokenizer, chat_template=tokenizer.chat_template)


def _template(directory: Path, tokenizer: Any) -> str | None:
    for name in ("chat_template.jinja", "chat_template.json"):
        file = directory / name
        if file.is_file():
            text = file.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return tokenizer.chat_template


def _pil_processor(fam: Family, directory: Path) -> Any:
    """Processor without torchvision: PIL image processor + tokenizer + chat template, no video processor."""
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    template = _template(directory, tokenizer)
    if fam.processor_class == "LlavaProcessor":
        config_file = directory / "processor_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        return LlavaProcessor(
            image_processor=CLIPImageProcessorPil.from_pretrained(directory, local_files_only=True),
            tokenizer=tokenizer,
            patch_size=config.get("patch_size", 14),
            vision_feature_select_strategy=config.get("vision_feature_select_strategy", "default"),
            num_additional_image_tokens=config.get("num_additional_image_tokens", 1),
            chat_template=template,
        )
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(directory, local_files_only=True)
    return _NO_VIDEO[fam.processor_class](image_processor, tokenizer, chat_template=template)


def load_processor(fam: Family, directory: Path) -> Any:
    """The checkpoint's processor (``AutoProcessor``); the PIL assembly where that cannot build a full one."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(directory, local_files_only=True)
    except (ImportError, ValueError, OSError, TypeError, AttributeError):  # torchvision-backed parts missing
        processor = None
    if processor is None or not hasattr(processor, "image_processor"):  # may silently be only a tokenizer
        processor = _pil_processor(fam, directory)
    return processor


def set_pixel_bounds(processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """Set a Qwen image processor's pixel budget (``model.min_pixels`` / ``model.max_pixels``) in place."""
    ip = processor.image_processor
    if min_pixels is None and max_pixels is None:
        return
    if not hasattr(ip, "merge_size"):
        raise ValueError(
            f"model.min_pixels/max_pixels: {type(ip).__name__} has no pixel budget (Qwen image processors only)"
        )
    ip.size["shortest_edge"] = int(min_pixels) if min_pixels is not None else ip.size["shortest_edge"]
    ip.size["longest_edge"] = int(max_pixels) if max_pixels is not None else ip.size["longest_edge"]
    for name, key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if hasattr(ip, name):
            setattr(ip, name, ip.size[key])


def qwen_pixel_bounds(processor: Any) -> dict[str, int] | None:
    """``patch_size``, ``merge_size``, ``min_pixels``, ``max_pixels`` the processor resizes with (Qwen), else None."""
    ip = processor.image_processor
    if not hasattr(ip, "merge_size"):
        return None
    return {
        "patch_size": int(ip.patch_size),
        "merge_size": int(ip.merge_size),
        "min_pixels": int(ip.size["shortest_edge"]),
        "max_pixels": int(ip.size["longest_edge"]),
    }


def save_processor(processor: Any, fam: Family, out: Path) -> None:
    """``save_pretrained`` recording the real transformers processor class (not the no-video stand-in) and,
    for a processor saved without its video part, that part's settings (the image processor's, as the
    published checkpoints let it default), so a plain ``AutoProcessor`` can rebuild the whole processor."""
    processor.save_pretrained(out)
    for name in _CLASS_FILES:
        file = out / name
        if not file.is_file():
            continue
        data = json.loads(file.read_text())
        changed = "processor_class" in data and data["processor_class"] != fam.processor_class
        data["processor_class"] = data.get("processor_class") and fam.processor_class
        if name == "processor_config.json" and fam.video_processor_type and "video_processor" not in data:
            image = dict(data.get("image_processor") or processor.image_processor.to_dict())
            image.pop("image_processor_type", None)
            data["video_processor"] = {**image, "video_processor_type": fam.video_processor_type}
            changed = True
        if changed:
            file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
