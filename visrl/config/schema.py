"""The schema of the composed run config: types, ranges and allowed values, checked before any work.

Why: Hydra composes any value a user types (``iter=three``, ``stage=train``, ``filter.answer_hi=1.5``), and
the pipeline would only trip over it after base preparation, SFT and rollouts, or never (``stage=train``
silently ran as ``stage=sft``). ``run.py`` calls :func:`validate` right after composition, before the
pipeline (or torch) is imported: a bad value stops the run in seconds with ONE line naming the key, the
value and what is allowed (:class:`~visrl.config.errors.ConfigError`, exit code 2).

The schema is a table of :class:`Rule` per dotted key (``*`` matches any key at that level, e.g. the DPO
stages); a key absent from the composed config is skipped (each group option holds its own keys, e.g. only
``benchmark=vstar`` has ``benchmark.protocols``). A mandatory value left as ``???`` is reported with the
key and how to set it. ``tests/test_configs.py`` composes every option of every group and every experiment
and validates it against this table.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, OmegaConfBaseException

from visrl.config.errors import ConfigError

__all__ = ["RULES", "Rule", "missing_keys", "problems", "required_keys", "unresolvable", "validate"]


@dataclass(frozen=True)
class Rule:
    """What a value may be. ``kind``: int | float | bool | str | choice (``choices`` holds them)."""

    kind: str
    lo: float | None = None  # inclusive bounds (numbers)
    hi: float | None = None
    lo_open: bool = False  # lo itself excluded (e.g. beta > 0)
    nullable: bool = False
    choices: tuple[Any, ...] = ()

    def allowed(self) -> str:
        """What is allowed, in words: ``an integer >= 1``, ``one of all, sft, eval``, ..."""
        if self.kind == "choice":
            text = "one of " + ", ".join(str(c) for c in self.choices)
        else:
            text = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[
                self.kind
            ]
            if self.lo is not None and self.hi is not None and not self.lo_open:
                text += f" in [{self.lo:g}, {self.hi:g}]"
            elif self.lo is not None:
                text += f" {'>' if self.lo_open else '>='} {self.lo:g}"
                text += f" and <= {self.hi:g}" if self.hi is not None else ""
        return text + (" or null" if self.nullable else "")

    def ok(self, value: Any) -> bool:
        """True if ``value`` (a composed, resolved leaf) satisfies the rule."""
        if value is None:
            return self.nullable
        if self.kind == "choice":
            return value in self.choices
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str)
        if isinstance(value, bool) or not isinstance(value, int if self.kind == "int" else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        below = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        return not below and not (self.hi is not None and value > self.hi)


def _int(lo: float | None = None, hi: float | None = None, nullable: bool = False) -> Rule:
    return Rule("int", lo, hi, nullable=nullable)


def _num(
    lo: float | None = None, hi: float | None = None, open_lo: bool = False, nullable: bool = False
) -> Rule:
    return Rule("float", lo, hi, lo_open=open_lo, nullable=nullable)


def _one_of(*choices: Any, nullable: bool = False) -> Rule:
    return Rule("choice", choices=choices, nullable=nullable)


BOOL = Rule("bool")
COUNT = _int(1)  # a positive count: batch sizes, lengths, sample counts
EPOCHS = _int(0)
FRACTION = _num(0.0, 1.0)
LR = _num(0.0, open_lo=True)
LIMIT = _int(1, nullable=True)  # null = no limit
# Lightning 2.x precision flags (lightning.fabric.connector._PRECISION_INPUT_STR)
PRECISIONS = ("64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed", "transformer-engine",
              "transformer-engine-float16", "64", "32", "16", "bf16")  # fmt: skip

RULES: dict[str, Rule] = {
    "stage": _one_of("all", "sft", "eval"),
    "iter": _int(0),
    "seed": _int(),
    "threads": LIMIT,  # null: torch's default
    "save_merged": BOOL,
    "ckpt": Rule("str", nullable=True),
    "fail_after": Rule("str", nullable=True),
    # model (tiny and real)
    "model.freeze_vision": BOOL,
    "model.gradient_checkpointing": BOOL,
    "model.vision_memo_mb": _int(0),
    "model.min_pixels": _int(1, nullable=True),
    "model.max_pixels": _int(1, nullable=True),
    "model.dtype": _one_of("float32", "bfloat16", "float16"),
    "model.image_size": _int(8, nullable=True),
    "model.text_hidden": COUNT,
    "model.text_layers": COUNT,
    "model.heads": COUNT,
    "model.vision_hidden": COUNT,
    "model.vision_layers": COUNT,
    "model.patch_size": COUNT,
    "model.merge_size": COUNT,
    "model.vocab_size": COUNT,
    "model.lora.r": COUNT,
    "model.lora.alpha": _num(0.0, open_lo=True),
    "model.lora.dropout": _num(0.0, 1.0),
    # data
    "data.sizes.sft": COUNT,
    "data.sizes.rl": COUNT,
    "data.sizes.test": COUNT,
    "data.world.n_objects": COUNT,
    # base preparation (tiny backbones)
    "base.enabled": BOOL,
    "base.epochs": EPOCHS,
    "base.batch_size": COUNT,
    "base.max_length": COUNT,
    "base.optimizer.lr": LR,
    # SFT
    "sft.lora": BOOL,
    "sft.epochs": EPOCHS,
    "sft.batch_size": COUNT,
    "sft.max_length": COUNT,
    "sft.optimizer.lr": LR,
    "sft.optimizer.weight_decay": _num(0.0),
    "sft.scheduler.warmup_ratio": FRACTION,
    # rollout
    "rollout.n_boxes": COUNT,
    "rollout.temperature": _num(0.0),
    "rollout.answer_temperature": _num(0.0),
    "rollout.max_new_tokens": COUNT,
    "rollout.questions": LIMIT,
    "rollout.batch_size": COUNT,
    "rollout.bad_box.enabled": BOOL,
    "rollout.bad_box.iou_threshold": FRACTION,
    "rollout.bad_box.spread": FRACTION,
    "rollout.rejected_own_crop": BOOL,
    "rollout.fallback_box": BOOL,
    # scoring and filtering
    "scorer.m_org": _one_of("initial", "previous"),
    "filter.answer_hi": FRACTION,
    "filter.answer_lo": FRACTION,
    "filter.crop_hi": FRACTION,
    "filter.crop_lo": FRACTION,
    "filter.min_margin": FRACTION,
    "filter.max_pairs": _int(1, nullable=True),
    "filter.shuffle_scores": BOOL,
    "filter.shuffle_seed": _int(),
    # objective ("loss" choices: visrl.losses.PREFERENCE_LOSSES, added by _rules())
    "objective.beta": _num(0.0, open_lo=True),
    "objective.label_smoothing": _num(0.0, 0.5),
    # DPO
    "dpo.lora": BOOL,
    "dpo.reference": _one_of("initial", "previous"),
    "dpo.precompute_ref": BOOL,
    "dpo.ftx": _num(0.0),
    "dpo.pref": _num(0.0),
    "benchmark.split": _one_of("val", "test"),
    "dpo.batch_size": COUNT,
    "dpo.max_length": COUNT,
    "dpo.stages.*.enabled": BOOL,
    "dpo.stages.*.epochs": EPOCHS,
    "dpo.stages.*.lr": LR,
    "dpo.stages.*.weights.*": _num(0.0),
    "dpo.optimizer.weight_decay": _num(0.0),
    "dpo.scheduler.warmup_ratio": FRACTION,
    # benchmark
    "benchmark.limit": LIMIT,
    "benchmark.max_new_tokens": COUNT,
    "benchmark.batch_size": COUNT,
    "benchmark.prompt_style": _one_of("published", "templates"),
    "benchmark.judge.kind": _one_of("none", "openai", "local"),
    # trainer (Lightning)
    "trainer.accelerator": _one_of("auto", "cpu", "gpu", "cuda", "mps", "tpu"),
    "trainer.precision": _one_of(*PRECISIONS),
    "trainer.num_nodes": COUNT,
    "trainer.accumulate_grad_batches": COUNT,
    "trainer.gradient_clip_val": _num(0.0, nullable=True),
    "trainer.log_every_n_steps": COUNT,
    # logger
    "logger.mode": _one_of("online", "offline", "disabled"),
}


def _expand(node: Any, parts: Sequence[str], prefix: str) -> Iterator[tuple[str, DictConfig, str]]:
    """(dotted key, parent node, last key) for every key matching ``parts`` (``*``: any key) under ``node``."""
    if not isinstance(node, DictConfig):
        return
    head, rest = parts[0], parts[1:]
    keys = [str(k) for k in node] if head == "*" else ([head] if head in node else [])
    for key in keys:
        dotted = f"{prefix}{key}"
        if not rest:
            yield dotted, node, key
        else:
            yield from _expand(node._get_node(key), rest, dotted + ".")


def _rules() -> dict[str, Rule]:
    from visrl.losses import PREFERENCE_LOSSES  # torch only (the losses layer); the valid loss names

    return {**RULES, "objective.loss": _one_of(*sorted(PREFERENCE_LOSSES))}


def problems(cfg: DictConfig) -> list[str]:
    """Every violation of the schema in ``cfg``, one line each (``key=value: expected ...``); ``???``
    values are not checked here (see :func:`missing_keys`)."""
    found = []
    for pattern, rule in _rules().items():
        for dotted, parent, key in _expand(cfg, pattern.split("."), ""):
            try:
                value = parent[key]
            except OmegaConfBaseException:
                continue  # no value or a broken interpolation: missing_keys() / unresolvable() report it
            if not rule.ok(value):
                found.append(f"config key {dotted}={value!r} is not allowed: expected {rule.allowed()}")
    return found


def missing_keys(cfg: DictConfig) -> list[str]:
    """Keys without a value anywhere in ``cfg`` but its ``hydra`` node: ``???``, an interpolation to a ``???``
    (``data.image_root: ${.root}``) or one that falls back to ``???`` (``${oc.select:data.image_root,???}``)."""
    return sorted(key for key, problem in _walk(cfg, "") if problem in (None, _DERIVED))


def required_keys(cfg: DictConfig) -> list[str]:
    """The ``???`` keys themselves when there are any (``data.root``), else the keys that fall back to
    ``???`` (``benchmark.root`` without ``data=viscot``): the keys a user has to set."""
    found = list(_walk(cfg, ""))
    direct = sorted(key for key, problem in found if problem is None)
    return direct or sorted(key for key, problem in found if problem == _DERIVED)


def unresolvable(cfg: DictConfig) -> list[str]:
    """``key: reason`` for every interpolation in ``cfg`` (but ``hydra``) that cannot be resolved."""
    return [f"{key}: {problem}" for key, problem in _walk(cfg, "") if problem not in (None, _DERIVED)]


_DERIVED = "derived"  # _walk's reason for a key whose value comes from a ``???`` elsewhere
# what a mandatory key holds, for the one-line message
HINTS = {
    "data.root": "Visual-CoT folder with cot/<dataset>/<images>, visrl_sft.json, visrl_rl.json",
    "benchmark.root": "Visual-CoT benchmark folder with benchmark/*.json and cot/<dataset>/<images>",
    "ckpt": "saved model directory",
}


def _walk(node: Any, prefix: str) -> Iterator[tuple[str, str | None]]:
    """(dotted key, None) for a ``???`` leaf, (key, _DERIVED) for one that resolves to ``???``, (key, reason)
    for an unresolvable one."""
    if not isinstance(node, (DictConfig, ListConfig)):
        return
    keys = list(node) if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        dotted = f"{prefix}{key}"
        if dotted == "hydra":
            continue
        if OmegaConf.is_missing(node, key):
            yield dotted, None
            continue
        try:
            value = node[key]
        except InterpolationToMissingValueError:
            yield dotted, _DERIVED
            continue
        except OmegaConfBaseException as exc:  # a broken interpolation: name the key and the reason
            yield dotted, str(exc).splitlines()[0]
            continue
        if value == "???":
            yield dotted, _DERIVED
        elif isinstance(value, (DictConfig, ListConfig)):
            yield from _walk(value, dotted + ".")


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` with the first problem: a key without a value, an unresolvable
    interpolation, then a value against :data:`RULES` (the count of further problems is appended)."""
    found = [
        f"config key {key} has no value: set {key}=<{HINTS.get(key, 'value')}>" for key in required_keys(cfg)
    ]
    found += [f"config key {problem}" for problem in unresolvable(cfg)]
    found += problems(cfg)
    if found:
        more = f" (and {len(found) - 1} more problem(s))" if len(found) > 1 else ""
        raise ConfigError(found[0] + more)
