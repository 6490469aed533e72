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
* two **axes** besides the global step: the iteration ``iter`` (:meth:`log_iteration`: benchmark, data and
  base-skill metrics, one row per iteration) and one step per training phase ``<phase>/step``
  (:meth:`log_phase`, used by the Lightning adapter: ``sft/train/loss`` on ``sft/step``, ``dpo/stage1/...``
  on ``dpo/stage1/step``), declared to the backend (W&B ``define_metric``) as they appear;
* an optional **backend** (``visrl.logging.backends``: W&B, CSV) that receives the same calls.

**Resumes never duplicate.** Re-opening a run dir continues after the mirror's last step; an iteration row
whose keys were already logged for that iteration, a phase row at a phase step already recorded, and a table,
image panel or artifact whose name is in ``<run_dir>/logged.jsonl`` are skipped (the first record is kept).

Built by Hydra from ``conf/logger/*.yaml`` as a partial; the pipeline supplies the run directory::

    run_logger = hydra.utils.instantiate(cfg.logger)(run_dir=run_dir)
    ...
    run_logger.finish()   # in a ``finally:``: exit code 1 when an exception is propagating, else 0

In distributed runs only global rank 0 writes anything; other ranks get an inactive logger (all no-ops).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from visrl.data.io import append_lines, read_jsonl, rewrite_lines
from visrl.logging.media import ImageWithBoxes

__all__ = ["Backend", "ImageWithBoxes", "RunLogger", "global_rank", "read_metrics"]

MIRROR_NAME = "metrics.jsonl"
LEDGER_NAME = "logged.jsonl"  # names of the tables, image panels and artifacts already logged
ITER = "iter"  # the iteration axis (0 = base/SFT, k = after RL iteration k)
_RANK_ENV = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


class Backend(Protocol):
    """What a RunLogger forwards to (implementations in ``visrl.logging.backends``)."""

    def open(self, run_dir: Path) -> None: ...
    def define_metric(self, name: str, step_metric: str | None) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None: ...
    def log_images(self, key: str, images: list[Any], step: int) -> None: ...
    def log_artifact(self, path: Path, name: str, type: str) -> None: ...
    def log_config(self, config: dict[str, Any]) -> None: ...
    def log_summary(self, values: dict[str, Any]) -> None: ...
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


class _History:
    """What an earlier process already logged in this run dir (read once, at open)."""

    def __init__(self, run_dir: Path) -> None:
        self.last_step = -1
        self.iteration_rows: set[tuple[int, frozenset[str]]] = set()  # (iter, metric keys)
        self.phase_steps: dict[tuple[str, int | None], int] = {}  # (axis, iter) -> last phase step
        self.logged: set[str] = set()  # ledger entries "table:<key>", "images:<key>", "artifact:<name>"
        mirror = run_dir / MIRROR_NAME
        lines, rows, torn = read_jsonl(mirror, allow_torn_tail=True)
        if torn:  # a row cut short by a crash: drop it, or the next append would extend the broken line
            rewrite_lines(mirror, lines)
        for idx, row in enumerate(rows):
            step = row.pop("step", None)
            if isinstance(step, bool) or not isinstance(step, int):
                raise ValueError(f"{mirror}: line {idx + 1} has no integer 'step' (got {step!r})")
            self.last_step = max(self.last_step, step)
            self._index(row)
        ledger = run_dir / LEDGER_NAME
        lines, rows, torn = read_jsonl(ledger, allow_torn_tail=True)
        if torn:
            rewrite_lines(ledger, lines)
        self.logged = {str(r.get("name")) for r in rows}

    def _index(self, row: dict[str, Any]) -> None:
        it = row.get(ITER)
        it = int(it) if isinstance(it, int | float) and not isinstance(it, bool) else None
        axes = [k for k in row if k.endswith("/step")]
        for axis in axes:
            key = (axis, it)
            self.phase_steps[key] = max(self.phase_steps.get(key, -1), int(row[axis]))
        if it is not None and not axes:
            self.iteration_rows.add((it, frozenset(k for k in row if k != ITER)))


class RunLogger:
    """One per pipeline run: global step, ``metrics.jsonl`` mirror, optional W&B/CSV backend."""

    def __init__(self, run_dir: str | Path, backend: Backend | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.active = global_rank() == 0
        self.backend = backend if self.active else None
        self.mirror_path = self.run_dir / MIRROR_NAME
        self._step = -1  # last step used; -1 before the first call
        self._finished = False
        self._defined: set[str] = set()  # metrics whose axis was declared to the backend
        self._phase_base: dict[tuple[str, int | None], int] = {}  # (phase, iter) -> step of local step 0
        if self.active:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._past = _History(self.run_dir) if self.active else None  # what earlier processes logged here
        # (axis, iter) -> last phase step, earlier processes and this one
        self._phase_max = dict(self._past.phase_steps) if self._past else {}
        if self._past is not None:
            self._step = self._past.last_step
            if self.backend is not None:
                self.backend.open(self.run_dir)

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

    def _define(self, keys: Sequence[str], step_metric: str) -> None:
        """Declare ``keys`` as plotted against ``step_metric`` (once per key and process)."""
        if self.backend is None:
            return
        for key in (step_metric, *keys):
            if key not in self._defined:
                self._defined.add(key)
                self.backend.define_metric(key, None if key == step_metric else step_metric)

    # -- scalars -------------------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> int:
        """Log scalars at ``step`` (None = next); returns the step used. Values: numbers or 1-element tensors."""
        self._check_open("log_metrics")
        clean: dict[str, int | float] = {}
        for key, value in metrics.items():
            if not isinstance(key, str) or not key or key == "step":
                raise ValueError(f"RunLogger.log_metrics: invalid metric key {key!r} ('step' is reserved)")
            clean[key] = _scalar(key, value)
        used = self._take_step(step, "log_metrics")
        if self.active:
            finite = {k: (v if math.isfinite(v) else None) for k, v in clean.items()}
            append_lines(self.mirror_path, [json.dumps({"step": used, **finite}, allow_nan=False)])
        if self.backend is not None and clean:
            self.backend.log_metrics({k: float(v) for k, v in clean.items()}, used)
        return used

    def log_iteration(self, iteration: int, metrics: Mapping[str, Any]) -> int | None:
        """Log ``{"iter": iteration, **metrics}`` (benchmark, data, base-skill metrics) on the iteration axis.

        Idempotent: the same keys for the same iteration, already in the mirror from an earlier process (a
        resumed run re-reading its cached evaluation), are not logged again; returns None then, else the step.
        """
        if self._past is not None and (int(iteration), frozenset(metrics)) in self._past.iteration_rows:
            return None
        self._define(list(metrics), ITER)
        return self.log_metrics({ITER: int(iteration), **metrics})

    def phase_step(self, phase: str, local_step: int, iteration: int | None = None) -> int:
        """``<phase>/step`` of a fit's ``local_step``: the phase's optimizer steps counted across iterations
        (iteration k's fit starts after the last step any earlier iteration recorded for the phase)."""
        key = (phase, iteration)
        if key not in self._phase_base:
            axis = f"{phase}/step"
            earlier = [v for (a, it), v in self._phase_max.items()
                       if a == axis and it is not None and iteration is not None and it < iteration]  # fmt: skip
            self._phase_base[key] = max(earlier, default=-1) + 1
        return self._phase_base[key] + int(local_step)

    def log_phase(
        self, phase: str, local_step: int, metrics: Mapping[str, Any], context: Mapping[str, float] | None = None,
        step: int | None = None,
    ) -> int | None:  # fmt: skip
        """Log a training row of ``phase`` ("base", "sft", "dpo/stage1") at the fit's ``local_step``.

        Keys become ``<phase>/<key>`` on the ``<phase>/step`` axis; ``context`` (e.g. ``{"iter": 2}``) is added
        as is. A row at a phase step that an earlier process already recorded (a resumed fit replaying the
        steps after its checkpoint) is skipped: returns None, else the global step used.
        """
        context = dict(context or {})
        iteration = context.get(ITER)
        iteration = None if iteration is None else int(iteration)
        axis, at = f"{phase}/step", self.phase_step(phase, local_step, iteration)
        done = self._past.phase_steps.get((axis, iteration), -1) if self._past else -1
        if at <= done:
            return None
        row = {f"{phase}/{k}": v for k, v in metrics.items()}
        self._define(list(row), axis)
        used = self.log_metrics({**row, axis: at, **context}, step=step)
        self._phase_max[(axis, iteration)] = max(self._phase_max.get((axis, iteration), -1), at)
        return used

    # -- media, artifacts, config --------------------------------------------------------------------
    def _once(self, entry: str) -> bool:
        """True the first time ``entry`` is seen in this run dir (recorded in ``logged.jsonl``; with no
        backend nothing is kept, so nothing is recorded)."""
        if self.backend is None or self._past is None:
            return True
        if entry in self._past.logged:
            return False
        self._past.logged.add(entry)
        return True

    def _record(self, entry: str) -> None:
        if self.backend is not None:
            append_lines(self.run_dir / LEDGER_NAME, [json.dumps({"name": entry, "step": self._step})])

    def log_table(
        self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None = None
    ) -> int | None:
        """Log a table (cells: str/number/None or :class:`ImageWithBoxes`) at ``step`` (None = next).
        A key already logged in this run dir is skipped (returns None)."""
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
        if not self.active or not self._once(f"table:{key}"):
            return None
        used = self._take_step(step, "log_table")
        if self.backend is not None:
            self.backend.log_table(key, columns, table, used)
        self._record(f"table:{key}")
        return used

    def log_predictions(
        self,
        key: str,
        rows: Sequence[Mapping[str, Any]],
        image_root: str | Path | None = None,
        limit: int = 32,
    ) -> int | None:
        """Evaluation predictions (rows of a ``predictions.jsonl``) as a table: the image with the
        ground-truth box ("gt") and the predicted box ("pred") drawn, then every other field of the row."""
        rows = list(rows)[:limit]
        fields = [f for f in dict.fromkeys(k for r in rows for k in r) if f not in ("image", "box", "gt_box")]
        table = []
        for idx, r in enumerate(rows):
            if not r.get("image"):
                raise ValueError(f"RunLogger.log_predictions({key!r}): row {idx} has no 'image' field")
            image = Path(r["image"]) if image_root is None else Path(image_root) / r["image"]
            boxes = {"gt": (r.get("gt_box"), "gt"), "pred": (r.get("box"), "pred")}
            cells = [c if c is None or isinstance(c, str | int | float) else json.dumps(c)
                     for c in (r.get(f) for f in fields)]  # fmt: skip
            table.append([ImageWithBoxes(image, boxes, caption=str(r.get("question", ""))), *cells])
        return self.log_table(key, ["image", *fields], table) if table else None

    def log_images(self, key: str, images: Sequence[str | Path], step: int | None = None) -> int | None:
        """Image files (the run's plots) as one image panel ``key``; skipped if ``key`` was logged before."""
        self._check_open("log_images")
        paths = [Path(p) for p in images]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"RunLogger.log_images({key!r}): not found: {missing}")
        if not self.active or not paths or not self._once(f"images:{key}"):
            return None
        used = self._take_step(step, "log_images")
        if self.backend is not None:
            self.backend.log_images(key, paths, used)
        self._record(f"images:{key}")
        return used

    def log_artifact(self, path: str | Path, name: str, type: str) -> None:
        """Register a file or directory (a checkpoint, a pairs file) as a versioned artifact of the run,
        once per name and run dir (a resume does not add a second version)."""
        self._check_open("log_artifact")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"RunLogger.log_artifact({name!r}): {path} does not exist")
        if self.active and self._once(f"artifact:{name}"):
            if self.backend is not None:
                self.backend.log_artifact(path, name, type)
            self._record(f"artifact:{name}")

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record (merge) run configuration: the resolved Hydra config, a module's hyper-parameters."""
        self._check_open("log_config")
        if self.active and self.backend is not None:
            self.backend.log_config(dict(config))

    def log_summary(self, values: Mapping[str, Any]) -> None:
        """Set run-summary values (nested JSON-able: the final metrics, the paired effect and its CI)."""
        self._check_open("log_summary")
        if self.active and self.backend is not None:
            self.backend.log_summary(json.loads(json.dumps(dict(values), default=str)))

    # -- end -----------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Nothing is buffered: every row is appended and synced when logged."""

    def finish(self, exit_code: int | None = None) -> None:
        """Close the backend (idempotent). ``exit_code`` None: 1 if an exception is propagating (a call from
        a ``finally:`` or ``except:`` block of a crash), else 0; W&B marks a non-zero run as failed."""
        if self._finished:
            return
        if exit_code is None:
            exit_code = 0 if sys.exc_info()[0] is None else 1
        self._finished = True
        if self.backend is not None:
            self.backend.finish(exit_code)

    def fail(self) -> None:
        """Finish with exit code 1 (the run crashed)."""
        self.finish(exit_code=1)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)

    def __repr__(self) -> str:
        backend = type(self.backend).__name__ if self.backend is not None else "mirror only"
        return f"RunLogger({str(self.run_dir)!r}, {backend}, step={self._step})"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``<run_dir>/metrics.jsonl`` (a last line cut short by a crash is dropped)."""
    return read_jsonl(Path(run_dir) / MIRROR_NAME, allow_torn_tail=True)[1]
