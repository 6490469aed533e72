"""RunLogger backends: Weights & Biases and plain CSV (the ``logger=`` Hydra group picks one, or none).

A backend is configured by Hydra (cheap, no side effects) and opened by :class:`visrl.logging.RunLogger` once
the pipeline knows the run directory. Both receive exactly what the RunLogger's ``metrics.jsonl`` mirror gets,
plus tables, artifacts and config, which the mirror does not hold.

* :class:`WandbBackend` -- ``wandb`` is imported lazily in :meth:`WandbBackend.open`. Default ``mode="offline"``:
  no network, the run lands in ``<run_dir>/wandb/offline-run-*/`` and can be uploaded later with
  ``wandb sync``. Tables are logged as ``wandb.Table`` (stored by W&B as a run artifact) *and* their images as
  an image panel ``<key>_images`` whose PNGs and box JSON sit under the run folder's ``files/media/``.
  ``group`` defaults to the Hydra sweep (multirun) and ``name`` to ``hydra.job.override_dirname``.
* :class:`CsvBackend` -- ``<run_dir>/csv/metrics.csv`` (wide: one column per key, the file is rewritten when
  a new key appears), ``csv/tables/<key>/step_<s>.csv`` with images rendered to PNG next to it (boxes burnt
  in), ``csv/artifacts.csv``, ``csv/images.csv``, ``csv/config.json`` and ``csv/summary.json``.

W&B specifics: the run's id is kept in ``<run_dir>/wandb_id.txt``, so a resumed pipeline continues the same W&B
run (``resume="allow"``; offline, each process writes its own ``offline-run-*-<id>/`` folder and ``wandb sync``
joins them into one run); ``iter`` is the x-axis of ``eval/*`` and ``data/*`` and each training phase has its
own ``<phase>/step`` axis (``define_metric``); a crash finishes the run with exit code 1 (failed).

:func:`wandb_run_logger` and :func:`csv_run_logger` are the Hydra ``_target_`` s of ``conf/logger/{wandb,csv}.yaml``
(partials: the pipeline calls them with ``run_dir=``); ``logger=none`` targets ``RunLogger`` itself.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from visrl.data.io import read_json, write_text_atomic
from visrl.logging.media import ImageWithBoxes, load_image, render
from visrl.logging.run_logger import ITER, RunLogger
from visrl.logging.sweep import hydra_job_info, sweep_group_name

__all__ = ["CsvBackend", "WandbBackend", "csv_run_logger", "safe_name", "wandb_run_logger"]

_WANDB_MODES = ("online", "offline", "disabled")
WANDB_ID_FILE = "wandb_id.txt"  # <run_dir>/wandb_id.txt: the id of the run's one W&B run


def safe_name(key: str) -> str:
    """``key`` with every character outside ``[A-Za-z0-9._-]`` replaced by ``-`` (file and artifact names)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", key).strip("-") or "unnamed"


class WandbBackend:
    """Weights & Biases run (offline by default). Arguments mirror ``wandb.init``; ``settings`` are extra
    ``wandb.Settings`` fields (``silent=True`` is always set). :meth:`open` sets ``WANDB_SILENT=true`` in the
    process environment unless it is already set. W&B keeps its artifact staging area (tables are artifacts)
    under ``$WANDB_DATA_DIR`` (default ``~/.local/share/wandb``) until ``wandb sync``."""

    def __init__(
        self,
        project: str = "visrl",
        mode: str = "offline",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
        job_type: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        if mode not in _WANDB_MODES:
            raise ValueError(f"logger.mode: expected one of {_WANDB_MODES}, got {mode!r}")
        self.project, self.mode, self.entity = project, mode, entity
        self.group, self.name, self.job_type = group, name, job_type
        self.tags = [str(t) for t in tags]
        self.settings = dict(settings or {})
        self.run: Any = None
        self._wandb: Any = None

    def resolved_group_and_name(self) -> tuple[str | None, str]:
        """Explicit values win; else the Hydra sweep (multirun only) and the job's override string."""
        info = hydra_job_info()
        group = self.group
        if group is None and info is not None and info.multirun and info.sweep_dir:
            group = sweep_group_name(info.sweep_dir)
        name = self.name if self.name is not None else (info.override_dirname if info else "")
        return group, (name or "default")[:128]

    def open(self, run_dir: Path) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb  # lazy: importing wandb costs ~1 s and is not needed by logger=csv/none
        from wandb.sdk.lib.runid import generate_id

        group, name = self.resolved_group_and_name()
        settings = wandb.Settings(**{"silent": True, **self.settings})
        self._wandb = wandb
        id_file = run_dir / WANDB_ID_FILE  # one W&B run per run dir: a resume continues it
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else ""
        if not run_id:
            run_id = generate_id()
            write_text_atomic(id_file, run_id + "\n")
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            dir=str(run_dir),
            mode=self.mode,
            group=group,
            name=name,
            tags=self.tags or None,
            job_type=self.job_type,
            id=run_id,
            resume="allow",  # offline: a second offline-run-*-<id>/ folder; `wandb sync` joins them in one run
            reinit="create_new",  # several runs per process: Hydra's basic launcher runs jobs sequentially
            settings=settings,
        )
        self.run.define_metric(ITER)  # the iteration axis of benchmark and data metrics
        for glob in ("eval/*", "data/*"):
            self.run.define_metric(glob, step_metric=ITER)  # step_sync: rows without `iter` get the last one

    def define_metric(self, name: str, step_metric: str | None) -> None:
        self.run.define_metric(name, step_metric=step_metric)

    def _image(self, item: ImageWithBoxes) -> Any:
        boxes = item.normalised_boxes()
        class_labels = {i + 1: label for i, label in enumerate(boxes)}  # W&B class ids are ints
        box_data = [
            {
                "position": {
                    "minX": xyxy[0],
                    "minY": xyxy[1],
                    "maxX": xyxy[2],
                    "maxY": xyxy[3],
                },  # normalised
                "class_id": i + 1,
                "box_caption": caption or label,
            }
            for i, (label, (xyxy, caption)) in enumerate(boxes.items())
            if xyxy is not None
        ]
        return self._wandb.Image(
            load_image(item.image),
            caption=item.caption or None,
            boxes={"boxes": {"box_data": box_data, "class_labels": class_labels}},
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        data = [[self._image(c) if isinstance(c, ImageWithBoxes) else c for c in row] for row in rows]
        payload: dict[str, Any] = {key: self._wandb.Table(columns=columns, data=data)}
        images = [cell for row in data for cell in row if isinstance(cell, self._wandb.Image)]
        if images:
            payload[f"{key}_images"] = images
        self.run.log(payload, step=step)

    def log_artifact(self, path: Path, name: str, type: str) -> None:
        artifact = self._wandb.Artifact(safe_name(name), type=type)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def log_images(self, key: str, images: list[Path], step: int) -> None:
        self.run.log({key: [self._wandb.Image(str(p), caption=p.stem) for p in images]}, step=step)

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


class CsvBackend:
    """Plain files under ``<run_dir>/<subdir>/`` for users without W&B.

    Not Lightning's ``CSVLogger``: that is one Trainer's logger (a ``version_N/metrics.csv`` per fit), it
    deletes an existing ``metrics.csv`` when re-opened (a resumed run would lose its earlier rows) and it has
    no tables, images, artifacts or summary; this backend is one file for the whole run, kept on resume."""

    def __init__(self, subdir: str = "csv") -> None:
        self.subdir = subdir
        self.dir: Path | None = None
        self._columns: list[str] = ["step"]
        self._rows: list[dict[str, Any]] = []

    @property
    def metrics_path(self) -> Path:
        if self.dir is None:
            raise RuntimeError("CsvBackend used before open()")
        return self.dir / "metrics.csv"

    def open(self, run_dir: Path) -> None:
        self.dir = run_dir / self.subdir
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.metrics_path.is_file():  # resumed run: keep the earlier rows
            with self.metrics_path.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                self._columns = list(reader.fieldnames or ["step"])
                self._rows = [dict(r) for r in reader]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, **metrics}
        new = [k for k in row if k not in self._columns]
        self._rows.append(row)
        if new or not self.metrics_path.is_file():
            self._columns.extend(new)
            self._rewrite()
        else:
            with self.metrics_path.open("a", newline="", encoding="utf-8") as fh:
                csv.DictWriter(fh, fieldnames=self._columns).writerow(row)

    def _rewrite(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self._columns)
        writer.writeheader()
        writer.writerows(self._rows)
        write_text_atomic(self.metrics_path, buf.getvalue())

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        assert self.dir is not None
        table_dir = self.dir / "tables" / safe_name(key)
        media_dir = table_dir / f"step_{step}"
        out_rows = []
        for i, row in enumerate(rows):
            out = []
            for j, cell in enumerate(row):
                if isinstance(cell, ImageWithBoxes):
                    media_dir.mkdir(parents=True, exist_ok=True)
                    png = media_dir / f"r{i}_c{j}.png"
                    render(cell).save(png)
                    cell = png.relative_to(table_dir).as_posix()
                out.append(cell)
            out_rows.append(out)
        table_dir.mkdir(parents=True, exist_ok=True)
        with (table_dir / f"step_{step}.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            writer.writerows(out_rows)

    def define_metric(self, name: str, step_metric: str | None) -> None:
        """A CSV has no axes: every row keeps its ``step`` and its axis columns (``iter``, ``<phase>/step``)."""

    def log_images(self, key: str, images: list[Path], step: int) -> None:
        self._index("images.csv", ["key", "step", "path"], [[key, step, str(p.resolve())] for p in images])

    def log_summary(self, values: dict[str, Any]) -> None:
        self._merge_json("summary.json", values)

    def _index(self, name: str, header: list[str], rows: list[list[Any]]) -> None:
        assert self.dir is not None
        index = self.dir / name
        first = not index.is_file()
        with index.open("a", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            if first:
                writer.writerow(header)
            writer.writerows(rows)

    def _merge_json(self, name: str, values: dict[str, Any]) -> None:
        assert self.dir is not None
        path = self.dir / name
        merged = read_json(path) if path.is_file() else {}
        merged.update(values)
        write_text_atomic(path, json.dumps(merged, indent=2, sort_keys=True, default=str))

    def log_artifact(self, path: Path, name: str, type: str) -> None:
        self._index("artifacts.csv", ["name", "type", "path"], [[name, type, str(path.resolve())]])

    def log_config(self, config: dict[str, Any]) -> None:
        self._merge_json("config.json", config)

    def finish(self, exit_code: int = 0) -> None:
        """Nothing is buffered: every call already wrote its file."""


def wandb_run_logger(
    run_dir: str | Path,
    *,
    project: str = "visrl",
    mode: str = "offline",
    entity: str | None = None,
    group: str | None = None,
    name: str | None = None,
    tags: Sequence[str] = (),
    job_type: str | None = None,
    settings: Mapping[str, Any] | None = None,
) -> RunLogger:
    """``conf/logger/wandb.yaml``: a RunLogger writing to a W&B run under ``run_dir``."""
    backend = WandbBackend(project, mode, entity, group, name, tags, job_type, settings)
    return RunLogger(run_dir, backend)


def csv_run_logger(run_dir: str | Path, *, subdir: str = "csv") -> RunLogger:
    """``conf/logger/csv.yaml``: a RunLogger writing ``<run_dir>/<subdir>/metrics.csv``."""
    return RunLogger(run_dir, CsvBackend(subdir))
