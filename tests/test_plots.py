"""Run plots: iteration curves from summary.json and the gt/SFT/final box gallery."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visrl.logging.media import colour_for
from visrl.logging.plots import (
    GalleryItem,
    gallery_items_from_predictions,
    iteration_series,
    plot_gallery,
    plot_iterations,
    select_gallery,
)

P = "eval/synthetic"


def _summary(with_ci: bool) -> dict:
    iterations = []
    for it, acc in enumerate((0.30, 0.42, 0.55)):
        metrics = {
            f"{P}/cot_pred/accuracy": acc,
            f"{P}/cot_pred/det_acc": acc - 0.1,
            f"{P}/cot_pred/mean_iou": acc / 2,
            f"{P}/cot_gt/accuracy": 0.9,
            f"{P}/direct/accuracy": 0.2,
            "data/pairs_kept": 10.0 * it,
        }
        if with_ci:
            metrics[f"{P}/cot_pred/accuracy_ci"] = [acc - 0.05, acc + 0.04]
        iterations.append({"iter": it, "metrics": metrics})
    return {"iterations": iterations[::-1], "config": {"objective.beta": 0.1}}  # order must not matter


def _png_ok(path: Path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def test_iteration_series_parses_keys_and_intervals() -> None:
    series = iteration_series(_summary(with_ci=True))
    assert list(series) == [P]  # data/pairs_kept is not a <mode>/<metric> key
    acc = series[P][("cot_pred", "accuracy")]
    assert [(i, round(v, 2)) for i, v, _ in acc] == [(0, 0.30), (1, 0.42), (2, 0.55)]
    assert acc[2][2] == pytest.approx((0.50, 0.59))
    assert all(ci is None for _, _, ci in series[P][("cot_gt", "accuracy")])


@pytest.mark.parametrize("with_ci", [True, False])
def test_plot_iterations_writes_a_png(tmp_path: Path, with_ci: bool) -> None:
    _png_ok(plot_iterations(_summary(with_ci), tmp_path / "plots" / "iterations.png"))


def test_plot_iterations_rejects_bad_summaries(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"iterations\[1\]"):
        plot_iterations({"iterations": [{"iter": 0, "metrics": {}}, {"metrics": {}}]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no '<prefix>/cot_pred/accuracy'"):
        plot_iterations({"iterations": [{"iter": 0, "metrics": {"train/loss": 1.0}}]}, tmp_path / "x.png")


def _write_predictions(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(uid: str, pred: str, box: list[float] | None, correct: bool, mode: str = "cot_pred") -> dict:
    return {
        "uid": uid, "mode": mode, "question": f"What pattern is on the {uid} object?", "answer": "stripes",
        "pred": pred, "correct": correct, "box_text": str(box), "box": box, "gt_box": [0.5, 0.5, 0.9, 0.9],
        "iou": 0.0, "parse_failure": None,
    }  # fmt: skip


def test_gallery_from_two_prediction_files(tmp_path: Path) -> None:
    images = {}
    for uid in ("a", "b", "c"):
        images[uid] = tmp_path / f"{uid}.png"
        Image.fromarray(np.full((64, 64, 3), 255, dtype=np.uint8)).save(images[uid])
    sft = _write_predictions(
        tmp_path / "sft" / "predictions.jsonl",
        [_row("a", "dots", [0.0, 0.0, 0.3, 0.3], False), _row("b", "stripes", None, True),
         _row("c", "dots", [0.1, 0.1, 0.2, 0.2], False), _row("a", "dots", None, False, mode="direct")],
    )  # fmt: skip
    final = _write_predictions(
        tmp_path / "iter_2" / "predictions.jsonl",
        [_row("b", "dots", [0.5, 0.5, 0.9, 0.9], False), _row("a", "stripes", [0.5, 0.5, 0.85, 0.9], True)],
    )
    items = gallery_items_from_predictions(sft, final, image_paths=images)
    assert [Path(i.image_path).stem for i in items] == ["a", "b"]  # SFT order; c has no final row
    a = items[0]
    assert (a.sft_answer, a.final_answer, a.gt_answer) == ("dots", "stripes", "stripes")
    assert (a.sft_correct, a.final_correct) == (False, True) and a.final_box == [0.5, 0.5, 0.85, 0.9]
    assert [i.sft_answer for i in select_gallery(items[::-1], n=2)] == [
        "dots",
        "stripes",
    ]  # fixed-by-RL first

    pixels = _png_ok(plot_gallery(items, tmp_path / "gallery.png", n=8))
    for idx in range(3):  # gt, sft, final boxes each drawn in their legend colour
        rgb = np.array([int(colour_for(idx)[k : k + 2], 16) for k in (1, 3, 5)])
        assert (np.abs(pixels.astype(int) - rgb).sum(axis=-1) < 40).any(), f"colour {colour_for(idx)} missing"


def test_gallery_input_errors_name_the_file(tmp_path: Path) -> None:
    bad = _write_predictions(tmp_path / "bad.jsonl", [{"uid": "a", "mode": "cot_pred"}])
    with pytest.raises(ValueError, match=r"bad.jsonl: record 0 lacks field\(s\) \['question'"):
        gallery_items_from_predictions(bad, bad)
    good = _write_predictions(tmp_path / "good.jsonl", [_row("a", "x", None, False)])
    with pytest.raises(KeyError, match="no image path for uid 'a'"):
        gallery_items_from_predictions(good, good)
    with pytest.raises(ValueError, match="no items"):
        plot_gallery([], tmp_path / "g.png")
    item = GalleryItem(tmp_path / "missing.png", "q", None, "a", None, "b", None, "c")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        plot_gallery([item], tmp_path / "g.png")
