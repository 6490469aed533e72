"""The frozen-vision memo (visrl/models/vision_memo.py): exact, and only while the vision side is frozen."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from visrl.data.box_formats import GridFormat
from visrl.data.prompts import user
from visrl.models.backbone import freeze_vision, load_backbone
from visrl.models.logprobs import sequence_logps
from visrl.models.rope_memo import MEMO_ATTR as ROPE_ATTR
from visrl.models.tiny import build_tiny
from visrl.models.vision_memo import install_vision_memo, vision_memo_of

torch.set_num_threads(1)


def rope_memo_of(inner):
    return getattr(inner, ROPE_ATTR, None)


FAMILIES = ("qwen2vl", "qwen25vl", "llava")


def tiny(family: str, seed: int = 0):
    extra = {"patch_size": 16} if family == "llava" else {}
    return build_tiny(family, box_format=GridFormat(grid=4), seed=seed, **extra)


def image(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def ROWS():
    """Three rows over three distinct images (one image in two rows, a two-image row)."""
    full, other, crop = image(0), image(1), image(2, (48, 24))
    return [
        ([user("Where is the star?\n<image>", [full])], "[1, 2, 3, 4]"),
        ([user("What is on it?\n<image>\n<image>", [full, crop])], "red"),
        ([user("Where is the cat?\n<image>", [other])], "[0, 0, 1, 1]"),
    ]


def batch(bb, order=(0, 1, 2)):
    """The rows of :func:`ROWS` in ``order``, collated with completions."""
    rows = [ROWS()[i] for i in order]
    enc = bb.encoder
    return enc.collate([enc.encode_prompt(p) for p, _ in rows], [enc.encode_completion(c) for _, c in rows])


def loss_and_grads(bb, b):
    bb.model.zero_grad()
    logps, _ = sequence_logps(bb.model, b)
    (-logps.sum()).backward()
    return logps.detach(), {n: p.grad.clone() for n, p in bb.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_memo_gives_bit_identical_logps_and_gradients(family):
    plain, memo = freeze_vision(tiny(family)), freeze_vision(tiny(family), memo_bytes=64 << 20)
    inner = memo.base_model.model
    assert vision_memo_of(plain.base_model.model) is None and vision_memo_of(inner) is not None
    for order in ((0, 1, 2), (2, 0, 1), (1, 2, 0)):  # other batch compositions: cached images re-used
        want_lp, want_g = loss_and_grads(plain, batch(plain, order))
        got_lp, got_g = loss_and_grads(memo, batch(memo, order))
        assert torch.equal(want_lp, got_lp)
        assert want_g.keys() == got_g.keys() and all(torch.equal(want_g[k], got_g[k]) for k in want_g)
    stats = vision_memo_of(inner)
    assert stats.misses == 3  # three distinct images, each encoded once
    assert stats.hits == 3 * 4 - 3  # four image slots per batch, three batches


def test_memo_steps_aside_while_the_tower_trains():
    bb = freeze_vision(tiny("qwen2vl"), memo_bytes=64 << 20)
    memo = vision_memo_of(bb.base_model.model)
    loss_and_grads(bb, batch(bb))
    assert memo.entries
    bb.base_model.model.visual.requires_grad_(True)  # a stage that trains the tower: features change
    _, grads = loss_and_grads(bb, batch(bb))
    assert not memo.entries and any(k.startswith("model.visual") for k in grads)


def test_memo_is_bounded_and_can_be_removed():
    bb = freeze_vision(tiny("qwen2vl"), memo_bytes=1)  # smaller than one image's features
    inner = bb.base_model.model
    memo = vision_memo_of(inner)
    want, _ = loss_and_grads(bb, batch(bb))
    assert len(memo.entries) == 1  # the most recent image only
    assert install_vision_memo(inner, ("visual",), "grid", 0) is None and vision_memo_of(inner) is None
    got, _ = loss_and_grads(bb, batch(bb))
    assert torch.equal(want, got)


def test_saved_model_carries_no_memo(tmp_path):
    bb = freeze_vision(tiny("qwen2vl"), memo_bytes=64 << 20)
    loss_and_grads(bb, batch(bb))
    bb.save(tmp_path / "m")
    again = load_backbone(tmp_path / "m")
    assert vision_memo_of(again.base_model.model) is None
    with torch.no_grad():
        assert torch.equal(
            sequence_logps(bb.model, batch(bb))[0], sequence_logps(again.model, batch(again))[0]
        )


# ---------------------------------------------------------------------------------------------- rope memo
@pytest.mark.parametrize("family", ("qwen2vl", "qwen25vl"))
def test_rope_memo_gives_the_models_positions(family):
    bb = tiny(family)
    memo = rope_memo_of(bb.base_model.model)
    enc = bb.encoder
    text_only = ([user("No image here, only a few more words.")], "x")
    for side in ("right", "left"):
        for order in ((0, 1, 2), (2, 1, 0), (1, 3, 0)):  # 3: a row without images between image rows
            rows = [ROWS()[i] if i < 3 else text_only for i in order]
            prompts, completions = (
                [enc.encode_prompt(p) for p, _ in rows],
                [enc.encode_completion(c) for _, c in rows],
            )
            b = enc.collate(prompts, completions, side)
            args = dict(
                mm_token_type_ids=b["mm_token_type_ids"], image_grid_thw=b["image_grid_thw"],
                attention_mask=b["attention_mask"],
            )  # fmt: skip
            want, got = memo.original(b["input_ids"], **args), memo(b["input_ids"], **args)
            assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert memo.misses == 4 and memo.hits == 3 * 6 - 4  # 4 distinct rows; padding does not make a row new


def test_rope_memo_on_every_qwen_backbone_only():
    assert rope_memo_of(tiny("qwen2vl").base_model.model) is not None
    assert (
        rope_memo_of(tiny("llava").base_model.model) is None
    )  # 1-D positions from the mask: nothing to memoise


# ---------------------------------------------------------------------------------------------- whole runs
def test_base_cache_key_ignores_the_memo_setting():
    from visrl.data.skills import BaseSkills
    from visrl.data.synthetic import WorldConfig
    from visrl.training.base_prep import key_material

    on = key_material({"family": "qwen2vl", "vision_memo_mb": 1024}, WorldConfig(), BaseSkills(), {})
    off = key_material({"family": "qwen2vl", "vision_memo_mb": 0}, WorldConfig(), BaseSkills(), {})
    assert on == off


def test_a_run_without_memos_and_with_two_threads_gives_identical_results(tiny_run, run_visrl, tmp_path):
    """The speed settings change no number: memo off, 2 threads, own cache (base rebuilt) vs ``tiny_run``."""
    run_dir = tmp_path / "plain"
    env = {"VISRL_CACHE": str(tmp_path / "cache")}
    result = run_visrl(run_dir, "iter=2", "logger=csv", "model.vision_memo_mb=0", "threads=2", env=env)
    assert result.returncode == 0, result.tail()
    want, got = (json.loads((d / "summary.json").read_text()) for d in (tiny_run, run_dir))
    assert [it["metrics"] for it in got["iterations"]] == [it["metrics"] for it in want["iterations"]]
    for name in ("iter_1/candidates.jsonl", "iter_1/pairs.json", "iter_2/pairs.json"):
        assert (run_dir / name).read_bytes() == (tiny_run / name).read_bytes(), name
    got, want = (predictions(d / "iter_2/eval/predictions.jsonl") for d in (run_dir, tiny_run))
    assert got == want  # every prediction, apart from where each run's cache holds the image


def predictions(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "image"} for row in rows]
