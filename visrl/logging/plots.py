"""Run plots (matplotlib, Agg, PNG): accuracy over RL iterations, and a gallery of focus boxes.

* :func:`plot_iterations` -- the paper's headline curve (VisRL §4, iterative DPO): answer accuracy with the
  model's own box (``cot_pred``) and its detection accuracy (Acc@IoU>0.5, plus mean IoU) vs iteration, the SFT
  warm-up drawn as iteration 0. ``cot_gt`` (answer from the ground-truth crop: the ceiling a perfect focus box
  gives) and ``direct`` (no box: the floor) are drawn as dashed/dotted reference lines. Error bars come from
  bootstrap intervals ``<key>_ci = [lo, hi]`` when the summary holds them.
* :func:`plot_gallery` -- test images with the ground-truth, SFT and final-iteration boxes in distinct colours,
  question and answers underneath: what the RL iterations changed about *where the model looks*.
  :func:`gallery_items_from_predictions` builds its input from two ``predictions.jsonl`` files.

Metric keys in ``summary.json`` are ``[<prefix>/]<mode>/<metric>`` (``<prefix>`` e.g. ``eval/synthetic``; one
row of panels per prefix). Boxes are canonical normalised xyxy.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from visrl.data.io import read_jsonl  # noqa: E402
from visrl.logging.media import BoxLike, as_xyxy, colour_for, load_image  # noqa: E402

__all__ = [
    "GalleryItem",
    "gallery_items_from_predictions",
    "iteration_series",
    "plot_gallery",
    "plot_iterations",
    "select_gallery",
    "summary_iterations",
]

MODES = ("direct", "cot_gt", "cot_pred")
_KEY = re.compile(r"^(?:(?P<prefix>.+)/)?(?P<mode>direct|cot_gt|cot_pred)/(?P<metric>[^/]+)$")
GALLERY_LABELS = ("gt", "sft", "final")
# (panel title, [(mode, metric, legend label, line style)]): the policy's own box solid, references dashed.
_PANELS = (
    (
        "answer accuracy",
        [
            ("cot_pred", "accuracy", "own box (cot_pred)", "o-"),
            ("cot_gt", "accuracy", "gt box (cot_gt)", "--"),
            ("direct", "accuracy", "no box (direct)", ":"),
        ],
    ),
    ("detection", [("cot_pred", "det_acc", "Acc@IoU>0.5", "o-"), ("cot_pred", "mean_iou", "mean IoU", "--")]),
)  # legend order = colour order (media.BOX_COLOURS)


def summary_iterations(summary: Mapping[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """``[(iter, metrics)]`` sorted by iteration; raises ``ValueError`` naming a malformed entry."""
    entries = summary.get("iterations") if isinstance(summary, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError("summary: expected a non-empty list under 'iterations'")
    out = []
    for idx, entry in enumerate(entries):
        if (
            not isinstance(entry, Mapping)
            or "iter" not in entry
            or not isinstance(entry.get("metrics"), Mapping)
        ):
            raise ValueError(f"summary.iterations[{idx}]: expected {{'iter': int, 'metrics': {{...}}}}")
        out.append((int(entry["iter"]), dict(entry["metrics"])))
    return sorted(out, key=lambda t: t[0])


def iteration_series(
    summary: Mapping[str, Any],
) -> dict[str, dict[tuple[str, str], list[tuple[int, float, Any]]]]:
    """``prefix -> (mode, metric) -> [(iter, value, ci | None)]`` for every ``<mode>/<metric>`` scalar."""
    series: dict[str, dict[tuple[str, str], list[tuple[int, float, Any]]]] = {}
    for it, metrics in summary_iterations(summary):
        for key, value in metrics.items():
            match = _KEY.match(key)
            if not match or key.endswith("_ci") or not isinstance(value, (int, float)):
                continue
            ci = metrics.get(f"{key}_ci")
            ci = tuple(ci) if isinstance(ci, (list, tuple)) and len(ci) == 2 else None
            prefix = match["prefix"] or ""
            series.setdefault(prefix, {}).setdefault((match["mode"], match["metric"]), []).append(
                (it, float(value), ci)
            )
    return series


def _draw(ax: Any, points: list[tuple[int, float, Any]], label: str, style: str, colour: str) -> None:
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    if all(p[2] is not None for p in points):  # yerr: [2, n] distances below / above the point
        yerr = [[y - p[2][0] for y, p in zip(ys, points)], [p[2][1] - y for y, p in zip(ys, points)]]
        ax.errorbar(xs, ys, yerr=yerr, fmt=style, color=colour, label=label, capsize=3)
    elif len(xs) == 1 and style != "o-":  # a reference measured once: a horizontal line
        ax.axhline(ys[0], linestyle=style, color=colour, label=label)
    else:
        ax.plot(xs, ys, style, color=colour, label=label)


def plot_iterations(summary: Mapping[str, Any], out_path: str | Path) -> Path:
    """Accuracy and detection accuracy vs iteration (0 = SFT); one row of two panels per benchmark prefix."""
    series = iteration_series(summary)
    series = {
        p: s for p, s in series.items() if ("cot_pred", "accuracy") in s or ("cot_pred", "det_acc") in s
    }
    if not series:
        raise ValueError("summary: no '<prefix>/cot_pred/accuracy' or '.../cot_pred/det_acc' metrics to plot")
    iters = [it for it, _ in summary_iterations(summary)]
    fig, axes = plt.subplots(len(series), 2, figsize=(10, 3.6 * len(series)), squeeze=False)
    for row, (prefix, by_key) in enumerate(sorted(series.items())):
        for col, (title, lines) in enumerate(_PANELS):
            ax = axes[row][col]
            for idx, (mode, metric, label, style) in enumerate(lines):
                if (mode, metric) in by_key:
                    _draw(ax, by_key[(mode, metric)], label, style, colour_for(idx + 2))
            ax.set_title(f"{prefix or 'benchmark'}: {title}")
            ax.set_xticks(iters, ["SFT" if i == 0 else str(i) for i in iters])
            ax.set_xlabel("iteration")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="best")
    return _save(fig, out_path)


def _save(fig: Any, out_path: str | Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110, format="png")
    plt.close(fig)
    return out_path


@dataclass(frozen=True)
class GalleryItem:
    """One test question: its image, the gt box/answer, and the SFT and final policies' box/answer."""

    image_path: str | Path
    question: str
    gt_box: BoxLike | None
    gt_answer: str
    sft_box: BoxLike | None
    sft_answer: str
    final_box: BoxLike | None
    final_answer: str
    sft_correct: bool | None = None
    final_correct: bool | None = None


def _mark(correct: bool | None) -> str:
    return "" if correct is None else (" ✓" if correct else " ✗")


def plot_gallery(items: Sequence[GalleryItem], out_path: str | Path, n: int = 8, columns: int = 4) -> Path:
    """A grid of the first ``n`` items with gt / SFT / final boxes (legend) and answers under each image."""
    items = list(items)[:n]
    if not items:
        raise ValueError("plot_gallery: no items to draw")
    cols = min(columns, len(items))
    rows = -(-len(items) // cols)  # ceil
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 4.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items):
        image = load_image(item.image_path)
        w, h = image.size
        ax.imshow(image)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])  # keep the frame: image edges stay visible on light backgrounds
        boxes = (item.gt_box, item.sft_box, item.final_box)
        for idx, (label, box) in enumerate(zip(GALLERY_LABELS, boxes)):
            if box is None:
                continue
            x1, y1, x2, y2 = as_xyxy(box, f"gallery {item.image_path}: {label} box")
            width = 3.0 - idx * 0.7  # gt thickest, so coinciding boxes stay visible
            rect = Rectangle((x1 * w, y1 * h), (x2 - x1) * w, (y2 - y1) * h, fill=False, linewidth=width)
            rect.set_edgecolor(colour_for(idx))
            ax.add_patch(rect)
        text = (
            textwrap.fill(item.question, 40)
            + f"\ngt: {item.gt_answer}\nsft: {item.sft_answer}{_mark(item.sft_correct)}"
            + f"\nfinal: {item.final_answer}{_mark(item.final_correct)}"
        )
        ax.text(0.5, -0.03, text, transform=ax.transAxes, ha="center", va="top", fontsize=7)
    handles = [
        Patch(facecolor="none", edgecolor=colour_for(i), label=lab) for i, lab in enumerate(GALLERY_LABELS)
    ]
    fig.legend(handles=handles, loc="upper center", ncol=3, frameon=False)
    fig.subplots_adjust(top=0.93, hspace=0.9)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110, format="png")
    plt.close(fig)
    return out_path


_REQUIRED = ("uid", "mode", "question", "answer", "pred", "box", "gt_box")


def _rows_by_uid(path: Path, mode: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for idx, row in enumerate(read_jsonl(path, allow_torn_tail=False)[1]):
        missing = [f for f in _REQUIRED if f not in row]
        if missing:
            raise ValueError(f"{path}: record {idx} lacks field(s) {missing}")
        if row["mode"] == mode:
            out[str(row["uid"])] = row
    return out


def _image_of(
    uid: str,
    row: Mapping[str, Any],
    image_paths: Mapping[str, str | Path] | None,
    image_root: str | Path | None,
    src: Path,
) -> Path:
    """uid -> image path: the explicit mapping, else the row's ``image`` field (relative to ``image_root``)."""
    if image_paths is not None and uid in image_paths:
        return Path(image_paths[uid])
    if not row.get("image"):
        raise KeyError(
            f"{src}: no image path for uid {uid!r} (not in image_paths and the row has no 'image' field)"
        )
    path = Path(row["image"])
    if path.is_absolute():
        return path
    if image_root is not None:
        return Path(image_root) / path
    return path if path.exists() else src.parent / path  # relative to the cwd, else to the predictions file


def gallery_items_from_predictions(
    sft_predictions: str | Path,
    final_predictions: str | Path,
    image_paths: Mapping[str, str | Path] | None = None,
    mode: str = "cot_pred",
    image_root: str | Path | None = None,
) -> list[GalleryItem]:
    """Join two ``predictions.jsonl`` files (SFT and final iteration) on ``uid`` for ``mode`` rows.

    Image paths come from ``image_paths`` (uid -> path, e.g. built from the test records) or else from the
    SFT row's ``image`` field, resolved against ``image_root`` when relative (the benchmark's image root).
    Order follows the SFT file; uids missing from either file are skipped.
    """
    sft_path, final_path = Path(sft_predictions), Path(final_predictions)
    sft, final = _rows_by_uid(sft_path, mode), _rows_by_uid(final_path, mode)
    items = []
    for uid, a in sft.items():
        b = final.get(uid)
        if b is None:
            continue
        items.append(
            GalleryItem(
                image_path=_image_of(uid, a, image_paths, image_root, sft_path),
                question=str(a["question"]),
                gt_box=a["gt_box"],
                gt_answer=str(a["answer"]),
                sft_box=a["box"],
                sft_answer=str(a["pred"]),
                final_box=b["box"],
                final_answer=str(b["pred"]),
                sft_correct=None if a.get("correct") is None else bool(a["correct"]),
                final_correct=None if b.get("correct") is None else bool(b["correct"]),
            )
        )
    if not items:
        raise ValueError(f"no '{mode}' uid is shared by {sft_path} and {final_path}")
    return items


def select_gallery(items: Sequence[GalleryItem], n: int = 8) -> list[GalleryItem]:
    """``n`` items, most telling first: fixed by RL (wrong -> right), then broken (right -> wrong), then rest."""

    def rank(item: GalleryItem) -> int:
        if item.sft_correct is False and item.final_correct:
            return 0
        if item.sft_correct and item.final_correct is False:
            return 1
        return 2

    return sorted(items, key=rank)[:n]  # sorted() is stable: file order within a rank
