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

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from visrl.benchmarks.synthetic import paired_bootstrap
from visrl.data.records import read_viscot
from visrl.data.sft import RowsDataModule, sft_rows
from visrl.models.backbone import Backbone, apply_lora, load_backbone
from visrl.models.frozen import frozen_policy
from visrl.models.policy import VLMPolicy
from visrl.training.base_prep import base_rows, cache_key, cached_base, key_material
from visrl.training.fit import fit
from visrl.training.sft import SFTModule

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_run_metadata(cfg, out)
    torch.set_num_threads(int(cfg.threads))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    logger = instantiate(cfg.logger)(run_dir=out)
    logger.log_config(OmegaConf.to_container(cfg, resolve=True))
    templates = instantiate(cfg.prompt)
    data = instantiate(cfg.data)
    splits = data.ensure()
    benchmark = build_benchmark(cfg, splits)
    try:
        if cfg.stage == "eval":
            backbone = load_backbone(cfg.ckpt) if cfg.ckpt else build_backbone(cfg)
            metrics = evaluate(benchmark, backbone, templates, out / "eval", logger, cfg)
            return {"iterations": [{"iter": 0, "metrics": metrics}]}
        backbone = build_backbone(cfg)
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
    for key in ("lora", "is_tiny"):  # pipeline settings of the backbone, not builder arguments
        spec.pop(key, None)
    return instantiate(spec, _convert_="all")


def prepare_base(cfg: DictConfig, backbone: Backbone, templates, logger) -> Backbone:
    """Tiny backbones only: teach generic skills once, cached under a key of the whole recipe."""
    if not cfg.base.enabled:
        return backbone
    world = instantiate(cfg.data.world)
    skills = instantiate(cfg.base.skills)
    schedule = OmegaConf.to_container(cfg.base, resolve=True)
    material = key_material(OmegaConf.to_container(cfg.model, resolve=True), world, skills, schedule)
    root = Path(cfg.paths.cache_dir) / "base"
    key = cache_key(material)
    hit = cached_base(root, key)
    if hit is not None:
        log.info("base model: cache hit %s", hit)
        return load_backbone(hit / "model")
    log.info("base model: preparing %s (cached afterwards)", root / key)
    rows = base_rows(world, skills, backbone, templates)
    train_rows(cfg.base, backbone, rows, root / key, logger, cfg)
    backbone.save(root / key / "model")
    (root / key / "key.json").write_text(json.dumps(material, indent=2, default=str))
    (root / key / "DONE").touch()
    return backbone


def sft_warmup(cfg: DictConfig, backbone: Backbone, splits, image_root, templates, out: Path, logger) -> Backbone:
    """SFT on the small box-annotated split, both steps (VisRL §3.2); resumable."""
    if (out / "DONE").exists():
        return load_backbone(out / "model")
    if cfg.sft.lora:
        backbone = apply_lora(backbone, **cfg.model.lora)
    rows = sft_rows(read_viscot(splits["sft"]), image_root, backbone, templates)
    train_rows(cfg.sft, backbone, rows, out, logger, cfg)
    backbone.save(out / "model")  # LoRA is merged on save: the SFT model is the RL starting point
    (out / "DONE").touch()
    return load_backbone(out / "model")


def train_rows(stage_cfg: DictConfig, backbone: Backbone, rows, out: Path, logger, cfg: DictConfig) -> None:
    """One supervised fit (base prep or SFT) of ``rows`` with the stage's optimizer and schedule."""
    from visrl.logging.lightning import RunLoggerAdapter

    dm = RowsDataModule(rows, backbone.encoder, int(stage_cfg.batch_size), int(stage_cfg.max_length), int(cfg.seed))
    logger.log_metrics({f"data/{out.name}/dropped_long": float(sum(dm.dropped.values()))})
    module = SFTModule(backbone.model, instantiate(stage_cfg.optimizer), instantiate(stage_cfg.scheduler))
    fit(module, dm, out, int(stage_cfg.epochs), trainer_kwargs(cfg), RunLoggerAdapter(logger, name=out.name))


def rl_iterations(cfg, backbone, data, splits, templates, benchmark, summary, logger) -> Backbone:
    """VisRL iterations k = 1..K: regenerate with M_RL^{k-1}, stage 1, stage 2, save, evaluate."""
    out = Path(cfg.paths.output_dir)
    m_org = frozen_policy(backbone, out / "sft" / "model", int(cfg.rollout.batch_size))
    prefs = build_preference_data(cfg, out, splits, data.image_root, templates)
    for k in range(1, int(cfg.iter) + 1):
        it = out / f"iter_{k}"
        if (it / "DONE").exists():
            backbone = load_backbone(it / "model")
            continue
        logger.log_metrics({"iter": float(k)})
        policy = VLMPolicy(backbone, batch_size=int(cfg.rollout.batch_size))
        prefs.regenerate(policy, k, m_org if cfg.scorer.m_org == "initial" else policy)
        stats = json.loads((it / "stats.json").read_text())
        logger.log_metrics(flat_numbers(stats, "data/"))
        reference = m_org if cfg.dpo.reference == "initial" else policy  # a VLMPolicy: model + encoder
        for name, stage in cfg.dpo.stages.items():
            if stage.enabled:
                fit_dpo_stage(cfg, stage, backbone, prefs, reference, it / name, logger)
        backbone.save(it / "model")
        metrics = evaluate(benchmark, backbone, templates, it / "eval", logger, cfg)
        summary.add(k, {**metrics, **flat_numbers(stats, "data/")})
        (it / "DONE").touch()
        backbone = load_backbone(it / "model")
    return backbone


def build_preference_data(cfg: DictConfig, out: Path, splits, image_root, templates):
    """The self-evolving data of every iteration (VisRL §3.3), served as step-level DPO rows."""
    from visrl.data.preference import PreferenceDataModule
    from visrl.rollout.generator import RolloutConfig

    return PreferenceDataModule(
        run_dir=out, pool=read_viscot(splits["rl"]), image_root=image_root, templates=templates,
        rollout=RolloutConfig.from_mapping(OmegaConf.to_container(cfg.rollout, resolve=True)),
        filter_cfg=instantiate(cfg.filter), answer_scorer=instantiate(cfg.scorer.answer),
        crop_scorer=instantiate(cfg.scorer.crop), batch_size=int(cfg.dpo.batch_size),
        max_length=int(cfg.dpo.max_length), rejected_own_crop=bool(cfg.rollout.rejected_own_crop),
        questions_per_iter=cfg.rollout.questions, seed=int(cfg.seed),
    )


def fit_dpo_stage(cfg, stage, backbone, prefs, reference, out: Path, logger) -> None:
    """One step-DPO stage: the stage's step weights select the rows and weight the losses (stages are data)."""
    from visrl.logging.lightning import RunLoggerAdapter
    from visrl.training.step_dpo import StepDPOModule

    if (out / "DONE").exists():  # resumed run: this stage's weights are already trained
        backbone.model.load_state_dict(torch.load(out / "weights.pt", weights_only=True), strict=False)
        return
    weights = {s: float(w) for s, w in stage.weights.items() if float(w) > 0}
    prefs.steps = tuple(weights)
    if not prefs.rows_for(prefs.steps):
        log.warning("%s: no preference pairs for steps %s; stage skipped", out, list(weights))
        out.mkdir(parents=True, exist_ok=True)
    else:
        prefs.attach_reference_logps(reference)  # once per iteration and reference, cached beside the pairs
        module = StepDPOModule(
            backbone.model, optimizer=instantiate(cfg.dpo.optimizer, lr=float(stage.lr)),
            scheduler=instantiate(cfg.dpo.scheduler), weights=weights, loss=cfg.objective.loss,
            beta=float(cfg.objective.beta), label_smoothing=float(cfg.objective.label_smoothing),
            ftx=float(cfg.objective.ftx),
        )
        fit(module, prefs, out, int(stage.epochs), trainer_kwargs(cfg), RunLoggerAdapter(logger, name=out.name))
    trainable = {n: p.detach() for n, p in backbone.model.named_parameters() if p.requires_grad}
    torch.save(trainable, out / "weights.pt")
    (out / "DONE").touch()


def evaluate(benchmark, backbone: Backbone, templates, out: Path, logger, cfg: DictConfig) -> dict[str, float]:
    """Evaluate on the configured benchmark (cached in ``out/metrics.json`` for resumed runs)."""
    if (out / "metrics.json").exists():
        metrics = json.loads((out / "metrics.json").read_text())
    else:
        metrics = benchmark.evaluate(VLMPolicy(backbone, batch_size=int(cfg.rollout.batch_size)), templates, out)
    logger.log_metrics({f"eval/{benchmark.name}/{k}": v for k, v in metrics.items()})
    return metrics


# ----------------------------------------------------------------------------------------------- helpers
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
        self.partial.write_text(json.dumps(self.data, indent=2))

    def finish(self) -> dict[str, Any]:
        from visrl.logging.rundir import make_run_plots

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
