"""Step-level DPO: weighted sum of per-step preference losses, plus the optional SFT (``ftx``) term.

The VisRL reference implementation trains in two stages on the same preference pairs:

* stage 1: ``L1 = L_DPO(x1 = (I, q); b_w, b_l)`` -- the box step only;
* stage 2: ``L2 = 0.5 L_DPO(x1; b_w, b_l) + 0.5 L_DPO(x2 = (I, q, c(b_w)); a_w, a_l)``.

A stage is therefore just a mapping from step name to weight (``{"box": 1}``, then
``{"box": 0.5, "answer": 0.5}``; :data:`REFERENCE_STAGE_WEIGHTS`), and :func:`step_dpo_loss` combines
the per-step :class:`~visrl.losses.preference.PreferenceLossOutput` s with it. Stages live in config
(``conf/stage``), not in code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from visrl.losses.preference import PreferenceLossOutput

__all__ = ["REFERENCE_STAGE_WEIGHTS", "check_step_weights", "sft_term", "step_dpo_loss"]

REFERENCE_STAGE_WEIGHTS: Mapping[str, Mapping[str, float]] = {
    "stage1": {"box": 1.0},
    "stage2": {"box": 0.5, "answer": 0.5},
}


def sft_term(chosen_logps: Tensor, chosen_n_tokens: Tensor) -> Tensor:
    """Per-example mean token NLL of the chosen completion, ``-logp(y_w) / n(y_w)``, shape ``[B]``.

    This is the ``ftx`` term of LLaMA-Factory's DPO (``sft_loss = -policy_chosen_logps_avg``), added by the
    caller as ``loss + ftx * sft_term(...).mean()``. The VisRL reference uses ``ftx = 0``. Token counts are
    clamped to >= 1 (a completion always has at least its end-of-turn token).
    """
    if chosen_logps.dim() != 1 or chosen_n_tokens.shape != chosen_logps.shape:
        raise ValueError(
            "visrl.losses.sft_term: chosen_logps and chosen_n_tokens must both be 1-D [B] tensors, got "
            f"{tuple(chosen_logps.shape)} and {tuple(chosen_n_tokens.shape)}"
        )
    return -chosen_logps / chosen_n_tokens.to(chosen_logps.dtype).clamp(min=1.0)


def check_step_weights(weights: Mapping[str, float], owner: str = "visrl.losses") -> dict[str, float]:
    """``weights`` as ``{step: float}``; an error naming ``owner`` unless finite, >= 0, not all zero."""
    bad = {k: w for k, w in weights.items() if not (math.isfinite(w) and w >= 0)}
    if not weights or bad or not any(weights.values()):
        raise ValueError(
            f"{owner}: weights must map steps to finite weights >= 0, not all zero; got {dict(weights)}"
        )
    return {str(k): float(w) for k, w in weights.items()}


def step_dpo_loss(
    step_outputs: Mapping[str, PreferenceLossOutput],
    weights: Mapping[str, float],
    sft_terms: Mapping[str, Tensor] | None = None,
    ftx: float = 0.0,
    pref: float = 1.0,
) -> Tensor:
    """``sum_s weights[s] * (pref * mean_B(step_outputs[s].losses) + ftx * mean_B(sft_terms[s]))``: a scalar.

    ``pref`` weighs the preference term (1 in the reference; 0 leaves the SFT term alone, the control that
    separates what DPO adds from fine-tuning on the chosen samples).

    Every weighted step must be present in ``step_outputs`` (and in ``sft_terms`` when ``ftx > 0``; see
    :func:`sft_term`); extra steps (e.g. computed only for logging) are left out of the loss. Weights must
    be finite and >= 0, and not all zero. A batch of one step is the call with one step in both mappings.
    """
    weights = check_step_weights(weights, "visrl.losses.step_dpo_loss")
    missing = sorted(set(weights) - set(step_outputs))
    if missing:
        raise ValueError(
            f"visrl.losses.step_dpo_loss: weighted steps {missing} have no loss; got steps {sorted(step_outputs)}"
        )
    if not (math.isfinite(ftx) and ftx >= 0):
        raise ValueError(f"visrl.losses.step_dpo_loss: ftx must be finite and >= 0, got {ftx}")
    if not (math.isfinite(pref) and pref >= 0) or pref + ftx == 0:
        raise ValueError(
            f"visrl.losses.step_dpo_loss: pref must be finite and >= 0 with pref + ftx > 0, got {pref}"
        )
    if ftx and (sft_terms is None or set(weights) - set(sft_terms)):
        raise ValueError("visrl.losses.step_dpo_loss: ftx > 0 needs the SFT term of every weighted step")
    terms = []
    for step, w in weights.items():
        objective = pref * step_outputs[step].losses.mean()  # scalar
        if ftx:
            objective = objective + ftx * sft_terms[step].mean()  # type: ignore[index]
        terms.append(w * objective)
    return torch.stack(terms).sum()
