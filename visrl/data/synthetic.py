"""The synthetic zoom world: the embedded default task, a problem that truly needs a focus box.

Why it needs zoom (VisRL §1: intention-driven perception): each scene is a ``scene_size`` px square holding
a few coloured shapes, one per cell of a ``grid`` x ``grid`` layout, and each shape carries a black-and-white
*texture patch* (horizontal / vertical / diagonal stripes or a checkerboard, period 4 px). The model's global
view is the scene box-filtered down to ``view_size`` px: at the default 4x reduction every texture averages
to exactly the same grey (4-px-aligned patches, 2-px stripes), so the answer is *provably* absent from the
full image; a crop of the right cell, shown at ``view_size`` px, shows the stripes at 1:1. Questions name an
object by colour ("What pattern is on the red object?"), so answering needs the model to find the object first.
``target_colours`` restricts the referent to a few colours (the default asks for the red object, with
distractors of the other colours): a tiny model learns to find a constant key but, in the CPU budget, not to
match a varying one (docs/toy-scale-status.md).

:class:`IntentWorld` is the task where *the question picks the object* (VisRL's intention-driven claim):
``target_colours`` is empty, so every object of a scene may be named and each question names one of them,
by colour (``reference: colour``) or, harder, by shape (``reference: shape``). A scene whose objects a
question can tell apart writes, per object, the question that names it (``questions`` in
``<split>_scenes.json``): the benchmark's swap check re-asks the same image about another object.

Splits are written in the Visual-CoT record format (``visrl.data.records``): PNG images on disk plus one JSON
list per split, so the same loaders serve real and synthetic data. ``sft`` is the small box-annotated set,
``rl`` the large pool whose boxes are never read by training code, ``val`` for every design and tuning
choice, ``test`` held out with boxes for the reported numbers (never used to choose anything). Split ``i``
of (sft, rl, test, val) is drawn with seed ``1000 * seed + i``, so adding ``val`` left the others unchanged.
Everything is deterministic from the seed.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from visrl.data.boxes import Box, from_px

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 50, 170),
    "orange": (240, 130, 20),
    "cyan": (30, 190, 200),
    "pink": (240, 120, 180),
}
SHAPES = ("circle", "square", "triangle", "diamond")
PATTERNS = ("horizontal", "vertical", "diagonal", "checkered")


@dataclass(frozen=True)
class WorldConfig:
    """Size and difficulty of the synthetic world (all Hydra values under ``data.world``)."""

    scene_size: int = 256
    grid: int = 4
    n_objects: int = 3
    object_frac: float = 0.8  # object side / cell side (0.8 -> IoU(cell, object) = 0.64 > 0.5)
    patch_frac: float = 0.5  # texture side / cell side, rounded down to a multiple of 4 px
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    patterns: tuple[str, ...] = PATTERNS
    distinct_patterns: bool = True  # a wrong crop never shows the right answer: no lucky-guess rewards
    distinct_shapes: bool = True  # "the circle" names one object (base-model grounding by shape)
    background: int = 200
    question: str = "What pattern is on the {colour} object?"
    # colours a question may ask about; () = any. With e.g. ("red",) every scene holds exactly one red object
    # (the referent) among distractors of other colours: finding it is a one-hop lookup of a constant key.
    target_colours: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("colours", "shapes", "patterns", "target_colours"):  # Hydra passes lists (ListConfig)
            object.__setattr__(self, name, tuple(getattr(self, name)))
        cell = self.scene_size // self.grid
        if self.scene_size % (4 * self.grid):
            raise ValueError(f"data.world.scene_size={self.scene_size} must be a multiple of 4*grid")
        if self.n_objects > min(len(self.colours), self.grid * self.grid):
            raise ValueError(f"data.world.n_objects={self.n_objects} exceeds colours or cells")
        if self.distinct_patterns and self.n_objects > len(self.patterns):
            raise ValueError("data.world.distinct_patterns needs n_objects <= number of patterns")
        if self.distinct_shapes and self.n_objects > len(self.shapes):
            raise ValueError("data.world.distinct_shapes needs n_objects <= number of shapes")
        unknown = sorted(set(self.target_colours) - set(self.colours))
        if unknown:
            raise ValueError(f"data.world.target_colours: {unknown} are not among data.world.colours")
        if self.target_colours and self.n_objects - 1 > len(set(self.colours) - set(self.target_colours)):
            raise ValueError("data.world.target_colours leaves fewer distractor colours than n_objects - 1")
        if int(cell * self.patch_frac) < 8:
            raise ValueError(f"data.world.patch_frac={self.patch_frac} gives a texture under 8 px")

    def ask(self, obj: SceneObject) -> str:
        """The question that names ``obj`` (by colour)."""
        return self.question.format(colour=obj.colour)

    def nameable(self, scene: Scene) -> tuple[SceneObject, ...]:
        """The objects a question may name: those of a target colour (all when ``target_colours`` is empty)."""
        return tuple(o for o in scene.objects if o.colour in self.target_colours) or scene.objects


REFERENCES = ("colour", "shape")


@dataclass(frozen=True)
class IntentWorld(WorldConfig):
    """The world where the question picks the object: any object may be named, by ``reference``.

    ``reference: colour`` asks "What pattern is on the green object?" (colours are distinct in a scene);
    ``reference: shape`` asks ``shape_question`` ("What pattern is on the circle?"), which needs
    ``distinct_shapes``. The one-object worlds that base preparation derives from it stay valid.
    """

    reference: str = "colour"
    shape_question: str = "What pattern is on the {shape}?"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reference not in REFERENCES:
            raise ValueError(f"data.world.reference={self.reference!r}; valid: {list(REFERENCES)}")
        if self.n_objects > 1 and self.target_colours:
            raise ValueError(
                "data.world.target_colours must be empty in an IntentWorld (any object is named)"
            )
        if self.n_objects > 1 and self.reference == "shape" and not self.distinct_shapes:
            raise ValueError("data.world.distinct_shapes must be true when data.world.reference=shape")

    def ask(self, obj: SceneObject) -> str:
        if self.reference == "shape":
            return self.shape_question.format(shape=obj.shape, colour=obj.colour)
        return super().ask(obj)

    def nameable(self, scene: Scene) -> tuple[SceneObject, ...]:
        """Every object whose ``reference`` attribute no other object of the scene shares."""
        values = [getattr(o, self.reference) for o in scene.objects]
        return tuple(o for o, v in zip(scene.objects, values) if values.count(v) == 1) or scene.objects


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    pattern: str
    cell: tuple[int, int]  # (column, row)
    box_px: tuple[int, int, int, int]  # tight xyxy in scene pixels


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    size: int

    def box(self, obj: SceneObject) -> Box:
        return from_px(obj.box_px, (self.size, self.size))

    def to_json(self) -> dict:
        return {"size": self.size, "objects": [asdict(o) for o in self.objects]}


def sample_scene(rng: random.Random, cfg: WorldConfig) -> Scene:
    """Draw a scene: distinct cells and colours, jittered inside their cells."""
    cell = cfg.scene_size // cfg.grid
    side = int(round(cell * cfg.object_frac))
    cells = rng.sample([(c, r) for r in range(cfg.grid) for c in range(cfg.grid)], cfg.n_objects)
    if cfg.target_colours:  # one referent colour, distractors from the rest
        others = [c for c in cfg.colours if c not in cfg.target_colours]
        colours = [rng.choice(list(cfg.target_colours))] + rng.sample(others, cfg.n_objects - 1)
    else:
        colours = rng.sample(list(cfg.colours), cfg.n_objects)
    if cfg.distinct_patterns:
        patterns = rng.sample(list(cfg.patterns), cfg.n_objects)
    else:
        patterns = [rng.choice(cfg.patterns) for _ in range(cfg.n_objects)]
    if cfg.distinct_shapes:
        shapes = rng.sample(list(cfg.shapes), cfg.n_objects)
    else:
        shapes = [rng.choice(cfg.shapes) for _ in range(cfg.n_objects)]
    objects = []
    for (c, r), colour, pattern, shape in zip(cells, colours, patterns, shapes):
        # jitter on a 4 px lattice keeps the texture aligned with the 4x box filter of the global view
        slack = (cell - side) // 4
        x1 = c * cell + 4 * rng.randint(0, slack)
        y1 = r * cell + 4 * rng.randint(0, slack)
        objects.append(SceneObject(colour, shape, pattern, (c, r), (x1, y1, x1 + side, y1 + side)))
    return Scene(tuple(objects), cfg.scene_size)


def texture(pattern: str, side: int, phase: int) -> np.ndarray:
    """A ``side`` x ``side`` uint8 texture (0 black, 255 white), stripes 2 px wide, period 4 px."""
    y, x = np.mgrid[0:side, 0:side]
    masks = {
        "horizontal": ((y + phase) // 2) % 2,
        "vertical": ((x + phase) // 2) % 2,
        "diagonal": ((x + y + phase) // 2) % 2,
        "checkered": (x // 2 + y // 2 + phase // 2) % 2,
    }
    if pattern not in masks:
        raise ValueError(f"unknown pattern {pattern!r}; valid: {sorted(masks)}")
    return (masks[pattern] * 255).astype(np.uint8)


def render_scene(scene: Scene, cfg: WorldConfig, seed: int = 0) -> Image.Image:
    """Render a scene to an RGB image of ``scene_size`` px."""
    img = Image.new("RGB", (scene.size, scene.size), (cfg.background,) * 3)
    draw = ImageDraw.Draw(img)
    rng = random.Random(seed)
    cell = cfg.scene_size // cfg.grid
    patch = (int(cell * cfg.patch_frac) // 4) * 4
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box_px
        rgb = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=rgb)
        elif obj.shape == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=rgb)
        elif obj.shape == "triangle":
            draw.polygon([((x1 + x2) // 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=rgb)
        elif obj.shape == "diamond":
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
            draw.polygon([(cx, y1), (x2 - 1, cy), (cx, y2 - 1), (x1, cy)], fill=rgb)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
        # the texture patch sits at the object's centre, on the 4 px lattice
        px = x1 + ((x2 - x1 - patch) // 2 // 4) * 4
        py = y1 + ((y2 - y1 - patch) // 2 // 4) * 4
        tex = texture(obj.pattern, patch, phase=rng.randrange(4))
        img.paste(Image.fromarray(tex).convert("RGB"), (px, py))
    return img


def global_view(image: Image.Image, size: int) -> Image.Image:
    """The model's view of an image: box-filtered to ``size`` px square (exact area average)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.BOX)


@dataclass(frozen=True)
class Question:
    scene: Scene
    target: SceneObject
    question: str
    answer: str

    @property
    def box(self) -> Box:
        return self.scene.box(self.target)


def make_question(scene: Scene, rng: random.Random, cfg: WorldConfig) -> Question:
    target = rng.choice(cfg.nameable(scene))
    return Question(scene, target, cfg.ask(target), target.pattern)


def scene_row(question_id: int, q: Question, cfg: WorldConfig) -> dict:
    """The ``<split>_scenes.json`` row of a question; with ``questions`` (per object, the question naming it,
    None for one no question names) when the scene holds more than one nameable object."""
    row = {"question_id": question_id, **q.scene.to_json(), "target": q.scene.objects.index(q.target)}
    named = cfg.nameable(q.scene)
    if len(named) > 1:
        row["questions"] = [cfg.ask(o) if o in named else None for o in q.scene.objects]
    return row


@dataclass(frozen=True)
class SplitSizes:
    sft: int = 256
    rl: int = 2048
    test: int = 384
    val: int | None = None  # None: as many as ``test``

    def count(self, split: str) -> int:
        n = getattr(self, split)
        return self.test if n is None else n


SPLITS = ("sft", "rl", "test", "val")  # the index is the split's seed offset: never reorder


@dataclass
class SyntheticDataset:
    """Writes (once) and indexes the synthetic splits under ``root/<config hash>``.

    A different world, sizes or seed gets its own directory, so cached splits are never stale.
    """

    root: Path
    world: WorldConfig = field(default_factory=WorldConfig)
    sizes: SplitSizes = field(default_factory=SplitSizes)
    seed: int = 0

    def __post_init__(self) -> None:
        sizes = asdict(self.sizes)
        if sizes["val"] is None:  # val = test size: the key (and the cached dir) stays what it was before val
            del sizes["val"]
        self.meta = {"world": asdict(self.world), "sizes": sizes, "seed": self.seed, "version": 1}
        key = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[:12]
        self.root = Path(self.root) / key

    @property
    def image_root(self) -> Path:
        return self.root

    def split_path(self, split: str) -> Path:
        return self.root / f"{split}.json"

    def ensure(self) -> dict[str, Path]:
        """Write every split that is missing; return split name -> JSON path."""
        self.root.mkdir(parents=True, exist_ok=True)
        for split_idx, split in enumerate(SPLITS):
            if not self.split_path(split).exists():
                self._write_split(split, self.sizes.count(split), self.seed * 1000 + split_idx)
        meta, world = json.dumps(self.meta, indent=2), self.root / "world.json"
        if not world.exists() or world.read_text() != meta:  # a second process (DDP rank) only reads
            world.write_text(meta)
        return {s: self.split_path(s) for s in SPLITS}

    def _write_split(self, split: str, n: int, seed: int) -> None:
        from visrl.data.records import make_viscot_record, write_viscot

        rng = random.Random(seed)
        img_dir = self.root / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        records, scenes = [], []
        size = (self.world.scene_size, self.world.scene_size)
        for i, q in enumerate(iter_questions(rng, self.world, n)):
            rel = f"images/{split}/{i:06d}.png"
            render_scene(q.scene, self.world, seed=rng.randrange(2**31)).save(self.root / rel)
            records.append(
                make_viscot_record(
                    dataset="synthetic",
                    split=split,
                    question_id=i,
                    image_path=rel,
                    box_px=q.target.box_px,
                    size=size,
                    question=q.question,
                    answer=q.answer,
                )
            )
            scenes.append(scene_row(i, q, self.world))
        (self.root / f"{split}_scenes.json").write_text(json.dumps(scenes))
        tmp = self.split_path(split).with_suffix(".tmp")
        write_viscot(records, tmp)
        tmp.replace(self.split_path(split))  # atomic: a split file exists only when complete


def iter_questions(rng: random.Random, cfg: WorldConfig, n: int) -> Iterator[Question]:
    for _ in range(n):
        scene = sample_scene(rng, cfg)
        yield make_question(scene, rng, cfg)
