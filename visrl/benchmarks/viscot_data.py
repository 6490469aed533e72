"""Visual-CoT benchmark files: the questions joined by row with their detection rows, and their images.

Layout (HF ``deepcs233/Visual-CoT``): ``root/benchmark/<ds>.json`` (questions, answers), the row-aligned
``root/benchmark_det/<ds>.jsonl`` (expression, pixel box, width/height) and the images at
``root/<image path>`` (``cot/<ds>/...``; ``v7w``/``visual7w`` spellings are both tried). Rows are joined
BY ROW (the published loaders do so; question ids are not unique). A row that cannot be used (a bad
record, a missing or mismatched detection row, an image that cannot be read) is a skipped row, never
fatal; a file that is missing or not a JSON list is an :class:`~visrl.data.errors.InputError` naming it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from visrl.benchmarks.base import skip_row
from visrl.data.errors import InputError
from visrl.data.images import open_rgb
from visrl.data.records import DetRecord, VisCoTRecord, read_det_rows, read_viscot_rows, same_image

__all__ = ["ViscotItem", "benchmark_files", "load_dataset", "load_items", "open_image", "resolve_image"]

_PATH_ALIASES = (("cot/v7w/", "cot/visual7w/"), ("cot/visual7w/", "cot/v7w/"))


@dataclass(frozen=True)
class ViscotItem:
    """One question: the benchmark record, its detection row, and its position in the files."""

    dataset: str
    row: int
    record: VisCoTRecord
    det: DetRecord

    @property
    def uid(self) -> str:
        return f"{self.dataset}:{self.row}"


def benchmark_files(root: Path | str, dataset: str) -> tuple[Path, Path]:
    """``(benchmark/<ds>.json, benchmark_det/<ds>.jsonl)``; a missing one is an InputError naming it."""
    root = Path(root)
    paths = (root / "benchmark" / f"{dataset}.json", root / "benchmark_det" / f"{dataset}.jsonl")
    for path in paths:
        if not path.is_file():
            raise InputError(f"Visual-CoT benchmark: missing {path} (see docs/benchmarks.md)")
    return paths


def load_dataset(
    root: Path | str, dataset: str, limit: int | None = None
) -> tuple[list[ViscotItem], list[dict]]:
    """The first ``limit`` rows of ``benchmark/<dataset>.json`` joined BY ROW with ``benchmark_det``:
    the usable items, and a skipped row (``bad_record``, ``no_det_row``, ``det_mismatch``) for each other
    row. A file that is missing, not UTF-8 or not a JSON list is an InputError naming it."""
    bench_path, det_path = benchmark_files(root, dataset)
    records, dets = read_viscot_rows(bench_path), read_det_rows(det_path)
    items, skipped = [], []
    for row in range(len(records) if limit is None else min(limit, len(records))):
        rec, det = records[row], dets[row] if row < len(dets) else None
        skip = functools.partial(skip_row, f"{dataset}:{row}", row=row, dataset=dataset)
        if isinstance(rec, InputError):
            skipped.append(skip("bad_record", bench_path, error=str(rec)))
        elif det is None:
            skipped.append(skip("no_det_row", det_path, error=f"{det_path} has only {len(dets)} rows"))
        elif isinstance(det, InputError):
            skipped.append(skip("bad_record", det_path, error=str(det)))
        elif not same_image(rec.image_path, det.img_path):
            error = f"image {rec.image_path!r} but the det row names {det.img_path!r}"
            skipped.append(skip("det_mismatch", det_path, error=error))
        else:
            items.append(ViscotItem(dataset, row, rec, det))
    return items, skipped


def load_items(root: Path | str, dataset: str, limit: int | None = None) -> list[ViscotItem]:
    """The usable items of :func:`load_dataset`."""
    return load_dataset(root, dataset, limit)[0]


def resolve_image(root: Path, rel: str) -> Path:
    """``root/rel``, or the other spelling of the v7w/visual7w folder when only that exists."""
    candidates = [root / rel] + [
        root / (new + rel[len(old) :]) for old, new in _PATH_ALIASES if rel.startswith(old)
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"Visual-CoT image not found: tried {', '.join(map(str, candidates))}")


def open_image(root: Path, it: ViscotItem) -> Image.Image | dict:
    """The item's image, or its skipped row (``image_missing`` / ``image_unreadable``)."""
    try:
        path = resolve_image(root, it.record.image_path)
    except FileNotFoundError as e:
        return skip_row(
            it.uid, "image_missing", root / it.record.image_path, it.row, str(e), dataset=it.dataset
        )
    try:
        return open_rgb(path)
    except FileNotFoundError as e:
        return skip_row(it.uid, "image_unreadable", path, it.row, str(e), dataset=it.dataset)


# Published values beyond +-SQ_LIMIT padded-square sides are out_of_range (departure): such a box lies
