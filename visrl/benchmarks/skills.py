"""Greedy accuracy of the base skills (point, locate, colour, read) on fresh synthetic scenes.

The tiny backbone's base preparation (:mod:`visrl.training.base_prep`) teaches generic skills of the
synthetic world (:mod:`visrl.data.skills`); this measures each one by exact text match, so a run records
what its starting model can do before the SFT warm-up (``base/<skill>`` metrics).
"""

from __future__ import annotations

import random

from visrl.data.box_formats import BoxFormat
from visrl.data.images import crop_view, to_view
from visrl.data.prompts import PromptTemplates, user
from visrl.data.skills import BaseSkills, box_text, point_world
from visrl.data.synthetic import WorldConfig, render_scene, sample_scene
from visrl.models.protocols import Policy

__all__ = ["evaluate_base"]


def evaluate_base(
    policy: Policy,
    world: WorldConfig,
    skills: BaseSkills,
    templates: PromptTemplates,
    n: int = 128,
    seed: int = 999,
) -> dict[str, float]:
    """Greedy accuracy of each base skill on ``n`` fresh scenes (exact text match), e.g. ``base/locate``."""
    rng = random.Random(seed)
    fmt: BoxFormat = policy.backbone.box_format
    size = policy.backbone.image_size
    prompts: dict[str, list] = {"point": [], "locate": [], "colour": [], "read": []}
    golds: dict[str, list[str]] = {k: [] for k in prompts}
    marker = point_world(world, skills)
    for _ in range(n):
        lone = sample_scene(rng, marker)
        view = to_view(render_scene(lone, world, seed=rng.randrange(2**31)), size)
        prompts["point"].append([user(skills.point_prompt, [view])])
        golds["point"].append(box_text(lone, lone.objects[0], fmt))
        scene = sample_scene(rng, world)
        image = render_scene(scene, world, seed=rng.randrange(2**31))
        full = to_view(image, size)
        obj = rng.choice(scene.objects)
        prompts["locate"].append([user(skills.locate_prompt, [full], shape=obj.shape, colour=obj.colour)])
        golds["locate"].append(box_text(scene, obj, fmt))
        prompts["colour"].append([user(skills.colour_prompt, [full], box=box_text(scene, obj, fmt))])
        golds["colour"].append(obj.colour)
        written = fmt.parse(box_text(scene, obj, fmt), image.size)
        crop = crop_view(image, written.box if written.ok else scene.box(obj), size)
        prompts["read"].append(templates.direct_prompt(world.question.format(colour=obj.colour), crop))
        golds["read"].append(obj.pattern)
    out = {}
    for skill, ps in prompts.items():
        preds = [o[0].strip() for o in policy.generate(ps, max_new_tokens=24)]
        out[f"base/{skill}"] = sum(p == g for p, g in zip(preds, golds[skill])) / n
    return out
