"""Pure preference losses for step-level DPO (VisRL §3.3): DPO/cDPO, robust DPO, IPO, hinge, ftx; a registry.

See :mod:`visrl.losses.preference` for the formulas and :mod:`visrl.losses.step` for how stages combine them.
"""

from visrl.losses.preference import (
    PREFERENCE_LOSSES,
    PreferenceLossFn,
    PreferenceLossOutput,
    hinge_loss,
    ipo_loss,
    preference_loss,
    robust_loss,
    sigmoid_loss,
)
from visrl.losses.step import REFERENCE_STAGE_WEIGHTS, check_step_weights, sft_term, step_dpo_loss

__all__ = [
    "PREFERENCE_LOSSES",
    "REFERENCE_STAGE_WEIGHTS",
    "check_step_weights",
    "PreferenceLossFn",
    "PreferenceLossOutput",
    "hinge_loss",
    "ipo_loss",
    "preference_loss",
    "robust_loss",
    "sft_term",
    "sigmoid_loss",
    "step_dpo_loss",
]
