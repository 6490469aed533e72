"""Base-model preparation of tiny backbones: the cache of the prepared base model, keyed by configuration.

VisRL starts from a pretrained multimodal model; weights cannot be downloaded here, so the tiny default
backbone is first trained on generic skills of the synthetic world (:mod:`visrl.data.skills`, measured by
:mod:`visrl.benchmarks.skills`). The result is cached under a key derived from its configuration
(:func:`visrl.data.hashing.cache_key` of :func:`key_material`): a second run reuses it; any change of
model, world, skills or schedule rebuilds it. Real backbones skip this stage.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from visrl.data.skills import BaseSkills
from visrl.data.synthetic import WorldConfig

__all__ = ["cached_base", "key_material"]


# model settings that change how fast the base is built, never what it is (the vision memo is exact)
SPEED_ONLY = ("vision_memo_mb",)


def key_material(
    model_cfg: dict[str, Any], world: WorldConfig, skills: BaseSkills, schedule: dict[str, Any]
) -> dict[str, Any]:
    """Everything that determines the base model (hashed by :func:`visrl.data.hashing.cache_key`)."""
    return {
        "model": {k: v for k, v in model_cfg.items() if k not in SPEED_ONLY},
        "world": asdict(world),
        "skills": asdict(skills),
        "schedule": schedule,
        "version": 1,
    }


def cached_base(cache_root: Path, key: str) -> Path | None:
    """The finished cache entry ``cache_root/key`` (it has ``DONE``), else None."""
    path = cache_root / key
    return path if (path / "DONE").exists() else None
