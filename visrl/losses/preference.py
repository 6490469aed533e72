"""Pairwise preference losses on sequence log-probs (VisRL §3.3).

VisRL trains both steps (the focus box, then the answer) with standard sigmoid DPO (Rafailov et al. 2023)
on *summed* completion log-probs, beta = 0.1, no label smoothing: that is :func:`sigmoid_loss` with its
defaults. The other losses are drop-in alternatives for ablations, with the formulas of TRL's
``DPOTrainer`` (``trl/trainer/dpo_trainer.py``, checked against trl 1.16 in ``tests/test_losses.py``).

Every loss has the same signature: the policy and reference log-probs of the chosen and rejected
completions, each a 1-D tensor ``[B]``, plus keyword options, and returns a :class:`PreferenceLossOutput`
with *per-example* losses (the caller reduces them). Write ``r_c = logp_pi(y_w) - logp_ref(y_w)``,
``r_r = logp_pi(y_l) - logp_ref(y_l)`` and ``delta = r_c - r_r``:

==========  ===========================================================================================
sigmoid     ``-(1 - eps) log s(beta delta) - eps log s(-beta delta)``; ``eps = label_smoothing = 0`` is
            DPO, ``eps > 0`` is conservative DPO (cDPO, Mitchell 2023; TRL <= 0.2x's sigmoid loss).
robust      ``[-(1 - eps) log s(beta delta) + eps log s(-beta delta)] / (1 - 2 eps)``: the unbiased robust
            DPO of Chowdhury et al. 2024, ``eps`` = label-flip rate in [0, 0.5).
ipo         ``(delta' - 1 / (2 beta))^2`` (Azar et al. 2023, eq. 17; ``beta`` is their tau). With
            ``chosen_n_tokens`` / ``rejected_n_tokens`` given, ``delta' = r_c / n_c - r_r / n_r`` uses the
            per-token *mean* log-ratios, exactly as TRL does (counts clamped to >= 1); without them,
            ``delta' = delta`` on summed log-probs (the paper's formula, which scales with length).
hinge       ``max(0, 1 - beta delta)`` (SLiC-HF, Zhao et al. 2023; ``1 / beta`` is the margin).
==========  ===========================================================================================

``s`` is the logistic sigmoid. Rewards are ``beta * r_c`` and ``beta * r_r`` (detached) for every loss, as
TRL logs them. Token counts are accepted (and ignored) by the summed losses so that a caller can switch
losses by name without knowing which ones use them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PREFERENCE_LOSSES",
    "PreferenceLossFn",
    "PreferenceLossOutput",
    "hinge_loss",
    "ipo_loss",
    "preference_loss",
    "robust_loss",
    "sigmoid_loss",
]


class PreferenceLossOutput(NamedTuple):
    """Per-example results of a preference loss; every field has shape ``[B]``."""

    losses: Tensor  # [B], differentiable
    chosen_rewards: Tensor  # [B], beta * (logp_pi(y_w) - logp_ref(y_w)), detached
    rejected_rewards: Tensor  # [B], beta * (logp_pi(y_l) - logp_ref(y_l)), detached

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Batch means for logging: loss, rewards/{chosen,rejected,margins,accuracies}."""
        margins = self.chosen_rewards - self.rejected_rewards  # [B]
        return {
            f"{prefix}loss": self.losses.detach().mean().item(),
            f"{prefix}rewards/chosen": self.chosen_rewards.mean().item(),
            f"{prefix}rewards/rejected": self.rejected_rewards.mean().item(),
            f"{prefix}rewards/margins": margins.mean().item(),
            f"{prefix}rewards/accuracies": (margins > 0).float().mean().item(),
        }


class PreferenceLossFn(Protocol):
    def __call__(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor,
        *,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        chosen_n_tokens: Tensor | None = None,
        rejected_n_tokens: Tensor | None = None,
    ) -> PreferenceLossOutput: ...


def _log_ratios(
    name: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """Validate the four ``[B]`` inputs and ``beta``; return the log-ratios ``(r_c, r_r)``, each ``[B]``."""
    named = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    shape = policy_chosen_logps.shape
    for field, t in named.items():
        if t.dim() != 1 or t.shape != shape:
            raise ValueError(
                f"visrl.losses.{name}: {field} must be a 1-D tensor [B] like policy_chosen_logps "
                f"{tuple(shape)}, got shape {tuple(t.shape)}"
            )
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"visrl.losses.{name}: beta must be a finite number > 0, got {beta}")
    return policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps


def _output(
    losses: Tensor, chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float
) -> PreferenceLossOutput:
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )


def _check_smoothing(name: str, label_smoothing: float, upper: float, closed: bool) -> None:
    ok = 0.0 <= label_smoothing <= upper if closed else 0.0 <= label_smoothing < upper
    if not ok:
        interval = f"[0, {upper}]" if closed else f"[0, {upper})"
        raise ValueError(f"visrl.losses.{name}: label_smoothing must be in {interval}, got {label_smoothing}")


def _no_smoothing(name: str, label_smoothing: float) -> None:
    if label_smoothing != 0.0:
        raise ValueError(
            f"visrl.losses.{name}: label_smoothing={label_smoothing} has no meaning for this loss; "
            "use 'sigmoid' (cDPO) or 'robust'"
        )


def sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_n_tokens: Tensor | None = None,
    rejected_n_tokens: Tensor | None = None,
) -> PreferenceLossOutput:
    """DPO (``label_smoothing = 0``, the VisRL reference) or conservative DPO (``0 < eps <= 0.5``)."""
    r_c, r_r = _log_ratios(
        "sigmoid", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    _check_smoothing("sigmoid", label_smoothing, 0.5, closed=True)
    logits = beta * (r_c - r_r)  # [B]
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return _output(losses, r_c, r_r, beta)


def robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_n_tokens: Tensor | None = None,
    rejected_n_tokens: Tensor | None = None,
) -> PreferenceLossOutput:
    """Robust DPO (Chowdhury et al. 2024): unbiased under label flips with rate ``label_smoothing``."""
    r_c, r_r = _log_ratios(
        "robust", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    _check_smoothing("robust", label_smoothing, 0.5, closed=False)
    logits = beta * (r_c - r_r)  # [B]
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return _output(losses, r_c, r_r, beta)


def _per_token(name: str, field: str, logratios: Tensor, n_tokens: Tensor) -> Tensor:
    if n_tokens.shape != logratios.shape:
        raise ValueError(
            f"visrl.losses.{name}: {field} must have shape {tuple(logratios.shape)}, got {tuple(n_tokens.shape)}"
        )
    return logratios / n_tokens.to(logratios.dtype).clamp(min=1.0)  # [B]


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_n_tokens: Tensor | None = None,
    rejected_n_tokens: Tensor | None = None,
) -> PreferenceLossOutput:
    """IPO (Azar et al. 2023); per-token mean log-ratios when both token counts are given (as TRL)."""
    r_c, r_r = _log_ratios(
        "ipo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    _no_smoothing("ipo", label_smoothing)
    if (chosen_n_tokens is None) != (rejected_n_tokens is None):
        raise ValueError("visrl.losses.ipo: give both chosen_n_tokens and rejected_n_tokens, or neither")
    if chosen_n_tokens is not None and rejected_n_tokens is not None:
        delta = _per_token("ipo", "chosen_n_tokens", r_c, chosen_n_tokens) - _per_token(
            "ipo", "rejected_n_tokens", r_r, rejected_n_tokens
        )
    else:
        delta = r_c - r_r  # [B], summed log-probs
    losses = (delta - 1 / (2 * beta)) ** 2
    return _output(losses, r_c, r_r, beta)


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_n_tokens: Tensor | None = None,
    rejected_n_tokens: Tensor | None = None,
) -> PreferenceLossOutput:
    """SLiC-style hinge loss ``relu(1 - beta * delta)`` on summed log-ratios."""
    r_c, r_r = _log_ratios(
        "hinge", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    _no_smoothing("hinge", label_smoothing)
    losses = torch.relu(1 - beta * (r_c - r_r))
    return _output(losses, r_c, r_r, beta)


PREFERENCE_LOSSES: Mapping[str, PreferenceLossFn] = {
    "sigmoid": sigmoid_loss,
    "robust": robust_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
}


def preference_loss(
    name: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    **options: float | Tensor | None,
) -> PreferenceLossOutput:
    """Dispatch to ``PREFERENCE_LOSSES[name]``; ``options`` are its keyword options (beta, ...)."""
    try:
        fn = PREFERENCE_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"visrl.losses: unknown preference loss {name!r}; valid names: {sorted(PREFERENCE_LOSSES)}"
        ) from None
    return fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, **options)
