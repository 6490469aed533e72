"""The real-backbone path on tiny random-weight checkpoints of the real classes (``tests/real_checkpoints.py``).

Each test pins one bug of the real path: box special tokens kept as single tokens (Qwen2-VL), the Qwen2.5-VL
box frame equal to the processor's, model text never creating an image slot, saved models keeping their load
settings and loading with plain transformers / PEFT, LLaVA's prompt order and pad colour, placement, and one
``debug=fast iter=1`` pipeline run on a fixture.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from visrl.data.box_formats import Qwen2VLFormat, Qwen25VLFormat, SqFloatFormat
from visrl.data.boxes import Box
from visrl.data.prompts import Message, user
from visrl.models.backbone import Backbone, apply_lora, load_backbone
from visrl.models.logprobs import sequence_logps
from visrl.models.placement import place
from visrl.models.real import load_pretrained

HUB = {
    "llava": "llava-hf/llava-1.5-7b-hf",
    "qwen2vl": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen25vl": "Qwen/Qwen2.5-VL-7B-Instruct",
}
FORMATS = {"llava": SqFloatFormat(), "qwen2vl": Qwen2VLFormat(), "qwen25vl": Qwen25VLFormat()}


def load(real_checkpoints: dict[str, Path], family: str, **kwargs) -> Backbone:
    return load_pretrained(
        HUB[family], path=real_checkpoints[family], box_format=FORMATS[family], dtype="float32", **kwargs
    )


def picture(w: int = 120, h: int = 90, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def answer_batch(bb: Backbone, answer: str = "red") -> dict[str, torch.Tensor]:
    enc = bb.encoder
    prompt = [user("<image>\nWhat colour? Look closer:\n<image>", [picture(), picture(60, 60, 1)])]
    return enc.collate([enc.encode_prompt(prompt)], [enc.encode_completion(answer)])


@pytest.mark.parametrize("family", sorted(HUB))
def test_fixture_loads_with_the_real_classes(real_checkpoints, family):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    directory = real_checkpoints[family]
    model = AutoModelForImageTextToText.from_pretrained(directory)
    assert type(model).__name__ == {"llava": "LlavaForConditionalGeneration", "qwen2vl": "Qwen2VLForConditionalGeneration", "qwen25vl": "Qwen2_5_VLForConditionalGeneration"}[family]  # fmt: skip
    tok = AutoTokenizer.from_pretrained(directory)
    specials = (
        ["<image>"] if family == "llava" else ["<|box_start|>", "<|box_end|>", "<|image_pad|>", "<|im_end|>"]
    )
    for token in specials:
        assert len(tok(token, add_special_tokens=False).input_ids) == 1, token
    bb = load(real_checkpoints, family)
    with torch.no_grad():
        logps, _ = sequence_logps(bb.model, answer_batch(bb))
    assert torch.isfinite(logps).all()


def test_qwen2vl_box_keeps_its_special_tokens(real_checkpoints):
    """Bug 1: a model-written Qwen2-VL box is ``<|box_start|>``, digits, ``<|box_end|>``: the special tokens
    stay single tokens in training targets; only question text holding them is escaped."""
    bb = load(real_checkpoints, "qwen2vl")
    enc, tok = bb.encoder, bb.encoder.tokenizer
    text = bb.box_format.format(Box(0.1, 0.2, 0.5, 0.6), (640, 480))
    ids = enc.encode_completion(text)
    start, end = tok.convert_tokens_to_ids("<|box_start|>"), tok.convert_tokens_to_ids("<|box_end|>")
    assert ids[0] == start and ids.count(end) == 1 and ids.count(start) == 1
    assert ids[: len(ids) - len(enc.end_of_turn_ids)] == tok(text, add_special_tokens=False).input_ids
    before = enc.escaped_texts
    question = enc.encode_prompt(
        [user("<image>\nWhere is <|box_start|>(1,2),(3,4)<|box_end|>?", [picture()])]
    )
    assert start not in question.input_ids and end not in question.input_ids
    assert enc.escaped_texts == before + 1
    plain = enc.encode_prompt([user("<image>\nWhere is the cat?", [picture()])])
    assert enc.escaped_texts == before + 1  # ordinary prompts take the plain path
    assert plain.input_ids.count(enc.image_token_id) > 0


@pytest.mark.parametrize("family", sorted(HUB))
def test_model_text_never_creates_an_image_slot(real_checkpoints, family):
    """Bug 4: an answer holding ``<image>`` / ``<|image_pad|>`` re-encoded (e.g. by the judge) stays text."""
    bb = load(real_checkpoints, family)
    enc = bb.encoder
    answer = "It is <image> and <|image_pad|><|vision_start|> red"
    assert enc.image_token_id not in enc.encode_completion(answer)
    before = enc.escaped_texts
    judged = [user("<image>\nQuestion: what colour? Model answer: {answer}", [picture()], answer=answer)]
    encoded = enc.encode_prompt(judged)  # raised "2 image tokens but the prompt holds 1 images" before
    assert encoded.vision and enc.escaped_texts == before + 1
    multi = [user("<image>\nWhat colour?", [picture()]), Message("assistant", (answer,)), user("Sure?")]
    assert enc.encode_prompt(multi).input_ids.count(enc.image_token_id) == enc.encode_prompt(
        judged
    ).input_ids.count(enc.image_token_id)


@pytest.mark.parametrize(("min_pixels", "max_pixels"), [(None, None), (3136, 401408)])
def test_qwen25vl_boxes_live_in_the_frame_the_model_is_fed(real_checkpoints, min_pixels, max_pixels):
    """Bug 2: one source of truth for the pixel budget; the box frame is the processed image's size."""
    bb = load(real_checkpoints, "qwen25vl", min_pixels=min_pixels, max_pixels=max_pixels)
    big = picture(1600, 1200)
    seen = bb.encoder.processed_size(big)
    assert bb.box_format.resized(big.size) == seen
    assert seen == ((1596, 1204) if max_pixels is None else (728, 532))
    w, h = seen
    expected = f'{{"bbox_2d": [{round(w / 4)}, {round(h / 4)}, {round(3 * w / 4)}, {round(3 * h / 4)}]}}'
    assert bb.box_format.format(Box(0.25, 0.25, 0.75, 0.75), big.size) == expected


@pytest.mark.parametrize("family", sorted(HUB))
def test_saved_model_loads_with_plain_transformers(real_checkpoints, family, tmp_path):
    """Bug 6: load settings survive a save; the processor records the real class."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    bb = load(real_checkpoints, family, attn_implementation="eager")
    bb.save(tmp_path / "saved")
    again = load_backbone(tmp_path / "saved")
    assert again.model.config._attn_implementation == "eager" and again.spec["attn_implementation"] == "eager"
    real_class = {"llava": "LlavaProcessor", "qwen2vl": "Qwen2VLProcessor", "qwen25vl": "Qwen2_5_VLProcessor"}
    recorded = json.loads((tmp_path / "saved" / "processor_config.json").read_text())["processor_class"]
    assert recorded == real_class[family]
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved")
    batch = answer_batch(bb)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(model, batch)[0], sequence_logps(bb.model, batch)[0])
    try:
        processor = AutoProcessor.from_pretrained(tmp_path / "saved")
    except ImportError as err:  # the Qwen processors' video part needs torchvision; never a silent tokenizer
        assert family != "llava" and "torchvision" in str(err).lower()
    else:
        assert type(processor).__name__ == real_class[family]


@pytest.mark.parametrize("family", sorted(HUB))
def test_lora_save_is_a_standard_peft_adapter(real_checkpoints, family, tmp_path):
    """Bug 7: ``PeftModel.from_pretrained(base, dir/adapter)`` reproduces the log-probs; merged on request."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    bb = apply_lora(load(real_checkpoints, family))
    with torch.no_grad():
        for name, p in bb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    batch = answer_batch(bb)
    with torch.no_grad():
        expected = sequence_logps(bb.model, batch)[0]
    bb.save(tmp_path / "s")
    assert not (tmp_path / "s" / "merged").exists()
    base = AutoModelForImageTextToText.from_pretrained(tmp_path / "s")
    peft = PeftModel.from_pretrained(base, tmp_path / "s" / "adapter")
    with torch.no_grad():
        assert torch.equal(sequence_logps(peft, batch)[0], expected)
    bb.save(tmp_path / "m", merged=True)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "m" / "merged")
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(merged, batch)[0], expected, atol=1e-4, rtol=1e-4)


def test_llava_prompt_order_and_pad_colour(real_checkpoints):
    """Bug 8: full image, question, crop in that order; the pad colour is LLaVA's ``int(m * 255)``."""
    bb = load(real_checkpoints, "llava")
    enc = bb.encoder
    prompt = [user("<image>\nWhat colour? Look closer:\n<image>", [picture(), picture(60, 60, 1)])]
    text = re.sub("(<image>)+", "<image>", enc.tokenizer.decode(enc.encode_prompt(prompt).input_ids))
    assert text.index("<image>") < text.index("What colour? Look closer:") < text.rindex("<image>")
    assert (
        text.endswith("<image> ASSISTANT:") and text.count("<image>") == 2
    )  # not the published images-first order
    mean = enc.image_processor.image_mean
    square = enc._square(Image.new("RGB", (40, 20), (0, 0, 0)))
    assert square.getpixel((0, 0)) == tuple(int(m * 255) for m in mean) == (122, 116, 104)


def test_place_casts_weights_and_keeps_rotary_buffers(real_checkpoints):
    """Bug 10: ``place`` puts a backbone on a device in a precision (rotary ``inv_freq`` stays fp32)."""
    bb = place(load(real_checkpoints, "qwen2vl"), "cpu", "bfloat16")
    assert {p.dtype for p in bb.model.parameters()} == {torch.bfloat16}
    assert all(b.dtype == torch.float32 for n, b in bb.model.named_buffers() if n.endswith("inv_freq"))
    assert next(bb.model.parameters()).device.type == "cpu"


def test_gradient_checkpointing_is_a_config_value(real_checkpoints, tmp_path):
    bb = load(real_checkpoints, "qwen2vl", gradient_checkpointing=True)
    assert bb.model.is_gradient_checkpointing
    bb.save(tmp_path / "gc")
    assert load_backbone(tmp_path / "gc").model.is_gradient_checkpointing


@pytest.mark.parametrize(
    ("family", "model"),
    [("qwen2vl", "qwen2vl"), pytest.param("llava", "llava15", marks=pytest.mark.slow),
     pytest.param("qwen25vl", "qwen25vl", marks=pytest.mark.slow)],
)  # fmt: skip
def test_debug_fast_iter1_on_a_real_checkpoint(family, model, real_checkpoints, run_visrl, tmp_path):
    """Bug 5: ``debug=fast`` with a real backbone runs the toy task end to end (its tiny sizes do not apply)."""
    result = run_visrl(
        tmp_path / "run",
        f"model={model}",
        "data=synthetic",  # the toy task on the real backbone (the recipe chooses Visual-CoT data)
        f"model.path={real_checkpoints[family]}",
        "model.dtype=float32",
        "iter=1",
        "logger=none",
    )
    assert result.returncode == 0, result.tail()
    run = tmp_path / "run"
    assert (run / "summary.json").is_file()
    assert (run / "iter_1" / "model" / "adapter" / "adapter_config.json").is_file()
    assert load_backbone(run / "iter_1" / "model").family == family


def test_mini_viscot_tree_reads_like_the_published_files(viscot_tree):
    """The fixture tree: the benchmark loader joins json and det rows, and every image is where it is named."""
    from visrl.benchmarks.viscot import load_items, resolve_image

    for dataset in ("cub", "textvqa"):
        items = load_items(viscot_tree, dataset)
        assert len(items) == 2
        for item in items:
            with Image.open(resolve_image(viscot_tree, item.record.image_path)) as im:
                assert im.size == (item.det.width, item.det.height)
