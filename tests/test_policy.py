"""VLMPolicy generation / scoring and sequence_logps on the tiny backbones (visrl/models/policy.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from visrl.data.boxes import GridFormat
from visrl.models.encoding import IGNORE_INDEX
from visrl.models.logprobs import sequence_logps
from visrl.models.policy import VLMPolicy
from visrl.models.tiny import build_tiny
from visrl.prompts import Message, user

torch.set_num_threads(1)
FAMILIES = ("qwen2vl", "qwen25vl", "llava")


def tiny(family: str):
    extra = {"patch_size": 16} if family == "llava" else {}
    return build_tiny(family, box_format=GridFormat(grid=4), **extra)


def image(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def prompts():
    full, crop = image(0), image(1, (48, 24))
    return [
        [user("Where is the red star?\n<image>", [full])],
        [
            user(
                "What is on the star? A longer question to change the padding.\n<image>\n<image>",
                [full, crop],
            )
        ],
        [
            user("Where? <image>", [full]),
            Message("assistant", ("[1, 2, 3, 4]",)),
            user("Crop: <image>", [crop]),
        ],
    ]


COMPLETIONS = ["[1, 2, 3, 4]", "red", "blue star"]


def naive_logps(model, batch):
    """Reference: full-vocabulary log-softmax at every position, then sum over label positions."""
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()  # [B, T, V]
    logp = F.log_softmax(logits[:, :-1], dim=-1)
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    picked = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * mask).sum(1), mask.sum(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_logps_matches_naive_computation(family):
    bb = tiny(family)
    enc = bb.encoder
    for side in ("right", "left"):
        batch = enc.collate(
            [enc.encode_prompt(p) for p in prompts()], [enc.encode_completion(c) for c in COMPLETIONS], side
        )
        with torch.no_grad():
            got, n = sequence_logps(bb.model, batch)
            want, n_want = naive_logps(bb.model, batch)
        assert n.tolist() == n_want.tolist() == [len(enc.encode_completion(c)) for c in COMPLETIONS]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_equals_unbatched(family):
    policy = VLMPolicy(tiny(family), batch_size=8)
    batched = policy.generate(prompts(), max_new_tokens=8)
    single = [policy.generate([p], max_new_tokens=8)[0] for p in prompts()]
    assert batched == single
    assert all(len(group) == 1 for group in batched)
    small = VLMPolicy(policy.backbone, batch_size=1).generate(prompts(), max_new_tokens=8)
    assert small == batched


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_returns_k_per_prompt_and_is_reproducible(family):
    policy = VLMPolicy(tiny(family), batch_size=6)
    policy.model.train()
    torch.manual_seed(7)
    expected_global = torch.rand(1)
    torch.manual_seed(7)
    a = policy.generate(prompts(), max_new_tokens=6, temperature=1.0, num_return_sequences=4, seed=11)
    assert torch.rand(1).eq(expected_global).all()  # the global RNG is untouched
    assert policy.model.training  # mode restored
    b = policy.generate(prompts(), max_new_tokens=6, temperature=1.0, num_return_sequences=4, seed=11)
    c = policy.generate(prompts(), max_new_tokens=6, temperature=1.0, num_return_sequences=4, seed=12)
    assert [len(g) for g in a] == [4, 4, 4]
    assert a == b and a != c
    assert len({t for g in a for t in g}) > 3  # an untrained model samples diverse texts
    assert not any("<|im_end|>" in t or "<|endoftext|>" in t for g in a for t in g)


def test_decode_cuts_at_end_of_turn_and_keeps_earlier_special_tokens():
    enc = tiny("qwen2vl").encoder
    ids = enc.tokenizer("[1, 2, 3, 4]", add_special_tokens=False).input_ids
    eot = enc.end_of_turn_ids
    vs = enc.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert enc.decode(ids + eot + ids) == "[1, 2, 3, 4]"
    assert enc.decode([vs] + ids + [enc.pad_token_id] * 3) == "<|vision_start|>[1, 2, 3, 4]"
    assert enc.decode(torch.tensor(ids)) == "[1, 2, 3, 4]"


def test_completion_logprobs_batched_equals_unbatched_and_reductions():
    bb = tiny("qwen2vl")
    policy = VLMPolicy(bb, batch_size=2)
    total = policy.completion_logprobs(prompts(), COMPLETIONS)
    single = torch.cat([policy.completion_logprobs([p], [c]) for p, c in zip(prompts(), COMPLETIONS)])
    torch.testing.assert_close(total, single, atol=1e-4, rtol=1e-5)
    mean = policy.completion_logprobs(prompts(), COMPLETIONS, reduction="mean")
    counts = torch.tensor([len(bb.encoder.encode_completion(c)) for c in COMPLETIONS], dtype=torch.float32)
    torch.testing.assert_close(mean, total / counts)
    assert total.shape == (3,) and (total < 0).all() and not total.requires_grad
    with pytest.raises(ValueError, match="2 prompts but 1"):
        policy.completion_logprobs(prompts()[:2], COMPLETIONS[:1])


def test_generate_rejects_greedy_with_several_sequences():
    policy = VLMPolicy(tiny("qwen2vl"))
    with pytest.raises(ValueError, match="greedy"):
        policy.generate(prompts()[:1], max_new_tokens=2, num_return_sequences=2)
