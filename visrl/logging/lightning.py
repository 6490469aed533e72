"""RunLoggerAdapter: hands a Lightning ``Trainer`` the run's :class:`~visrl.logging.RunLogger`.

Every stage of the VisRL pipeline (SFT, and per iteration stage-1 and stage-2 DPO; paper §3.3) is its own
``Trainer.fit``, and each fit counts its steps from 0. The adapter maps a fit's step ``s`` to the run's global
step ``offset + s``, where ``offset`` is the RunLogger's next step when the fit first logs. Metric keys stay the
same across iterations (``train/loss`` in iteration 1 and 3 is one W&B chart, the step separates them); the
adapter adds constant ``context`` scalars to every row instead (e.g. ``{"iter": 2, "stage": 1}``) so a row
can be attributed without parsing keys.

With ``phase`` ("base", "sft", "dpo/stage1", "dpo/stage2") the rows go through
:meth:`RunLogger.log_phase` instead: keys become ``<phase>/<key>`` (``sft/train/loss``,
``dpo/stage1/train/loss``: each phase's losses in their own chart) on the phase's own axis ``<phase>/step``
(counted across iterations), and rows a resumed fit replays (the steps between its checkpoint and the crash)
are not logged twice.

Rebasing keeps the global step monotonic in every case: when a fit's step goes backwards (the adapter is
reused for the next fit, or ``trainer.validate`` logs from step 0), or when someone else logged through the
RunLogger in the meantime, the offset moves to the RunLogger's next step.

``finalize`` only flushes: the RunLogger lives for the whole run and the pipeline finishes it.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_fabric.utilities.logger import _convert_params, _flatten_dict, _sanitize_params
from pytorch_lightning.loggers.logger import Logger, rank_zero_experiment
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from visrl.logging.run_logger import RunLogger

__all__ = ["RunLoggerAdapter"]


class RunLoggerAdapter(Logger):
    """A Lightning logger forwarding to a RunLogger with a global-step offset.

    Args:
        run_logger: the run's logger (shared by every stage).
        name: the stage name ("sft", "stage1", ...): namespaces the forwarded hyper-parameters and names
            Lightning's default checkpoint sub-directory.
        phase: the training phase ("sft", "dpo/stage1", ...): keys ``<phase>/<key>`` on axis ``<phase>/step``.
        prefix: prepended to every metric key when there is no ``phase``.
        context: constant scalars added to every logged row, e.g. ``{"iter": 2}``.
        save_dir: where Lightning may put checkpoints/profiles; None means ``trainer.default_root_dir``.
    """

    def __init__(
        self,
        run_logger: RunLogger,
        *,
        name: str = "train",
        phase: str | None = None,
        prefix: str = "",
        context: Mapping[str, float] | None = None,
        save_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.run_logger = run_logger
        self._name = name
        self.phase = phase
        self.prefix = prefix
        self.context = dict(context or {})
        self._save_dir = None if save_dir is None else str(save_dir)
        self._offset: int | None = None  # global step of this fit's step 0
        self._last_local = -1
        self._hparams_logged = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return ""  # checkpoints go to <save_dir>/<name>/checkpoints, no version_N level

    @property
    def save_dir(self) -> str | None:
        return self._save_dir

    @property
    @rank_zero_experiment
    def experiment(self) -> RunLogger:
        """The RunLogger, for ``self.logger.experiment.log_table(...)`` inside a LightningModule."""
        return self.run_logger

    def global_step_of(self, step: int) -> int:
        """The global step for this fit's ``step`` (rebasing if it would not be monotonic)."""
        floor = self.run_logger.step  # the last step anyone logged
        if self._offset is None or step < self._last_local or self._offset + step < floor:
            self._offset = self.run_logger.next_step - step
        self._last_local = step
        return self._offset + step

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        local = self._last_local + 1 if step is None else int(step)
        if self.phase is not None:
            self.run_logger.log_phase(
                self.phase, local, metrics, self.context, step=self.global_step_of(local)
            )
            return
        row = {f"{self.prefix}{k}": v for k, v in metrics.items()}
        row.update(self.context)
        self.run_logger.log_metrics(row, step=self.global_step_of(local))

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Forward the module's hyper-parameters once per adapter, under ``hparams/<name>/...``."""
        if self._hparams_logged:
            return
        flat = _sanitize_params(_flatten_dict(_convert_params(params)))
        self.run_logger.log_config({f"hparams/{self._name}/{k}": v for k, v in flat.items()})
        self._hparams_logged = True

    @rank_zero_only
    def save(self) -> None:
        self.run_logger.flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.run_logger.flush()
