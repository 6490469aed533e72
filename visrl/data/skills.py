"""Base-skill data for tiny backbones: what a pretrained LMM would bring to the synthetic world.

VisRL starts from a pretrained multimodal model (Qwen2-VL-7B, LLaVA-1.5-7B). Weights cannot be downloaded
here, so the tiny default backbone is first taught *generic* skills of the synthetic world, never the
intention -> region pairs that VisRL avoids annotating:

* ``point``: "Where is the object?" + a view holding one lone object of constant look -> its box (reading the
  attended token's position: learnable in minutes because the object's key is constant);
* ``read`` (reading a clear view, like OCR pretraining): a close-up of one object + the question about it ->
  the pattern, with the ``direct`` template (also the prompt of the likelihood crop scorer);
* ``locate`` ("Where is the circle?" among several objects) and ``colour`` ("What colour is the object in
  [1, 2, 2, 3]?"): referring grounding and region description, phrased differently from the task's question.
  Off in the default recipe (its base budget is too small for them); the intent preset trains both, on
  12,000 scenes x 8 epochs (docs/toy-scale-status.md).

The default task's questions ask for the red object among distractors ("What pattern is on the red object?
Please provide the bounding box ..."); the intent task's name any object by colour. Either way the prompt is
one the base never saw, so the SFT warm-up starts from a model that can point (or ground by shape) and read,
and has to learn from a few annotated examples which region a question needs: partial boxes, the room VisRL's
self-evolution closes.
:mod:`visrl.training.base_prep` trains on these rows (cached by configuration) and
:mod:`visrl.benchmarks.skills` measures the skills. Real backbones skip this stage.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

from visrl.data.box_formats import BoxFormat
from visrl.data.images import crop_view, to_view
from visrl.data.prompts import Prompt, PromptTemplates, user
from visrl.data.rows import Row
from visrl.data.synthetic import Scene, SceneObject, WorldConfig, render_scene, sample_scene

__all__ = ["BaseSkills", "base_rows", "box_text", "point_world"]


@dataclass(frozen=True)
class BaseSkills:
    """Which generic skills, on how many scenes, and the prompts that ask for them."""

    n_scenes: int = 4000
    locate: int = 1  # rows per scene of each skill
    colour: int = 1
    read: int = 1
    single_object: float = 0.0  # share of scenes with one object: "where" is learnable before "which"
    point: int = 0  # rows per scene of pointing at a lone object of constant look (see base_rows)
    point_prompt: str = "Where is the object?\n<image>"
    point_look: tuple[str, str] = ("red", "square")  # colour, shape of the pointing object
    locate_prompt: str = "Where is the {shape}?\n<image>"
    colour_prompt: str = "What colour is the object in {box}?\n<image>"
    seed: int = 1234


def base_rows(world: WorldConfig, skills: BaseSkills, backbone: Any, templates: PromptTemplates) -> list[Row]:
    """Encode the base-skill rows (deterministic from ``skills.seed``)."""
    rng = random.Random(skills.seed)
    enc, fmt, size = backbone.encoder, backbone.box_format, backbone.image_size
    rows: list[Row] = []

    def add(prompt: Prompt, completion: str, step: str, i: int) -> None:
        rows.append(Row(enc.encode_prompt(prompt), (enc.encode_completion(completion),), step, f"base:{i}"))

    single = dataclasses.replace(world, n_objects=1)
    marker = point_world(world, skills)
    for i in range(skills.n_scenes):
        scene = sample_scene(rng, single if rng.random() < skills.single_object else world)
        image = render_scene(scene, world, seed=rng.randrange(2**31))
        full = to_view(image, size)
        for _ in range(skills.point):
            # a lone object that always looks the same: its key is constant, so learning to read the attended
            # token's position has a first-order gradient (the 2-hop "which + where" circuit does not)
            lone = sample_scene(rng, marker)
            view = to_view(render_scene(lone, world, seed=rng.randrange(2**31)), size)
            add([user(skills.point_prompt, [view])], box_text(lone, lone.objects[0], fmt), "point", i)
        for _ in range(skills.locate):
            obj = rng.choice(scene.objects)
            add(
                [user(skills.locate_prompt, [full], shape=obj.shape, colour=obj.colour)],
                box_text(scene, obj, fmt),
                "locate",
                i,
            )
        for _ in range(skills.colour):
            obj = rng.choice(scene.objects)
            add([user(skills.colour_prompt, [full], box=box_text(scene, obj, fmt))], obj.colour, "colour", i)
        for _ in range(skills.read):
            obj = rng.choice(scene.objects)
            written = fmt.parse(box_text(scene, obj, fmt), image.size)
            crop = crop_view(image, written.box if written.ok else scene.box(obj), size)
            question = world.question.format(colour=obj.colour)
            add(templates.direct_prompt(question, crop), obj.pattern, "read", i)
    return rows


def point_world(world: WorldConfig, skills: BaseSkills) -> WorldConfig:
    """The world of the pointing skill: one object of colour and shape ``skills.point_look``."""
    colour, shape = skills.point_look
    return dataclasses.replace(
        world,
        n_objects=1,
        colours=(colour,),
        shapes=(shape,),
        target_colours=(),
        distinct_shapes=False,
        distinct_patterns=False,
    )


def box_text(scene: Scene, obj: SceneObject, box_format: BoxFormat) -> str:
    """The box of ``obj`` in ``scene`` written in ``box_format``."""
    return box_format.format(scene.box(obj), (scene.size, scene.size))
