"""The synthetic zoom world (visrl/data/synthetic.py): the default task must truly need a focus box (VisRL §1).

Covers the claims the world's design rests on:

* the texture patch is invisible in the model's global view: for every pattern and phase, the 256 -> 64 px
  box-filtered view is the same image, with one flat grey over the patch area; a crop of the object's cell
  shown at the same 64 px tells the patterns apart;
* splits are deterministic from the seed, written as Visual-CoT records (``read_viscot`` reads them back) whose
  ``###`` box is the target object's box in the scene file, and live under a directory keyed by the config;
* scenes have distinct cells / colours / patterns / shapes (so "the red object" and "the circle" name one
  object and a wrong crop never shows the right answer);
* invalid world configs fail at construction with an error naming the field.

The patch area is found from the pixels (black / white appear nowhere else), not from the renderer's formula.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from visrl.data.images import crop_view, load_rgb, resolve, to_view
from visrl.data.records import read_viscot
from visrl.data.synthetic import (
    COLOURS,
    PATTERNS,
    Scene,
    SplitSizes,
    SyntheticDataset,
    WorldConfig,
    global_view,
    iter_questions,
    render_scene,
    sample_scene,
    texture,
)

torch.set_num_threads(1)
VIEW = 64  # the tiny backbones' image_size: a 4x reduction of the default 256 px scene
SIZES = SplitSizes(sft=3, rl=2, test=4)


def with_pattern(scene: Scene, pattern: str) -> Scene:
    """The same scene with every object wearing ``pattern`` (cells, colours, shapes, jitter unchanged)."""
    return dataclasses.replace(
        scene, objects=tuple(dataclasses.replace(o, pattern=pattern) for o in scene.objects)
    )


def patch_area(image: np.ndarray, box_px: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Bounding box (x1, y1, x2, y2, exclusive) of the black/white texture pixels inside ``box_px``."""
    x1, y1, x2, y2 = box_px
    region = image[y1:y2, x1:x2]  # [h, w, 3]
    bw = np.all(region == 0, axis=-1) | np.all(region == 255, axis=-1)  # [h, w]
    ys, xs = np.nonzero(bw)
    assert len(xs), f"no texture pixels inside object box {box_px}"
    return x1 + int(xs.min()), y1 + int(ys.min()), x1 + int(xs.max()) + 1, y1 + int(ys.max()) + 1


# ------------------------------------------------------------------------------------ zoom is needed
def test_texture_is_invisible_in_the_global_view_and_visible_in_a_cell_crop() -> None:
    world = WorldConfig()
    assert world.scene_size // VIEW == 4
    rng = random.Random(0)
    for trial in range(6):
        scene = sample_scene(rng, world)
        views, crops = [], []
        for pattern in PATTERNS:
            patterned = with_pattern(scene, pattern)
            image = render_scene(patterned, world, seed=trial)  # the seed draws each patch's phase
            pixels = np.asarray(image)  # [256, 256, 3]
            view = np.asarray(global_view(image, VIEW))  # [64, 64, 3]
            assert np.array_equal(view, np.asarray(to_view(image, VIEW)))  # the policy's view is this one
            for obj in patterned.objects:
                px1, py1, px2, py2 = patch_area(pixels, obj.box_px)
                assert (px1 % 4, py1 % 4, px2 % 4, py2 % 4) == (0, 0, 0, 0), "patch off the 4 px lattice"
                patch_view = view[py1 // 4 : py2 // 4, px1 // 4 : px2 // 4]  # [h/4, w/4, 3]
                assert len(np.unique(patch_view)) == 1, f"{pattern} leaves structure in the global view"
            views.append(view)
            crops.append(np.asarray(crop_view(image, patterned.box(patterned.objects[0]), VIEW)))
        for pattern, view in zip(PATTERNS, views):
            assert np.array_equal(view, views[0]), f"{pattern} vs {PATTERNS[0]}: global views differ"
        assert len({c.tobytes() for c in crops}) == len(PATTERNS), "a cell crop does not show the pattern"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_pattern_and_phase_averages_to_the_same_grey(pattern: str) -> None:
    for phase in range(4):
        tex = texture(pattern, 32, phase)  # [32, 32] uint8 in {0, 255}
        assert set(np.unique(tex)) == {0, 255}
        blocks = tex.reshape(8, 4, 8, 4).mean(axis=(1, 3))  # [8, 8] exact 4x4 means
        assert np.all(blocks == 127.5), f"{pattern} phase {phase}: a 4x4 block is not half white"
    with pytest.raises(ValueError, match="unknown pattern 'zigzag'"):
        texture("zigzag", 32, 0)


# ------------------------------------------------------------------------------------ scenes
def test_scenes_have_distinct_cells_colours_patterns_and_shapes() -> None:
    world = WorldConfig()
    cell = world.scene_size // world.grid
    rng = random.Random(1)
    for _ in range(200):
        scene = sample_scene(rng, world)
        objs = scene.objects
        assert len(objs) == world.n_objects
        for attr in ("cell", "colour", "pattern", "shape"):
            values = [getattr(o, attr) for o in objs]
            assert len(set(values)) == len(values), f"repeated {attr} in {scene}"
        for o in objs:
            c, r = o.cell
            x1, y1, x2, y2 = o.box_px
            assert c * cell <= x1 < x2 <= (c + 1) * cell and r * cell <= y1 < y2 <= (r + 1) * cell
            assert x1 % 4 == 0 and y1 % 4 == 0  # jitter on the 4 px lattice of the box filter


def test_patterns_and_shapes_may_repeat_when_not_distinct() -> None:
    world = WorldConfig(n_objects=6, distinct_patterns=False, distinct_shapes=False)
    scene = sample_scene(random.Random(0), world)
    # six objects, four patterns / shapes: pigeonhole says both repeat; colours and cells never do
    assert len({o.pattern for o in scene.objects}) < 6 and len({o.shape for o in scene.objects}) < 6
    assert len({o.colour for o in scene.objects}) == len({o.cell for o in scene.objects}) == 6


def test_target_colours_give_one_referent_among_other_colours() -> None:
    world = WorldConfig(
        colours=["red", "green", "blue", "yellow", "cyan"], target_colours=["red"]
    )  # Hydra lists
    assert world.colours == ("red", "green", "blue", "yellow", "cyan") and world.target_colours == ("red",)
    rng = random.Random(2)
    distractors = set()
    for q in iter_questions(rng, world, 200):
        assert q.target.colour == "red" and q.question == "What pattern is on the red object?"
        assert [o.colour for o in q.scene.objects].count("red") == 1
        distractors |= {o.colour for o in q.scene.objects} - {"red"}
    assert distractors == {"green", "blue", "yellow", "cyan"}


def test_without_target_colours_any_object_is_asked_about() -> None:
    colours = {q.target.colour for q in iter_questions(random.Random(0), WorldConfig(), 200)}
    assert colours == set(WorldConfig().colours)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target_colours": ("red", "mauve")}, "target_colours"),
        ({"colours": ("red", "green", "blue"), "target_colours": ("red", "green")}, "target_colours"),
        ({"scene_size": 250}, "scene_size"),
        ({"n_objects": 9, "distinct_patterns": False, "distinct_shapes": False}, "n_objects"),
        ({"grid": 2, "n_objects": 5, "distinct_patterns": False, "distinct_shapes": False}, "n_objects"),
        ({"n_objects": 5}, "distinct_patterns"),
        ({"n_objects": 5, "distinct_patterns": False}, "distinct_shapes"),
        ({"patch_frac": 0.1}, "patch_frac"),
    ],
)
def test_invalid_world_configs_raise_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"data\.world\.{field}"):
        WorldConfig(**kwargs)


# ------------------------------------------------------------------------------------ splits on disk
def split_files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_splits_are_deterministic_from_the_seed(tmp_path: Path) -> None:
    a = SyntheticDataset(tmp_path / "a", sizes=SIZES, seed=3)
    b = SyntheticDataset(tmp_path / "b", sizes=SIZES, seed=3)
    c = SyntheticDataset(tmp_path / "c", sizes=SIZES, seed=4)
    for ds in (a, b, c):
        ds.ensure()
    assert a.root.name == b.root.name != c.root.name  # the directory key is the config, not the location
    files_a, files_b, files_c = split_files(a.root), split_files(b.root), split_files(c.root)
    assert any(name.endswith(".png") for name in files_a)
    assert files_a == files_b  # JSON and PNG bytes identical
    assert files_a["test.json"] != files_c["test.json"]
    assert files_a["images/test/000000.png"] != files_c["images/test/000000.png"]


def test_splits_are_viscot_records_whose_boxes_are_the_target_objects(tmp_path: Path) -> None:
    world = WorldConfig()
    ds = SyntheticDataset(tmp_path, world=world, sizes=SIZES, seed=0)
    paths = ds.ensure()
    assert set(paths) == {"sft", "rl", "test", "val"}
    meta = json.loads((ds.root / "world.json").read_text())
    assert meta["world"]["scene_size"] == world.scene_size and meta["seed"] == 0
    for split, path in paths.items():
        records = read_viscot(path)
        scenes = json.loads((ds.root / f"{split}_scenes.json").read_text())
        assert len(records) == len(scenes) == SIZES.count(split)
        for i, (rec, scene) in enumerate(zip(records, scenes)):
            target = scene["objects"][scene["target"]]
            where = f"{split} record {i}"
            assert (rec.dataset, rec.split, rec.question_id, scene["question_id"]) == (
                "synthetic",
                split,
                i,
                i,
            )
            assert rec.box_px == tuple(target["box_px"]), where
            assert rec.question == world.question.format(colour=target["colour"]), where
            assert rec.answer == target["pattern"], where
            pixels = np.asarray(load_rgb(resolve(ds.image_root, rec.image_path)))  # [S, S, 3]
            assert pixels.shape == (world.scene_size, world.scene_size, 3), where
            x1, y1, x2, y2 = rec.box_px
            inside = pixels[y1:y2, x1:x2].reshape(-1, 3)
            assert np.all(inside == COLOURS[target["colour"]], axis=-1).any(), f"{where}: colour not in box"


def test_ensure_writes_once_and_a_changed_config_gets_its_own_directory(tmp_path: Path) -> None:
    base = SyntheticDataset(tmp_path, sizes=SIZES)
    base.ensure()
    stamp = {p: p.stat().st_mtime_ns for p in base.root.rglob("*.png")}
    base.ensure()  # cached: nothing rewritten
    assert stamp == {p: p.stat().st_mtime_ns for p in base.root.rglob("*.png")}
    variants = [
        SyntheticDataset(tmp_path, world=WorldConfig(n_objects=2), sizes=SIZES),
        SyntheticDataset(tmp_path, world=WorldConfig(patch_frac=0.25), sizes=SIZES),
        SyntheticDataset(tmp_path, sizes=SplitSizes(sft=3, rl=2, test=5)),
        SyntheticDataset(tmp_path, sizes=SIZES, seed=1),
    ]
    roots = {base.root, *(v.root for v in variants)}
    assert len(roots) == 5 and all(r.parent == tmp_path for r in roots)
    assert SyntheticDataset(tmp_path, world=WorldConfig(), sizes=SIZES).root == base.root
    two = variants[0]
    two.ensure()
    scenes = json.loads((two.root / "test_scenes.json").read_text())
    assert {len(s["objects"]) for s in scenes} == {2}  # the variant's own world, not the cached default
