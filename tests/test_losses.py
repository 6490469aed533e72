"""Tests for visrl.losses: hand-derived values, gradient signs, registry, step weights, agreement with TRL."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from visrl.losses import (
    PREFERENCE_LOSSES,
    REFERENCE_STAGE_WEIGHTS,
    PreferenceLossOutput,
    preference_loss,
    sft_term,
    step_dpo_loss,
)

torch.set_num_threads(1)


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# One hand example: pi_c - ref_c = 2, pi_r - ref_r = -1, so delta = 3 and, at beta = 0.1, beta * delta = 0.3.
PC, PR, RC, RR = _t(-10.0), _t(-20.0), _t(-12.0), _t(-19.0)
SP = math.log1p(math.exp(-0.3))  # -log s(0.3)  = log(1 + e^-0.3) = 0.554355
SN = 0.3 + SP  # -log s(-0.3) = log(1 + e^0.3) = 0.3 + log(1 + e^-0.3) = 0.854355


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        # DPO: -log s(0.3) = log(1 + e^-0.3)
        ("sigmoid", {}, 0.5543552),
        # cDPO eps = 0.1: 0.9 * 0.554355 + 0.1 * 0.854355 = 0.498920 + 0.085436
        ("sigmoid", {"label_smoothing": 0.1}, 0.5843552),
        # robust eps = 0.1: (0.9 * 0.554355 - 0.1 * 0.854355) / (1 - 0.2) = 0.413484 / 0.8
        ("robust", {"label_smoothing": 0.1}, 0.5168552),
        # robust eps = 0 is DPO
        ("robust", {}, 0.5543552),
        # hinge: relu(1 - 0.3)
        ("hinge", {}, 0.7),
        # IPO on sums: (3 - 1 / (2 * 0.1))^2 = (3 - 5)^2
        ("ipo", {}, 4.0),
        # IPO per token, n_c = 4, n_r = 2: 2/4 - (-1)/2 = 1, (1 - 5)^2
        ("ipo", {"chosen_n_tokens": torch.tensor([4]), "rejected_n_tokens": torch.tensor([2])}, 16.0),
    ],
)
def test_hand_values(name: str, options: dict, expected: float) -> None:
    """beta = 0.1, pi_c - ref_c = -10 - (-12) = 2, pi_r - ref_r = -20 - (-19) = -1: delta = 3, logits 0.3.

    Each expected loss is derived in the comment above its row; rewards are 0.1 * 2 and 0.1 * -1.
    """
    out = preference_loss(name, PC, PR, RC, RR, beta=0.1, **options)
    assert isinstance(out, PreferenceLossOutput)
    assert out.losses.shape == (1,)
    assert out.losses.item() == pytest.approx(expected, abs=1e-6)
    # rewards: beta * log-ratio = 0.1 * 2 and 0.1 * -1, the same for every loss
    assert out.chosen_rewards.item() == pytest.approx(0.2)
    assert out.rejected_rewards.item() == pytest.approx(-0.1)


def test_hand_constants_match_formulas() -> None:
    """The decimals typed into test_hand_values, recomputed from log(1 + e^-0.3) and log(1 + e^0.3)."""
    assert abs(SP - 0.5543552) < 1e-6
    assert abs(0.9 * SP + 0.1 * SN - 0.5843552) < 1e-6
    assert abs((0.9 * SP - 0.1 * SN) / 0.8 - 0.5168552) < 1e-6


def test_metrics_summary() -> None:
    out = preference_loss("sigmoid", _t(-1, -1), _t(-3, 0), _t(-2, -1), _t(-2, -2), beta=0.5)
    # rewards chosen 0.5 * (1, 0) = (0.5, 0); rejected 0.5 * (-1, 2) = (-0.5, 1); margins (1, -1)
    m = out.metrics("stage1/")
    assert m["stage1/rewards/chosen"] == pytest.approx(0.25)
    assert m["stage1/rewards/rejected"] == pytest.approx(0.25)
    assert m["stage1/rewards/margins"] == pytest.approx(0.0)
    assert m["stage1/rewards/accuracies"] == pytest.approx(0.5)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_gradient_signs(name: str) -> None:
    """Where the loss is active, it pushes the chosen log-prob up and the rejected one down."""
    pc = _t(-10.0, -4.0).requires_grad_()
    pr = _t(-10.0, -6.0).requires_grad_()
    rc, rr = _t(-10.0, -5.0), _t(-10.0, -5.0)  # delta = 0 and delta = 2: both below hinge/IPO targets
    out = preference_loss(name, pc, pr, rc, rr, beta=0.1)
    out.losses.sum().backward()
    assert (pc.grad < 0).all(), pc.grad
    assert (pr.grad > 0).all(), pr.grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_ipo_pulls_back_beyond_target_margin() -> None:
    """IPO regresses delta onto 1 / (2 beta) = 5: beyond it the gradient flips sign (DPO's does not)."""
    pc, pr = _t(0.0).requires_grad_(), _t(-8.0).requires_grad_()  # delta = 8 > 5
    preference_loss("ipo", pc, pr, _t(0.0), _t(0.0), beta=0.1).losses.sum().backward()
    assert pc.grad.item() == pytest.approx(2 * (8 - 5)) and pr.grad.item() == pytest.approx(-2 * (8 - 5))


def test_hinge_is_flat_past_margin() -> None:
    pc = _t(0.0).requires_grad_()
    out = preference_loss("hinge", pc, _t(-20.0), _t(0.0), _t(0.0), beta=0.1)  # 1 - 0.1 * 20 < 0
    out.losses.sum().backward()
    assert out.losses.item() == 0.0 and pc.grad.item() == 0.0


def test_registry_and_errors() -> None:
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "robust", "ipo", "hinge"}
    with pytest.raises(ValueError, match=r"unknown preference loss 'dpo'.*hinge.*ipo.*robust.*sigmoid"):
        preference_loss("dpo", PC, PR, RC, RR)
    with pytest.raises(ValueError, match="ref_rejected_logps must be a 1-D tensor"):
        preference_loss("sigmoid", PC, PR, RC, _t(1.0, 2.0))
    with pytest.raises(ValueError, match="beta"):
        preference_loss("sigmoid", PC, PR, RC, RR, beta=0.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        preference_loss("robust", PC, PR, RC, RR, label_smoothing=0.5)
    with pytest.raises(ValueError, match="no meaning"):
        preference_loss("hinge", PC, PR, RC, RR, label_smoothing=0.1)
    with pytest.raises(ValueError, match="both"):
        preference_loss("ipo", PC, PR, RC, RR, chosen_n_tokens=torch.tensor([3]))


def test_summed_losses_accept_and_ignore_token_counts() -> None:
    n = {"chosen_n_tokens": torch.tensor([4]), "rejected_n_tokens": torch.tensor([2])}
    for name in ("sigmoid", "robust", "hinge"):
        with_n = preference_loss(name, PC, PR, RC, RR, **n).losses
        assert torch.equal(with_n, preference_loss(name, PC, PR, RC, RR).losses)


def test_sft_term() -> None:
    # -(-6) / 3 = 2 and -(-1) / 1 = 1; a zero count is clamped to 1: -(-0.5) / 1
    got = sft_term(_t(-6.0, -1.0, -0.5), torch.tensor([3, 1, 0]))
    assert got.tolist() == pytest.approx([2.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="sft_term"):
        sft_term(_t(-6.0), torch.tensor([3, 1]))


def test_step_dpo_loss_weights() -> None:
    box = PreferenceLossOutput(_t(1.0, 3.0), _t(0, 0), _t(0, 0))  # mean 2
    ans = PreferenceLossOutput(_t(4.0, 8.0), _t(0, 0), _t(0, 0))  # mean 6
    steps = {"box": box, "answer": ans}
    assert step_dpo_loss(steps, REFERENCE_STAGE_WEIGHTS["stage1"]).item() == pytest.approx(2.0)  # 1 * 2
    assert step_dpo_loss(steps, REFERENCE_STAGE_WEIGHTS["stage2"]).item() == pytest.approx(4.0)  # .5*2 + .5*6
    assert step_dpo_loss(steps, {"answer": 0.25}).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match=r"weighted steps \['answer'\] have no loss"):
        step_dpo_loss({"box": box}, {"box": 0.5, "answer": 0.5})
    for bad in ({}, {"box": -1.0}, {"box": float("nan")}, {"box": 0.0}):
        with pytest.raises(ValueError, match="step_dpo_loss"):
            step_dpo_loss(steps, bad)


def test_step_dpo_loss_adds_the_weighted_ftx_term() -> None:
    """``w * (mean L + ftx * mean sft)`` per step (the SFT term is part of the step's objective)."""
    box = PreferenceLossOutput(_t(1.0, 3.0), _t(0, 0), _t(0, 0))  # mean 2
    sft = {"box": _t(0.5, 1.5)}  # mean 1
    assert step_dpo_loss({"box": box}, {"box": 0.5}, sft, ftx=2.0).item() == pytest.approx(0.5 * (2 + 2 * 1))
    assert step_dpo_loss({"box": box}, {"box": 0.5}, sft, ftx=0.0).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs the SFT term"):
        step_dpo_loss({"box": box}, {"box": 0.5}, None, ftx=1.0)
    with pytest.raises(ValueError, match="ftx must be finite"):
        step_dpo_loss({"box": box}, {"box": 0.5}, sft, ftx=-1.0)


def test_step_dpo_loss_weighs_the_preference_term() -> None:
    """``w * (pref * mean L + ftx * mean sft)``: pref 0 is the ftx-only control, pref 1 the default."""
    box = PreferenceLossOutput(_t(1.0, 3.0), _t(0, 0), _t(0, 0))  # mean 2
    sft = {"box": _t(0.5, 1.5)}  # mean 1
    assert step_dpo_loss({"box": box}, {"box": 0.5}, sft, ftx=2.0, pref=0.0).item() == pytest.approx(0.5 * 2)
    assert step_dpo_loss({"box": box}, {"box": 0.5}, sft, ftx=2.0, pref=0.25).item() == pytest.approx(
        0.5 * 2.5
    )
    assert step_dpo_loss({"box": box}, {"box": 1.0}, sft, ftx=1.0, pref=1.0).item() == pytest.approx(3.0)
    for bad in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="pref must be finite"):
            step_dpo_loss({"box": box}, {"box": 0.5}, sft, ftx=1.0, pref=bad)
    with pytest.raises(ValueError, match=r"pref \+ ftx > 0"):  # nothing left to train
        step_dpo_loss({"box": box}, {"box": 0.5}, sft, ftx=0.0, pref=0.0)


def test_step_dpo_loss_gradient_flows_to_both_steps() -> None:
    pc_box, pc_ans = _t(-3.0).requires_grad_(), _t(-5.0).requires_grad_()
    box = preference_loss("sigmoid", pc_box, _t(-3.0), _t(-3.0), _t(-3.0))
    ans = preference_loss("sigmoid", pc_ans, _t(-5.0), _t(-5.0), _t(-5.0))
    step_dpo_loss({"box": box, "answer": ans}, {"box": 0.5, "answer": 0.5}).backward()
    # d/dx of -log s(0.1 x) at x = 0 is -0.1 * s(0) = -0.05; times 0.5
    assert pc_box.grad.item() == pytest.approx(-0.025) and pc_ans.grad.item() == pytest.approx(-0.025)


# ---------------------------------------------------------------- agreement with TRL's DPOTrainer


class _StubModel:
    """Stands in for the policy: returns canned outputs whatever the batch (only ``.training`` is read)."""

    training = True

    def __init__(self, outputs: SimpleNamespace) -> None:
        self.outputs = outputs

    def __call__(self, **kwargs: object) -> SimpleNamespace:
        return self.outputs


def _trl_losses(loss_type: str, pc, pr, rc, rr, nc, nr, beta: float, label_smoothing: float) -> torch.Tensor:
    """Per-example losses from ``trl.DPOTrainer._compute_loss`` (trl 1.x: the loss is inline there).

    A bare ``DPOTrainer`` (no ``__init__``) gets only the attributes ``_compute_loss`` reads; the "model" is
    a stub whose per-token log-probs, zero outside the completion, sum to the given sequence log-probs,
    and the reference log-probs come precomputed in the batch. One call per example gives per-example losses.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    seq_len = 1 + int(max(nc.max(), nr.max()))  # one prompt token, then completions right-aligned
    losses = []
    for i in range(len(pc)):
        completion_mask = torch.zeros(2, seq_len, dtype=torch.long)  # rows: [chosen, rejected]
        completion_mask[0, seq_len - int(nc[i]) :] = 1
        completion_mask[1, seq_len - int(nr[i]) :] = 1
        shifted = completion_mask[:, 1:].double()  # [2, L-1]: positions whose token is a completion token
        per_token = shifted * torch.stack([pc[i], pr[i]])[:, None] / shifted.sum(dim=1, keepdim=True)
        outputs = SimpleNamespace(
            log_probs=per_token,
            entropy=torch.zeros_like(per_token),
            mean_logits=torch.zeros_like(per_token),
            is_top1=torch.zeros_like(per_token, dtype=torch.bool),
        )
        model = _StubModel(outputs)
        trainer = DPOTrainer.__new__(DPOTrainer)
        trainer.__dict__.update(
            model=model,
            accelerator=SimpleNamespace(
                device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t
            ),
            aux_loss_enabled=False,
            ld_alpha=None,
            precompute_ref_logps=True,
            f_divergence_type="reverse_kl",
            loss_types=[loss_type],
            loss_weights=[1.0],
            beta=beta,
            label_smoothing=label_smoothing,
            use_weighting=False,
            _metrics=defaultdict(lambda: defaultdict(list)),
            _total_train_tokens=0,
            _tp_size=1,
        )
        inputs = {
            "input_ids": torch.zeros(2, seq_len, dtype=torch.long),
            "attention_mask": torch.ones(2, seq_len, dtype=torch.long),
            "completion_mask": completion_mask,
            "ref_chosen_logps": rc[i : i + 1],
            "ref_rejected_logps": rr[i : i + 1],
        }
        losses.append(trainer._compute_loss(model, inputs, return_outputs=False))
    return torch.stack(losses)


@pytest.fixture(scope="module")
def random_batch() -> dict[str, torch.Tensor]:
    pytest.importorskip("trl.trainer.dpo_trainer", reason="trl (a test-only dependency) is not installed")
    g = torch.Generator().manual_seed(0)
    b = 8
    pc = -torch.empty(b, dtype=torch.float64).uniform_(2, 60, generator=g)
    pr = -torch.empty(b, dtype=torch.float64).uniform_(2, 60, generator=g)
    return {
        "pc": pc,
        "pr": pr,
        "rc": pc + 3 * torch.randn(b, generator=g, dtype=torch.float64),
        "rr": pr + 3 * torch.randn(b, generator=g, dtype=torch.float64),
        "nc": torch.randint(1, 30, (b,), generator=g),
        "nr": torch.randint(1, 30, (b,), generator=g),
    }


@pytest.mark.parametrize(
    ("name", "beta", "eps"),
    [
        ("sigmoid", 0.1, 0.0),
        ("sigmoid", 0.5, 0.0),
        ("robust", 0.1, 0.1),
        ("robust", 0.3, 0.25),
        ("hinge", 0.1, 0.0),
    ]
    + [("hinge", 0.05, 0.0), ("ipo", 0.1, 0.0), ("ipo", 0.02, 0.0)],
)
def test_agrees_with_trl(random_batch: dict[str, torch.Tensor], name: str, beta: float, eps: float) -> None:
    b = random_batch
    ours = preference_loss(
        name, b["pc"], b["pr"], b["rc"], b["rr"], beta=beta, label_smoothing=eps,
        chosen_n_tokens=b["nc"], rejected_n_tokens=b["nr"],
    )  # fmt: skip
    theirs = _trl_losses(name, b["pc"], b["pr"], b["rc"], b["rr"], b["nc"], b["nr"], beta, eps)
    torch.testing.assert_close(ours.losses, theirs, rtol=1e-9, atol=1e-9)


def test_label_smoothed_sigmoid_agrees_with_trl(random_batch: dict[str, torch.Tensor]) -> None:
    """trl 1.x's 'sigmoid' no longer applies label smoothing (its cDPO form was removed); cDPO is the mixture
    (1 - eps) * DPO(chosen > rejected) + eps * DPO(rejected > chosen), so build it from TRL's plain DPO."""
    b, eps, beta = random_batch, 0.2, 0.1
    ours = preference_loss("sigmoid", b["pc"], b["pr"], b["rc"], b["rr"], beta=beta, label_smoothing=eps)
    forward = _trl_losses("sigmoid", b["pc"], b["pr"], b["rc"], b["rr"], b["nc"], b["nr"], beta, 0.0)
    swapped = _trl_losses("sigmoid", b["pr"], b["pc"], b["rr"], b["rc"], b["nr"], b["nc"], beta, 0.0)
    torch.testing.assert_close(ours.losses, (1 - eps) * forward + eps * swapped, rtol=1e-9, atol=1e-9)
