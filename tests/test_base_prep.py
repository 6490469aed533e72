"""Base-model preparation of tiny backbones (visrl/data/skills.py, visrl/benchmarks/skills.py,
visrl/training/base_prep.py, ``visrl.pipeline.prepare_base``).

The stand-in for the pretrained LMM VisRL starts from (paper §4 uses Qwen2-VL / LLaVA-1.5) must teach only
generic skills, never the CoT task itself, and must be cached exactly as long as its recipe is unchanged:

* ``base_rows``: every scene gets the configured number of rows of each skill, no prompt carries the CoT
  box/answer instruction, targets are well-formed, and the rows are a function of the seed;
* ``cache_key``: changes with the model config, the world, the skills and the schedule, and is stable
  otherwise (key order, a fresh composition, another process with another hash seed);
* ``prepare_base`` (the real Hydra config, ``debug=fast``): trains once, a second call loads the cached
  model without training, a changed config or an unfinished cache entry trains again;
* ``evaluate_base``: the three skill accuracies, in [0, 1], computed against the right golds (a pixel
  oracle that reads the colour inside the prompt's box scores 1.0 on ``colour``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

import visrl.pipeline as pipeline
from visrl.benchmarks.skills import evaluate_base
from visrl.data.box_formats import GridFormat
from visrl.data.hashing import cache_key
from visrl.data.prompts import IMAGE_MARKER, VISRL_SUFFIX, Prompt, PromptTemplates
from visrl.data.records import VISCOT_SUFFIX
from visrl.data.skills import BaseSkills, base_rows
from visrl.data.synthetic import COLOURS, PATTERNS, SHAPES, WorldConfig
from visrl.logging.run_logger import RunLogger
from visrl.models.backbone import Backbone
from visrl.models.tiny import build_tiny
from visrl.training.base_prep import key_material

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
TEMPLATES: PromptTemplates = instantiate(OmegaConf.load(CONF / "prompt" / "tiny.yaml"))
FMT = GridFormat(grid=4)
SKILLS = BaseSkills(n_scenes=3, locate=2, colour=1, read=2, single_object=0.5, seed=7)


def tiny() -> Backbone:
    return build_tiny(
        "qwen2vl", text_hidden=32, text_layers=1, heads=2, vision_hidden=32, vision_layers=1, box_format=FMT
    )


def compose_cfg(*overrides: str) -> DictConfig:
    """``conf/config.yaml`` with ``debug=fast`` and ``overrides`` (Hydra's compose API)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["debug=fast", *overrides])


def instruction(template: str) -> str:
    """The fixed instruction of a template: its text without the question field and image markers."""
    return template.replace("{question}", "").replace(IMAGE_MARKER, "").strip()


# ------------------------------------------------------------------------------------ rows
def test_base_rows_cover_the_skills_with_the_configured_counts() -> None:
    backbone = tiny()
    rows = base_rows(WorldConfig(), SKILLS, backbone, TEMPLATES)
    per_scene = {"locate": SKILLS.locate, "colour": SKILLS.colour, "read": SKILLS.read}
    assert Counter((r.uid, r.step) for r in rows) == Counter(
        {(f"base:{i}", step): n for i in range(SKILLS.n_scenes) for step, n in per_scene.items()}
    )
    enc = backbone.encoder
    for row in rows:
        target, prompt = enc.decode(row.completions[0]), enc.tokenizer.decode(row.prompt.input_ids)
        if row.step == "locate":  # "Where is the <shape>?" -> a box the grid format parses
            assert FMT.parse(target, (256, 256)).ok, target
            assert re.search(r"Where is the (\w+)\?", prompt).group(1) in SHAPES, prompt
        elif row.step == "colour":  # the box is in the prompt, the colour is the target
            assert FMT.parse(prompt, (256, 256)).ok and target in COLOURS, (prompt, target)
        else:
            assert target in PATTERNS


def test_base_rows_never_ask_the_cot_question() -> None:
    backbone = tiny()
    decode = backbone.encoder.tokenizer.decode
    forbidden = [
        instruction(TEMPLATES.box),
        instruction(TEMPLATES.answer),
        VISRL_SUFFIX.strip(),
        VISCOT_SUFFIX.strip(),
    ]
    assert all(forbidden)
    # the check can fail: a CoT box prompt, encoded and decoded the same way, shows its instruction
    cot = backbone.encoder.encode_prompt(TEMPLATES.box_prompt("Q?", Image.new("RGB", (64, 64))))
    assert forbidden[0] in decode(cot.input_ids)
    for row in base_rows(WorldConfig(), SKILLS, backbone, TEMPLATES):
        text = decode(row.prompt.input_ids)
        assert not any(f in text for f in forbidden), f"{row.uid} {row.step}: {text[:200]!r}"


def rows_signature(rows) -> list:
    return [(r.step, r.uid, r.prompt.input_ids, r.completions, r.prompt.vision["pixel_values"]) for r in rows]


def test_base_rows_are_deterministic_for_a_seed() -> None:
    backbone = tiny()
    a, b = (rows_signature(base_rows(WorldConfig(), SKILLS, backbone, TEMPLATES)) for _ in range(2))
    other = rows_signature(
        base_rows(WorldConfig(), BaseSkills(**{**vars(SKILLS), "seed": 8}), backbone, TEMPLATES)
    )
    assert len(a) == len(b) == len(other)
    for ra, rb in zip(a, b):
        assert ra[:4] == rb[:4] and torch.equal(ra[4], rb[4])
    assert any(ra[:4] != ro[:4] or not torch.equal(ra[4], ro[4]) for ra, ro in zip(a, other))


# ------------------------------------------------------------------------------------ cache key
class _Key(Exception):
    """Raised by the patched ``cached_base`` to hand back the key ``prepare_base`` derived."""


def vocab_only(vocab: dict[str, int]) -> SimpleNamespace:
    """What ``prepare_base`` reads of a backbone before its cache lookup: the tokenizer's vocabulary."""
    return SimpleNamespace(
        encoder=SimpleNamespace(
            processor=SimpleNamespace(tokenizer=SimpleNamespace(get_vocab=lambda: dict(vocab)))
        )
    )


def pipeline_key(
    cfg: DictConfig, monkeypatch: pytest.MonkeyPatch, vocab: dict[str, int] | None = None
) -> str:
    """The cache key the real ``prepare_base`` derives from ``cfg`` (stopped before any training)."""

    def capture(root: Path, key: str) -> None:
        raise _Key(key)

    monkeypatch.setattr(pipeline, "cached_base", capture)
    with pytest.raises(_Key) as caught:
        pipeline.prepare_base(cfg, vocab_only(vocab or {"a": 0, "b": 1}), instantiate(cfg.prompt), None)
    return str(caught.value)


KEY_VARIANTS = {
    "model size": ["model.text_hidden=96"],
    "model box format": ["model.box_format.grid=8"],
    "model seed": ["seed=1"],
    "world": ["data.world.n_objects=2"],
    "skills count": ["base.skills.n_scenes=9"],
    "skills prompt": ["base.skills.locate_prompt='Find the {shape}: <image>'"],
    "schedule epochs": ["base.epochs=2"],
    "schedule lr": ["base.optimizer.lr=0.01"],
}


def test_cache_key_changes_with_each_ingredient_and_is_stable_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = pipeline_key(compose_cfg(), monkeypatch)
    keys = {name: pipeline_key(compose_cfg(*ov), monkeypatch) for name, ov in KEY_VARIANTS.items()}
    assert base not in keys.values(), [n for n, k in keys.items() if k == base]
    assert len(set(keys.values())) == len(keys)
    assert pipeline_key(compose_cfg(), monkeypatch) == base  # a fresh composition
    assert pipeline_key(compose_cfg("data.sizes.test=7", "iter=1"), monkeypatch) == base  # not ingredients


def test_cache_key_changes_with_the_tokenizer_vocabulary(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny tokenizer is trained in code: a changed corpus must not reuse a base model of the old one."""
    cfg = compose_cfg()
    assert pipeline_key(cfg, monkeypatch, {"a": 0, "b": 1}) != pipeline_key(
        cfg, monkeypatch, {"a": 0, "bc": 1}
    )


@pytest.mark.parametrize("override", ["prompt=visrl", "trainer.accumulate_grad_batches=4"])
def test_cache_key_changes_with_what_else_shapes_the_base_model(override: str, monkeypatch) -> None:
    """``base_rows`` encodes the ``read`` skill with ``templates.direct`` and the fit runs with
    ``cfg.trainer``: either change gives another base model, so it must give another key."""
    assert pipeline_key(compose_cfg(override), monkeypatch) != pipeline_key(compose_cfg(), monkeypatch)


def plain_material() -> dict:
    model = {
        "_target_": "visrl.models.tiny.build_tiny",
        "text_hidden": 32,
        "box_format": {"_target_": "visrl.data.box_formats.GridFormat", "grid": 4},
    }
    schedule = {"epochs": 1, "optimizer": {"lr": 2e-3, "_partial_": True}}
    return key_material(model, WorldConfig(), SKILLS, schedule)


def test_cache_key_ignores_dictionary_order_and_the_process() -> None:
    material = plain_material()
    key = cache_key(material)
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    reordered = {
        k: dict(reversed(list(v.items()))) if isinstance(v, dict) else v
        for k, v in reversed(list(material.items()))
    }
    assert cache_key(reordered) == key
    code = (
        "import sys\n"
        "from visrl.data.hashing import cache_key\n"
        "from visrl.data.skills import BaseSkills\n"
        "from visrl.training.base_prep import key_material\n"
        "from visrl.data.synthetic import WorldConfig\n"
        f"skills = BaseSkills(**{vars(SKILLS)!r})\n"
        f"print(cache_key(key_material({material['model']!r}, WorldConfig(), skills, {material['schedule']!r})))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # set / str() orderings would differ here
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == key


# ------------------------------------------------------------------------------------ prepare_base
@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Count the pipeline's supervised fits (their output dirs); evaluate the base on 8 scenes, not 128."""
    calls: list[Path] = []
    real_train, real_eval = pipeline.train_rows, pipeline.evaluate_base

    def train_rows(stage_cfg, backbone, rows, out, logger, cfg, **kw):
        calls.append(Path(out))
        return real_train(stage_cfg, backbone, rows, out, logger, cfg, **kw)

    monkeypatch.setattr(pipeline, "train_rows", train_rows)
    monkeypatch.setattr(pipeline, "evaluate_base", lambda *a, **k: real_eval(*a, **{**k, "n": 8}))
    return calls


def weights(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prepare_base_trains_once_then_reuses_the_cache(counted: list[Path], tmp_path: Path) -> None:
    cfg = compose_cfg(f"paths.cache_dir={tmp_path / 'cache'}")
    templates = instantiate(cfg.prompt)
    logger = RunLogger(tmp_path / "run")
    try:
        fresh = pipeline.build_backbone(cfg)
        init = weights(fresh)
        first = weights(pipeline.prepare_base(cfg, fresh, templates, logger))
        assert len(counted) == 1 and not same_weights(first, init)
        entry = counted[0]
        assert entry.parent == tmp_path / "cache" / "base" and (entry / "DONE").exists()
        assert json.loads((entry / "key.json").read_text())["skills"]["n_scenes"] == cfg.base.skills.n_scenes
        skills = json.loads((entry / "skills.json").read_text())
        assert set(skills) == {"base/point", "base/locate", "base/colour", "base/read"}
        assert all(0.0 <= v <= 1.0 for v in skills.values())

        # cache hit: a new random backbone comes back as the cached model, with no fit
        second = pipeline.prepare_base(cfg, pipeline.build_backbone(cfg), templates, logger)
        assert len(counted) == 1 and same_weights(weights(second), first)

        # a changed recipe trains a new entry; an entry without DONE (a crashed run) is rebuilt
        changed = compose_cfg(f"paths.cache_dir={tmp_path / 'cache'}", "base.skills.n_scenes=6")
        pipeline.prepare_base(changed, pipeline.build_backbone(changed), templates, logger)
        assert len(counted) == 2 and counted[1] != entry
        (entry / "DONE").unlink()
        pipeline.prepare_base(cfg, pipeline.build_backbone(cfg), templates, logger)
        assert counted[2:] == [entry]
    finally:
        logger.finish()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skill_rows = [
        {k: v for k, v in row.items() if k.startswith("base/")} for row in logged if "base/colour" in row
    ]
    assert skill_rows[:2] == [skills, skills]  # the cache hit reports the cached model's skills


def test_prepare_base_is_skipped_when_disabled(counted: list[Path], tmp_path: Path) -> None:
    cfg = compose_cfg(f"paths.cache_dir={tmp_path}", "base=none")
    backbone = tiny()
    assert pipeline.prepare_base(cfg, backbone, TEMPLATES, logger=None) is backbone and not counted


# ------------------------------------------------------------------------------------ evaluate_base
class ColourOracle:
    """Answers the colour skill by reading the prompt's box in the full view; says nothing otherwise."""

    def __init__(self) -> None:
        self.backbone = SimpleNamespace(box_format=FMT, image_size=64)
        self.calls: list[int] = []

    def generate(self, prompts: list[Prompt], max_new_tokens: int, **_) -> list[list[str]]:
        self.calls.append(len(prompts))
        return [[self._answer(p)] for p in prompts]

    def _answer(self, prompt: Prompt) -> str:
        (turn,) = prompt
        if not turn.text.startswith("What colour is the object in"):
            return ""
        view = np.asarray(turn.images[0])  # [64, 64, 3]
        box = FMT.parse(turn.text, (64, 64)).box
        cells = view[round(box.y1 * 64) : round(box.y2 * 64), round(box.x1 * 64) : round(box.x2 * 64)]
        counts = {name: int(np.all(cells == rgb, axis=-1).sum()) for name, rgb in COLOURS.items()}
        return max(counts, key=counts.get)


def test_evaluate_base_scores_each_skill_against_its_gold() -> None:
    oracle = ColourOracle()
    scores = evaluate_base(oracle, WorldConfig(), SKILLS, TEMPLATES, n=12, seed=3)
    assert scores == {"base/point": 0.0, "base/locate": 0.0, "base/colour": 1.0, "base/read": 0.0}
    assert oracle.calls == [12, 12, 12, 12]


def test_evaluate_base_on_a_tiny_policy_returns_four_accuracies() -> None:
    from visrl.models.policy import VLMPolicy

    scores = evaluate_base(VLMPolicy(tiny(), batch_size=8), WorldConfig(), SKILLS, TEMPLATES, n=4)
    assert set(scores) == {"base/point", "base/locate", "base/colour", "base/read"}
    assert all(0.0 <= v <= 1.0 and (v * 4).is_integer() for v in scores.values())
