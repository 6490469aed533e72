"""RunLogger: the single object of a pipeline run that talks to W&B / CSV, with a JSONL mirror.

The VisRL pipeline (SFT, then K iterations of regenerate -> stage-1 DPO -> stage-2 DPO -> evaluate; paper §3.3)
logs from many places: Lightning modules inside every ``Trainer.fit``, pair statistics after each
regeneration, benchmark metrics after each evaluation. One ``RunLogger`` per run owns

* the **global step**: one monotonic counter across all stages and iterations (``step=None`` = next step;
  an explicit step may repeat the last one, to add keys to the same row, but never go back);
* the **mirror** ``<run_dir>/metrics.jsonl``: every scalar logged, one JSON object per call
  ``{"step": s, **metrics}``. It is the project's own record: tests, plots and the report read it, never a
  backend's private format. Strict JSON, as every project file: a non-finite value is written as ``null``
  (the backend still receives the NaN/inf, which W&B plots as such);
* an optional **backend** (``visrl.logging.backends``: W&B, CSV) that receives the same calls.

Built by Hydra from ``conf/logger/*.yaml`` as a partial; the pipeline supplies the run directory::

    run_logger = hydra.utils.instantiate(cfg.logger)(run_dir=run_dir)
    run_logger.log_config(OmegaConf.to_container(cfg, resolve=True))
    ...
    run_logger.finish()        # or use it as a context manager (exit code 1 on an exception)

In distributed runs only global rank 0 writes anything; other ranks get an inactive logger (all no-ops).
Re-opening a run dir whose mirror already has rows continues after its last step (resumed runs stay monotonic).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from visrl.data.io import json_object
from visrl.logging.media import ImageWithBoxes

__all__ = ["Backend", "ImageWithBoxes", "RunLogger", "global_rank", "read_jsonl", "read_metrics"]

MIRROR_NAME = "metrics.jsonl"
_RANK_ENV = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


class Backend(Protocol):
    """What a RunLogger forwards to (implementations in ``visrl.logging.backends``)."""

    def open(self, run_dir: Path) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None: ...
    def log_artifact(self, path: Path, name: str, type: str) -> None: ...
    def log_config(self, config: dict[str, Any]) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...


def global_rank() -> int:
    """This process's global rank from the launcher environment (0 when not distributed)."""
    for var in _RANK_ENV:
        if os.environ.get(var):
            return int(os.environ[var])
    return 0


def _scalar(key: str, value: Any) -> int | float:
    """A JSON-able Python number from a float/int/bool/numpy scalar/one-element tensor, else TypeError."""
    if not isinstance(value, numbers.Number) and callable(getattr(value, "item", None)):
        n = value.numel() if hasattr(value, "numel") else getattr(value, "size", 1)  # torch / numpy
        if n != 1:
            raise TypeError(
                f"RunLogger.log_metrics: {key!r} is not a scalar (shape {getattr(value, 'shape', '?')})"
            )
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"RunLogger.log_metrics: {key!r} must be a number, got {type(value).__name__}: {value!r}")


def _last_step(mirror: Path) -> int:
    """The largest step recorded in an existing mirror file (-1 if absent or empty)."""
    if not mirror.is_file():
        return -1
    last = -1
    for idx, row in enumerate(read_jsonl(mirror)):
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"{mirror}: record {idx} has no integer 'step' (got {step!r})")
        last = max(last, step)
    return last


class RunLogger:
    """One per pipeline run: global step, ``metrics.jsonl`` mirror, optional W&B/CSV backend."""

    def __init__(self, run_dir: str | Path, backend: Backend | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.active = global_rank() == 0
        self.backend = backend if self.active else None
        self.mirror_path = self.run_dir / MIRROR_NAME
        self._step = -1  # last step used; -1 before the first call
        self._mirror = None
        self._finished = False
        if self.active:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._step = _last_step(self.mirror_path)
            self._mirror = self.mirror_path.open("a", encoding="utf-8")
            if self.backend is not None:
                try:
                    self.backend.open(self.run_dir)
                except BaseException:
                    self._mirror.close()
                    raise

    # -- steps ---------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """The last step used (-1 before anything was logged). Log at ``step=logger.step`` to add to that row."""
        return self._step

    @property
    def next_step(self) -> int:
        """The step a ``step=None`` call will use."""
        return self._step + 1

    def _take_step(self, step: int | None, what: str) -> int:
        if step is None:
            step = self._step + 1
        elif int(step) != step or step < self._step:
            raise ValueError(
                f"RunLogger.{what}: step {step!r} must be an integer >= the last step {self._step} "
                "(the global step is monotonic; pass step=None for the next one)"
            )
        self._step = int(step)
        return self._step

    def _check_open(self, what: str) -> None:
        if self._finished:
            raise RuntimeError(f"RunLogger.{what}: the logger of {self.run_dir} is already finished")

    # -- logging -------------------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> int:
        """Log scalars at ``step`` (None = next); returns the step used. Values: numbers or 1-element tensors."""
        self._check_open("log_metrics")
        clean: dict[str, int | float] = {}
        for key, value in metrics.items():
            if not isinstance(key, str) or not key or key == "step":
                raise ValueError(f"RunLogger.log_metrics: invalid metric key {key!r} ('step' is reserved)")
            clean[key] = _scalar(key, value)
        used = self._take_step(step, "log_metrics")
        if self._mirror is not None:
            finite = {k: (v if math.isfinite(v) else None) for k, v in clean.items()}
            self._mirror.write(json.dumps({"step": used, **finite}, allow_nan=False) + "\n")
            self._mirror.flush()
        if self.backend is not None and clean:
            self.backend.log_metrics({k: float(v) for k, v in clean.items()}, used)
        return used

    def log_table(
        self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None = None
    ) -> int:
        """Log a table (cells: str/number/None or :class:`ImageWithBoxes`) at ``step`` (None = next)."""
        self._check_open("log_table")
        columns = [str(c) for c in columns]
        table = [list(r) for r in rows]
        for idx, row in enumerate(table):
            if len(row) != len(columns):
                raise ValueError(
                    f"RunLogger.log_table({key!r}): row {idx} has {len(row)} cells, expected {len(columns)} {columns}"
                )
            for cell in row:  # fail here, with the row index, rather than deep inside a backend
                if isinstance(cell, ImageWithBoxes):
                    cell.normalised_boxes()
        used = self._take_step(step, "log_table")
        if self.active and self.backend is not None:
            self.backend.log_table(key, columns, table, used)
        return used

    def log_artifact(self, path: str | Path, name: str, type: str) -> None:
        """Register a file or directory (a checkpoint, a pairs file) as a versioned artifact of the run."""
        self._check_open("log_artifact")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"RunLogger.log_artifact({name!r}): {path} does not exist")
        if self.active and self.backend is not None:
            self.backend.log_artifact(path, name, type)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record (merge) run configuration: the resolved Hydra config, a module's hyper-parameters."""
        self._check_open("log_config")
        if self.active and self.backend is not None:
            self.backend.log_config(dict(config))

    def flush(self) -> None:
        if self._mirror is not None:
            self._mirror.flush()

    def finish(self, exit_code: int = 0) -> None:
        """Close the mirror and the backend (idempotent)."""
        if self._finished:
            return
        self._finished = True
        if self._mirror is not None:
            self._mirror.close()
            self._mirror = None
        if self.backend is not None:
            self.backend.finish(exit_code)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)

    def __repr__(self) -> str:
        backend = type(self.backend).__name__ if self.backend is not None else "mirror only"
        return f"RunLogger({str(self.run_dir)!r}, {backend}, step={self._step})"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per non-empty line (raises naming the file and line)."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                rows.append(json_object(line, f"{path}:{lineno}"))
    return rows


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``<run_dir>/metrics.jsonl``."""
    return read_jsonl(Path(run_dir) / MIRROR_NAME)
