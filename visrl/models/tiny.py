"""Tiny, randomly initialised instances of the real VLM classes, built offline (no hub access).

Why: the VisRL pipeline (paper §3: SFT, then iterative step-level DPO on self-scored two-step rollouts) is
exercised end to end on a CPU with the *same* model classes the 7B backbones use
(``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``), only with tiny configs and the tiny tokenizer of
:mod:`visrl.models.tokenizer`. Everything downstream (encoder, policy, losses, LoRA) therefore runs the
real code paths (M-RoPE, window attention, multi-image placeholders, CLS dropping).

Departure from the reference models (documented, deliberate): ``abs_pos_embed=True`` adds a learned 2-D
absolute position embedding to the *merged* vision tokens of the Qwen towers. Those towers carry only
rotary positions, and at tiny scale a from-scratch model then learns "where is X" very slowly or not at
all (shared/notes/toy-scale-findings.md). The embedding is a submodule of the visual tower (saved,
trained, LoRA-frozen like the tower) applied by a forward hook; a base grid is bilinearly resized to each
image's merged grid, so crops with other aspect ratios still get positions. LLaVA's CLIP tower already has
absolute positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

from visrl.models.backbone import Backbone
from visrl.models.encoding import make_encoder
from visrl.models.tokenizer import (
    LLAVA_IMAGE_TOKEN,
    QWEN_IMAGE_TOKEN,
    VISION_END,
    VISION_START,
    build_tiny_tokenizer,
)

FAMILIES = ("llava", "qwen2vl", "qwen25vl")
ABS_POS_ATTR = "abs_pos_embed"


class MergedGridPositionEmbedding(nn.Module):
    """Learned 2-D absolute positions for merged vision tokens, resized to any merged grid."""

    def __init__(self, dim: int, merge_size: int, base_grid: int = 8, init_std: float = 0.02) -> None:
        super().__init__()
        self.merge_size = merge_size
        self.base_grid = base_grid
        self.weight = nn.Parameter(torch.randn(dim, base_grid, base_grid) * init_std)  # [D, g, g]

    def forward(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """``grid_thw`` [N, 3] (patch grid per image) -> [sum_i t_i*h_i*w_i / merge², D], row-major."""
        chunks = []
        for t, h, w in grid_thw.tolist():
            hm, wm = h // self.merge_size, w // self.merge_size
            grid = self.weight
            if (hm, wm) != (self.base_grid, self.base_grid):
                grid = F.interpolate(grid[None], size=(hm, wm), mode="bilinear", align_corners=False)[0]
            chunks.append(grid.flatten(1).T.repeat(t, 1))  # [t*hm*wm, D]
        return torch.cat(chunks, dim=0)


def _add_abs_pos(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook on the Qwen visual tower: ``pooler_output`` [sum_tokens, D] += positions."""
    grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
    if grid_thw is None:
        raise ValueError("tiny.py abs-pos hook: the visual tower was called without grid_thw")
    pos = getattr(module, ABS_POS_ATTR)(grid_thw)
    output.pooler_output = output.pooler_output + pos.to(output.pooler_output.dtype)
    return output


def attach_abs_pos_embed(model: PreTrainedModel, base_grid: int = 8, init_std: float = 0.02) -> None:
    """Register the merged-grid position embedding on ``model.model.visual`` (idempotent)."""
    visual = model.model.visual
    if hasattr(visual, ABS_POS_ATTR):
        return
    dim = model.config.text_config.hidden_size
    merge = model.config.vision_config.spatial_merge_size
    param = next(visual.parameters())
    module = MergedGridPositionEmbedding(dim, merge, base_grid, init_std).to(device=param.device, dtype=param.dtype)
    visual.add_module(ABS_POS_ATTR, module)
    visual.register_forward_hook(_add_abs_pos, with_kwargs=True)


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) like Qwen's [16, 24, 24] for head_dim 128."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


class _NoVideoProcessorMixin:
    """Shared init for the Qwen processors without a video processor (torchvision is not installable)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        self.image_token = getattr(tokenizer, "image_token", QWEN_IMAGE_TOKEN)
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = None
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class TinyQwen2VLProcessor(_NoVideoProcessorMixin, Qwen2VLProcessor):
    """Qwen2-VL processor with the PIL image processor and no video processor."""


class TinyQwen2_5_VLProcessor(_NoVideoProcessorMixin, Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor with the PIL image processor and no video processor."""


def qwen_processor_class(family: str) -> type[ProcessorMixin]:
    """The video-free processor class of a Qwen family ("qwen2vl" or "qwen25vl")."""
    return TinyQwen2VLProcessor if family == "qwen2vl" else TinyQwen2_5_VLProcessor


def build_processor(
    family: str, tokenizer, image_size: int, patch_size: int, merge_size: int
) -> ProcessorMixin:
    """The PIL-backed processor of a tiny backbone (images resized to exactly ``image_size`` squared)."""
    if family == "llava":
        side = {"height": image_size, "width": image_size}
        image_processor = CLIPImageProcessorPil(size=side, crop_size=side, do_center_crop=False)
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=tokenizer.chat_template,
        )
    factor = patch_size * merge_size
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=factor * factor,
        max_pixels=max(image_size * image_size, factor * factor),
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=2,
    )
    return qwen_processor_class(family)(image_processor, tokenizer, chat_template=tokenizer.chat_template)


def _text_sizes(tok, s: dict[str, int]) -> dict[str, int]:
    """Language-model sizes shared by every tiny family."""
    return dict(
        vocab_size=len(tok),
        hidden_size=s["text_hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["text_layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=4096,
    )


def _qwen_config(family: str, tok, s: dict[str, int]) -> Qwen2VLConfig | Qwen2_5_VLConfig:
    ids = {
        name: tok.convert_tokens_to_ids(t) for name, t in (("image", QWEN_IMAGE_TOKEN), ("vs", VISION_START))
    }
    text = dict(
        **_text_sizes(tok, s),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": mrope_section(s["text_hidden"] // s["heads"]),
        },
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        depth=s["vision_layers"],
        num_heads=s["heads"],
        in_channels=3,
        patch_size=s["patch_size"],
        spatial_merge_size=s["merge_size"],
        temporal_patch_size=2,
    )
    tokens = dict(
        image_token_id=ids["image"],
        video_token_id=len(tok),  # no video token in the tiny vocabulary; never matches an input id
        vision_start_token_id=ids["vs"],
        vision_end_token_id=tok.convert_tokens_to_ids(VISION_END),
    )
    if family == "qwen2vl":
        vision.update(embed_dim=s["vision_hidden"], hidden_size=s["text_hidden"], mlp_ratio=4)
        return Qwen2VLConfig(
            text_config=Qwen2VLTextConfig(**text), vision_config=Qwen2VLVisionConfig(**vision), **tokens
        )
    vision.update(
        hidden_size=s["vision_hidden"],
        intermediate_size=4 * s["vision_hidden"],
        out_hidden_size=s["text_hidden"],
        window_size=2 * s["patch_size"] * s["merge_size"],  # a multiple of patch x merge
        fullatt_block_indexes=[s["vision_layers"] - 1],
    )
    return Qwen2_5_VLConfig(
        text_config=Qwen2_5_VLTextConfig(**text), vision_config=Qwen2_5_VLVisionConfig(**vision), **tokens
    )


def _llava_config(tok, s: dict[str, int]) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=s["vision_hidden"],
        intermediate_size=4 * s["vision_hidden"],
        projection_dim=s["vision_hidden"],
        num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["heads"],
        image_size=s["image_size"],
        patch_size=s["patch_size"],
    )
    text = LlamaConfig(
        **_text_sizes(tok, s),
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    n_tokens = (s["image_size"] // s["patch_size"]) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
        image_seq_length=n_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )


def _check_args(
    family: str,
    is_tiny: bool,
    abs_pos_embed: bool,
    text_hidden: int,
    vision_hidden: int,
    heads: int,
    image_size: int,
    patch_size: int,
    merge_size: int,
) -> None:
    """Reject inconsistent tiny configs with a message naming the offending argument."""
    if not is_tiny:
        raise ValueError(
            "build_tiny: is_tiny=False; real backbones are built by visrl.models.real.load_pretrained"
        )
    if family not in FAMILIES:
        raise ValueError(f"build_tiny: unknown family {family!r}; valid: {FAMILIES}")
    if abs_pos_embed and family == "llava":
        raise ValueError(
            "build_tiny: abs_pos_embed applies to the Qwen towers; CLIP already has absolute positions"
        )
    if text_hidden % heads or vision_hidden % heads:
        raise ValueError(
            f"build_tiny: text_hidden {text_hidden} / vision_hidden {vision_hidden} not divisible by heads {heads}"
        )
    unit = patch_size * (1 if family == "llava" else merge_size)
    if image_size % unit:
        raise ValueError(
            f"build_tiny: image_size {image_size} is not a multiple of the patch grid unit {unit}"
        )


def build_tiny(
    family: str,
    text_hidden: int = 128,
    text_layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vision_hidden: int = 128,
    vision_layers: int = 2,
    patch_size: int = 8,
    merge_size: int = 2,
    image_size: int = 64,
    abs_pos_embed: bool | None = None,
    abs_pos_grid: int = 8,
    abs_pos_std: float = 0.02,
    box_format: Any = None,
    seed: int = 0,
    dtype: str = "float32",
    vocab_size: int = 512,
    name: str | None = None,
    lora: dict[str, Any] | None = None,
    is_tiny: bool = True,
    freeze_vision: bool = False,  # pipeline setting; applied per stage by the pipeline, here on request
) -> Backbone:
    """Build a randomly initialised tiny backbone of ``family`` ("llava", "qwen2vl", "qwen25vl").

    Deterministic in ``seed`` (the global RNG is left untouched). With image_size 64, patch 8, merge 2 a
    Qwen image is 16 tokens; a LLaVA image is (image_size/patch_size)² tokens (CLS dropped).
    ``abs_pos_embed`` defaults to True for the Qwen families and must be False for LLaVA; its learned grid is
    ``abs_pos_grid`` square (resized to the merged grid of each image) with init std ``abs_pos_std``. ``lora``
    (apply_lora settings: r, alpha, dropout, target_regex) is recorded as ``backbone.lora`` for the
    pipeline's later :func:`apply_lora` call, not applied here; ``is_tiny`` is the config marker the
    pipeline reads and must be True here (so ``conf/model/*.yaml`` instantiates as is).
    """
    if abs_pos_embed is None:
        abs_pos_embed = family != "llava"
    _check_args(
        family, is_tiny, abs_pos_embed, text_hidden, vision_hidden, heads, image_size, patch_size, merge_size
    )
    sizes = dict(
        text_hidden=text_hidden,
        text_layers=text_layers,
        heads=heads,
        kv_heads=kv_heads or heads,
        intermediate=intermediate or 4 * text_hidden,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        patch_size=patch_size,
        merge_size=merge_size,
        image_size=image_size,
    )
    image_token = LLAVA_IMAGE_TOKEN if family == "llava" else QWEN_IMAGE_TOKEN
    tok = build_tiny_tokenizer(vocab_size=vocab_size, image_token=image_token)
    processor = build_processor(family, tok, image_size, patch_size, merge_size)
    pos = {"abs_pos_grid": abs_pos_grid, "abs_pos_std": abs_pos_std} if abs_pos_embed else None
    model = _init_model(family, tok, sizes, pos, seed, dtype)
    spec = dict(
        sizes, family=family, abs_pos_embed=abs_pos_embed, seed=seed, dtype=dtype, vocab_size=vocab_size,
        **(pos or {}),
    )
    backbone = Backbone(
        name=name or f"tiny_{family}",
        model=model,
        encoder=make_encoder(family, processor),
        box_format=box_format,
        image_size=image_size,
        family=family,
        spec={"builder": "tiny", **spec},
        lora=dict(lora) if lora else None,
    )
    if freeze_vision:
        from visrl.models.backbone import freeze_vision as _freeze

        _freeze(backbone)
    return backbone


def _init_model(
    family: str, tok, sizes: dict[str, int], pos: dict[str, Any] | None, seed: int, dtype: str
) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "llava":
            model: PreTrainedModel = LlavaForConditionalGeneration(_llava_config(tok, sizes))
        elif family == "qwen2vl":
            model = Qwen2VLForConditionalGeneration(_qwen_config(family, tok, sizes))
        else:
            model = Qwen2_5_VLForConditionalGeneration(_qwen_config(family, tok, sizes))
        if pos is not None:
            attach_abs_pos_embed(model, pos["abs_pos_grid"], pos["abs_pos_std"])
    model.generation_config.pad_token_id = tok.pad_token_id
    return cast_weights(model, getattr(torch, dtype))


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
