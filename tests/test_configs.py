"""Every Hydra config under ``conf/`` composes, says what it means, and builds its cheap parts.

Why: the configs are the user interface of the framework (README "Configuration"; the presets reproduce
VisRL §4 and its ablations). A typo in a ``_target_`` argument, a preset whose values lose to a later
default, or a mandatory value nobody documented only shows up when someone launches a 7B run. Here, for
each option of each group (found on disk, so new files are covered automatically) and each experiment:

* it composes through Hydra's compose API and is recorded as the group's choice;
* every value the file sets is the value in the composed config (package and defaults order are right);
* every ``_target_`` imports and accepts the configured arguments (signature bind: no model is built);
* mandatory ``???`` values come only from the selected file (presets document theirs in their header);
* the cheap parts are instantiated: prompt templates, filter, scorers, benchmark (dummy roots), data
  (synthetic) and the logger partial (csv / none / wandb in disabled mode) writing one metric.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from visrl.config import schema

CONF = Path(__file__).resolve().parents[1] / "conf"
MODEL_PIPELINE_KEYS = ("lora", "is_tiny")  # model settings read by the pipeline, not builder arguments


def _options() -> list[tuple[str, str]]:
    """(group, option) for every YAML file of a config group under conf/ (nested groups: hydra/launcher)."""
    found = []
    for path in sorted(CONF.rglob("*.yaml")):
        group = path.parent.relative_to(CONF).as_posix()
        if group != "." and not path.stem.startswith("_"):  # _tiny/_real: bases of options, not choices
            found.append((group, path.stem))
    return found


OPTIONS = _options()
EXPERIMENTS = [opt for group, opt in OPTIONS if group == "experiment"]


@functools.cache
def compose_cfg(*overrides: str) -> DictConfig:
    """``conf/config.yaml`` with ``overrides`` and the ``hydra`` node, via Hydra's compose API.

    Cached (composition takes ~0.4 s) and read-only: tests derive mutable copies with :func:`job_config`.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def package_of(group: str, path: Path) -> str:
    """Where the file's keys land: its ``# @package`` header, else the group path (dots)."""
    for line in path.read_text().splitlines():
        match = re.match(r"#\s*@package\s+(\S+)", line)
        if match:
            return "" if match.group(1) == "_global_" else match.group(1)
    return group.replace("/", ".")


def leaves(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every non-dict value (lists are values) of a raw YAML mapping."""
    if isinstance(node, dict) and (node or not prefix):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def lookup(container: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(container, dict) or part not in container:
            raise KeyError(dotted)
        container = container[part]
    return container


def target_nodes(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every mapping with a ``_target_`` in a plain (unresolved) container, with its dotted path."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            yield from target_nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from target_nodes(value, f"{path}[{i}]")


def check_targets(cfg: DictConfig, where: str) -> int:
    """Import every ``_target_`` and bind its configured arguments to the signature; returns the count."""
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)  # Hydra's own nodes (launchers of uninstalled plugins) are not ours
    count = 0
    for path, node in target_nodes(container):
        try:
            target = get_object(node["_target_"])
        except Exception as exc:  # ImportError, AttributeError: the config names code that does not exist
            pytest.fail(f"{where}: {path}._target_ {node['_target_']!r} does not import: {exc}")
        kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
        if path == "model":
            kwargs = {k: v for k, v in kwargs.items() if k not in MODEL_PIPELINE_KEYS}
        try:
            inspect.signature(target).bind_partial(**kwargs)
        except TypeError as exc:
            pytest.fail(
                f"{where}: {path} ({node['_target_']}) does not accept its configured arguments: {exc}"
            )
        count += 1
    return count


def job_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` without the ``hydra`` node and with ``paths.output_dir`` (``${hydra:runtime.output_dir}``,
    which only a real run sets) filled in, so that every other interpolation can be resolved."""
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.set_readonly(job, False)
    job.paths.output_dir = "/nonexistent/run"
    return job


def missing_keys(cfg: DictConfig) -> set[str]:
    """The keys a user must set (``???`` in a file, or a fallback to ``???``) of the job config."""
    return set(schema.required_keys(job_config(cfg)))


# ----------------------------------------------------------------------------------------------- tests
def test_default_config_is_the_documented_cpu_default() -> None:
    cfg = compose_cfg()
    choices = cfg.hydra.runtime.choices
    assert choices.model == "tiny_qwen2vl" and cfg.model.is_tiny
    assert choices.data == "synthetic" and choices.benchmark == "synthetic"
    assert choices.logger == "wandb" and cfg.logger.mode == "offline"  # never the network by default
    assert choices.debug is None and choices.experiment is None
    assert (cfg.stage, cfg.iter, cfg.fail_after) == ("all", 3, None)
    assert missing_keys(cfg) == set()
    assert check_targets(cfg, "default config") >= 8
    OmegaConf.to_container(job_config(cfg), resolve=True)  # no broken interpolation


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_keeps_its_values(group: str, option: str) -> None:
    path = CONF / group / f"{option}.yaml"
    cfg = compose_cfg(f"{group}={option}")
    assert cfg.hydra.runtime.choices[group] == option
    raw = yaml.safe_load(path.read_text()) or {}
    raw.pop("defaults", None)
    composed = OmegaConf.to_container(cfg, resolve=False)
    package = package_of(group, path)
    for key, value in leaves(raw, package):
        try:
            got = lookup(composed, key)
        except KeyError:
            pytest.fail(f"{path}: {key} is set in the file but missing from the composed config")
        assert got == value, f"{path}: {key} = {value!r} in the file, {got!r} once composed"
    check_targets(cfg, f"{group}={option}")
    # mandatory values come from the file itself (e.g. data=viscot's paths), never from a default
    declared = {key for key, value in leaves(raw, package) if value == "???" or str(value).endswith(",???}")}
    if group not in ("experiment", "recipe", "model"):  # these select data=viscot (data.root)
        assert missing_keys(cfg) <= declared, (
            f"{path}: unexpected mandatory keys {missing_keys(cfg) - declared}"
        )


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_preset_documents_its_mandatory_values(name: str) -> None:
    """A preset's header shows the command (``python run.py experiment=<name> k=...``) with every ``???``."""
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert f"experiment={name}" in text, f"experiment/{name}.yaml: its header shows no command line"
    documented = set(re.findall(r"\s([\w.]+)=\.\.\.", text))
    assert missing_keys(compose_cfg(f"experiment={name}")) == documented


REAL_MODELS = ("llava15", "qwen2vl", "qwen25vl")
PAPER_CHOICES = {"data": "viscot", "benchmark": "viscot", "base": "none", "sft": "reference", "dpo": "reference",
                 "prompt": "visrl", "scorer": "judge", "recipe": "paper"}  # fmt: skip


@pytest.mark.parametrize("model", REAL_MODELS)
def test_real_backbone_selects_the_paper_recipe(model: str) -> None:
    """``model=<real>`` is the paper's recipe in one command: Visual-CoT data and benchmark under one
    ``data.root``, LoRA SFT/DPO, judge scorers, no tiny base preparation, bf16 on the GPU when present."""
    from visrl.models.real import KNOWN_MODELS

    cfg = compose_cfg(f"model={model}", "iter=3")
    choices = cfg.hydra.runtime.choices
    assert {g: choices[g] for g in PAPER_CHOICES} == PAPER_CHOICES
    assert KNOWN_MODELS[cfg.model.hf_id] == cfg.model.family and not cfg.model.is_tiny
    assert cfg.base.enabled is False and cfg.sft.lora is True and cfg.dpo.lora is True
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("auto", "bf16-mixed")
    assert cfg.objective.beta == 0.1 and cfg.model.lora.r == 8 and cfg.model.lora.alpha == 16
    assert cfg.rollout.n_boxes == 6 and cfg.dpo.reference == "initial"
    assert missing_keys(cfg) == {"data.root"}  # the one value the user must give
    job = job_config(cfg)
    job.data.root = "/data/viscot"
    assert (job.data.image_root, job.benchmark.root) == ("/data/viscot", "/data/viscot")
    assert job.data.sft == "/data/viscot/visrl_sft.json"
    schema.validate(job)


@pytest.mark.parametrize("model", REAL_MODELS)
def test_real_backbone_on_the_toy_task_and_without_the_recipe(model: str) -> None:
    """``data=synthetic`` keeps the toy task (its benchmark follows the data); ``recipe=none`` drops the
    recipe altogether (the tiny defaults on a real backbone)."""
    toy = compose_cfg(f"model={model}", "data=synthetic")
    assert (toy.hydra.runtime.choices.data, toy.hydra.runtime.choices.benchmark) == ("synthetic", "synthetic")
    assert toy.sft.lora is True and missing_keys(toy) == set()
    plain = compose_cfg(f"model={model}", "recipe=none")
    assert plain.sft.lora is False and plain.hydra.runtime.choices.scorer == "self"
    assert plain.model.hf_id and plain.model.box_format._target_.startswith("visrl.data.box_formats.")


def test_default_composes_as_before_the_bases() -> None:
    """The tiny default's model, built from model/_tiny.yaml, holds exactly the values it always had."""
    cfg = compose_cfg()
    model = OmegaConf.to_container(cfg.model)
    assert model == {
        "_target_": "visrl.models.tiny.build_tiny", "name": "tiny_qwen2vl", "is_tiny": True,
        "freeze_vision": True, "vision_memo_mb": 1024, "family": "qwen2vl", "text_hidden": 64, "text_layers": 2, "heads": 4,
        "kv_heads": None, "intermediate": None, "vision_hidden": 64, "vision_layers": 1, "patch_size": 8,
        "merge_size": 2, "image_size": 64, "abs_pos_embed": True, "abs_pos_grid": 4, "abs_pos_std": 0.15,
        "vocab_size": 512, "seed": "${seed}", "dtype": "float32",
        "box_format": {"_target_": "visrl.data.box_formats.GridFormat", "grid": 4},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_regex": None},
    }  # fmt: skip
    assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.seed) == ("auto", "32-true", 0)


COMPOSITIONS = [f"{g}={o}" for g, o in OPTIONS if g != "hydra/launcher"] + [f"model={m}" for m in REAL_MODELS]


@pytest.mark.parametrize("override", COMPOSITIONS)
def test_every_composition_satisfies_the_schema(override: str) -> None:
    """Every option of every group and every experiment preset passes visrl.config.schema (types, ranges,
    choices), and nothing but the documented mandatory roots lacks a value."""
    job = job_config(compose_cfg(override))
    assert schema.problems(job) == [], override
    assert schema.unresolvable(job) == [], override
    assert set(schema.required_keys(job)) <= {"data.root", "benchmark.root"}, override
    for key in schema.required_keys(job):
        OmegaConf.update(job, key, "/some/folder")
    schema.validate(job)


@pytest.mark.parametrize(
    ("override", "needle"),
    [("iter=three", "iter='three'"), ("objective.beta=0", "objective.beta=0"), ("stage=train", "one of all"),
     ("objective.loss=dpo", "one of hinge"), ("dpo.stages.stage1.epochs=-1", "dpo.stages.stage1.epochs=-1"),
     ("trainer.accelerator=gpus", "one of auto"), ("filter.crop_lo=-0.1", "in [0, 1]"),
     ("rollout.questions=0", "an integer >= 1 or null")],
)  # fmt: skip
def test_schema_rejects_a_bad_value_naming_key_value_and_allowed(override: str, needle: str) -> None:
    with pytest.raises(schema.ConfigError) as err:
        schema.validate(job_config(compose_cfg(override)))
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_cheap_parts_instantiate(group: str, option: str, tmp_path: Path) -> None:
    """Prompt, filter, scorers, benchmark (dummy roots) and synthetic data of every composition build."""
    cfg = job_config(compose_cfg(f"{group}={option}"))
    for key in schema.required_keys(cfg):  # data.root / benchmark.root: a dummy folder
        OmegaConf.update(cfg, key, str(tmp_path))
    templates = instantiate(cfg.prompt)
    for step, n_images in (("box", 1), ("answer", 2), ("direct", 1)):  # answer: full image + crop (§3.1)
        text = getattr(templates, step)
        assert "{question}" in text and text.count("<image>") == n_images, f"prompt.{step}: {text!r}"
    instantiate(cfg.filter)
    instantiate(cfg.scorer.answer)
    instantiate(cfg.scorer.crop)
    if cfg.benchmark.get("split_path", "unset") is None:
        benchmark = instantiate(cfg.benchmark, split_path=str(tmp_path / "test.json"))
    else:
        benchmark = instantiate(cfg.benchmark)
    assert callable(benchmark.evaluate)
    if OmegaConf.select(cfg, "data._target_", default="").endswith("SyntheticDataset"):
        assert callable(instantiate(cfg.data).ensure)  # nothing is written before ensure()


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "logger"])
def test_logger_partial_builds_a_run_logger(option: str, tmp_path: Path) -> None:
    from visrl.logging.run_logger import RunLogger, read_metrics

    make = instantiate(job_config(compose_cfg(f"logger={option}")).logger)
    extra = {"mode": "disabled"} if option == "wandb" else {}  # the real backend, without writing a run
    logger = make(run_dir=tmp_path, **extra)
    assert isinstance(logger, RunLogger)
    logger.log_metrics({"probe": 1.5})
    logger.finish()
    assert read_metrics(tmp_path) == [{"step": 0, "probe": 1.5}]


@pytest.mark.parametrize("group", ["model", "objective", "experiment"])
def test_unknown_option_lists_the_valid_ones(group: str) -> None:
    with pytest.raises(MissingConfigException) as err:
        compose_cfg(f"{group}=nonexistent")
    message = str(err.value)
    assert f"Available options in '{group}'" in message
    for other, option in OPTIONS:
        if other == group:
            assert option in message


def test_unknown_key_is_rejected() -> None:
    """Struct mode: a misspelt key is an error, not a silently ignored setting."""
    with pytest.raises(ConfigCompositionException, match="objective.betta"):
        compose_cfg("objective.betta=0.2")


def test_run_name_leaves_out_logger_and_fault_injection() -> None:
    """The run dir is named from the overrides (resume = same command); logger and fail_after do not
    count, so a run crashed with fail_after=... resumes with the plain command, under any logger."""
    cfg = compose_cfg("iter=2", "fail_after=iter_1", "logger=csv", "objective.beta=0.2")
    assert cfg.hydra.job.override_dirname == "iter-2+objective.beta-0.2"
