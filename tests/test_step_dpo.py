"""Step-level DPO (visrl/training/step_dpo.py), reference strategies (reference.py), packed pairs (pair_logps.py)."""

from __future__ import annotations

import copy
import json
import warnings
from functools import partial

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import Logger

from visrl.data.hashing import rows_fingerprint
from visrl.data.prompts import PromptTemplates
from visrl.data.rows import PairBatch, Row, pair_batch
from visrl.models.backbone import apply_lora
from visrl.models.fingerprint import model_fingerprint, processor_fingerprint
from visrl.models.logprobs import sequence_logps
from visrl.models.tiny import build_tiny
from visrl.training.pair_logps import pack_pairs, pair_logps
from visrl.training.reference import (
    AdapterDisabledReference,
    FrozenCopyReference,
    PrecomputedReference,
    ReferenceCache,
    ReferenceStrategy,
    compute_reference_logps,
)
from visrl.training.step_dpo import StepDPOModule

torch.set_num_threads(1)
TEMPLATES = PromptTemplates(
    box="{question} Where should I look?\n<image>", answer="{question} Answer.\n<image>\n<image>"
)
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
STAGE1, STAGE2 = {"box": 1.0}, {"box": 0.5, "answer": 0.5}


def tiny(family: str = "qwen2vl", seed: int = 0):
    extra = {"patch_size": 16} if family == "llava" else {}
    return build_tiny(
        family, text_hidden=64, text_layers=1, vision_hidden=64, vision_layers=1, seed=seed, **extra
    )


def image(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


BOXES = [("[1, 1, 3, 3]", "[0, 0, 1, 4]"), ("[2, 0, 4, 2]", "[0, 3, 1, 4]"), ("[0, 1, 2, 4]", "[3, 3, 4, 4]")]
ANSWERS = [("red", "a blue square"), ("green circle", "no"), ("two", "three yellow ones")]
QUESTIONS = ["What colour is the star?", "Which shape is left of the square?", "How many circles?"]


def make_rows(encoder, steps=("box", "answer"), own_crop: bool = False) -> list[Row]:
    """Box rows (one image) and answer rows (image + crop) of three questions, like preference_rows."""
    rows = []
    for i, q in enumerate(QUESTIONS):
        full, crop, other = image(i), image(10 + i, (40, 24)), image(20 + i, (24, 40))
        if "box" in steps:
            comps = tuple(encoder.encode_completion(t) for t in BOXES[i])
            rows.append(Row(encoder.encode_prompt(TEMPLATES.box_prompt(q, full)), comps, "box", f"q{i}"))
        if "answer" in steps:
            comps = tuple(encoder.encode_completion(t) for t in ANSWERS[i])
            own = encoder.encode_prompt(TEMPLATES.answer_prompt(q, full, other)) if own_crop else None
            prompt = encoder.encode_prompt(TEMPLATES.answer_prompt(q, full, crop))
            rows.append(Row(prompt, comps, "answer", f"q{i}", rejected_prompt=own))
    return rows


def batches_of(rows: list[Row], encoder, size: int = 3, ref: list | None = None) -> list[PairBatch]:
    """Pair batches of one step each: collate(prompts + prompts, chosen + rejected, "right")."""
    out = []
    for step in sorted({r.step for r in rows}):
        idx = [i for i, r in enumerate(rows) if r.step == step]
        for s in range(0, len(idx), size):
            part = idx[s : s + size]
            pairs = pair_batch([rows[i] for i in part], encoder)
            if ref is not None:
                pairs.ref_chosen = torch.tensor([ref[i][0] for i in part])
                pairs.ref_rejected = torch.tensor([ref[i][1] for i in part])
            out.append(pairs)
    return out


class MemoryLogger(Logger):
    """Keeps every logged metrics dict (the project's metrics mirror is not under test here)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []

    name, version = "memory", 0
    experiment = None

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def fit(module: StepDPOModule, batches: list[PairBatch], epochs: int, validate: bool = False) -> MemoryLogger:
    logger = MemoryLogger()
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader if validate else None)
    return logger


def module_for(model, weights, reference=None, lr=5e-3, **kw) -> StepDPOModule:
    opt = partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)
    return StepDPOModule(model, opt, weights=weights, reference=reference, beta=0.5, **kw)


def mean_loss(module: StepDPOModule, batches: list[PairBatch]) -> float:
    with torch.no_grad():
        return float(np.mean([module.step_output(b).out.losses.mean().item() for b in batches]))


# ---- packed pairs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2vl", "qwen25vl", "llava"])
def test_packed_pairs_equal_concatenated_forward_values_and_grads(family):
    bb = tiny(family, seed=1)
    rows = make_rows(bb.encoder)
    for pairs in batches_of(rows, bb.encoder):
        assert pack_pairs(bb.model, pairs.batch, pairs.n) is not None  # the packed path is taken
        bb.model.zero_grad()
        want, want_n = sequence_logps(bb.model, pairs.batch)  # [2B]
        (want * torch.linspace(0.5, 1.5, len(want))).sum().backward()
        want_grads = {k: p.grad.clone() for k, p in bb.model.named_parameters() if p.grad is not None}
        bb.model.zero_grad()
        got, got_n = pair_logps(bb.model, pairs.batch, pairs.n)
        (got * torch.linspace(0.5, 1.5, len(got))).sum().backward()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        assert torch.equal(got_n, want_n)
        assert want_grads.keys() == {k for k, p in bb.model.named_parameters() if p.grad is not None}
        for k, g in want_grads.items():
            torch.testing.assert_close(dict(bb.model.named_parameters())[k].grad, g, atol=1e-5, rtol=1e-4)


def test_packing_accepts_left_padded_batches():
    bb = tiny()
    rows = make_rows(bb.encoder, steps=("box",))
    enc = bb.encoder
    prompts = [r.prompt for r in rows] * 2
    batch = enc.collate(prompts, [r.completions[0] for r in rows] + [r.completions[1] for r in rows], "left")
    with torch.no_grad():
        want = sequence_logps(bb.model, pair_batch(rows, enc).batch)[0]  # right padded
        torch.testing.assert_close(pair_logps(bb.model, batch, 3)[0], want, atol=1e-4, rtol=1e-5)


def test_different_rejected_prompt_falls_back_to_concatenated_forward():
    bb = tiny()
    rows = make_rows(bb.encoder, steps=("answer",), own_crop=True)
    pairs = pair_batch(rows, bb.encoder)
    assert pack_pairs(bb.model, pairs.batch, pairs.n) is None  # crops differ: nothing to share
    with torch.no_grad():
        torch.testing.assert_close(
            pair_logps(bb.model, pairs.batch, 3)[0], sequence_logps(bb.model, pairs.batch)[0]
        )


# ---- training ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [STAGE1, STAGE2], ids=["stage1", "stage2"])
def test_stage_training_lowers_loss_changes_every_parameter_and_logs(weights):
    bb = tiny()
    rows = make_rows(bb.encoder)
    ref = compute_reference_logps(bb.model, rows, bb.encoder, batch_size=2)
    batches = batches_of(rows, bb.encoder, ref=ref)  # box batch + answer batch, reference precomputed
    module = module_for(bb.model, weights)
    trained = [b for b in batches if b.step in weights]
    before_loss = mean_loss(module, trained)
    before = {k: p.detach().clone() for k, p in bb.model.named_parameters() if p.requires_grad}
    logger = fit(module, batches, epochs=4, validate=True)
    assert mean_loss(module, trained) < before_loss - 0.05
    unchanged = [k for k, p in bb.model.named_parameters() if p.requires_grad and torch.equal(p, before[k])]
    assert unchanged == []
    keys = set().union(*logger.rows)
    for split in ("train", "val"):
        assert {f"{split}/loss"} | {f"{split}/{s}/{m}" for s in weights for m in METRICS} <= keys
        assert "answer" in weights or not any(k.startswith(f"{split}/answer/") for k in keys)


def test_stage1_skips_answer_batches_without_updating():
    bb = tiny()
    rows = make_rows(bb.encoder, steps=("answer",))
    batches = batches_of(rows, bb.encoder, ref=[(0.0, 0.0)] * len(rows))
    module = module_for(bb.model, STAGE1, reference=ExplodingReference())
    assert module.training_step(batches[0], 0) is None
    before = copy.deepcopy(bb.model.state_dict())
    logger = fit(module, batches, epochs=2)
    assert all(torch.equal(v, bb.model.state_dict()[k]) for k, v in before.items())
    assert not any(k.startswith("train/") for row in logger.rows for k in row)


def test_lora_training_with_adapter_disabled_reference():
    bb = apply_lora(tiny(), r=4, alpha=8)
    rows = make_rows(bb.encoder)
    module = module_for(bb.model, STAGE2, reference=AdapterDisabledReference())
    batches = batches_of(rows, bb.encoder)  # no precomputed values: the strategy is used every step
    lora = {k: p.detach().clone() for k, p in bb.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in k for k in lora)
    fit(module, batches, epochs=3)
    assert all(not torch.equal(p, lora[k]) for k, p in bb.model.named_parameters() if p.requires_grad)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == {f"model.{k}" for k in lora}


# ---- reference strategies --------------------------------------------------------------------------------
class ExplodingReference(ReferenceStrategy):
    def logps(self, pairs, policy=None):
        raise AssertionError("the strategy must not be called when the batch carries reference log-probs")


def test_adapter_disabled_reference_equals_base_model():
    base = tiny(seed=3)
    frozen_base = copy.deepcopy(base.model)
    bb = apply_lora(base, r=4, alpha=8)
    with torch.no_grad():  # a non-zero adapter, so policy and reference differ
        for name, p in bb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    rows = make_rows(bb.encoder)
    for pairs in batches_of(rows, bb.encoder):
        ref_c, ref_r = AdapterDisabledReference().logps(pairs, policy=bb.model)
        with torch.no_grad():
            base_logps, _ = sequence_logps(frozen_base, pairs.batch)
            policy_logps, _ = sequence_logps(bb.model, pairs.batch)
        torch.testing.assert_close(torch.cat([ref_c, ref_r]), base_logps, atol=1e-4, rtol=1e-5)
        assert (policy_logps - base_logps).abs().max() > 1e-2
    precomputed = compute_reference_logps(AdapterDisabledReference(bb.model), rows, bb.encoder)
    with torch.no_grad():
        prompts = [r.prompt for r in rows] + [r.rejected_prompt or r.prompt for r in rows]
        completions = [r.completions[0] for r in rows] + [r.completions[1] for r in rows]
        base_all, _ = sequence_logps(
            frozen_base, bb.encoder.collate(prompts, completions, "right")
        )  # [2 * 6]
    np.testing.assert_allclose(np.array(precomputed), base_all.view(2, -1).T.numpy(), atol=1e-4)
    with pytest.raises(TypeError, match="not a peft.PeftModel"):
        AdapterDisabledReference().logps(batches_of(rows, bb.encoder)[0], policy=frozen_base)


def test_precomputed_equals_frozen_copy_and_survives_training():
    bb = tiny(seed=4)
    rows = make_rows(bb.encoder)
    frozen = FrozenCopyReference(bb.model)
    precomputed = compute_reference_logps(frozen, rows, bb.encoder, batch_size=2)
    bb.model.train()
    plain = compute_reference_logps(bb.model, rows, bb.encoder, batch_size=4)
    np.testing.assert_allclose(np.array(plain), np.array(precomputed), atol=1e-4)
    assert bb.model.training and all(p.requires_grad for p in bb.model.parameters())  # mode restored
    module = module_for(bb.model, STAGE2, reference=frozen)
    fit(module, batches_of(rows, bb.encoder), epochs=1)  # the policy moves, the frozen copy does not
    again = compute_reference_logps(frozen, rows, bb.encoder, batch_size=3)
    np.testing.assert_allclose(np.array(again), np.array(precomputed), atol=1e-4)
    moved = compute_reference_logps(bb.model, rows, bb.encoder)
    assert np.abs(np.array(moved) - np.array(precomputed)).max() > 1e-3
    # from a loader of pair batches, in the loader's order
    loader = batches_of(rows, bb.encoder, size=2)
    flat = [(c, r) for b in loader for c, r in zip(*(t.tolist() for t in frozen.logps(b)))]
    assert compute_reference_logps(frozen, loader) == flat


def test_precomputed_reference_logps_in_the_batch_are_used():
    bb = tiny(seed=5)
    rows = make_rows(bb.encoder, steps=("box",))
    with torch.no_grad():
        logps, _ = sequence_logps(bb.model, pair_batch(rows, bb.encoder).batch)  # [6]
    shift = [(float(logps[i]) - 1.0, float(logps[3 + i]) + 2.0) for i in range(3)]
    pairs = batches_of(rows, bb.encoder, ref=shift)[0]
    module = module_for(bb.model, STAGE1, reference=ExplodingReference())
    out = module.step_output(pairs).out
    torch.testing.assert_close(out.chosen_rewards, torch.full((3,), 0.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.rejected_rewards, torch.full((3,), -1.0), atol=1e-4, rtol=0)
    pairs.ref_chosen = pairs.ref_rejected = None
    with pytest.raises(KeyError, match="no ref_chosen / ref_rejected"):
        module_for(bb.model, STAGE1).step_output(pairs)


def test_ftx_adds_the_weighted_sft_term():
    bb = tiny(seed=6)
    rows = make_rows(bb.encoder, steps=("answer",))
    pairs = batches_of(rows, bb.encoder, ref=[(-50.0, -50.0)] * 3)[0]
    plain = module_for(bb.model, STAGE2).step_output(pairs)
    with_ftx = module_for(bb.model, STAGE2, ftx=2.0).step_output(pairs)
    with torch.no_grad():
        logps, counts = sequence_logps(bb.model, pairs.batch)
    sft = (-logps[:3] / counts[:3]).mean()
    torch.testing.assert_close(with_ftx.loss, plain.loss + 0.5 * 2.0 * sft, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("weights", [{}, {"box": -1.0}, {"box": 0.0}, {"box": float("nan")}])
def test_bad_weights_are_rejected(weights):
    with pytest.raises(ValueError, match="weights"):
        module_for(torch.nn.Linear(2, 2), weights)


# ---- fingerprints and cache ------------------------------------------------------------------------------
def test_reference_cache_reuses_values_across_a_beta_sweep(tmp_path):
    bb = tiny(seed=7)
    rows = make_rows(bb.encoder)
    key = {
        "model": model_fingerprint(bb.model),
        "data": rows_fingerprint(rows),
        "processor": processor_fingerprint(bb.encoder),
    }
    calls = []

    def compute():
        calls.append(1)
        return compute_reference_logps(bb.model, rows, bb.encoder)

    cache = ReferenceCache(tmp_path / "ref")
    first = cache.get_or_compute(key, compute)
    assert cache.get_or_compute(key, compute) == first and len(calls) == 1  # beta 0.1, 0.2, ...: one compute
    assert rows_fingerprint(make_rows(tiny(seed=7).encoder)) == key["data"]  # re-encoding is stable
    assert model_fingerprint(tiny(seed=7).model) == key["model"]
    with torch.no_grad():
        next(bb.model.parameters()).add_(1e-3)
    assert model_fingerprint(bb.model) != key["model"]
    cache.get_or_compute({**key, "model": model_fingerprint(bb.model)}, compute)
    assert len(calls) == 2
    path = cache.path(key)
    path.write_text(json.dumps({"key": {"model": "other"}, "logps": []}))
    with pytest.raises(ValueError, match="field 'key'"):
        cache.get_or_compute(key, compute)
    assert isinstance(PrecomputedReference(), ReferenceStrategy)
