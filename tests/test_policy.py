"""VLMPolicy generation / scoring and sequence_logps on the tiny backbones (visrl/models/policy.py), and the
exact rollout shortcuts: vision features once per image, shared prefixes prefilled once (prefix.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from visrl.data.box_formats import GridFormat
from visrl.data.prompts import Message, user
from visrl.models.backbone import apply_lora
from visrl.models.encoding import IGNORE_INDEX, EncodedPrompt
from visrl.models.families import make_encoder
from visrl.models.frozen import AdapterDisabledPolicy
from visrl.models.logprobs import sequence_logps
from visrl.models.policy import VLMPolicy, prompt_images
from visrl.models.prefix import identities, image_spans, shared_layout, shared_prefix_groups
from visrl.models.tiny import build_tiny

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


# ---- the rollout shortcuts ------------------------------------------------------------------------------
def rollout_prompts():
    """A rollout chunk in miniature: step-1 prompts (one image) and step-2 prompts (full view + crop; the
    crops of a question share the question and view), one crop used twice, one odd-sized crop."""
    views = [image(20), image(21)]
    sizes = {1: (48, 24), 3: (32, 64), 4: (64, 32)}  # 3 and 4: as many tokens, other M-RoPE grids
    crops = [image(30 + i, sizes.get(i, (64, 64))) for i in range(5)]
    questions = ["Where is the red star?", "What colour is the big square in the corner?"]
    step1 = [[user(f"{q} Box.\n<image>", [v])] for q, v in zip(questions, views)]
    pairs = [(0, crops[0]), (0, crops[1]), (0, crops[0]), (1, crops[2]), (1, crops[3]), (1, crops[4])]
    step2 = [[user(f"{questions[j]} Answer.\n<image>\n<image>", [views[j], c])] for j, c in pairs]
    return step1, step2, crops


def plain(policy: VLMPolicy) -> VLMPolicy:
    """The same backbone through Hugging Face's plain path (no shortcuts)."""
    out = VLMPolicy(policy.backbone, batch_size=policy.batch_size)
    out.precompute_vision = out.share_prefixes = False
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_shortcuts_give_the_plain_paths_outputs(family):
    fast = VLMPolicy(tiny(family), batch_size=8)
    slow = plain(fast)
    step1, step2, crops = rollout_prompts()
    greedy, sampled, several = (
        dict(),
        dict(temperature=1.0, seed=5),
        dict(temperature=1.0, seed=5, num_return_sequences=3),
    )
    for batch in (step1, step2, prompts()):
        for kw in (greedy, sampled, several):
            assert fast.generate(batch, max_new_tokens=7, **kw) == slow.generate(
                batch, max_new_tokens=7, **kw
            )
    # several memory-sized batches (batch_size 4 // 3 copies = 1 prompt per batch)
    small, small_plain = VLMPolicy(fast.backbone, batch_size=4), plain(VLMPolicy(fast.backbone, batch_size=4))
    kw = dict(max_new_tokens=5, temperature=1.0, seed=9, num_return_sequences=3)
    assert small.generate(step1, **kw) == small_plain.generate(step1, **kw)
    scored = [[user("Q?\n<image>", [c])] for c in crops] + step2
    answers = ["red", "a blue star", "x", "yes", "no", "square", "it is", "0", "1", "22", "[1, 2, 3, 4]"]
    torch.testing.assert_close(
        fast.completion_logprobs(scored, answers),
        slow.completion_logprobs(scored, answers),
        atol=1e-5,
        rtol=1e-6,
    )


def test_shared_prefixes_are_prefilled_once():
    """A step-1 prompt's samples, and the step-2 rows of a question, prefill their shared part once."""
    policy = VLMPolicy(tiny("qwen2vl"), batch_size=32)
    seen: list[tuple[int, int]] = []  # (rows, tokens) of each language-model forward
    policy.model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    step1, step2, _ = rollout_prompts()
    for prompts, copies in ((step1, 4), (step2, 1)):
        rows = len(prompts) * copies
        seen.clear()
        plain(policy).generate(
            prompts, max_new_tokens=1, temperature=1.0, seed=0, num_return_sequences=copies
        )
        [(n, length)] = seen  # Hugging Face: every row prefills its whole prompt
        assert n == rows
        seen.clear()
        policy.generate(prompts, max_new_tokens=1, temperature=1.0, seed=0, num_return_sequences=copies)
        (groups, width), (n, own) = seen  # the 2 questions' prefixes once, then each row's own tokens
        assert groups == 2 and n == rows and width + own >= length
        assert own == 1 if copies > 1 else own < length / 2
        assert groups * width + rows * own < rows * length


def test_position_ids_per_distinct_layout_equal_hugging_faces_for_every_row():
    """Rows of one layout share position ids; crops with as many tokens but other grids must not."""
    policy = VLMPolicy(tiny("qwen2vl"))
    enc = policy.backbone.encoder
    _, step2, _ = rollout_prompts()
    encoded = [enc.encode_prompt(p) for p in step2]
    ids, mask, types, _ = shared_layout(encoded, [(list(range(len(step2))), 1)], enc.pad_token_id)
    images = [prompt_images(p) for p in step2]
    grids = torch.cat([enc.image_features(im)[0]["image_grid_thw"] for ims in images for im in ims])
    want = policy.backbone.base_model._prepare_position_ids_for_generation(
        ids, {"attention_mask": mask, "mm_token_type_ids": types, "image_grid_thw": grids}
    )  # [4, n, L]
    assert torch.equal(policy._positions(ids, mask, types, images), want)
    assert not torch.equal(want[:, 4], want[:, 5]) and torch.equal(ids[4], ids[5])  # 32x64 vs 64x32 crop


def count_vision_calls(policy: VLMPolicy) -> list[int]:
    """Images per call of the vision tower, recorded into the returned list."""
    calls: list[int] = []
    visual = policy.backbone.base_model.model.visual
    visual.register_forward_pre_hook(lambda m, a, kw: calls.append(len(kw["grid_thw"])), with_kwargs=True)
    return calls


def test_vision_cache_encodes_each_image_once_and_forgets_on_exit():
    policy = VLMPolicy(tiny("qwen2vl"), batch_size=32)
    calls = count_vision_calls(policy)
    step1, step2, crops = rollout_prompts()
    crop_prompts = [[user("Q?\n<image>", [c])] for c in crops]
    policy.generate(step2, max_new_tokens=2)
    assert calls == [2 + 5]  # within one call: each distinct image once (not 2 views x 3 + 6 crops)
    calls.clear()
    with policy.vision_cache():
        boxes = policy.generate(step1, max_new_tokens=4, temperature=1.0, seed=1, num_return_sequences=2)
        answers = policy.generate(step2, max_new_tokens=4)
        logps = policy.completion_logprobs(crop_prompts, ["red"] * 5)
    assert calls == [2, 5]  # views in step 1; only the crops in step 2; nothing for the scorer
    slow = plain(policy)
    assert boxes == slow.generate(step1, max_new_tokens=4, temperature=1.0, seed=1, num_return_sequences=2)
    assert answers == slow.generate(step2, max_new_tokens=4)
    torch.testing.assert_close(logps, slow.completion_logprobs(crop_prompts, ["red"] * 5))
    with torch.no_grad():  # new weights after the block: features must be recomputed, not reused
        policy.backbone.base_model.model.visual.merger.mlp[-1].weight.mul_(1.5)
    calls.clear()
    changed = policy.completion_logprobs(crop_prompts, ["red"] * 5)
    assert calls == [5] and changed.ne(logps).all()
    torch.testing.assert_close(changed, slow.completion_logprobs(crop_prompts, ["red"] * 5))


def test_lora_policy_and_adapter_disabled_policy_keep_separate_features():
    """M_org under LoRA is the same model with the adapter off; each policy caches its own features."""
    bb = apply_lora(
        tiny("qwen2vl"), r=4, alpha=8, target_regex=r".*(visual\.blocks\.\d+\.attn\.qkv|q_proj|v_proj)"
    )
    with torch.no_grad():
        for name, p in bb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    policy, m_org = VLMPolicy(bb, batch_size=16), AdapterDisabledPolicy(bb, batch_size=16)
    _, step2, crops = rollout_prompts()
    crop_prompts = [[user("Q?\n<image>", [c])] for c in crops]
    kw = dict(max_new_tokens=5, temperature=1.0, seed=2)
    with policy.vision_cache(), m_org.vision_cache():
        tuned = policy.generate(step2, **kw), policy.completion_logprobs(crop_prompts, ["a"] * 5)
        base = m_org.generate(step2, **kw), m_org.completion_logprobs(crop_prompts, ["a"] * 5)
    assert tuned[0] == plain(policy).generate(step2, **kw)
    torch.testing.assert_close(tuned[1], plain(policy).completion_logprobs(crop_prompts, ["a"] * 5))
    base_plain = AdapterDisabledPolicy(bb, batch_size=16)
    base_plain.precompute_vision = base_plain.share_prefixes = False
    assert base[0] == base_plain.generate(step2, **kw)
    torch.testing.assert_close(base[1], base_plain.completion_logprobs(crop_prompts, ["a"] * 5))
    assert not torch.allclose(tuned[1], base[1])


# ---- prefix grouping and layout (pure) ------------------------------------------------------------------
def encoded(ids: list[int]) -> EncodedPrompt:
    return EncodedPrompt(ids, None, {})


IMG = 99


def test_groups_share_text_and_identical_images_only():
    a, b, c = image(1), image(2), image(3)
    # prompt = 3 text tokens, an image of 2 placeholders, 2 text tokens
    prompts = [
        [1, 2, 3, IMG, IMG, 4, 5],
        [1, 2, 3, IMG, IMG, 4, 5],
        [1, 2, 3, IMG, IMG, 4, 6],
        [7, 8, 9, 4, 5],
    ]
    images = [[a], [a], [b], []]
    enc = [encoded(p) for p in prompts]
    spans = [image_spans(e, [2] * len(ims), IMG) for e, ims in zip(enc, images)]
    idents = identities(enc, images, spans)
    assert idents[0] == idents[1] and idents[0][:3] == idents[2][:3] and idents[0][3] != idents[2][3]
    # 0 and 1 share all but the last token; 2 shares only the 3 tokens before its (different) image:
    # joining would cost more prefill than its own group; 3 shares nothing
    assert shared_prefix_groups(idents, copies=1) == [([0, 1], 6), ([2], 6), ([3], 4)]
    # a longer shared text makes joining pay off: the prefix then stops where the images differ
    long = [encoded([1, 2, 3, 4, 5, 6, IMG, IMG, 7, 8]) for _ in range(3)]
    spans = [image_spans(e, [2], IMG) for e in long]
    assert shared_prefix_groups(identities(long, [[a], [b], [a]], spans), copies=1) == [([0, 1, 2], 6)]
    assert shared_prefix_groups([idents[0], idents[3]], copies=1) is None  # nothing shared
    # with copies a prompt keeps its own group (prefix = all but the last token) rather than shrink it
    assert shared_prefix_groups(idents[:1] + idents[2:3], copies=8) == [([0], 6), ([1], 6)]
    # a touching image pair [c][a]: spans by counts, and a cut never splits an image
    touching = encoded([1, IMG, IMG, IMG, IMG, 2])
    assert image_spans(touching, [2, 2], IMG) == [(1, 2), (3, 2)]
    ident = identities([touching, touching], [[c, a], [c, b]], [image_spans(touching, [2, 2], IMG)] * 2)
    assert shared_prefix_groups(ident, copies=1) == [([0, 1], 3)]


def test_layout_aligns_prefixes_and_keeps_each_row_unpadded():
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 6], [7, 8, 9]]
    groups = [([0, 1], 3), ([2], 2)]
    enc = [EncodedPrompt(p, [0] * (len(p) - 1) + [1], {}) for p in prompts]
    ids, mask, types, width = shared_layout(enc, groups, pad=0)
    assert width == 3 and ids.shape == (3, 3 + 2)
    for row, m, t, p in zip(ids.tolist(), mask.tolist(), types.tolist(), prompts):
        assert [x for x, keep in zip(row, m) if keep] == p  # the row is the prompt, padding masked
        assert [x for x, keep in zip(t, m) if keep] == [0] * (len(p) - 1) + [1]
    assert ids[2].tolist() == [0, 7, 8, 0, 9]  # [pad][prefix 7 8][pad][own suffix 9]


def test_encoder_caches_prompt_ids_and_bounds_its_pixel_cache():
    bb = tiny("qwen2vl")
    enc = bb.encoder
    first, other = (
        enc.encode_prompt([user("Q?\n<image>", [image(1)])]),
        enc.encode_prompt([user("Q?\n<image>", [image(2)])]),
    )
    assert first.input_ids == other.input_ids and not torch.equal(
        first.vision["pixel_values"], other.vision["pixel_values"]
    )
    first.input_ids.append(7)  # callers own their ids: the cached ones stay intact
    assert enc.encode_prompt([user("Q?\n<image>", [image(1)])]).input_ids == other.input_ids
    assert enc.encode_prompt([user("Q!\n<image>", [image(1)])]).input_ids != other.input_ids
    one = sum(t.numel() * t.element_size() for t in other.vision.values())
    for cap, reprocessed in ((2 * one, True), (100 * one, False)):
        small = make_encoder("qwen2vl", enc.processor, cache_bytes=cap)
        images = [image(10 + i) for i in range(5)]
        for im in images:
            small.image_features(im)
        processed: list[Image.Image] = []
        small._process_image = lambda im, f=small._process_image, log=processed: log.append(im) or f(im)
        small.image_features(images[0])  # the least recently used image
        assert bool(processed) == reprocessed
