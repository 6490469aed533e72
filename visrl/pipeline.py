"""The VisRL pipeline, read top to bottom (paper §3): base prep -> SFT warm-up -> K x (regenerate -> fit -> evaluate).

    run(cfg)
      backbone  = build_backbone(cfg)                       # conf/model: tiny (built) or real (from_pretrained)
      backbone  = prepare_base(...)                         # tiny only: generic skills, cached by config hash
      backbone  = sft_warmup(...)                           # both steps supervised on the small annotated split
      m_org     = frozen copy of the SFT model              # the self-scorer (and the DPO reference by default)
      evaluate  -> iteration 0
      for k in 1..iter:
          prefs.regenerate(M_RL^{k-1}, m_org)              # rollouts, self-scores, filter, pairs -> iter_k/
          stage 1 fit (box step) ; stage 2 fit (0.5 box + 0.5 answer)
          save iter_k/model ; evaluate -> iteration k
      summary.json, plots (derived from the parts above)

This is the only module besides ``run.py`` that reads the Hydra config; everything it calls takes typed
arguments. Resuming, rank-0 writes and the fault hook are :class:`visrl.runs.RunDir`'s: each ``run.step``
below is skipped when it is already done, so re-running the same command continues where the run stopped.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import platform
import subprocess
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from visrl.benchmarks.skills import evaluate_base
from visrl.data.hashing import cache_key
from visrl.data.io import read_json, write_json_atomic, write_text_atomic
from visrl.data.records import read_viscot
from visrl.data.sft import sft_rows
from visrl.data.skills import base_rows
from visrl.dist import check_strategy, launcher_local_rank, on_rank_zero
from visrl.logging.samples import log_model_artifact, log_pair_samples, log_predictions, report_run
from visrl.models.backbone import Backbone, apply_lora, freeze_vision, load_backbone
from visrl.models.frozen import frozen_policy
from visrl.models.placement import place
from visrl.models.policy import VLMPolicy
from visrl.runs import RunDir, RunLock, cache_lock
from visrl.summary import flat_numbers, write_final_files
from visrl.training.base_prep import cached_base, key_material
from visrl.training.datamodules import RowsDataModule
from visrl.training.fit import fit
from visrl.training.sft import SFTModule

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.stage`` in ``cfg.paths.output_dir``, owning that directory for the whole run."""
    check_strategy(trainer_kwargs(cfg))  # e.g. trainer=deepspeed_zero2 without deepspeed: one line, at once
    lock = RunLock(Path(cfg.paths.output_dir)).acquire()
    try:
        return _run(cfg, RunDir(cfg.paths.output_dir, fail_after=cfg.get("fail_after")))
    finally:
        lock.release()


def _run(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    on_rank_zero(save_run_metadata, cfg, run.root)
    if cfg.threads is not None:  # null keeps torch's default
        torch.set_num_threads(int(cfg.threads))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    check_config(cfg)
    # the model first: missing real weights stop the run within seconds, before data generation or W&B
    backbone = load_backbone(cfg.ckpt) if cfg.stage == "eval" and cfg.ckpt else build_backbone(cfg)
    logger = instantiate(cfg.logger)(run_dir=run.root)
    logger.log_config(OmegaConf.to_container(cfg, resolve=True))
    templates = instantiate(cfg.prompt)
    data = instantiate(cfg.data)
    splits = data.ensure()
    benchmark = build_benchmark(cfg, splits)
    try:
        if cfg.stage == "eval":
            evaluate(cfg, run, "eval", 0, benchmark, backbone, templates, logger)
            return report_run(
                run.root, logger, run.finish(lambda: write_final_files(run.root, benchmark, ["eval"]))
            )
        backbone = prepare_base(cfg, backbone, templates, logger if not run.done("base") else None)
        run.step("base", lambda: None)  # the base model is a shared cache; the run records that it logged it
        backbone = sft_warmup(cfg, run, backbone, splits, data.image_root, templates, logger)
        evaluate(cfg, run, "sft/eval", 0, benchmark, backbone, templates, logger)
        iterations = int(cfg.iter) if cfg.stage == "all" else 0
        if iterations:
            rl_iterations(cfg, run, backbone, data, splits, templates, benchmark, logger)
        evals = ["sft/eval", *(f"iter_{k}/eval" for k in range(1, iterations + 1))]
        return report_run(run.root, logger, run.finish(lambda: write_final_files(run.root, benchmark, evals)))
    finally:
        logger.finish()


# ----------------------------------------------------------------------------------------------- stages
def build_backbone(cfg: DictConfig) -> Backbone:
    """The model of ``conf/model`` (a tiny random init or real pretrained weights)."""
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    pipeline_settings = (
        "lora",
        "is_tiny",
        "freeze_vision",
        "vision_memo_mb",
    )  # of the backbone, not builder arguments
    for key in pipeline_settings:
        spec.pop(key, None)
    return instantiate(spec, _convert_="all")


def prepare_base(cfg: DictConfig, backbone: Backbone, templates, logger) -> Backbone:
    """Tiny backbones only: teach generic skills once, cached under a key of the whole recipe. ``logger``:
    where the skills metrics go (None: a resumed run that logged them already)."""
    if not cfg.base.enabled:
        return backbone
    world = instantiate(cfg.data.world)
    skills = instantiate(cfg.base.skills)
    schedule = {  # everything else that shapes the base model: its recipe, prompts and trainer settings
        **OmegaConf.to_container(cfg.base, resolve=True),
        "templates": dataclasses.asdict(templates),
        "trainer": trainer_kwargs(cfg),
        # the tiny tokenizer is built in code, so its vocabulary is part of the recipe
        "vocab": cache_key(backbone.encoder.processor.tokenizer.get_vocab()),
    }
    material = key_material(OmegaConf.to_container(cfg.model, resolve=True), world, skills, schedule)
    root = Path(cfg.paths.cache_dir) / "base"
    key = cache_key(material)
    single = cfg.trainer.get("devices", 1) in (1, "1") and int(cfg.trainer.get("num_nodes", 1)) == 1
    with cache_lock(root / f"{key}.lock", single):  # parallel jobs of one recipe: one builds, others wait
        if (hit := cached_base(root, key)) is not None:
            log.info("base model: cache hit %s", hit)
            if logger is not None:
                logger.log_iteration(0, read_json(hit / "skills.json"))
            return load_backbone(hit / "model")
        log.info("base model: preparing %s (cached afterwards)", root / key)
        rows = base_rows(world, skills, backbone, templates)
        train_rows(cfg.base, backbone, rows, root / key, logger, cfg, phase="base")

        def save() -> None:
            skills_metrics = evaluate_base(VLMPolicy(backbone, batch_size=64), world, skills, templates)
            if logger is not None:
                logger.log_iteration(0, skills_metrics)  # e.g. base/locate, base/read: what the base can do
            write_json_atomic(root / key / "skills.json", skills_metrics)
            backbone.save(root / key / "model")
            write_json_atomic(root / key / "key.json", material)
            (root / key / "DONE").touch()

        on_rank_zero(save)
    return backbone


def sft_warmup(
    cfg: DictConfig, run: RunDir, backbone: Backbone, splits, image_root, templates, logger
) -> Backbone:
    """SFT on the small box-annotated split, both steps (VisRL §3.2); the RL starting point is reloaded from
    disk (merged under LoRA), so a fresh and a resumed run start the iterations from the same model."""

    def train() -> None:
        model = apply_lora(backbone, **cfg.model.lora) if cfg.sft.lora else backbone
        rows = sft_rows(read_viscot(splits["sft"]), image_root, model, templates)
        train_rows(cfg.sft, model, rows, run / "sft", logger, cfg)
        on_rank_zero(model.save, run / "sft" / "model", bool(cfg.save_merged))

    run.step("sft", train)
    return load_backbone(run / "sft" / "model")


def train_rows(
    stage_cfg: DictConfig, backbone: Backbone, rows, out: Path, logger, cfg: DictConfig, phase: str = "sft"
) -> None:
    """One supervised fit (``phase`` base or sft) of ``rows`` with the stage's optimizer and schedule."""
    from visrl.logging.lightning import RunLoggerAdapter

    trainable_parts(cfg, backbone)
    dm = RowsDataModule(
        rows,
        backbone.encoder,
        int(stage_cfg.batch_size),
        int(stage_cfg.max_length),
        int(cfg.seed),
        knob=f"{phase}.max_length",
    )
    logger.log_iteration(0, {f"data/{phase}/dropped_long": float(sum(dm.dropped.values()))})
    module = SFTModule(backbone.model, instantiate(stage_cfg.optimizer), instantiate(stage_cfg.scheduler))
    adapter = RunLoggerAdapter(logger, name=phase, phase=phase)
    fit(module, dm, out, int(stage_cfg.epochs), trainer_kwargs(cfg), adapter, label=phase)


def rl_iterations(cfg, run: RunDir, backbone: Backbone, data, splits, templates, benchmark, logger) -> None:
    """VisRL iterations k = 1..K (§3.3). One live model is trained across all iterations (under LoRA: one
    adapter on the SFT model, so the adapter-disabled model is M_org)."""
    if cfg.dpo.lora:
        backbone = apply_lora(backbone, **cfg.model.lora)
    trainable_parts(cfg, backbone)
    m_org = frozen_policy(
        backbone, run / "sft" / "model", int(cfg.rollout.batch_size), vision_memo_bytes(cfg)
    )
    place(m_org.backbone, trainer_device(cfg))  # a full-fine-tuning M_org is a copy loaded on the CPU
    prefs = build_preference_data(cfg, run.root, splits, data.image_root, templates)
    for k in range(1, int(cfg.iter) + 1):
        run.step(
            f"iter_{k}",
            lambda k=k: iteration(
                cfg, run, k, backbone, m_org, prefs, templates, benchmark, data.image_root, logger
            ),
            trains=backbone.model,
        )


def iteration(
    cfg, run: RunDir, k: int, backbone: Backbone, m_org, prefs, templates, benchmark, image_root, logger
) -> None:
    """One VisRL iteration: regenerate with M_RL^{k-1}, DPO stage 1 and stage 2, save, evaluate."""
    policy = on_device(cfg, backbone)  # M_RL^{k-1}
    regenerated = prefs.regenerate(policy, k, m_org if cfg.scorer.m_org == "initial" else policy)
    logger.log_iteration(k, flat_numbers(regenerated.stats.to_json(), "data/"))
    log_pair_samples(logger, run / f"iter_{k}" / "pairs.json", image_root, k)
    # the reference is fixed BEFORE stage 1 trains (reference=previous means M_RL^{k-1} for both stages);
    # precomputed log-probs are cached for resumes and beta sweeps
    ref_policy = m_org if cfg.dpo.reference == "initial" else policy
    if prefs.rows and cfg.dpo.precompute_ref:
        prefs.attach_reference_logps(ref_policy)
    reference = None if cfg.dpo.precompute_ref else reference_strategy(ref_policy, backbone)
    for name, stage in cfg.dpo.stages.items():
        if stage.enabled:
            run.step(
                f"iter_{k}/{name}",
                lambda name=name, stage=stage: fit_dpo_stage(
                    cfg, stage, backbone, prefs, run / f"iter_{k}" / name, k, logger, reference
                ),
                trains=backbone.model,
            )
    on_rank_zero(backbone.save, run / f"iter_{k}" / "model", bool(cfg.save_merged))  # adapter under LoRA
    on_rank_zero(log_model_artifact, logger, run / f"iter_{k}" / "model", f"model_iter_{k}")
    evaluate(cfg, run, f"iter_{k}/eval", k, benchmark, backbone, templates, logger)


def reference_strategy(ref_policy: VLMPolicy, backbone: Backbone):
    """The DPO reference computed on the fly (``dpo.precompute_ref=false``): the adapter-disabled model under
    LoRA when the reference is the initial model, else a frozen copy (taken now, before the stages train)."""
    from visrl.training.reference import AdapterDisabledReference, FrozenCopyReference

    if backbone.is_lora and ref_policy.model is not backbone.model:
        return AdapterDisabledReference(backbone.model)
    return FrozenCopyReference(ref_policy.model, copy=ref_policy.model is backbone.model)


def trainable_parts(cfg: DictConfig, backbone: Backbone) -> None:
    """What a stage may train: everything (or the LoRA adapter), minus the vision side if ``model.freeze_vision``."""
    if cfg.model.get("freeze_vision", False):
        freeze_vision(backbone, vision_memo_bytes(cfg))


def vision_memo_bytes(cfg: DictConfig) -> int:
    """``model.vision_memo_mb`` in bytes (0: no memo of the frozen vision side's features)."""
    return int(cfg.model.get("vision_memo_mb") or 0) << 20


def build_preference_data(cfg: DictConfig, out: Path, splits, image_root, templates):
    """The self-evolving data of every iteration (VisRL §3.3), served as step-level DPO rows."""
    from visrl.rollout.generator import RolloutConfig
    from visrl.training.datamodules import PreferenceDataModule

    return PreferenceDataModule(
        run_dir=out,
        pool=read_viscot(splits["rl"]),
        image_root=image_root,
        templates=templates,
        rollout=RolloutConfig.from_mapping(OmegaConf.to_container(cfg.rollout, resolve=True)),
        filter_cfg=instantiate(cfg.filter),
        answer_scorer=instantiate(cfg.scorer.answer),
        crop_scorer=instantiate(cfg.scorer.crop),
        batch_size=int(cfg.dpo.batch_size),
        max_length=int(cfg.dpo.max_length),
        rejected_own_crop=bool(cfg.rollout.rejected_own_crop),
        questions_per_iter=cfg.rollout.questions,
        seed=int(cfg.seed),
        ref_cache_dir=Path(cfg.paths.cache_dir) / "ref_logps",  # shared by runs: a beta sweep reuses them
    )


def fit_dpo_stage(cfg, stage, backbone: Backbone, prefs, out: Path, k: int, logger, reference=None) -> None:
    """One step-DPO stage: the stage's step weights select the rows and weight the losses (stages are data)."""
    from visrl.logging.lightning import RunLoggerAdapter
    from visrl.training.step_dpo import StepDPOModule

    weights = {s: float(w) for s, w in stage.weights.items() if float(w) > 0}
    stage_data = prefs.for_steps(tuple(weights))
    if not stage_data.rows:
        log.warning("%s: no preference pairs for steps %s; stage skipped", out, list(weights))
        return
    module = StepDPOModule(
        backbone.model,
        optimizer=instantiate(cfg.dpo.optimizer, lr=float(stage.lr)),
        scheduler=instantiate(cfg.dpo.scheduler),
        weights=weights,
        loss=cfg.objective.loss,
        beta=float(cfg.objective.beta),
        label_smoothing=float(cfg.objective.label_smoothing),
        ftx=float(cfg.dpo.ftx),
        reference=reference,
        pref=float(cfg.dpo.pref),
    )
    adapter = RunLoggerAdapter(logger, name=out.name, phase=f"dpo/{out.name}", context={"iter": k})
    fit(
        module,
        stage_data,
        out,
        int(stage.epochs),
        trainer_kwargs(cfg),
        adapter,
        label=f"iter {k} | {out.name}",
    )


def evaluate(
    cfg: DictConfig, run: RunDir, name: str, k: int, benchmark, backbone: Backbone, templates, logger
) -> None:
    """Evaluate iteration ``k`` on the configured benchmark into ``<run_dir>/<name>`` (``metrics.json``,
    ``predictions.jsonl``); rank 0 only: the other ranks' metrics would go nowhere (the logger and the summary
    are rank 0's)."""

    def evaluate_now() -> None:
        policy = on_device(cfg, backbone)
        metrics = benchmark.evaluate(policy, templates, run / name)
        logger.log_iteration(k, {f"eval/{benchmark.name}/{key}": v for key, v in metrics.items()})
        log_predictions(logger, run / name / "predictions.jsonl", k, getattr(benchmark, "root", None))

    run.step(name, lambda: on_rank_zero(evaluate_now))


# ----------------------------------------------------------------------------------------------- helpers
def check_config(cfg: DictConfig) -> None:
    """Settings that would otherwise fail only after SFT and rollouts (hours on a 7B model) fail at start."""
    from visrl.losses import PREFERENCE_LOSSES

    if cfg.stage == "all" and cfg.objective.loss not in PREFERENCE_LOSSES:
        raise ValueError(
            f"objective.loss: unknown loss {cfg.objective.loss!r}; valid: {sorted(PREFERENCE_LOSSES)}"
        )


def build_benchmark(cfg: DictConfig, splits: dict[str, Path]):
    if cfg.benchmark.get("split_path", "unset") is None:  # the synthetic benchmark reads a split of the data
        return instantiate(cfg.benchmark, split_path=str(splits[cfg.benchmark.split]))
    return instantiate(cfg.benchmark)


def trainer_device(cfg: DictConfig) -> str:
    """Where this process's trainer trains: ``trainer.accelerator`` auto/gpu/cuda -> this rank's GPU when there
    is one (``cuda:<LOCAL_RANK>``, as Lightning assigns them), else the CPU."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return f"cuda:{launcher_local_rank()}"
    return "cpu"


def on_device(cfg: DictConfig, backbone: Backbone) -> VLMPolicy:
    """The backbone as a policy on the trainer's device: Lightning moves a model back to the CPU after a fit,
    and a model loaded from disk starts there, so every rollout, scoring, reference and evaluation phase
    starts here."""
    place(backbone, trainer_device(cfg))
    return VLMPolicy(backbone, batch_size=int(cfg.rollout.batch_size))


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.trainer, resolve=True)


def _git(*args: str) -> str:
    """``git <args>`` in the package's checkout (stripped stdout; "" when git or the checkout is missing)."""
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def save_run_metadata(cfg: DictConfig, out: Path) -> None:
    """The resolved config, the code version and the package versions, beside every artifact of the run
    (the same code gave other numbers under other package versions: docs/toy-scale-status.md)."""
    write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    sha, dirty = _git("rev-parse", "HEAD"), _git("status", "--porcelain")
    write_text_atomic(out / "git_sha.txt", (sha or "unknown") + (" (dirty)" if dirty else "") + "\n")
    write_json_atomic(out / "environment.json", environment())


ENV_PACKAGES = ("torch", "transformers", "tokenizers", "peft", "pytorch-lightning", "numpy", "pillow")


def environment() -> dict[str, str]:
    """Python, the CPU's vector instruction set and the versions of the packages that decide a run's
    numbers. The CPU matters: the same code, data and initial weights trained a different tiny base on an
    AVX2 machine than on an AVX-512 one (likely the kernels' float rounding; docs/toy-scale-status.md)."""
    versions = {"python": platform.python_version(), "cpu": torch.backends.cpu.get_cpu_capability()}
    for name in ENV_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
