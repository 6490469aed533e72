"""Tiny, randomly initialised instances of the real VLM classes, built offline (no hub access).

Why: the VisRL pipeline (paper §3: SFT, then iterative step-level DPO on self-scored two-step rollouts) is
exercised end to end on a CPU with the *same* model classes the 7B backbones use
(``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``), only with tiny configs and the tiny tokenizer of
:mod:`visrl.models.tokenizer`. Everything downstream (encoder, policy, losses, LoRA) therefore runs the
real code paths (M-RoPE, window attention, multi-image placeholders, CLS dropping). Per-family facts
(model class, image token, config builder, processor builder) come from :mod:`visrl.models.families`.

Departure from the reference models (documented, deliberate): ``abs_pos_embed=True`` adds a learned 2-D
absolute position embedding to the *merged* vision tokens of the Qwen towers (:mod:`visrl.models.abspos`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

from visrl.models.abspos import attach_abs_pos_embed
from visrl.models.backbone import Backbone, enable_gradient_checkpointing
from visrl.models.backbone import freeze_vision as _freeze
from visrl.models.families import Family, get_family, make_encoder, model_class, resolve
from visrl.models.placement import cast_weights
from visrl.models.tokenizer import VISION_END, VISION_START, build_tiny_tokenizer


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) like Qwen's [16, 24, 24] for head_dim 128."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


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


def _qwen_parts(fam: Family, tok, s: dict[str, int]) -> tuple[dict, dict, dict]:
    """(text, vision, token-id) config arguments shared by the two Qwen families."""
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
        image_token_id=tok.convert_tokens_to_ids(fam.image_token),
        video_token_id=len(tok),  # no video token in the tiny vocabulary; never matches an input id
        vision_start_token_id=tok.convert_tokens_to_ids(VISION_START),
        vision_end_token_id=tok.convert_tokens_to_ids(VISION_END),
    )
    return text, vision, tokens


def qwen2vl_config(fam: Family, tok, s: dict[str, int]) -> Qwen2VLConfig:
    """Tiny Qwen2-VL config (the family table's ``tiny_config`` of "qwen2vl")."""
    text, vision, tokens = _qwen_parts(fam, tok, s)
    vision.update(embed_dim=s["vision_hidden"], hidden_size=s["text_hidden"], mlp_ratio=4)
    return Qwen2VLConfig(
        text_config=Qwen2VLTextConfig(**text), vision_config=Qwen2VLVisionConfig(**vision), **tokens
    )


def qwen25vl_config(fam: Family, tok, s: dict[str, int]) -> Qwen2_5_VLConfig:
    """Tiny Qwen2.5-VL config (window attention; the last block full attention)."""
    text, vision, tokens = _qwen_parts(fam, tok, s)
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


def llava_config(fam: Family, tok, s: dict[str, int]) -> LlavaConfig:
    """Tiny LLaVA config: CLIP tower of ``image_size`` px, Llama language model, CLS dropped."""
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
        image_token_index=tok.convert_tokens_to_ids(fam.image_token),
        image_seq_length=n_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )


def _check_args(fam: Family, is_tiny: bool, abs_pos_embed: bool, s: dict[str, int]) -> None:
    """Reject inconsistent tiny configs with a message naming the offending argument."""
    if not is_tiny:
        raise ValueError(
            "build_tiny: is_tiny=False; real backbones are built by visrl.models.real.load_pretrained"
        )
    if abs_pos_embed and not fam.abs_pos_embed:
        raise ValueError(
            f"build_tiny: abs_pos_embed applies to the Qwen towers, not {fam.name!r} (CLIP has absolute positions)"
        )
    if s["text_hidden"] % s["heads"] or s["vision_hidden"] % s["heads"]:
        raise ValueError(
            f"build_tiny: text_hidden {s['text_hidden']} / vision_hidden {s['vision_hidden']} "
            f"not divisible by heads {s['heads']}"
        )
    unit = s["patch_size"] * (s["merge_size"] if fam.merged_patch_grid else 1)
    if s["image_size"] % unit:
        raise ValueError(
            f"build_tiny: image_size {s['image_size']} is not a multiple of the patch grid unit {unit}"
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
    vision_memo_mb: int = 0,  # with freeze_vision here: the frozen side's features memoised (vision_memo)
    gradient_checkpointing: bool = False,
) -> Backbone:
    """Build a randomly initialised tiny backbone of ``family`` (a key of the family table).

    Deterministic in ``seed`` (the global RNG is left untouched). With image_size 64, patch 8, merge 2 a
    Qwen image is 16 tokens; a LLaVA image is (image_size/patch_size)² tokens (CLS dropped).
    ``abs_pos_embed`` defaults to the family's table entry (True for the Qwen families, not allowed for
    LLaVA); its learned grid is ``abs_pos_grid`` square (resized to the merged grid of each image) with init
    std ``abs_pos_std``. ``lora`` (apply_lora settings: r, alpha, dropout, target_regex) is recorded as
    ``backbone.lora`` for the pipeline's later :func:`apply_lora` call, not applied here; ``is_tiny`` is
    the config marker the pipeline reads and must be True here (so ``conf/model/*.yaml`` instantiates as is).
    """
    fam = get_family(family, "build_tiny: family")
    abs_pos_embed = fam.abs_pos_embed if abs_pos_embed is None else abs_pos_embed
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
    _check_args(fam, is_tiny, abs_pos_embed, sizes)
    tok = build_tiny_tokenizer(vocab_size=vocab_size, image_token=fam.image_token)
    processor = resolve(fam.tiny_processor)(fam, tok, image_size, patch_size, merge_size)
    pos = {"abs_pos_grid": abs_pos_grid, "abs_pos_std": abs_pos_std} if abs_pos_embed else None
    model = _init_model(fam, resolve(fam.tiny_config)(fam, tok, sizes), pos, seed, dtype, tok.pad_token_id)
    spec = dict(
        sizes,
        family=family,
        abs_pos_embed=abs_pos_embed,
        seed=seed,
        dtype=dtype,
        vocab_size=vocab_size,
        gradient_checkpointing=gradient_checkpointing,
        **(pos or {}),
    )
    backbone = Backbone(
        name=name or f"tiny_{family}",
        model=model,
        encoder=make_encoder(fam, processor),
        box_format=box_format,
        image_size=image_size,
        family=family,
        spec={"builder": "tiny", **spec},
        lora=dict(lora) if lora else None,
    )
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return _freeze(backbone, vision_memo_mb << 20) if freeze_vision else backbone


def _init_model(
    fam: Family, config: PretrainedConfig, pos: dict[str, Any] | None, seed: int, dtype: str, pad_id: int
) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: PreTrainedModel = model_class(fam)(config)
        if pos is not None:
            attach_abs_pos_embed(model, pos["abs_pos_grid"], pos["abs_pos_std"])
    model.generation_config.pad_token_id = pad_id
    return cast_weights(model, getattr(torch, dtype))
