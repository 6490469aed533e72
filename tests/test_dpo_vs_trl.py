"""StepDPOModule computes the same DPO loss and metrics as TRL's DPOTrainer on the same batch.

TRL (1.16) is a test-only dependency. Its ``DPOTrainer.compute_loss`` runs on a batch built by TRL's own
vision collator from the same rows (messages + images); our module runs on the same token sequences in
our layout (``labels`` = input ids on TRL's ``completion_mask``), and, the other way round, TRL runs on a
batch collated by our encoder. Full fine-tuning (TRL ``ref_model=`` vs :class:`FrozenCopyReference`) and
LoRA (TRL's adapter disabling vs :class:`AdapterDisabledReference`) are both checked.
"""

from __future__ import annotations

import copy
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from visrl.data.prompts import PromptTemplates
from visrl.data.rows import PairBatch
from visrl.models.backbone import apply_lora
from visrl.models.tiny import build_tiny
from visrl.training.reference import AdapterDisabledReference, FrozenCopyReference
from visrl.training.step_dpo import StepDPOModule

trl_dpo = pytest.importorskip(
    "trl.trainer.dpo_trainer", reason="trl (a test-only dependency) is not installed"
)
datasets = pytest.importorskip("datasets")

torch.set_num_threads(1)
TEMPLATES = PromptTemplates(box="{question} Where?\n<image>", answer="{question} Answer.\n<image>\n<image>")
PAIRS = {
    "box": [
        ("What colour is the star?", "[1, 1, 3, 3]", "[0, 0, 1, 4]"),
        ("How many circles?", "[2, 0, 4, 2]", "[0, 3, 1, 4]"),
    ],
    "answer": [
        ("What colour is the star?", "red", "a blue square"),
        ("How many circles?", "three small ones", "two"),
    ],
}
BETA = 0.2


def image(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def prompts(step: str):
    """Our Prompt objects of one step's pairs (box: one image; answer: image + crop)."""
    out = []
    for i, (q, _, _) in enumerate(PAIRS[step]):
        full = image(i)
        out.append(
            TEMPLATES.box_prompt(q, full)
            if step == "box"
            else TEMPLATES.answer_prompt(q, full, image(10 + i, (40, 24)))
        )
    return out


def trl_examples(step: str, encoder) -> list[dict]:
    """The same pairs as TRL conversational vision examples (structured contents keep image positions)."""
    out = []
    for prompt, (_, chosen, rejected) in zip(prompts(step), PAIRS[step]):
        out.append(
            {
                "images": [im for m in prompt for im in m.images],
                "prompt": encoder.conversation(prompt),
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
            }
        )
    return out


def trl_trainer(model, ref_model, encoder, loss: str, label_smoothing: float, tmp_path, peft_config=None):
    examples = trl_examples("box", encoder) + trl_examples("answer", encoder)
    args = trl_dpo.DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_checkpointing=False,
        report_to=[],
        use_cpu=True,
        beta=BETA,
        loss_type=[loss],
        label_smoothing=label_smoothing,
        max_length=None,
        bf16=False,
        seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl_dpo.DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            processing_class=encoder.processor,
            train_dataset=datasets.Dataset.from_list(examples),
            peft_config=peft_config,
        )
    trainer.model.train()
    return trainer


def ours_from_trl(inputs: dict, step: str) -> PairBatch:
    """TRL's collated batch -> our pair batch (same token sequences; completion mask -> labels)."""
    batch = {k: v for k, v in inputs.items() if k != "completion_mask"}
    batch["labels"] = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    return PairBatch(step, inputs["input_ids"].shape[0] // 2, batch)


def trl_from_ours(pairs: PairBatch) -> dict:
    """Our pair batch -> TRL inputs (completion mask from labels)."""
    inputs = {k: v for k, v in pairs.batch.items() if k != "labels"}
    inputs["completion_mask"] = (pairs.batch["labels"] != -100).long()
    return inputs


def our_pairs(step: str, encoder) -> PairBatch:
    ps = [encoder.encode_prompt(p) for p in prompts(step)]
    comps = [encoder.encode_completion(c) for _, c, _ in PAIRS[step]] + [
        encoder.encode_completion(r) for _, _, r in PAIRS[step]
    ]
    return PairBatch(step, len(ps), encoder.collate(ps + ps, comps, "right"))


def _perturb(model, only: str | None, scale: float) -> None:
    """Move the policy away from the reference so that rewards are not zero."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (only is None or only in name):
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def setups(lora: bool, loss: str, eps: float, tmp_path):
    """(TRL trainer, our policy, our reference strategy, encoder) with equal policy and reference weights.

    LoRA: TRL wraps the base model itself (``peft_config``), so its reference is the adapter-disabled
    model, as in VisRL; wrapping first would make TRL copy the adapter as its reference instead.
    """
    bb = build_tiny("qwen2vl", text_hidden=64, text_layers=1, vision_hidden=64, vision_layers=1, seed=11)
    base = copy.deepcopy(bb.model)
    if lora:
        ours = apply_lora(bb, r=4, alpha=8)
        config = copy.deepcopy(ours.model.peft_config["default"])
        trainer = trl_trainer(base, None, bb.encoder, loss, eps, tmp_path, peft_config=config)
        _perturb(trainer.model, "lora_B", 0.3)
        ours.model.load_state_dict(trainer.model.state_dict())
        return trainer, ours.model, AdapterDisabledReference(), bb.encoder
    _perturb(bb.model, None, 0.02)
    trainer = trl_trainer(copy.deepcopy(bb.model), copy.deepcopy(base), bb.encoder, loss, eps, tmp_path)
    return trainer, bb.model, FrozenCopyReference(base), bb.encoder


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize(("loss", "eps"), [("sigmoid", 0.0), ("robust", 0.1), ("ipo", 0.0), ("hinge", 0.0)])
def test_loss_and_metrics_equal_trl(lora, loss, eps, tmp_path):
    trainer, our_model, reference, encoder = setups(lora, loss, eps, tmp_path)
    opt = partial(torch.optim.AdamW, lr=1e-3)
    module = StepDPOModule(
        our_model,
        opt,
        weights={"box": 1.0, "answer": 1.0},
        loss=loss,
        beta=BETA,
        label_smoothing=eps,
        reference=reference,
    )
    module.train()
    for step in ("box", "answer"):
        trl_batch = trainer.data_collator(copy.deepcopy(trl_examples(step, encoder)))
        for trl_inputs, pairs in [
            (trl_batch, ours_from_trl(trl_batch, step)),
            (trl_from_ours(our_pairs(step, encoder)), our_pairs(step, encoder)),
        ]:
            trainer._metrics["train"].clear()
            trainer.model.zero_grad()
            module.zero_grad()
            theirs = trainer.compute_loss(trainer.model, trl_inputs)
            result = module.step_output(pairs)
            torch.testing.assert_close(result.loss, theirs.detach(), atol=1e-5, rtol=1e-5)
            theirs.backward()
            result.loss.backward()
            their_grads = {k: p.grad for k, p in trainer.model.named_parameters() if p.requires_grad}
            assert all(p.grad is not None for p in our_model.parameters() if p.requires_grad)
            for name, p in our_model.named_parameters():
                if p.requires_grad:
                    torch.testing.assert_close(p.grad, their_grads[name], atol=1e-5, rtol=1e-4)
            ours_metrics = result.metrics()
            for key in (
                "rewards/chosen",
                "rewards/rejected",
                "rewards/margins",
                "rewards/accuracies",
                "logps/chosen",
                "logps/rejected",
            ):
                assert ours_metrics[key].item() == pytest.approx(trainer._metrics["train"][key][-1], abs=1e-4)
        assert abs(ours_metrics["rewards/margins"].item()) > 1e-3  # a non-trivial comparison
