"""Loading the real 7B backbones (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL) from local weights only.

Why: the paper's experiments (§4) fine-tune ``Qwen/Qwen2-VL-7B-Instruct`` (and compare LLaVA-1.5 /
Qwen2.5-VL) with LoRA rank 8, alpha 16, dropout 0 on the language model. This framework never downloads:
weights come from ``path`` or the local Hugging Face cache (``local_files_only=True``), and when they are
absent :class:`WeightsNotFoundError` is raised within seconds with one actionable line, instead of a hang
on the network or a multi-line hub traceback.

The processors come from the checkpoint (``AutoProcessor``). Where ``torchvision`` is missing (the fast
image and video processors import it), the PIL image processor, the tokenizer and the chat template are
assembled into a processor without a video processor, as for the tiny backbones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from visrl.models.backbone import Backbone
from visrl.models.encoding import make_encoder

KNOWN_MODELS = {
    "llava-hf/llava-1.5-7b-hf": "llava",
    "Qwen/Qwen2-VL-7B-Instruct": "qwen2vl",
    "Qwen/Qwen2.5-VL-7B-Instruct": "qwen25vl",
}
_MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2vl": "Qwen2VLForConditionalGeneration",
    "qwen25vl": "Qwen2_5_VLForConditionalGeneration",
}


class WeightsNotFoundError(FileNotFoundError):
    """The weights of a real backbone are not on this machine; ``str(err)`` is one actionable line."""


def infer_family(hf_id: str) -> str:
    """Family of a checkpoint id ("llava", "qwen2vl" or "qwen25vl")."""
    if hf_id in KNOWN_MODELS:
        return KNOWN_MODELS[hf_id]
    low = hf_id.lower().replace("_", ".").replace("-", ".")
    if "llava" in low:
        return "llava"
    if "qwen2.5.vl" in low:
        return "qwen25vl"
    if "qwen2.vl" in low:
        return "qwen2vl"
    raise ValueError(
        f"load_pretrained: cannot infer the family of {hf_id!r}; set model.family (llava|qwen2vl|qwen25vl)"
    )


def resolve_weights(hf_id: str, path: str | Path | None = None) -> Path:
    """The local directory holding ``hf_id``'s weights (``path`` or the HF cache), never the network."""
    hint = f"run `huggingface-cli download {hf_id}` on a connected machine (same HF_HOME), or set model.path=/dir"
    if path is not None:
        directory = Path(path).expanduser()
        if not (directory / "config.json").is_file():
            raise WeightsNotFoundError(
                f"weights for {hf_id} not found: {directory}/config.json is missing; {hint}"
            )
        return directory
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        directory = Path(snapshot_download(hf_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as err:
        raise WeightsNotFoundError(
            f"weights for {hf_id} not found in the local Hugging Face cache; {hint}"
        ) from err
    if not (directory / "config.json").is_file():
        raise WeightsNotFoundError(
            f"weights for {hf_id} are incomplete in the local cache ({directory}); {hint}"
        )
    return directory


def _pil_processor(family: str, directory: Path) -> Any:
    """Processor without torchvision: PIL image processor + tokenizer + chat template, no video processor."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor, Qwen2VLImageProcessorPil

    from visrl.models.tiny import qwen_processor_class

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    template = tokenizer.chat_template
    for name in ("chat_template.jinja", "chat_template.json"):
        file = directory / name
        if file.is_file():
            text = file.read_text()
            template = json.loads(text)["chat_template"] if name.endswith(".json") else text
            break
    if family == "llava":
        config = json.loads((directory / "processor_config.json").read_text())
        return LlavaProcessor(
            image_processor=CLIPImageProcessorPil.from_pretrained(directory, local_files_only=True),
            tokenizer=tokenizer,
            patch_size=config.get("patch_size", 14),
            vision_feature_select_strategy=config.get("vision_feature_select_strategy", "default"),
            num_additional_image_tokens=config.get("num_additional_image_tokens", 1),
            chat_template=template,
        )
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(directory, local_files_only=True)
    return qwen_processor_class(family)(image_processor, tokenizer, chat_template=template)


def load_processor(family: str, directory: Path) -> Any:
    """The checkpoint's processor; the PIL assembly where AutoProcessor cannot build a full one."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(directory, local_files_only=True)
    except (ImportError, ValueError, OSError, TypeError):  # torchvision-backed processors unavailable here
        processor = None
    if processor is None or not hasattr(processor, "image_processor"):  # may silently be only a tokenizer
        processor = _pil_processor(family, directory)
    return processor


def load_pretrained(
    hf_id: str,
    path: str | Path | None = None,
    family: str | None = None,
    box_format: Any = None,
    dtype: str = "bfloat16",
    attn_implementation: str | None = None,
    lora: dict[str, Any] | None = None,
    device_map: str | dict | None = None,
    image_size: int | None = None,
    name: str | None = None,
    is_tiny: bool = False,
    freeze_vision: bool = True,  # recorded for the pipeline, which freezes the vision side per stage
) -> Backbone:
    """Load a real backbone from local weights.

    ``lora`` (r, alpha, dropout, target_regex) is recorded as ``backbone.lora``, the settings the
    pipeline's :func:`apply_lora` call uses; the model is returned unwrapped.

    ``is_tiny`` is the config marker the pipeline reads; it must be False here.

    Raises:
        WeightsNotFoundError: the weights are neither at ``path`` nor in the local HF cache.
    """
    import transformers

    if is_tiny:
        raise ValueError(
            "load_pretrained: is_tiny=True; tiny backbones are built by visrl.models.tiny.build_tiny"
        )
    family = family or infer_family(hf_id)
    if family not in _MODEL_CLASSES:
        raise ValueError(f"load_pretrained: unknown family {family!r}; valid: {sorted(_MODEL_CLASSES)}")
    directory = resolve_weights(hf_id, path)
    model_cls = getattr(transformers, _MODEL_CLASSES[family])
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = model_cls.from_pretrained(directory, **kwargs)
    processor = load_processor(family, directory)
    spec = {"builder": "real", "hf_id": hf_id, "family": family, "dtype": dtype}
    return Backbone(
        name=name or hf_id.split("/")[-1],
        model=model,
        encoder=make_encoder(family, processor),
        box_format=box_format,
        image_size=image_size,
        family=family,
        spec=spec,
        lora=dict(lora) if lora else None,
    )
