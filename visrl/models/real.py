"""Loading the real backbones (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL) from local weights only.

Why: the paper's experiments (§4) fine-tune ``Qwen/Qwen2-VL-7B-Instruct`` (and compare LLaVA-1.5 /
Qwen2.5-VL) with LoRA rank 8, alpha 16, dropout 0 on the language model. This framework never downloads:
weights come from ``path`` or the local Hugging Face cache (``local_files_only=True``), and when they are
absent :class:`WeightsNotFoundError` is raised within seconds with one actionable line naming the installed
hub client's command (``hf download <id> --local-dir <dir>``).

The processor comes from the checkpoint (:func:`visrl.models.processors.load_processor`). ``min_pixels`` /
``max_pixels`` (Qwen) are set on that processor and the box format takes its frame from it, so Qwen2.5-VL
boxes are written in the pixels of the image the model is actually fed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from visrl.models.backbone import Backbone, enable_gradient_checkpointing
from visrl.models.families import FAMILIES, family_of, get_family, make_encoder, model_class
from visrl.models.processors import load_processor, qwen_pixel_bounds, set_pixel_bounds

log = logging.getLogger(__name__)

# published checkpoint id -> family (derived from the family table)
KNOWN_MODELS = {hub_id: name for name, fam in FAMILIES.items() for hub_id in fam.hub_ids}
# sizes of the tiny architectures (conf/debug/fast.yaml sets them); a checkpoint's architecture is fixed
TINY_SIZE_KEYS = ("text_hidden", "text_layers", "heads", "vision_hidden", "vision_layers")


class WeightsNotFoundError(FileNotFoundError):
    """The weights of a real backbone are not on this machine; ``str(err)`` is one actionable line."""


def infer_family(hf_id: str) -> str:
    """Family of a checkpoint id ("llava", "qwen2vl" or "qwen25vl")."""
    return family_of(hf_id).name


def download_hint(hf_id: str, directory: str | Path | None = None) -> str:
    """How to provide the weights, with the installed hub client's command."""
    target = directory or f"/models/{hf_id.split('/')[-1]}"
    return (
        f"run `hf download {hf_id} --local-dir {target}` on a connected machine and set model.path={target} "
        f"(or download into this machine's HF cache: `hf download {hf_id}`)"
    )


def resolve_weights(hf_id: str, path: str | Path | None = None) -> Path:
    """The local directory holding ``hf_id``'s weights (``path`` or the HF cache), never the network."""
    if path is not None:
        directory = Path(path).expanduser()
        if not (directory / "config.json").is_file():
            raise WeightsNotFoundError(
                f"weights for {hf_id} not found: {directory}/config.json is missing; {download_hint(hf_id, directory)}"
            )
        return directory
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    hint = download_hint(hf_id)
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


def frame_box_format(box_format: Any, processor: Any) -> Any:
    """``box_format`` in the frame the processor feeds the model: a format with a pixel frame
    (``with_frame``, e.g. Qwen2.5-VL's) takes the processor's patch, merge and pixel bounds."""
    bounds = qwen_pixel_bounds(processor)
    if box_format is None or bounds is None or not hasattr(box_format, "with_frame"):
        return box_format
    return box_format.with_frame(**bounds)


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
    vision_memo_mb: int = 0,  # likewise: the pipeline memoises the frozen side's features when > 0
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    gradient_checkpointing: bool = False,
    **tiny_sizes: int | None,
) -> Backbone:
    """Load a real backbone from local weights.

    ``lora`` (r, alpha, dropout, target_regex) is recorded as ``backbone.lora``, the settings the
    pipeline's :func:`apply_lora` call uses; the model is returned unwrapped. ``min_pixels`` /
    ``max_pixels`` (Qwen; None keeps the checkpoint's) bound the processor's resize and the box frame.
    ``tiny_sizes`` accepts only the tiny-architecture sizes of ``debug=fast`` (a pretrained checkpoint's
    architecture is fixed, so they are logged and ignored); ``is_tiny`` must be False here.

    Raises:
        WeightsNotFoundError: the weights are neither at ``path`` nor in the local HF cache.
    """
    if is_tiny:
        raise ValueError(
            "load_pretrained: is_tiny=True; tiny backbones are built by visrl.models.tiny.build_tiny"
        )
    unknown = sorted(set(tiny_sizes) - set(TINY_SIZE_KEYS))
    if unknown:
        raise TypeError(f"load_pretrained: unknown model config keys {unknown} (conf/model)")
    if tiny_sizes:
        log.info(
            "load_pretrained: %s apply to tiny models only; %s keeps its architecture",
            sorted(tiny_sizes),
            hf_id,
        )
    fam = get_family(family) if family else family_of(hf_id)
    directory = resolve_weights(hf_id, path)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = model_class(fam).from_pretrained(directory, **kwargs)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    processor = load_processor(fam, directory)
    set_pixel_bounds(processor, min_pixels, max_pixels)
    spec = {
        "builder": "real",
        "hf_id": hf_id,
        "family": fam.name,
        "dtype": dtype,
        "attn_implementation": attn_implementation,
        "device_map": device_map,
        "gradient_checkpointing": gradient_checkpointing,
    }
    return Backbone(
        name=name or hf_id.split("/")[-1],
        model=model,
        encoder=make_encoder(fam, processor, chat_template=fam.chat_template),
        box_format=frame_box_format(box_format, processor),
        image_size=image_size,
        family=fam.name,
        spec=spec,
        lora=dict(lora) if lora else None,
    )
