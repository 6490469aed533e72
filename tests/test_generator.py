"""Batched, seeded, resumable rollouts (visrl/rollout/generator.py) and the candidate-file plumbing.

Most tests use a fake policy (the model is irrelevant to batching, bad boxes, resume and sharding) that
draws its texts from the ``seed`` it is given, so they also check that seeding goes through the chunks;
the determinism / sharding tests run the real tiny Qwen2-VL backbone and the configured scorers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from visrl.data.box_formats import GridFormat
from visrl.data.prompts import PromptTemplates
from visrl.data.records import read_viscot
from visrl.data.synthetic import PATTERNS, SplitSizes, SyntheticDataset
from visrl.models.policy import VLMPolicy
from visrl.models.tiny import build_tiny
from visrl.rollout.badbox import overlaps
from visrl.rollout.candidates import Candidate, merge_shards, meta_path, read_candidates, shard_path
from visrl.rollout.generator import (
    RolloutConfig,
    RolloutQuestion,
    generate_candidates,
)
from visrl.rollout.scorers import LikelihoodCropScorer, RuleAnswerScorer, ScoreResult

torch.set_num_threads(1)
CONF = Path(__file__).resolve().parents[1] / "conf"
TEMPLATES = PromptTemplates(box="{question} Where?\n<image>", answer="{question}\n<image>\n<image>")
FMT = GridFormat(grid=4)
# sampled box texts of the fake policy: valid boxes and each kind of parse failure
BOX_TEXTS = ["[0, 0, 2, 2]", "[1, 1, 3, 3]", "[2, 0, 4, 2]", "[0, 2, 1, 4]", "[3, 3, 4, 4]",
             "hello", "[1, 2, 3]", "[0, 0, 5, 5]", "[1, 1, 1, 3]", ""]  # fmt: skip


class FakePolicy:
    """Seeded canned generations; records every generate call. Box prompts have one image, answer prompts
    two. ``box_texts`` replaces the random draw with fixed texts (cycled)."""

    def __init__(self, box_texts: list[str] | None = None, image_size: int = 64):
        self.backbone = SimpleNamespace(box_format=FMT, image_size=image_size)
        self.box_texts = box_texts
        self.calls: list[dict] = []

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, num_return_sequences=1, seed=None):
        n_images = {len(m.images) for p in prompts for m in p}
        self.calls.append({"n": len(prompts), "r": num_return_sequences, "images": n_images, "seed": seed})
        rng = random.Random(seed)
        if n_images == {1}:
            if self.box_texts is not None:
                return [
                    [self.box_texts[k % len(self.box_texts)] for k in range(num_return_sequences)]
                    for _ in prompts
                ]
            return [[rng.choice(BOX_TEXTS) for _ in range(num_return_sequences)] for _ in prompts]
        return [[rng.choice(PATTERNS) for _ in range(num_return_sequences)] for _ in prompts]


class FakeBoxesRealAnswers(FakePolicy):
    """Seeded fake boxes (a random tiny model almost never writes one) and the real model's sampled answers."""

    def __init__(self, policy: VLMPolicy):
        super().__init__()
        self.policy, self.backbone, self.model = policy, policy.backbone, policy.model

    def generate(self, prompts, **kw):
        if {len(m.images) for p in prompts for m in p} == {1}:
            return super().generate(prompts, **kw)
        return self.policy.generate(prompts, **kw)


class HashCropScorer:
    """Deterministic crop score in {0, 0.5, 1} from the crop's pixels (the model is irrelevant here)."""

    name = "hash_crop"

    def score(self, items, policy):
        return [ScoreResult(float(sum(it.crop.tobytes()) % 3) / 2, None) for it in items]


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    ds = SyntheticDataset(tmp_path_factory.mktemp("synthetic"), sizes=SplitSizes(sft=2, rl=10, test=2))
    paths = ds.ensure()
    return SimpleNamespace(root=ds.image_root, records=read_viscot(paths["rl"]))


@pytest.fixture(scope="module")
def tiny_policy() -> VLMPolicy:
    bb = build_tiny(
        "qwen2vl", text_hidden=64, text_layers=1, vision_hidden=64, vision_layers=1, box_format=FMT
    )
    return VLMPolicy(bb, batch_size=64)


CFG = RolloutConfig(n_boxes=4, batch_size=4, max_new_tokens=8, seed=3)


def run(world, out, policy=None, cfg=CFG, records=None, **kw):
    policy = policy or FakePolicy()
    return generate_candidates(policy, None, records or world.records, TEMPLATES, cfg, RuleAnswerScorer(),
                               HashCropScorer(), out, world.root, **kw)  # fmt: skip


def test_batched_generation_one_call_per_step_and_parse_failures(world, tmp_path):
    policy = FakePolicy()
    rows = run(world, tmp_path / "c.jsonl", policy)
    assert len(rows) == 10 * CFG.n_boxes
    assert [(r.question_index, r.cand) for r in rows] == [(q, c) for q in range(10) for c in range(4)]
    assert [r.uid for r in rows[::4]] == [rec.uid for rec in world.records]
    # 3 chunks (4, 4, 2 questions): each ONE batched box call and ONE answer call, nothing per candidate
    assert [(c["n"], c["r"], c["images"]) for c in policy.calls[::2]] == [
        (4, 4, {1}),
        (4, 4, {1}),
        (2, 4, {1}),
    ]
    for chunk, call in enumerate(policy.calls[1::2]):
        boxed = [r for r in rows if r.chunk == chunk and r.box is not None]
        assert (call["n"], call["r"], call["images"]) == (len(boxed), 1, {2})
    for r in rows:
        size = tuple(r.image_size)
        parsed = FMT.parse(r.sampled_text, size)
        assert r.parse_failure == (parsed.failure.value if parsed.failure else None)
        if r.box is None:
            assert r.answer is None and r.answer_score is None and r.crop_score is None
        else:
            assert r.answer in PATTERNS and r.answer_score == float(r.answer == r.answer_gold)
            assert FMT.parse(r.box_text, size).box.as_tuple() == tuple(r.box)
    failures = {r.parse_failure for r in rows} - {None}
    assert {"no_box", "wrong_arity", "out_of_range"} <= failures
    assert read_candidates(tmp_path / "c.jsonl") == rows


def test_candidate_json_is_the_file_line_and_bad_rows_are_named(world, tmp_path):
    """``Candidate.to_json`` writes exactly the file's line (key order included); a row missing a field or
    carrying an unknown one fails in one line naming the file and line."""
    path = tmp_path / "c.jsonl"
    run(world, path, FakePolicy())
    lines = path.read_text().splitlines()
    assert [json.dumps(c.to_json()) for c in read_candidates(path)] == lines
    row = json.loads(lines[1])
    del row["crop_score"]
    path.write_text("\n".join([lines[0], json.dumps({**row, "extra": 1})]) + "\n")
    with pytest.raises(
        ValueError, match=r"c\.jsonl: line 2: missing fields \['crop_score'\], unknown fields \['extra'\]"
    ):
        read_candidates(path)


def test_bad_box_replaces_overlapping_second_box_with_a_disjoint_one(world, tmp_path):
    # attempts (0,1) and (2,3) sample the same box twice: IoU 1 > 0.05 -> the second is synthesised
    rows = run(
        world,
        tmp_path / "a.jsonl",
        FakePolicy(["[0, 0, 2, 2]", "[0, 0, 2, 2]", "[0, 0, 1, 1]", "[0, 0, 1, 2]"]),
    )
    for r in rows:
        assert r.synthetic == (r.cand % 2 == 1) and not r.synthesis_failed
    by_q = {}
    for r in rows:
        by_q.setdefault(r.question_index, []).append(r)

    for cands in by_q.values():
        for good, bad in ((cands[0], cands[1]), (cands[2], cands[3])):
            assert not overlaps(good.region, bad.region)
            assert FMT.parse(bad.box_text, tuple(bad.image_size)).box.as_tuple() == tuple(bad.box)
            assert bad.sampled_text == good.box_text or bad.sampled_text == "[0, 0, 1, 2]"
            assert bad.answer is not None  # answered from the synthetic crop
    # switched off: boxes stay as sampled
    off = RolloutConfig(n_boxes=4, batch_size=4, max_new_tokens=8, seed=3, bad_box={"enabled": False})
    rows = run(world, tmp_path / "b.jsonl", FakePolicy(["[0, 0, 2, 2]"] * 2), cfg=off)
    assert not any(r.synthetic for r in rows) and {r.box_text for r in rows} == {"[0, 0, 2, 2]"}
    # no disjoint box exists next to a full-image box: kept as sampled, counted
    rows = run(world, tmp_path / "c.jsonl", FakePolicy(["[0, 0, 4, 4]", "[0, 0, 4, 4]"]))
    assert all(r.synthesis_failed == (r.cand % 2 == 1) and not r.synthetic for r in rows)


def test_repeated_boxes_are_crop_scored_once(world, tmp_path):
    class Counting(HashCropScorer):
        n_items = 0

        def score(self, items, policy):
            Counting.n_items += len(items)
            return super().score(items, policy)

    off = RolloutConfig(n_boxes=4, batch_size=4, max_new_tokens=8, seed=3, bad_box={"enabled": False})
    texts = ["[0, 0, 2, 2]", "[0, 0, 2, 2]", "[1, 1, 3, 3]", "[0, 0, 2, 2]"]
    rows = generate_candidates(FakePolicy(texts), None, world.records, TEMPLATES, off, RuleAnswerScorer(),
                               Counting(), tmp_path / "c.jsonl", world.root)  # fmt: skip
    assert Counting.n_items == 2 * len(world.records)  # two distinct boxes per question
    for q in range(len(world.records)):
        scores = [r.crop_score for r in rows if r.question_index == q]
        assert scores[0] == scores[1] == scores[3]


def test_records_boxes_are_never_read(world, tmp_path):
    stripped = [RolloutQuestion(r.uid, r.question, r.answer, r.image_path) for r in world.records]
    a = run(world, tmp_path / "a.jsonl", records=world.records)
    b = run(world, tmp_path / "b.jsonl", records=stripped)
    assert a == b


def _scorers():
    return RuleAnswerScorer(), LikelihoodCropScorer(template="{question}\n<image>")


def test_same_seed_same_candidates_real_model(world, tiny_policy, tmp_path):
    def go(name, seed):
        cfg = RolloutConfig(n_boxes=3, batch_size=4, max_new_tokens=6, seed=seed)
        generate_candidates(FakeBoxesRealAnswers(tiny_policy), tiny_policy, world.records[:6], TEMPLATES, cfg,
                            *_scorers(), tmp_path / name, world.root)  # fmt: skip
        return (tmp_path / name).read_bytes()

    first = go("a.jsonl", 0)
    assert go("b.jsonl", 0) == first
    assert go("c.jsonl", 1) != first
    rows = [Candidate.from_json(json.loads(line)) for line in first.decode().splitlines()]
    boxed = [r for r in rows if r.box is not None]
    assert len(rows) == 18 and len(boxed) >= 6
    assert all(r.answer is not None and 0 <= r.crop_score <= 1 for r in boxed)


def test_resume_after_crash_gives_the_same_file(world, tmp_path):
    full = tmp_path / "full.jsonl"
    run(world, full)

    def crash_after_chunk_1(index, rows):
        if index == 1:
            raise Crash("killed")

    crashed = tmp_path / "crashed.jsonl"
    with pytest.raises(Crash):
        run(world, crashed, on_chunk=crash_after_chunk_1)
    assert {r.chunk for r in read_candidates(crashed)} == {0, 1}
    # a third chunk torn mid-write: half its rows and a cut line
    lines = full.read_text().splitlines(keepends=True)
    with open(crashed, "a") as f:
        f.write("".join(lines[32:35]) + lines[35][:20])
    policy = FakePolicy()
    run(world, crashed, policy)
    assert crashed.read_bytes() == full.read_bytes()
    assert len(policy.calls) == 2  # only the unfinished chunk 2 was generated again
    run(world, crashed, policy)  # complete: nothing to do
    assert len(policy.calls) == 2 and crashed.read_bytes() == full.read_bytes()


def test_resume_with_other_settings_fails(world, tmp_path):
    out = tmp_path / "c.jsonl"
    run(world, out)
    other = RolloutConfig(n_boxes=2, batch_size=4, max_new_tokens=8, seed=3)
    with pytest.raises(ValueError, match="different settings.*config"):
        run(world, out, cfg=other)


@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_merge_to_the_single_process_file(world, tiny_policy, tmp_path, world_size):
    cfg = RolloutConfig(n_boxes=2, batch_size=2, max_new_tokens=6, seed=5)
    records = world.records[:7]  # 4 chunks, the last one short

    def go(out, shard):
        return generate_candidates(FakeBoxesRealAnswers(tiny_policy), tiny_policy, records, TEMPLATES, cfg,
                                   *_scorers(), out, world.root, shard=shard)  # fmt: skip

    single = tmp_path / "single" / "candidates.jsonl"
    go(single, (0, 1))
    out = tmp_path / "sharded" / "candidates.jsonl"
    paths = []
    for rank in range(world_size):
        rows = go(out, (rank, world_size))
        assert {r.chunk % world_size for r in rows} <= {rank}
        paths.append(shard_path(out, rank, world_size))
    assert paths[1].name == "candidates.rank1.jsonl"
    merged = merge_shards(paths, out)
    assert out.read_bytes() == single.read_bytes()
    assert json.loads(meta_path(out).read_text()) == json.loads(meta_path(single).read_text())
    assert merged == read_candidates(single)
    with pytest.raises(ValueError, match="unfinished"):
        merge_shards(paths[:-1], tmp_path / "partial.jsonl")


def test_config_validation():
    with pytest.raises(ValueError, match="temperature"):
        RolloutConfig(n_boxes=4, temperature=0.0)
    with pytest.raises(ValueError, match="unknown keys"):
        RolloutConfig.from_mapping({"n_boxes": 2, "typo": 1})
    cfg = RolloutConfig.from_mapping({"n_boxes": 2, "bad_box": {"spread": 0.5}, "questions": None})
    assert cfg.bad_box.spread == 0.5 and cfg.bad_box.enabled


def test_rollout_yaml_builds_a_config():
    root = OmegaConf.create({"seed": 7, "rollout": OmegaConf.load(CONF / "rollout" / "default.yaml")})
    cfg = RolloutConfig.from_mapping(OmegaConf.to_container(root.rollout, resolve=True))
    assert (cfg.seed, cfg.n_boxes, cfg.bad_box.iou_threshold) == (7, 16, 0.05)


def test_shard_argument_checked(world, tmp_path):
    with pytest.raises(ValueError, match="shard"):
        run(world, Path(tmp_path / "x.jsonl"), shard=(2, 2))
