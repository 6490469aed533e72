"""Tiny random-weight checkpoints of the three real VLM classes, laid out like their hub repositories.

Why: the real-backbone path (``visrl.models.real.load_pretrained``; LLaVA-1.5 / Qwen2-VL / Qwen2.5-VL as in
the VisRL paper §4) must be tested without the 7B weights or the network. Each builder writes what the hub
repository holds: ``config.json``, ``model.safetensors`` and ``generation_config.json`` of the real model class
(tiny sizes, random weights), a tokenizer of the real tokenizer class (``LlamaTokenizer`` for llava-hf,
``Qwen2Tokenizer`` for Qwen) trained offline as a small BPE and carrying the family's special tokens, the
published chat template (``chat_template.json``) and the published preprocessor values
(``preprocessor_config.json``; LLaVA's ``processor_config.json``). Everything loads with
``AutoModelForImageTextToText`` / ``AutoTokenizer`` and the project's real loader.

Published values stated here (from the hub repositories' files): LLaVA-1.5 uses CLIP ViT-L/14 at 336 px with
the CLIP mean/std, ``vision_feature_layer -2``, the "default" feature strategy; Qwen2-VL and Qwen2.5-VL use
``min_pixels 3136``, ``max_pixels 12845056``, patch 14, merge 2, temporal patch 2, the CLIP mean/std.

Also :func:`build_viscot_tree`: a mini Visual-CoT tree (``benchmark/<ds>.json``, ``benchmark_det/<ds>.jsonl``
with a few published records each, images generated at the paths the records name, at the recorded sizes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

FAMILIES = ("llava", "qwen2vl", "qwen25vl")
HUB_IDS = {
    "llava": "llava-hf/llava-1.5-7b-hf",
    "qwen2vl": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen25vl": "Qwen/Qwen2.5-VL-7B-Instruct",
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
QWEN_MIN_PIXELS = 3136
QWEN_MAX_PIXELS = 12845056

# Qwen2-VL-7B-Instruct's and Qwen2.5-VL-7B-Instruct's published chat template (chat_template.json).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# llava-hf/llava-1.5-7b-hf's published chat template: every image of a turn first, then its text.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_CORPUS = [
    "Please provide the bounding box coordinate of the region that can help you answer the question better.",
    "Answer the question using a single word or phrase. What is the colour of the object?",
    "What is the red object? The red circle. Does the bird in the picture have blue breast and dagger bill?",
    '{"bbox_2d": [12, 40, 220, 198]} (120,340),(560,780) [0.282, 0.316, 0.794, 0.738] yes no',
    "You are a helpful assistant. user assistant system " + " ".join(str(i) for i in range(200)),
]
# tiny sizes shared by the three families (the architecture of each class is otherwise the published one)
_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2
)


def _trained_bpe(pre_tokenizer: Any, alphabet: list[str], specials: list[str], vocab_size: int) -> Tokenizer:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    core.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return core


def _vocab_merges(core: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    state = json.loads(core.to_str())["model"]
    return state["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]


def qwen_tokenizer() -> Qwen2Tokenizer:
    """A ``Qwen2Tokenizer`` over a small byte-level BPE with Qwen's special tokens (eos ``<|im_end|>``)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    core = _trained_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), alphabet, ["<|endoftext|>"], 420)
    vocab, merges = _vocab_merges(core)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tok.eos_token = "<|im_end|>"
    tok.model_max_length = 32768
    return tok


def llava_tokenizer() -> LlamaTokenizer:
    """A ``LlamaTokenizer`` (metaspace BPE, byte fallback) with llava-hf's ``<image>`` and ``<pad>``."""
    specials = ["<unk>", "<s>", "</s>"]
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    core = _trained_bpe(pre, ["▁"], [], 400)
    pieces, merges = _vocab_merges(core)
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in sorted(pieces, key=pieces.__getitem__):
        vocab.setdefault(piece, len(vocab))
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_prefix_space=True)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})
    tok.padding_side = "left"
    return tok


def _qwen_model(family: str, tok: Qwen2Tokenizer) -> PreTrainedModel:
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("img", "<|image_pad|>"), ("vid", "<|video_pad|>"))}
    text = dict(
        _TEXT,
        vocab_size=len(tok),
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision: dict[str, Any] = dict(
        depth=1, num_heads=2, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2
    )
    tokens = dict(
        image_token_id=ids["img"],
        video_token_id=ids["vid"],
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    if family == "qwen2vl":
        vision.update(embed_dim=32, hidden_size=32, mlp_ratio=2)
        return Qwen2VLForConditionalGeneration(
            Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
        )
    vision.update(
        hidden_size=32, intermediate_size=64, out_hidden_size=32, window_size=112, fullatt_block_indexes=[0]
    )
    return Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    )


def _llava_model(tok: LlamaTokenizer) -> PreTrainedModel:
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=336,
        patch_size=14,
    )
    text = LlamaConfig(
        **_TEXT, vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=tok.pad_token_id
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=576,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        pad_token_id=tok.pad_token_id,
    )
    return LlavaForConditionalGeneration(config)


def _preprocessor(family: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(preprocessor_config.json, processor_config.json or None) with the published values."""
    if family == "llava":
        pre = {
            "crop_size": {"height": 336, "width": 336},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": CLIP_MEAN,
            "image_processor_type": "CLIPImageProcessor",
            "image_std": CLIP_STD,
            "processor_class": "LlavaProcessor",
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": 336},
        }
        proc = {
            "patch_size": 14,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
            "processor_class": "LlavaProcessor",
        }
        return pre, proc
    processor_class = "Qwen2VLProcessor" if family == "qwen2vl" else "Qwen2_5_VLProcessor"
    pre = {
        "min_pixels": QWEN_MIN_PIXELS,
        "max_pixels": QWEN_MAX_PIXELS,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": processor_class,
    }
    return pre, None


def build_checkpoint(family: str, out: Path, seed: int = 0) -> Path:
    """Write a tiny random-weight ``family`` checkpoint in the hub layout under ``out``; returns ``out``."""
    if family not in FAMILIES:
        raise ValueError(f"build_checkpoint: unknown family {family!r}; valid: {FAMILIES}")
    out.mkdir(parents=True, exist_ok=True)
    tok = llava_tokenizer() if family == "llava" else qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _llava_model(tok) if family == "llava" else _qwen_model(family, tok)
    gen = model.generation_config
    if family == "llava":
        gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = 1, 2, tok.pad_token_id
    else:
        eot = tok.convert_tokens_to_ids("<|endoftext|>")
        gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = eot, [tok.eos_token_id, eot], eot
    model.save_pretrained(out)
    tok.save_pretrained(out)
    template = LLAVA_CHAT_TEMPLATE if family == "llava" else QWEN_CHAT_TEMPLATE
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))
    pre, proc = _preprocessor(family)
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    if proc is not None:
        (out / "processor_config.json").write_text(json.dumps(proc, indent=2))
    return out


# ------------------------------------------------------------------------------------- mini Visual-CoT
def _record(ds: str, qid: int, path: str, box_px: list[int], box_sq: str, question: str, answer: str) -> dict:
    box_prompt = " Please provide the bounding box coordinate of the region that can help you answer the question better."
    return {
        "dataset": ds,
        "split": "val",
        "question_id": qid,
        "image": [path, f"{path}###{box_px}"],
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}{box_prompt}"},
            {"from": "gpt", "value": box_sq},
            {"from": "human", "value": "<image>"},
            {"from": "gpt", "value": answer},
        ],
    }


# Published records (cub, textvqa: the first two of each benchmark file), image sizes from benchmark_det.
_VISCOT = {
    "cub": [
        (
            "cot/cub/001.Black_footed_Albatross/Black_Footed_Albatross_0016_796067.jpg",
            7,
            [141, 87, 397, 298],
            [141.0, 87.0, 397.0, 298.0],
            "[0.282, 0.316, 0.794, 0.738]",
            (500, 357),
            "Does the bird in the picture have blue breast and dagger bill?",
            "No",
        ),
        (
            "cot/cub/001.Black_footed_Albatross/Black_Footed_Albatross_0064_796101.jpg",
            15,
            [82, 52, 342, 312],
            [82.0, 52.0, 342.0, 312.0],
            "[0.205, 0.212, 0.855, 0.863]",
            (400, 333),
            "Does the bird in the picture have white crown and buff under?",
            "No",
        ),
    ],
    "textvqa": [
        (
            "cot/textvqa/831bcec304a17054.jpg",
            0,
            [646, 522, 711, 574],
            [646.6026611328125, 522.9906578063965, 711.4963684082031, 574.0494847297668],
            "[0.631, 0.729, 0.695, 0.779]",
            (1024, 576),
            "how long has the drink on the right been aged?",
            "10 years",
        ),
        (
            "cot/textvqa/30f9b48158fc56e6.jpg",
            1,
            [432, 328, 488, 356],
            [432.469970703125, 328.5761307477951, 488.4020805358887, 356.84554521366954],
            "[0.422, 0.487, 0.477, 0.514]",
            (1024, 683),
            "who is at the center of all of this?",
            "bryan owens",
        ),
    ],
}


def build_viscot_tree(root: Path, seed: int = 0) -> Path:
    """A mini Visual-CoT tree under ``root``: benchmark json, det jsonl, images, and ``train.json``
    (the same records, as a viscot_363k-style training list). Returns ``root``."""
    rng = np.random.default_rng(seed)
    train = []
    for ds, rows in _VISCOT.items():
        records, dets = [], []
        for path, qid, box_px, det_box, box_sq, (w, h), question, answer in rows:
            records.append(_record(ds, qid, path, box_px, box_sq, question, answer))
            dets.append(
                {
                    "img_path": path,
                    "expression": question,
                    "bbox": det_box,
                    "height": h,
                    "width": w,
                    "question_id": qid,
                    "split": "val",
                }
            )
            image = root / path
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image)
        (root / "benchmark").mkdir(parents=True, exist_ok=True)
        (root / "benchmark_det").mkdir(parents=True, exist_ok=True)
        (root / "benchmark" / f"{ds}.json").write_text(json.dumps(records, indent=1))
        (root / "benchmark_det" / f"{ds}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dets))
        train += records
    (root / "train.json").write_text(json.dumps(train, indent=1))
    return root
