"""The intention-driven task and its metrics (visrl/data/synthetic.py IntentWorld, visrl/benchmarks/intent.py).

VisRL's claim is that the focus box depends on what is asked. These tests pin down:

* ``IntentWorld``: every scene holds several nameable objects, the question names one of them (varying from
  question to question), by colour or by shape; the scene file lists, per object, the question naming it;
  invalid settings fail naming the config key; the one-object worlds base preparation derives stay valid;
* the default world is unchanged: its data directory key and split bytes are those of the code before the
  ``val`` split and the intent world existed (hashes recorded from that code), and ``val`` is a fourth split;
* ``landed_on`` on hand-built boxes (IoU rule, centre rule, nowhere, unparsable);
* ``intent/swap_follow`` on a hand-built case: a fake policy that boxes the object the question names gets
  named_hit = swap_follow = 1 and swap_stay = 0; one that ignores the question (always the object of the
  recorded question) gets named_hit = 1, swap_follow = 0, swap_stay = 1; one that always boxes the first
  object gets exactly the share of swaps that happen to name the first object.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from visrl.benchmarks.intent import Referents, landed_on, load_referents
from visrl.benchmarks.synthetic import SyntheticBenchmark
from visrl.data.box_formats import GridFormat
from visrl.data.boxes import Box, from_px
from visrl.data.images import load_rgb, resolve, to_view
from visrl.data.prompts import PromptTemplates
from visrl.data.records import read_viscot
from visrl.data.synthetic import IntentWorld, SplitSizes, SyntheticDataset, WorldConfig, iter_questions

FMT = GridFormat(grid=4)
VIEW = 64
TEMPLATES = PromptTemplates(box="BOX {question}\n<image>", answer="ANSWER {question}\n<image>\n<image>")
PALETTE = ("red", "green", "blue", "yellow", "cyan")


# ------------------------------------------------------------------------------------ the world
def test_the_question_names_any_object_by_colour_and_varies() -> None:
    world = IntentWorld(colours=list(PALETTE))  # Hydra passes lists
    named = set()
    for q in iter_questions(random.Random(0), world, 300):
        assert len(world.nameable(q.scene)) == world.n_objects >= 2
        assert q.question == f"What pattern is on the {q.target.colour} object?"
        assert q.answer == q.target.pattern
        named.add(q.target.colour)
    assert named == set(PALETTE)


def test_shape_reference_names_the_object_by_shape() -> None:
    world = IntentWorld(reference="shape")
    shapes = set()
    for q in iter_questions(random.Random(1), world, 200):
        assert q.question == f"What pattern is on the {q.target.shape}?"
        assert [o.shape for o in q.scene.objects].count(q.target.shape) == 1
        shapes.add(q.target.shape)
    assert shapes == set(world.shapes)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"reference": "size"}, "reference"),
        ({"target_colours": ["red"]}, "target_colours"),
        ({"reference": "shape", "distinct_shapes": False}, "distinct_shapes"),
    ],
)
def test_invalid_intent_worlds_raise_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"data\.world\.{field}"):
        IntentWorld(**kwargs)


def test_one_object_worlds_derived_by_base_preparation_stay_valid() -> None:
    world = IntentWorld(reference="shape")
    lone = dict(colours=("red",), shapes=("square",), target_colours=(), distinct_shapes=False)
    assert dataclasses.replace(world, n_objects=1, distinct_patterns=False, **lone).n_objects == 1  # pointing
    assert dataclasses.replace(world, n_objects=1).n_objects == 1  # single-object scenes


def test_scene_files_list_the_question_naming_each_object(tmp_path: Path) -> None:
    ds = SyntheticDataset(tmp_path, world=IntentWorld(colours=list(PALETTE)), sizes=SplitSizes(2, 2, 5))
    records = read_viscot(ds.ensure()["test"])
    scenes = json.loads((ds.root / "test_scenes.json").read_text())
    for rec, scene in zip(records, scenes):
        qs = scene["questions"]
        assert qs == [f"What pattern is on the {o['colour']} object?" for o in scene["objects"]]
        assert qs[scene["target"]] == rec.question
    refs = load_referents(ds.split_path("test"))
    assert sorted(refs) == list(range(5)) and all(len(r.boxes) == 3 for r in refs.values())


# ------------------------------------------------------------------------------------ default unchanged
# Recorded with the code before IntentWorld and val: SyntheticDataset(root, world=<the default conf's world>,
# sizes=SplitSizes(sft=3, rl=2, test=4), seed=0); sha256 of each split file.
DEFAULT_KEY = "cf208127ada1"
DEFAULT_SHA = {
    "sft.json": "6888387fbd7daa4c5ceee6094ae793b430bab772ca7ca135da8fa3b3545ee2dc",
    "rl.json": "a3b9a053ebf3e43b9b18dbd22e0961fd1abf773391cecbd0a0276f49a3bbd5a3",
    "test.json": "dd3c12fdda0ab9fd875f26f2e22ce2b905d435a3a25051b077625e263a3fa99f",
    "test_scenes.json": "f55414f7343c7235a81d3506132b3a11db47bfa132fab5994e814e9c0f265fb4",
    "images/test/000003.png": "8ea61d945c84facd3138cbce308d36b6f393cd878a8f48f1e115bea5629d8699",
    "images/rl/000001.png": "c6255f95f2220b448586196ed11c3c4c4c4f19c96dfdcdad7a10b9c1dc4b32d5",
}


def default_dataset(root: Path, **sizes: int | None) -> SyntheticDataset:
    world = WorldConfig(colours=list(PALETTE), target_colours=["red"])
    return SyntheticDataset(root, world=world, sizes=SplitSizes(sft=3, rl=2, test=4, **sizes), seed=0)


def test_default_world_splits_are_unchanged_and_val_is_a_fourth_split(tmp_path: Path) -> None:
    ds = default_dataset(tmp_path)
    paths = ds.ensure()
    assert ds.root.name == DEFAULT_KEY
    for name, sha in DEFAULT_SHA.items():
        assert hashlib.sha256((ds.root / name).read_bytes()).hexdigest() == sha, name
    assert "questions" not in json.loads((ds.root / "test_scenes.json").read_text())[0]  # one nameable object
    val, test = read_viscot(paths["val"]), read_viscot(paths["test"])
    assert len(val) == len(test) == 4 and [r.split for r in val] == ["val"] * 4
    assert [r.question for r in val] != [r.question for r in test] or val[0].box_px != test[0].box_px
    assert default_dataset(tmp_path, val=7).root != ds.root  # an explicit val size is part of the key
    assert not load_referents(paths["test"])


# ------------------------------------------------------------------------------------ landing rule
@pytest.mark.parametrize(
    ("box", "expected"),
    [
        (Box(0.0, 0.0, 0.25, 0.25), 0),  # IoU(cell, object) = 0.64 > 0.5
        (Box(0.0, 0.0, 0.4, 0.4), 0),  # IoU 0.25, but the centre (0.2, 0.2) lies inside object 0
        (Box(0.3, 0.3, 0.7, 0.7), 1),  # centre (0.5, 0.5) inside object 1
        (Box(0.0, 0.6, 0.2, 1.0), None),  # overlaps nothing
        (None, None),  # unparsable
    ],
)
def test_landed_on(box: Box | None, expected: int | None) -> None:
    objects = [from_px((4, 4, 55, 55), (256, 256)), from_px((100, 100, 151, 151), (256, 256))]
    assert landed_on(box, objects) == expected


def test_swap_names_another_nameable_object_deterministically() -> None:
    ref = Referents((Box(0, 0, 1, 1),) * 3, ("a", None, "c"), target=0)
    assert {ref.swap(f"u{i}") for i in range(20)} == {2}
    ref = Referents((Box(0, 0, 1, 1),) * 3, ("a", "b", "c"), target=1)
    picks = [ref.swap(f"u{i}") for i in range(40)]
    assert set(picks) == {0, 2} and picks == [ref.swap(f"u{i}") for i in range(40)]


# ------------------------------------------------------------------------------------ swap_follow
class ScenePolicy:
    """Writes the grid box of an object chosen by ``pick(scene, question)``; answers "x"."""

    def __init__(self, views: dict[bytes, dict], pick):
        self.backbone = SimpleNamespace(box_format=FMT, image_size=VIEW)
        self.views, self.pick = views, pick

    def generate(self, prompts, max_new_tokens: int, **_) -> list[list[str]]:
        out = []
        for (turn,) in prompts:
            kind, question = turn.text.split("\n")[0].split(" ", 1)
            if kind != "BOX":
                out.append(["x"])
                continue
            scene = self.views[turn.images[0].tobytes()]
            obj = scene["objects"][self.pick(scene, question)]
            out.append([FMT.format(from_px(tuple(obj["box_px"]), (256, 256)), (256, 256))])
        return out


@pytest.fixture
def intent_split(tmp_path: Path) -> tuple[Path, dict[bytes, dict]]:
    ds = SyntheticDataset(tmp_path, world=IntentWorld(colours=list(PALETTE)), sizes=SplitSizes(2, 2, 12))
    path = ds.ensure()["test"]
    scenes = json.loads((ds.root / "test_scenes.json").read_text())
    views = {
        to_view(load_rgb(resolve(ds.image_root, r.image_path)), VIEW).tobytes(): s
        for r, s in zip(read_viscot(path), scenes)
    }
    return path, views


POLICIES = {
    "follows": lambda scene, q: scene["questions"].index(q),
    "ignores": lambda scene, q: scene["target"],
    "first": lambda scene, q: 0,
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_swap_follow_on_a_hand_built_case(intent_split, name: str, tmp_path: Path) -> None:
    path, views = intent_split
    metrics = SyntheticBenchmark(path, modes=["cot_pred"]).evaluate(
        ScenePolicy(views, POLICIES[name]), TEMPLATES, tmp_path / "eval"
    )
    rows = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    swaps = [r for r in rows if r["mode"] == "swap"]
    assert metrics["intent/n"] == len(swaps) == 12
    assert all(r["swapped"] != r["named"] for r in swaps)
    if name == "follows":
        expected = (1.0, 1.0, 0.0)
    elif name == "ignores":
        expected = (1.0, 0.0, 1.0)
    else:  # hits the named / swapped object exactly when it is object 0
        expected = tuple(sum(r[k] == 0 for r in swaps) / 12 for k in ("named", "swapped", "named"))
        assert expected[1] < 0.5
    got = tuple(metrics[f"intent/{k}"] for k in ("named_hit", "swap_follow", "swap_stay"))
    assert got == pytest.approx(expected)


def test_paired_effect_reports_swap_follow(intent_split, tmp_path: Path) -> None:
    path, views = intent_split
    bench = SyntheticBenchmark(path, modes=["cot_pred"])
    bench.evaluate(ScenePolicy(views, POLICIES["ignores"]), TEMPLATES, tmp_path / "before")
    bench.evaluate(ScenePolicy(views, POLICIES["follows"]), TEMPLATES, tmp_path / "after")
    effect = bench.paired_effect(tmp_path / "before", tmp_path / "after")
    assert effect["intent/swap_follow"]["diff"] == pytest.approx(1.0)
    assert effect["intent/named_hit"]["diff"] == pytest.approx(0.0)
    assert {"cot_pred/accuracy", "cot_pred/det_acc"} <= set(effect)


def test_worlds_with_one_nameable_object_get_no_intent_keys(tmp_path: Path) -> None:
    ds = default_dataset(tmp_path)
    path = ds.ensure()["test"]
    scenes = json.loads((ds.root / "test_scenes.json").read_text())
    views = {
        to_view(load_rgb(resolve(ds.image_root, r.image_path)), VIEW).tobytes(): s
        for r, s in zip(read_viscot(path), scenes)
    }
    bench = SyntheticBenchmark(path, modes=["cot_pred"])
    metrics = bench.evaluate(ScenePolicy(views, POLICIES["ignores"]), TEMPLATES, tmp_path / "eval")
    assert not any(k.startswith("intent/") for k in metrics)
    assert metrics["cot_pred/det_acc"] == 1.0
    effect = bench.paired_effect(tmp_path / "eval", tmp_path / "eval")
    assert not any(k.startswith("intent/") for k in effect)


def test_the_split_label_must_match_the_split_file(tmp_path: Path) -> None:
    assert SyntheticBenchmark(tmp_path / "val.json", split="val").split == "val"
    with pytest.raises(ValueError, match=r"benchmark\.split='val' but benchmark\.split_path is test\.json"):
        SyntheticBenchmark(tmp_path / "test.json", split="val")
