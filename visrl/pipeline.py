"""The VisRL pipeline, read top to bottom (paper §3): base prep -> SFT warm-up -> K x (regenerate -> fit -> evaluate).

    run(cfg)
      backbone  = build_backbone(cfg)                       # conf/model: tiny (built) or real (from_pretrained)
      backbone  = prepare_base(...)                         # tiny only: generic skills, cached by config hash
      backbone  = sft_warmup(...)                           # both steps supervised on the small annotated split
      m_org     = frozen copy of the SFT model              # the self-scorer (and the DPO reference by default)
      evaluate  -> iteration 0
      for k in 1..iter:
          data.regenerate(M_RL^{k-1}, m_org) -> iter_k/    # rollouts, self-scores, filter, pairs
          stage 1 fit (box step)  ; stage 2 fit (0.5 box + 0.5 answer)
          save iter_k/model ; evaluate -> iteration k
      summary.json, plots

This is the only module besides ``run.py`` that reads the Hydra config; everything it calls takes typed
arguments. Every step writes a ``DONE`` marker when complete, so re-running the same command continues from
the last completed step (SFT, generation, stage, iteration) and ends with the same summary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from visrl.benchmarks.skills import evaluate_base
from visrl.benchmarks.synthetic import paired_bootstrap
from visrl.data.hashing import cache_key
from visrl.data.records import read_viscot
from visrl.data.sft import sft_rows
from visrl.data.skills import base_rows
from visrl.dist import barrier, check_strategy, is_rank_zero
from visrl.models.backbone import Backbone, apply_lora, freeze_vision, load_backbone
from visrl.models.frozen import frozen_policy
from visrl.models.policy import VLMPolicy
from visrl.training.base_prep import cached_base, key_material
from visrl.training.datamodules import RowsDataModule
from visrl.training.fit import fit
from visrl.training.sft import SFTModule

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    out = Path(cfg.paths.output_dir)
    check_strategy(trainer_kwargs(cfg))  # e.g. trainer=deepspeed_zero2 without deepspeed: one line, at once
    out.mkdir(parents=True, exist_ok=True)
    if is_rank_zero():  # with several processes every rank runs this function; rank 0 writes the files
        save_run_metadata(cfg, out)
    torch.set_num_threads(int(cfg.threads))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    check_config(cfg)
    # the model first: missing real weights stop the run within seconds, before data generation or W&B
    backbone = load_backbone(cfg.ckpt) if cfg.stage == "eval" and cfg.ckpt else build_backbone(cfg)
    logger = instantiate(cfg.logger)(run_dir=out)
    logger.log_config(OmegaConf.to_container(cfg, resolve=True))
    templates = instantiate(cfg.prompt)
    data = instantiate(cfg.data)
    splits = data.ensure()
    benchmark = build_benchmark(cfg, splits)
    try:
        if cfg.stage == "eval":
            metrics = evaluate(benchmark, backbone, templates, out / "eval", logger, cfg)
            return {"iterations": [{"iter": 0, "metrics": metrics}]}
        backbone = prepare_base(cfg, backbone, templates, logger)
        backbone = sft_warmup(cfg, backbone, splits, data.image_root, templates, out / "sft", logger)
        summary = Summary(out, cfg)
        summary.add(0, evaluate(benchmark, backbone, templates, out / "sft" / "eval", logger, cfg))
        if cfg.stage == "all":
            rl_iterations(cfg, backbone, data, splits, templates, benchmark, summary, logger)
        return summary.finish()
    finally:
        logger.finish()


# ----------------------------------------------------------------------------------------------- stages
def build_backbone(cfg: DictConfig) -> Backbone:
    """The model of ``conf/model`` (a tiny random init or real pretrained weights)."""
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    for key in ("lora", "is_tiny", "freeze_vision"):  # pipeline settings of the backbone, not builder arguments
        spec.pop(key, None)
    return instantiate(spec, _convert_="all")


def prepare_base(cfg: DictConfig, backbone: Backbone, templates, logger) -> Backbone:
    """Tiny backbones only: teach generic skills once, cached under a key of the whole recipe."""
    if not cfg.base.enabled:
        return backbone
    world = instantiate(cfg.data.world)
    skills = instantiate(cfg.base.skills)
    schedule = {  # everything else that shapes the base model: its recipe, prompts and trainer settings
        **OmegaConf.to_container(cfg.base, resolve=True),
        "templates": dataclasses.asdict(templates),
        "trainer": trainer_kwargs(cfg),
        "vocab": cache_key(backbone.encoder.processor.tokenizer.get_vocab()),  # the tokenizer is built in code
    }
    material = key_material(OmegaConf.to_container(cfg.model, resolve=True), world, skills, schedule)
    root = Path(cfg.paths.cache_dir) / "base"
    key = cache_key(material)
    hit = cached_base(root, key)
    if hit is not None:
        log.info("base model: cache hit %s", hit)
        logger.log_metrics(json.loads((hit / "skills.json").read_text()))
        return load_backbone(hit / "model")
    log.info("base model: preparing %s (cached afterwards)", root / key)
    rows = base_rows(world, skills, backbone, templates)
    train_rows(cfg.base, backbone, rows, root / key, logger, cfg)
    if is_rank_zero():
        skills_metrics = evaluate_base(VLMPolicy(backbone, batch_size=64), world, skills, templates)
        logger.log_metrics(skills_metrics)  # e.g. base/locate, base/read: what the base model can do
        (root / key / "skills.json").write_text(json.dumps(skills_metrics, indent=2))
        backbone.save(root / key / "model")
        (root / key / "key.json").write_text(json.dumps(material, indent=2, default=str))
        (root / key / "DONE").touch()
    barrier()
    return backbone


def sft_warmup(cfg: DictConfig, backbone: Backbone, splits, image_root, templates, out: Path, logger) -> Backbone:
    """SFT on the small box-annotated split, both steps (VisRL §3.2); resumable."""
    if (out / "DONE").exists():
        return load_backbone(out / "model")
    if cfg.sft.lora:
        backbone = apply_lora(backbone, **cfg.model.lora)
    rows = sft_rows(read_viscot(splits["sft"]), image_root, backbone, templates)
    train_rows(cfg.sft, backbone, rows, out, logger, cfg)
    if is_rank_zero():
        backbone.save(out / "model")  # LoRA is merged on save: the SFT model is the RL starting point
        (out / "DONE").touch()
    barrier()  # the model is on disk for every rank
    fault_point(cfg, "sft")
    return load_backbone(out / "model")


def train_rows(stage_cfg: DictConfig, backbone: Backbone, rows, out: Path, logger, cfg: DictConfig) -> None:
    """One supervised fit (base prep or SFT) of ``rows`` with the stage's optimizer and schedule."""
    from visrl.logging.lightning import RunLoggerAdapter

    trainable_parts(cfg, backbone)
    dm = RowsDataModule(rows, backbone.encoder, int(stage_cfg.batch_size), int(stage_cfg.max_length), int(cfg.seed))
    logger.log_metrics({f"data/{out.name}/dropped_long": float(sum(dm.dropped.values()))})
    module = SFTModule(backbone.model, instantiate(stage_cfg.optimizer), instantiate(stage_cfg.scheduler))
    fit(module, dm, out, int(stage_cfg.epochs), trainer_kwargs(cfg), RunLoggerAdapter(logger, name=out.name))


def rl_iterations(cfg, backbone, data, splits, templates, benchmark, summary, logger) -> Backbone:
    """VisRL iterations k = 1..K: regenerate with M_RL^{k-1}, stage 1, stage 2, save, evaluate.

    One live model is trained across all iterations (under LoRA: one adapter on the SFT model, so the
    adapter-disabled model is M_org). A resumed run reloads the trainable weights of the last finished step.
    """
    out = Path(cfg.paths.output_dir)
    if cfg.dpo.lora:
        backbone = apply_lora(backbone, **cfg.model.lora)
    trainable_parts(cfg, backbone)
    m_org = frozen_policy(backbone, out / "sft" / "model", int(cfg.rollout.batch_size))
    prefs = build_preference_data(cfg, out, splits, data.image_root, templates)
    for k in range(1, int(cfg.iter) + 1):
        it = out / f"iter_{k}"
        if (it / "DONE").exists():
            load_trainable(backbone, it / "weights.pt")
            continue
        logger.log_metrics({"iter": float(k)})
        policy = VLMPolicy(backbone, batch_size=int(cfg.rollout.batch_size))
        stats = prefs.regenerate(policy, k, m_org if cfg.scorer.m_org == "initial" else policy).stats.to_json()
        logger.log_metrics(flat_numbers(stats, "data/"))
        log_pair_samples(logger, it / "pairs.json", data.image_root, k)
        # reference log-probs of every row, once per iteration and BEFORE stage 1 trains the policy (so that
        # reference=previous means M_RL^{k-1} for both stages); cached for resumes and beta sweeps
        ref_policy = m_org if cfg.dpo.reference == "initial" else policy
        if prefs.rows and cfg.dpo.precompute_ref:
            prefs.attach_reference_logps(ref_policy)
        reference = None if cfg.dpo.precompute_ref else reference_strategy(ref_policy, backbone)
        for name, stage in cfg.dpo.stages.items():
            if stage.enabled:
                fit_dpo_stage(cfg, stage, backbone, prefs, it / name, logger, reference)
        if is_rank_zero():
            backbone.save(it / "model")  # merged under LoRA: a deployable model per iteration
            save_trainable(backbone, it / "weights.pt")
            log_model_artifact(logger, it / "model", f"model_iter_{k}")
        metrics = evaluate(benchmark, backbone, templates, it / "eval", logger, cfg)
        summary.add(k, {**metrics, **flat_numbers(stats, "data/")})
        if is_rank_zero():
            (it / "DONE").touch()
        barrier()
        fault_point(cfg, f"iter_{k}")
    return backbone


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
        freeze_vision(backbone)


def save_trainable(backbone: Backbone, path: Path) -> None:
    torch.save({n: p.detach().clone() for n, p in backbone.model.named_parameters() if p.requires_grad}, path)


def load_trainable(backbone: Backbone, path: Path) -> None:
    missing = backbone.model.load_state_dict(torch.load(path, weights_only=True), strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"{path}: weights do not fit the model: unexpected {missing.unexpected_keys[:5]}")


def build_preference_data(cfg: DictConfig, out: Path, splits, image_root, templates):
    """The self-evolving data of every iteration (VisRL §3.3), served as step-level DPO rows."""
    from visrl.rollout.generator import RolloutConfig
    from visrl.training.datamodules import PreferenceDataModule

    return PreferenceDataModule(
        run_dir=out, pool=read_viscot(splits["rl"]), image_root=image_root, templates=templates,
        rollout=RolloutConfig.from_mapping(OmegaConf.to_container(cfg.rollout, resolve=True)),
        filter_cfg=instantiate(cfg.filter), answer_scorer=instantiate(cfg.scorer.answer),
        crop_scorer=instantiate(cfg.scorer.crop), batch_size=int(cfg.dpo.batch_size),
        max_length=int(cfg.dpo.max_length), rejected_own_crop=bool(cfg.rollout.rejected_own_crop),
        questions_per_iter=cfg.rollout.questions, seed=int(cfg.seed),
        ref_cache_dir=Path(cfg.paths.cache_dir) / "ref_logps",  # shared by runs: a beta sweep reuses them
    )


def fit_dpo_stage(cfg, stage, backbone, prefs, out: Path, logger, reference=None) -> None:
    """One step-DPO stage: the stage's step weights select the rows and weight the losses (stages are data)."""
    from visrl.logging.lightning import RunLoggerAdapter
    from visrl.training.step_dpo import StepDPOModule

    if (out / "DONE").exists():  # resumed run: this stage's weights are already trained
        load_trainable(backbone, out / "weights.pt")
        return
    weights = {s: float(w) for s, w in stage.weights.items() if float(w) > 0}
    stage_data = prefs.for_steps(tuple(weights))
    if not stage_data.rows:
        log.warning("%s: no preference pairs for steps %s; stage skipped", out, list(weights))
    else:
        module = StepDPOModule(
            backbone.model, optimizer=instantiate(cfg.dpo.optimizer, lr=float(stage.lr)),
            scheduler=instantiate(cfg.dpo.scheduler), weights=weights, loss=cfg.objective.loss,
            beta=float(cfg.objective.beta), label_smoothing=float(cfg.objective.label_smoothing),
            ftx=float(cfg.dpo.ftx), reference=reference,
        )
        fit(module, stage_data, out, int(stage.epochs), trainer_kwargs(cfg), RunLoggerAdapter(logger, name=out.name))
    if is_rank_zero():
        out.mkdir(parents=True, exist_ok=True)
        save_trainable(backbone, out / "weights.pt")
        (out / "DONE").touch()
    fault_point(cfg, f"{out.parent.name}/{out.name}")


def evaluate(benchmark, backbone: Backbone, templates, out: Path, logger, cfg: DictConfig) -> dict[str, float]:
    """Evaluate on the configured benchmark (cached in ``out/metrics.json`` for resumed runs); rank 0 only:
    the other ranks' metrics would go nowhere (the logger and the summary are rank 0's)."""
    if not is_rank_zero():
        return {}
    if (out / "metrics.json").exists():
        metrics = json.loads((out / "metrics.json").read_text())
    else:
        metrics = benchmark.evaluate(VLMPolicy(backbone, batch_size=int(cfg.rollout.batch_size)), templates, out)
    logger.log_metrics({f"eval/{benchmark.name}/{k}": v for k, v in metrics.items()})
    return metrics


# ----------------------------------------------------------------------------------------------- logging
SAMPLE_PAIRS = 8  # preference pairs shown per iteration in the W&B / CSV table
ARTIFACT_MAX_BYTES = 2 << 30  # larger saved models (merged 7B) are not copied into the logger's staging
PAIR_COLUMNS = (
    "uid", "image", "question", "chosen_box_text", "rejected_box_text", "chosen_answer", "rejected_answer",
    "chosen_answer_score", "chosen_crop_score", "rejected_answer_score", "rejected_crop_score",
)  # fmt: skip


def log_pair_samples(logger, pairs_path: Path, image_root: Path, k: int) -> None:
    """Up to ``SAMPLE_PAIRS`` pairs of iteration ``k`` as a table (image + chosen/rejected boxes, answers,
    scores), and the pairs file as an artifact: what the self-scored data of VisRL §3.3 looks like."""
    from visrl.logging.media import ImageWithBoxes

    rows = []
    for p in json.loads(pairs_path.read_text())[:SAMPLE_PAIRS]:
        boxes = {"chosen": (p.get("chosen_box"), "chosen"), "rejected": (p.get("rejected_box"), "rejected")}
        image = ImageWithBoxes(Path(image_root) / p["image"], boxes, caption=p.get("question", ""))
        chosen, rejected = p.get("chosen_scores") or {}, p.get("rejected_scores") or {}
        texts = [p[key]["value"] for key in ("chosen_step", "rejected_step", "chosen", "rejected")]
        scores = [chosen.get("answer"), chosen.get("crop"), rejected.get("answer"), rejected.get("crop")]
        rows.append([p.get("uid"), image, p.get("question"), *texts, *scores])
    if rows:
        logger.log_table(f"pairs/iter_{k}", PAIR_COLUMNS, rows)
    logger.log_artifact(pairs_path, f"pairs_iter_{k}", "dataset")


def log_model_artifact(logger, model_dir: Path, name: str) -> None:
    """The saved model as an artifact, unless it is too large to copy (then the log says so)."""
    size = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
    if size > ARTIFACT_MAX_BYTES:
        log.info("%s: %.1f GiB, not logged as an artifact (kept on disk)", model_dir, size / 2**30)
        return
    logger.log_artifact(model_dir, name, "model")


def fault_point(cfg: DictConfig, step: str) -> None:
    """Test hook (``fail_after`` in conf/config.yaml): raise right after ``step`` (``sft``, ``iter_k``,
    ``iter_k/stage1``, ``iter_k/stage2``) was completed and marked DONE, to exercise resuming."""
    if cfg.get("fail_after") == step:
        raise InjectedFailure(f"fail_after={step}: injected failure after {step} completed")


class InjectedFailure(RuntimeError):
    """The failure ``fault_point`` raises (never raised unless ``fail_after`` is set)."""


# ----------------------------------------------------------------------------------------------- helpers
def check_config(cfg: DictConfig) -> None:
    """Settings that would otherwise fail only after SFT and rollouts (hours on a 7B model) fail at start."""
    from visrl.losses import PREFERENCE_LOSSES

    if cfg.stage == "all" and cfg.objective.loss not in PREFERENCE_LOSSES:
        raise ValueError(f"objective.loss: unknown loss {cfg.objective.loss!r}; valid: {sorted(PREFERENCE_LOSSES)}")


def build_benchmark(cfg: DictConfig, splits: dict[str, Path]):
    if cfg.benchmark.get("split_path", "unset") is None:  # the synthetic benchmark reads the data's test split
        return instantiate(cfg.benchmark, split_path=str(splits["test"]))
    return instantiate(cfg.benchmark)


def flat_numbers(stats: dict, prefix: str) -> dict[str, float]:
    """Numeric leaves of a nested dict as ``prefix/a/b`` keys (for logging ``stats.json``)."""
    out: dict[str, float] = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            out.update(flat_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.trainer, resolve=True)


def save_run_metadata(cfg: DictConfig, out: Path) -> None:
    """The resolved config and the code version, beside every artifact of the run."""
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10,
                               cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    (out / "git_sha.txt").write_text((sha or "unknown") + (" (dirty)" if dirty else "") + "\n")


class Summary:
    """Per-iteration metrics -> ``summary.json`` (written once, at the end: its presence means complete)."""

    def __init__(self, out: Path, cfg: DictConfig):
        self.out, self.cfg = out, cfg
        self.partial = out / "summary.partial.json"
        self.data = json.loads(self.partial.read_text()) if self.partial.exists() else {"iterations": []}

    def add(self, k: int, metrics: dict[str, float]) -> None:
        self.data["iterations"] = [it for it in self.data["iterations"] if it["iter"] != k]
        self.data["iterations"].append({"iter": k, "metrics": metrics})
        if is_rank_zero():
            self.partial.write_text(json.dumps(self.data, indent=2))

    def finish(self) -> dict[str, Any]:
        from visrl.logging.rundir import make_run_plots

        if not is_rank_zero():
            return self.data
        iters = sorted(self.data["iterations"], key=lambda it: it["iter"])
        self.data["iterations"] = iters
        last = iters[-1]
        self.data["final_metric"] = last["metrics"].get("cot_pred/accuracy")
        if len(iters) > 1:
            self.data["effect"] = paired_bootstrap(self.out / "sft" / "eval", self.out / f"iter_{last['iter']}" / "eval")
        (self.out / "summary.json").write_text(json.dumps(self.data, indent=2))
        self.partial.unlink(missing_ok=True)
        make_run_plots(self.out)
        return self.data
