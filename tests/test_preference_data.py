"""Pairs, stats and step-DPO rows of one iteration (visrl/rollout/{pairs,stats,regenerate}.py,
visrl/training/{pair_rows,ref_logps,datamodules}.py).

Candidates come from the seeded fake policy of ``test_generator`` (answers drawn from the pattern names,
so the exact-match answer score is 0 or 1 and the reference filter keeps some questions); rows are encoded
with a real tiny Qwen2-VL backbone.
"""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from test_generator import FMT, TEMPLATES, FakePolicy, HashCropScorer  # tests/ is on sys.path (rootdir)

from visrl.data.boxes import from_px, iou
from visrl.data.images import crop_view, load_rgb, resolve, to_view
from visrl.data.pair_records import read_pairs
from visrl.data.records import read_viscot
from visrl.data.rows import PairBatch, pair_batch
from visrl.data.synthetic import SplitSizes, SyntheticDataset
from visrl.models.encoding import IGNORE_INDEX
from visrl.models.policy import VLMPolicy
from visrl.models.tiny import build_tiny
from visrl.rollout.candidates import read_candidates
from visrl.rollout.filter import FilterConfig
from visrl.rollout.generator import RolloutConfig, generate_candidates
from visrl.rollout.pairs import Pair, load_pairs
from visrl.rollout.regenerate import Regenerated, build_pairs, iteration_questions, load_regenerated
from visrl.rollout.scorers import RuleAnswerScorer
from visrl.rollout.stats import PairStats
from visrl.training.datamodules import PreferenceDataModule
from visrl.training.pair_rows import preference_rows
from visrl.training.ref_logps import attach_reference_logps

torch.set_num_threads(1)
CFG = RolloutConfig(n_boxes=8, batch_size=8, max_new_tokens=8, seed=11)


def tiny(seed: int = 0):
    return build_tiny("qwen2vl", text_hidden=64, text_layers=1, vision_hidden=64, vision_layers=1,
                      box_format=FMT, seed=seed)  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    ds = SyntheticDataset(tmp_path_factory.mktemp("synthetic"), sizes=SplitSizes(sft=2, rl=24, test=2))
    records = read_viscot(ds.ensure()["rl"])
    out = tmp_path_factory.mktemp("iter")
    generate_candidates(FakePolicy(), None, records, TEMPLATES, CFG, RuleAnswerScorer(), HashCropScorer(),
                        out / "candidates.jsonl", ds.image_root)  # fmt: skip
    candidates = read_candidates(out / "candidates.jsonl")
    result = build_pairs(candidates, FilterConfig(), TEMPLATES, out, ds.image_root, records=records)
    assert len(result.pairs) >= 4, "the fixture should keep a few pairs"
    return SimpleNamespace(root=ds.image_root, records=records, out=out, candidates=candidates, pairs=result.pairs,
                           stats=result.stats)  # fmt: skip


def test_the_result_is_what_the_files_hold(world):
    """The typed result equals what pairs.json / stats.json hold (read back by other ranks and resumes)."""
    assert load_regenerated(world.out) == Regenerated(world.pairs, world.stats, world.out)
    assert world.stats.to_json() == json.loads((world.out / "stats.json").read_text())
    assert PairStats.from_json(world.stats.to_json()) == world.stats and "yield" in world.stats.to_json()
    assert [p.record().raw for p in world.pairs] == [r.raw for r in read_pairs(world.out / "pairs.json")]
    raw = read_pairs(world.out / "pairs.json")[0]
    del raw.raw["chosen_box"]
    with pytest.raises(ValueError, match=r"record 0: field 'chosen_box': missing"):
        Pair.from_record(raw)


def test_max_pairs_keeps_the_first_kept_questions(world, tmp_path):
    """The pairs budget: the first ``max_pairs`` kept questions in question order, the rest ``over_budget``;
    the statistics count them, and a budget above the kept count changes nothing."""
    n = len(world.pairs)
    capped = build_pairs(world.candidates, FilterConfig(max_pairs=n - 2), TEMPLATES, tmp_path / "cap",
                         world.root, records=world.records)  # fmt: skip
    assert [p.record().raw for p in capped.pairs] == [p.record().raw for p in world.pairs[: n - 2]]
    reasons = capped.stats.drop_reasons
    assert reasons["kept"] == n - 2 and reasons["over_budget"] == 2
    assert world.stats.drop_reasons["over_budget"] == 0
    roomy = build_pairs(world.candidates, FilterConfig(max_pairs=n), TEMPLATES, tmp_path / "roomy",
                        world.root, records=world.records)  # fmt: skip
    assert roomy.pairs == world.pairs
    with pytest.raises(ValueError, match="max_pairs"):
        FilterConfig(max_pairs=0)


def test_shuffled_scores_keep_as_many_pairs_from_other_candidates(world, tmp_path):
    """The matched random-score control on real rollouts: the same questions kept, the chosen candidates
    drawn without regard to their scores (so they differ from the filter's choice)."""
    shuffled = build_pairs(world.candidates, FilterConfig(shuffle_scores=True, shuffle_seed=3), TEMPLATES,
                           tmp_path, world.root, records=world.records)  # fmt: skip
    assert [p.question_index for p in shuffled.pairs] == [p.question_index for p in world.pairs]
    assert shuffled.stats.drop_reasons == world.stats.drop_reasons
    picks = [(p.chosen_index, p.rejected_index) for p in shuffled.pairs]
    assert picks != [(p.chosen_index, p.rejected_index) for p in world.pairs]


@pytest.fixture(scope="module")
def backbone():
    return tiny()


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def test_stats_agree_with_candidates(world):
    stats = json.loads((world.out / "stats.json").read_text())
    cands = world.candidates
    pairs = load_pairs(world.out / "pairs.json")
    failures = Counter(c.parse_failure for c in cands if c.parse_failure)
    assert stats["questions"] == 24 and stats["candidates"] == 24 * 8
    assert {k: v for k, v in stats["parse_failures"].items() if v} == dict(failures)
    assert stats["parse_rate"] == pytest.approx(1 - sum(failures.values()) / len(cands))
    assert stats["synthetic_bad_boxes"] == sum(c.synthetic for c in cands) > 0
    assert stats["bad_box_synthesis_failed"] == sum(c.synthesis_failed for c in cands)
    assert stats["pairs_with_synthetic_rejected"] == sum(p.rejected_synthetic for p in pairs)
    assert stats["answered"] == stats["scored"] == sum(c.box is not None for c in cands)
    assert stats["pairs"] == len(pairs) == stats["drop_reasons"]["kept"]
    assert sum(stats["drop_reasons"].values()) == 24
    assert stats["yield"] == pytest.approx(len(pairs) / 24)
    by_key = {(c.question_index, c.cand): c for c in cands}
    chosen = [by_key[p.question_index, p.chosen_index] for p in pairs]
    rejected = [by_key[p.question_index, p.rejected_index] for p in pairs]
    for key in ("answer", "crop"):
        want = _mean(
            [getattr(c, f"{key}_score") - getattr(r, f"{key}_score") for c, r in zip(chosen, rejected)]
        )
        assert stats[f"mean_{key}_margin"] == pytest.approx(want)
    ious = [iou(c.region, r.region) for c, r in zip(chosen, rejected)]
    assert stats["mean_iou_chosen_rejected"] == pytest.approx(_mean(ious))
    # ground truth, analysis only: from the records' own pixel boxes
    gt = {i: from_px(rec.box_px, (256, 256)) for i, rec in enumerate(world.records)}
    boxed = [c for c in cands if c.box is not None]
    hits = [iou(c.region, gt[c.question_index]) > 0.5 for c in boxed]
    assert stats["gt"]["hit_rate"] == pytest.approx(_mean(hits))
    chosen_gt = [iou(c.region, gt[c.question_index]) for c in chosen]
    assert stats["gt"]["chosen_mean_iou_gt"] == pytest.approx(_mean(chosen_gt))


def test_pairs_json_is_the_visrl_layout_with_crops(world):
    by_key = {(c.question_index, c.cand): c for c in world.candidates}
    for p in read_pairs(world.out / "pairs.json"):
        c, r = (
            by_key[p.raw["question_index"], p.raw["chosen_index"]],
            by_key[p.raw["question_index"], p.raw["rejected_index"]],
        )
        assert p.images == (c.image,) and p.prompt == TEMPLATES.box.format(question=c.question)
        assert (p.chosen_step, p.rejected_step, p.chosen, p.rejected) == (
            c.box_text,
            r.box_text,
            c.answer,
            r.answer,
        )
        assert c.answer_score >= 0.8 and c.crop_score >= 0.8 and r.answer_score <= 0.2 and r.crop_score <= 0.2
        image = load_rgb(resolve(world.root, c.image))
        saved = load_rgb(str(world.out / p.raw["chosen_crop"]))
        assert to_view(saved, 64).tobytes() == crop_view(image, c.region, 64).tobytes()


def test_rows_use_the_chosen_crop_unless_rejected_own_crop(world, backbone):
    enc = backbone.encoder
    pair = next(p for p in world.pairs if p.chosen_box != p.rejected_box)
    image = load_rgb(resolve(world.root, pair.image))
    full = to_view(image, 64)
    chosen_crop = crop_view(image, pair.chosen_region, 64)
    own_crop = crop_view(image, pair.rejected_region, 64)
    box_row, answer_row = preference_rows([pair], world.root, backbone, TEMPLATES)
    assert (box_row.step, answer_row.step) == ("box", "answer") and box_row.uid == pair.uid
    assert box_row.prompt.input_ids == enc.encode_prompt(TEMPLATES.box_prompt(pair.question, full)).input_ids
    assert box_row.completions == (
        enc.encode_completion(pair.chosen_step),
        enc.encode_completion(pair.rejected_step),
    )
    want = enc.encode_prompt(TEMPLATES.answer_prompt(pair.question, full, chosen_crop))
    assert torch.equal(answer_row.prompt.vision["pixel_values"], want.vision["pixel_values"])
    assert answer_row.completions == (
        enc.encode_completion(pair.chosen),
        enc.encode_completion(pair.rejected),
    )
    assert answer_row.rejected_prompt is None
    _, own_row = preference_rows([pair], world.root, backbone, TEMPLATES, rejected_own_crop=True)
    own = enc.encode_prompt(TEMPLATES.answer_prompt(pair.question, full, own_crop))
    assert torch.equal(own_row.rejected_prompt.vision["pixel_values"], own.vision["pixel_values"])
    assert not torch.equal(
        own_row.rejected_prompt.vision["pixel_values"], own_row.prompt.vision["pixel_values"]
    )


@pytest.mark.parametrize("own_crop", [False, True])
def test_collate_concatenates_chosen_then_rejected(world, backbone, own_crop):
    rows = [r for r in preference_rows(world.pairs[:3], world.root, backbone, TEMPLATES, rejected_own_crop=own_crop)
            if r.step == "answer"]  # fmt: skip
    out = pair_batch(rows, backbone.encoder)
    batch, n = out.batch, out.n
    assert out.step == "answer" and n == 3 and batch["input_ids"].shape[0] == 6 and not out.has_reference
    assert out.uids == [r.uid for r in rows]
    for i, r in enumerate(rows):
        for half, completion in ((0, r.completions[0]), (1, r.completions[1])):
            labels = batch["labels"][half * n + i]
            assert labels[labels != IGNORE_INDEX].tolist() == completion
    prompts = [r.prompt for r in rows] + [r.rejected_prompt or r.prompt for r in rows]
    assert torch.equal(batch["pixel_values"], torch.cat([p.vision["pixel_values"] for p in prompts]))
    for r in rows:
        r.ref_logps = (-1.0, -2.0)
    out = pair_batch(rows, backbone.encoder)
    assert out.ref_chosen.tolist() == [-1.0] * 3 and out.ref_rejected.tolist() == [-2.0] * 3
    rows[0].ref_logps = None
    with pytest.raises(ValueError, match="reference log-probs"):
        pair_batch(rows, backbone.encoder)
    with pytest.raises(ValueError, match="one step"):
        pair_batch(
            rows + [r for r in preference_rows(world.pairs[:1], world.root, backbone, TEMPLATES)],
            backbone.encoder,
        )


def test_reference_logps_match_the_policy_and_are_cached(world, backbone, tmp_path):
    policy = VLMPolicy(backbone)
    rows = preference_rows(world.pairs[:4], world.root, backbone, TEMPLATES)
    cache = tmp_path / "ref_logps.json"
    attach_reference_logps(rows, policy, batch_size=3, cache_path=cache)
    box_rows = [r for r in rows if r.step == "box"]
    pairs = world.pairs[:4]
    image = lambda p: to_view(load_rgb(resolve(world.root, p.image)), 64)  # noqa: E731
    prompts = [TEMPLATES.box_prompt(p.question, image(p)) for p in pairs]
    want_c = policy.completion_logprobs(prompts, [p.chosen_step for p in pairs])
    want_r = policy.completion_logprobs(prompts, [p.rejected_step for p in pairs])
    got = torch.tensor([r.ref_logps for r in box_rows])  # [4, 2]
    torch.testing.assert_close(got, torch.stack([want_c, want_r], 1), atol=1e-4, rtol=1e-5)
    assert len(json.loads(cache.read_text())["logps"]) == 8
    calls = []
    hook = backbone.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        fresh = preference_rows(world.pairs[:4], world.root, backbone, TEMPLATES)
        attach_reference_logps(fresh, policy, cache_path=cache)  # same reference: read from the cache
        assert not calls and [r.ref_logps for r in fresh] == [r.ref_logps for r in rows]
    finally:
        hook.remove()
    other = VLMPolicy(tiny(seed=1))  # another reference: recomputed
    attach_reference_logps(fresh, other, cache_path=cache)
    assert [r.ref_logps for r in fresh] != [r.ref_logps for r in rows]


def test_iteration_questions_take_consecutive_slices():
    pool = list(range(10))
    assert iteration_questions(pool, None, 3) == pool
    assert [iteration_questions(pool, 4, k) for k in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_datamodule_regenerates_resumably_and_batches_by_step(world, backbone, tmp_path):
    policy = FakePolicy()
    policy.backbone = backbone
    dm = PreferenceDataModule(tmp_path, world.records, world.root, TEMPLATES, CFG, FilterConfig(),
                              RuleAnswerScorer(), HashCropScorer(), batch_size=3)  # fmt: skip
    result = dm.regenerate(policy, 1)
    out = result.out_dir
    assert out == tmp_path / "iter_1" and result == load_regenerated(out)
    assert {p.name for p in out.iterdir()} >= {"candidates.jsonl", "pairs.json", "stats.json", "crops"}
    n_pairs = len(read_pairs(out / "pairs.json"))
    assert n_pairs > 0 and len(dm.rows) == 2 * n_pairs
    assert len(dm.for_steps(("box",)).rows) == n_pairs and len(result.pairs) == n_pairs
    pairs_bytes, calls = (out / "pairs.json").read_bytes(), len(policy.calls)
    dm.regenerate(policy, 1)  # finished: nothing is sampled again, same pairs
    assert len(policy.calls) == calls and (out / "pairs.json").read_bytes() == pairs_bytes
    dm.regenerate(policy, 2)  # another iteration: other seeds
    assert (tmp_path / "iter_2" / "candidates.jsonl").read_bytes() != (out / "candidates.jsonl").read_bytes()
    dm.load(out, backbone)
    dm.attach_reference_logps(VLMPolicy(backbone))
    assert (out / "ref_logps.json").exists()
    for steps in (("box",), ("box", "answer")):
        stage = dm.for_steps(steps)
        seen = Counter()
        for b in stage.train_dataloader():
            assert isinstance(b, PairBatch) and b.step in steps and b.batch["input_ids"].shape[0] == 2 * b.n
            assert b.ref_chosen.shape == (b.n,)
            seen[b.step] += b.n
        assert seen == Counter({s: n_pairs for s in steps})
    assert len(dm.rows) == 2 * n_pairs  # a stage's view leaves the iteration's data as it was
