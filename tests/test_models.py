"""Tiny backbones, tokenizer, encoder, LoRA, save/load and the real-weights loader (visrl/models)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visrl.data.box_formats import GridFormat
from visrl.data.prompts import Message, user
from visrl.models.backbone import apply_lora, load_backbone, merge_lora
from visrl.models.encoding import IGNORE_INDEX
from visrl.models.logprobs import sequence_logps
from visrl.models.tiny import build_tiny
from visrl.models.tokenizer import build_tiny_tokenizer

torch.set_num_threads(1)
FAMILIES = ("qwen2vl", "qwen25vl", "llava")
REPO = Path(__file__).resolve().parents[1]


def tiny(family: str, **kw):
    extra = {"patch_size": 16} if family == "llava" else {}
    return build_tiny(family, box_format=GridFormat(grid=4), **extra, **kw)


def image(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def prompts():
    full, crop = image(0), image(1, (40, 24))
    return [
        [user("Where is the red star?\n<image>", [full])],
        [user("What is on the star?\n<image>\n<image>", [full, crop])],
        [
            user("Where? <image>", [full]),
            Message("assistant", ("[1, 2, 3, 4]",)),
            user("Crop: <image>", [crop]),
        ],
    ]


COMPLETIONS = ["[1, 2, 3, 4]", "red", "blue star"]


def batch_of(bb, padding_side="right"):
    enc = bb.encoder
    return enc.collate(
        [enc.encode_prompt(p) for p in prompts()],
        [enc.encode_completion(c) for c in COMPLETIONS],
        padding_side,
    )


# ---- tokenizer -----------------------------------------------------------------------------------------
def test_tokenizer_is_deterministic_fast_and_splits_digits():
    start = time.perf_counter()
    a = build_tiny_tokenizer()
    assert time.perf_counter() - start < 1.0
    b = build_tiny_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == 512
    for number in ("0", "7", "42", "1000", "[1, 2, 2, 3]"):
        ids = a(number, add_special_tokens=False).input_ids
        digits = [t for t in a.convert_ids_to_tokens(ids) if t.strip("Ġ").isdigit()]
        assert all(len(t.lstrip("Ġ")) == 1 for t in digits)
        assert "".join(t for t in digits) == "".join(c for c in number if c.isdigit())
        assert a.decode(ids) == number
    assert a.image_token == "<|image_pad|>" and a.image_token_id == a.convert_tokens_to_ids("<|image_pad|>")
    assert a.pad_token == a.eos_token == "<|endoftext|>"


@pytest.mark.parametrize(
    "word", ["horizontal", "vertical", "diagonal", "checkered", "red", "cyan", "triangle"]
)
def test_answer_words_are_single_tokens(word):
    # as in a real vocabulary; multi-token answers sharing pieces were spliced by answer-step DPO
    # ("vertical" -> "vertickertickered", docs/toy-scale-status.md)
    assert build_tiny_tokenizer().tokenize(word) == [word]


def test_chat_template_renders_images_per_family_and_masks_assistant_turns():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Q "}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "[0, 1, 2, 3]"}]},
    ]
    qwen = build_tiny_tokenizer()
    llava = build_tiny_tokenizer(image_token="<image>")
    text = qwen.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>user\nQ <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n[0, 1, 2, 3]<|im_end|>\n"
    )
    assert "<image>" in llava.apply_chat_template(messages, tokenize=False)
    out = qwen.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert qwen.decode(marked) == "[0, 1, 2, 3]<|im_end|>"
    gen = qwen.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("<|im_start|>assistant\n")


# ---- tiny backbones ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_and_two_image_multiturn_encoding(family):
    bb = tiny(family)
    enc = bb.encoder
    single = enc.encode_prompt(prompts()[0])
    n_image = single.input_ids.count(enc.image_token_id)
    assert n_image == 16  # 64x64: Qwen patch 8 merge 2, LLaVA patch 16 (CLS dropped)
    two = enc.encode_prompt(prompts()[1])
    assert two.input_ids.count(enc.image_token_id) > n_image  # full image + crop
    if family != "llava":
        assert two.token_type_ids == [int(t == enc.image_token_id) for t in two.input_ids]
        assert two.vision["image_grid_thw"].shape == (2, 3)
    else:
        assert two.token_type_ids is None and two.vision["pixel_values"].shape == (2, 3, 64, 64)
    batch = batch_of(bb)
    out = bb.model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # CLIP's post_layernorm is unused by LLaVA (it reads hidden states), as in the real model
    grads = {
        n: p.grad for n, p in bb.model.named_parameters() if p.requires_grad and "post_layernorm" not in n
    }
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    if family != "llava":
        assert grads["model.visual.abs_pos_embed.weight"].abs().sum() > 0


def test_collate_pads_and_masks_labels():
    bb = tiny("qwen2vl")
    enc = bb.encoder
    encoded = [enc.encode_prompt(p) for p in prompts()]
    comps = [enc.encode_completion(c) for c in COMPLETIONS]
    for side in ("left", "right"):
        batch = enc.collate(encoded, comps, side)
        for i, (p, c) in enumerate(zip(encoded, comps)):
            row_len = len(p.input_ids) + len(c)
            mask = batch["attention_mask"][i]
            assert int(mask.sum()) == row_len
            assert bool(mask[-1] if side == "right" and row_len == mask.numel() else True)
            labels = batch["labels"][i][mask.bool()]
            assert labels[: len(p.input_ids)].eq(IGNORE_INDEX).all()
            assert labels[len(p.input_ids) :].tolist() == c
            assert batch["labels"][i][~mask.bool()].eq(IGNORE_INDEX).all()
            assert batch["mm_token_type_ids"][i][mask.bool()].tolist() == p.token_type_ids + [0] * len(c)
        assert batch["image_grid_thw"].shape[0] == 5  # 1 + 2 + 2 images
    assert comps[0][-1] == enc.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_image_features_are_cached_per_image_object():
    bb = tiny("qwen2vl")
    enc, img = bb.encoder, image(3)
    a, b = enc.image_features(img)[0], enc.image_features(img)[0]
    assert a["pixel_values"] is b["pixel_values"]
    assert enc.image_features(img.copy())[0]["pixel_values"] is not a["pixel_values"]


@pytest.mark.parametrize("size", [(64, 64), (32, 48), (16, 16), (40, 24), (200, 30)])
def test_qwen_pixels_equal_the_processor_bit_for_bit(size):
    enc = tiny("qwen25vl").encoder
    img = image(5, size)
    vision, n_tokens = enc._process_image(img)
    ref = enc.image_processor(images=[img], return_tensors="pt")
    assert torch.equal(vision["pixel_values"], ref["pixel_values"])
    assert torch.equal(vision["image_grid_thw"], ref["image_grid_thw"])
    assert n_tokens == int(ref["image_grid_thw"].prod()) // 4
    assert (enc._fast_pixels(img) is not None) == (size in {(64, 64), (32, 48), (16, 16)})


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = tiny("qwen2vl", seed=0), tiny("qwen2vl", seed=0), tiny("qwen2vl", seed=1)
    assert torch.rand(1).eq(expected).all()
    sa, sb, sc = (m.model.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.visual.abs_pos_embed.weight"], sc["model.visual.abs_pos_embed.weight"])


def test_abs_pos_embed_reaches_image_tokens_for_any_grid():
    bb = tiny("qwen2vl")
    batch = batch_of(bb)  # includes a 40x24 crop: a merged grid other than the 8x8 base
    with torch.no_grad():
        before = bb.model(**batch).logits
        bb.model.model.visual.abs_pos_embed.weight.add_(1.0)
        after = bb.model(**batch).logits
    assert not torch.allclose(before, after)
    plain = tiny("qwen2vl", abs_pos_embed=False)
    assert not hasattr(plain.model.model.visual, "abs_pos_embed")
    with pytest.raises(ValueError, match="abs_pos_embed"):
        tiny("llava", abs_pos_embed=True)


# ---- LoRA and save/load --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen25vl", "llava"])
def test_lora_targets_language_model_only_and_disabled_adapter_is_base(family):
    bb = tiny(family)
    batch = batch_of(bb)
    with torch.no_grad():
        base, _ = sequence_logps(bb.model, batch)
    lora = apply_lora(bb, r=4, alpha=8)
    wrapped = [n for n, m in lora.model.named_modules() if hasattr(m, "lora_A")]
    assert wrapped and all("language_model" in n for n in wrapped)
    assert not any(
        "visual" in n or "vision_tower" in n for n in wrapped
    )  # Qwen2.5 vision MLP has gate_proj too
    trainable = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in lora.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        tuned, _ = sequence_logps(lora.model, batch)
        with lora.model.disable_adapter():
            disabled, _ = sequence_logps(lora.model, batch)
    assert not torch.allclose(tuned, base)
    assert torch.equal(disabled, base)
    with pytest.raises(ValueError, match="already carries"):
        apply_lora(lora)
    merged = merge_lora(lora)
    with torch.no_grad():
        assert torch.allclose(sequence_logps(merged.model, batch)[0], tuned, atol=1e-4)


def test_apply_lora_uses_config_settings():
    bb = tiny("qwen2vl", lora={"r": 2, "alpha": 4, "dropout": 0.0, "target_regex": None})
    lora = apply_lora(bb)
    assert lora.model.peft_config["default"].r == 2
    with pytest.raises(ValueError, match="matches no module"):
        apply_lora(bb, target_regex=r"nothing\.here")


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_reproduces_logprobs(family, tmp_path):
    bb = tiny(family, seed=3)
    batch = batch_of(bb)
    with torch.no_grad():
        if family != "llava":
            bb.model.model.visual.abs_pos_embed.weight.normal_()  # a trained-looking, non-initial embedding
        expected, _ = sequence_logps(bb.model, batch)
    bb.save(tmp_path / "bb")
    loaded = load_backbone(tmp_path / "bb")
    assert loaded.family == family and loaded.image_size == 64 and loaded.box_format == GridFormat(grid=4)
    with torch.no_grad():
        got, _ = sequence_logps(loaded.model, batch_of(loaded))
    assert torch.equal(got, expected)


def test_position_grid_settings_are_built_and_survive_save_load(tmp_path):
    bb = tiny("qwen2vl", abs_pos_grid=4, abs_pos_std=0.15)
    weight = bb.model.model.visual.abs_pos_embed.weight  # [D, 4, 4]
    assert weight.shape[1:] == (4, 4) and 0.1 < weight.std().item() < 0.2
    with torch.no_grad():
        expected, _ = sequence_logps(bb.model, batch_of(bb))
    bb.save(tmp_path / "bb")
    loaded = load_backbone(tmp_path / "bb")
    assert loaded.model.model.visual.abs_pos_embed.weight.shape[1:] == (4, 4)
    with torch.no_grad():
        assert torch.equal(sequence_logps(loaded.model, batch_of(loaded))[0], expected)


def test_bfloat16_build_round_trips_exactly(tmp_path):
    bb = tiny("qwen25vl", dtype="bfloat16")
    assert bb.model.dtype == torch.bfloat16
    assert bb.model.model.language_model.rotary_emb.inv_freq.dtype == torch.float32  # as from_pretrained
    with torch.no_grad():
        expected, _ = sequence_logps(bb.model, batch_of(bb))
    bb.save(tmp_path / "bf16")
    loaded = load_backbone(tmp_path / "bf16")
    assert loaded.model.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(sequence_logps(loaded.model, batch_of(loaded))[0], expected)


def test_save_load_lora_adapter_and_merged_on_request(tmp_path):
    lora = apply_lora(tiny("qwen2vl"))
    with torch.no_grad():
        for n, p in lora.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        expected, _ = sequence_logps(lora.model, batch_of(lora))
    lora.save(tmp_path / "plain")
    lora.save(tmp_path / "both", merged=True)
    assert (tmp_path / "plain" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "plain" / "merged").exists() and (tmp_path / "both" / "merged").is_dir()
    merged, adapter = (
        load_backbone(tmp_path / "plain"),
        load_backbone(tmp_path / "plain", merge_adapter=False),
    )
    assert not merged.is_lora and adapter.is_lora
    with torch.no_grad():
        assert torch.allclose(sequence_logps(merged.model, batch_of(merged))[0], expected, atol=1e-4)
        assert torch.equal(sequence_logps(adapter.model, batch_of(adapter))[0], expected)
    assert lora.is_lora  # saving merged did not mutate the live model


# ---- configs and the real loader -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny_qwen2vl", "tiny_qwen25vl", "tiny_llava"])
def test_tiny_model_configs_instantiate(name):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    GlobalHydra.instance().clear()  # the model files build on conf/model/_tiny.yaml: compose, not load
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={name}", "seed=0"]).model
    bb = instantiate(cfg, _convert_="all")
    assert bb.name == name and bb.box_format == GridFormat(grid=4) and cfg.is_tiny
    ids = bb.encoder.encode_prompt(prompts()[0]).input_ids
    assert ids.count(bb.encoder.image_token_id) == 16
    assert bb.lora == {"r": 8, "alpha": 16, "dropout": 0.0, "target_regex": None}


def test_real_loader_fails_fast_with_one_line_without_weights(tmp_path):
    code = (
        "from hydra.utils import instantiate\nfrom hydra import compose, initialize_config_dir\n"
        "from hydra.errors import InstantiationException\nimport sys\n"
        "for name in ('llava15', 'qwen2vl', 'qwen25vl'):\n"
        f"    with initialize_config_dir(config_dir='{REPO}/conf', version_base='1.3'):\n"
        "        cfg = compose('config', overrides=['model=' + name]).model\n"
        "    try:\n        instantiate(cfg)\n"
        "    except InstantiationException as err:\n"
        "        assert type(err.__cause__).__name__ == 'WeightsNotFoundError', repr(err.__cause__)\n"
        "        print(err.__cause__)\n"
        "    else:\n        sys.exit('loaded without weights?')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert time.perf_counter() - start < 60
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3
    for line, hf_id in zip(
        lines, ["llava-hf/llava-1.5-7b-hf", "Qwen/Qwen2-VL-7B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"]
    ):
        assert hf_id in line and f"`hf download {hf_id} --local-dir " in line and "model.path=" in line
        assert "huggingface-cli" not in line  # the installed hub client (huggingface_hub >= 1) is `hf`


# ---- agreement with the Hugging Face processors ----------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_matches_the_processor_call(family):
    """Our image-token expansion equals the processor's own ``__call__`` on the rendered text."""
    enc = tiny(family).encoder
    prompt = prompts()[1] if family != "llava" else [user("Q?\n<image>\n<image>", [image(0), image(1)])]
    text = enc.tokenizer.apply_chat_template(
        enc.conversation(prompt), tokenize=False, add_generation_prompt=True
    )
    ref = enc.processor(text=[text], images=[im for m in prompt for im in m.images], return_tensors="pt")
    ours = enc.encode_prompt(prompt)
    assert ours.input_ids == ref["input_ids"][0].tolist()
    assert torch.equal(ours.vision["pixel_values"], ref["pixel_values"])
    if family != "llava":
        assert ours.token_type_ids == ref["mm_token_type_ids"][0].tolist()


HF_LLAVA_TEMPLATE = (  # the llava-hf/llava-1.5-7b-hf template: images first, then text, "ASSISTANT:"
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_llava_encoder_with_a_real_style_processor_pads_instead_of_cropping():
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    from visrl.models.families import make_encoder

    tok = build_tiny_tokenizer(image_token="<image>")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
        ),
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=HF_LLAVA_TEMPLATE,
    )
    enc = make_encoder("llava", processor)
    wide = Image.new("RGB", (200, 100), (255, 255, 255))
    encoded = enc.encode_prompt([user("What is this?\n<image>", [wide])])
    assert encoded.input_ids.count(enc.image_token_id) == 256  # (224 / 14)², CLS dropped
    text = enc.tokenizer.decode(encoded.input_ids)  # images first, as the published template renders
    assert text.startswith("USER: <image><image>") and text.endswith("<image>\nWhat is this?\n ASSISTANT:")
    pixels = encoded.vision["pixel_values"][0]  # [3, 224, 224]: padded, so the top rows are the mean colour
    assert pixels[:, :40].abs().max() < 0.02 and pixels[:, 112].min() > 1.5


@pytest.mark.parametrize(
    ("family", "hf_id"), [("qwen2vl", "Qwen/Qwen2-VL-7B-Instruct"), ("llava", "llava-hf/llava-1.5-7b-hf")]
)
def test_load_pretrained_reads_a_checkpoint_directory(family, hf_id, tmp_path):
    """The real loader on a hub-layout directory (a tiny model standing in for the 7B weights)."""
    from visrl.models.real import load_pretrained

    bb = tiny(family, abs_pos_embed=False) if family != "llava" else tiny(family)
    bb.model.save_pretrained(tmp_path)
    bb.encoder.processor.save_pretrained(tmp_path)
    real = load_pretrained(
        hf_id, path=tmp_path, box_format=GridFormat(grid=4), dtype="float32", lora={"r": 4}
    )
    assert real.family == family and real.spec["builder"] == "real" and real.lora == {"r": 4}
    assert not real.is_lora and apply_lora(real).model.peft_config["default"].r == 4
    with torch.no_grad():
        torch.testing.assert_close(
            sequence_logps(real.model, batch_of(bb))[0], sequence_logps(bb.model, batch_of(bb))[0]
        )
    real.save(tmp_path / "saved")
    assert load_backbone(tmp_path / "saved").spec["hf_id"] == hf_id


def test_box_formats_of_earlier_saves_still_load() -> None:
    """backbone.json written before the formats moved to visrl.data.box_formats names visrl.data.boxes."""
    from visrl.data.box_formats import GridFormat
    from visrl.models.backbone import box_format_spec, build_box_format

    assert build_box_format(box_format_spec(GridFormat(grid=4))) == GridFormat(grid=4)
    assert build_box_format({"_target_": "visrl.data.boxes.GridFormat", "grid": 4}) == GridFormat(grid=4)
