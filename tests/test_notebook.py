"""notebooks/analysis.ipynb runs top to bottom on a fabricated run dir and a fabricated 2-job sweep."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from visrl.logging.rundir import find_predictions, resolve_target, summary_markdown
from visrl.logging.sweep import mark_complete

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"
P = "synthetic"


def _summary(final_acc: float) -> dict:
    its = [(0, 0.3), (1, (0.3 + final_acc) / 2), (2, final_acc)]
    return {
        "iterations": [
            {"iter": i, "metrics": {f"{P}/cot_pred/accuracy": a, f"{P}/cot_pred/det_acc": a / 2,
                                    f"{P}/cot_gt/accuracy": 0.9, f"{P}/direct/accuracy": 0.2}}
            for i, a in its
        ],
        "config": {"iter": 2},
    }  # fmt: skip


def _predictions(path: Path, image_dir: str, correct: bool) -> None:
    rows = []
    for i in range(3):
        box = [0.1 * i, 0.1, 0.1 * i + 0.4, 0.5]
        rows.append({
            "uid": f"synthetic:test:{i}", "mode": "cot_pred", "image": f"{image_dir}/{i:06d}.png",
            "question": "What pattern is on the red object?", "answer": "vertical", "pred": "vertical",
            "correct": correct, "box_text": str(box), "box": box, "gt_box": [0.5, 0.5, 0.9, 0.9], "iou": 0.1,
            "parse_failure": None,
        })  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(run_dir: Path, image_root: Path, final_acc: float = 0.6) -> Path:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps(_summary(final_acc)))
    mark_complete(run_dir, ["summary.json"])  # what the pipeline writes last
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "train/loss": 1.0}\n')
    _predictions(run_dir / "sft" / "eval" / P / "predictions.jsonl", "images/test", correct=False)
    _predictions(run_dir / "iter_2" / "eval" / P / "predictions.jsonl", "images/test", correct=True)
    (image_root / "images" / "test").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        pixels = np.zeros((64, 64, 3), dtype=np.uint8)
        pixels[16:48, 8 + 8 * i : 40 + 8 * i] = (220, 40, 40)  # a red square
        Image.fromarray(pixels).save(image_root / "images" / "test" / f"{i:06d}.png")
    return run_dir


def make_sweep(sweep: Path, image_root: Path) -> Path:
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for beta, acc in (("0.05", 0.5), ("0.1", 0.7)):
        job = make_run(sweep / f"objective.beta={beta}", image_root, acc)
        (job / ".hydra" / "overrides.yaml").write_text(f"- objective.beta={beta}\n")
    return sweep


def _execute(monkeypatch: pytest.MonkeyPatch, target: Path, image_root: Path) -> nbformat.NotebookNode:
    monkeypatch.setenv("VISRL_RUN_DIR", str(target))
    monkeypatch.setenv("VISRL_IMAGE_ROOT", str(image_root))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(target)}}
    ).execute()
    return nb


def _outputs(nb: nbformat.NotebookNode) -> tuple[list[str], int]:
    """All markdown text displayed, and the number of PNGs displayed."""
    texts, pngs = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", "".join(out.get("traceback", []))
            data = out.get("data", {})
            texts.append(data.get("text/markdown", ""))
            pngs += "image/png" in data
    return texts, pngs


def test_notebook_is_stored_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert nb.metadata.kernelspec.name == "python3"


def test_notebook_runs_on_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = tmp_path / "data"
    run = make_run(tmp_path / "outputs" / "default", images)
    texts, pngs = _outputs(_execute(monkeypatch, run, images))
    joined = "\n".join(texts)
    assert "**run dir**" in joined and "| synthetic/cot_pred/accuracy | 0.3 | 0.45 | 0.6 |" in joined
    assert pngs == 2 and "not a sweep directory" in joined  # iterations + gallery
    assert (run / "plots" / "iterations.png").is_file() and (run / "plots" / "gallery.png").is_file()


def test_notebook_runs_on_a_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = tmp_path / "data"
    sweep = make_sweep(tmp_path / "multirun" / "beta", images)
    texts, pngs = _outputs(_execute(monkeypatch, sweep, images))
    joined = "\n".join(texts)
    assert "2 jobs (2 complete, 0 failed, 0 incomplete)" in joined
    # the report table: jobs in order of beta, then columns job, override, status, cot_gt/cot_pred accuracy
    assert (
        "| objective.beta=0.05 | 0.05 | complete | 0.900 | 0.500 |"
        in joined.split("| objective.beta=0.1 |")[0]
    )
    assert "| objective.beta=0.1 | 0.1 | complete | 0.900 | 0.700 |" in joined
    assert pngs == 2 * 2 + 4  # per job: iterations + gallery; report: one plot per final metric
    assert (sweep / "report" / "report.csv").is_file()


def test_helpers_find_the_newest_target_and_predictions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    images = tmp_path / "data"
    old = make_run(tmp_path / "outputs" / "old", images)
    sweep = make_sweep(tmp_path / "multirun" / "beta", images)
    os.utime(old, (1, 1))
    monkeypatch.delenv("VISRL_RUN_DIR", raising=False)
    monkeypatch.chdir(tmp_path / "outputs")  # like a notebook started in a sub-directory
    assert resolve_target() == sweep.resolve()  # a job resolves to its sweep
    assert find_predictions(old) == (
        old / "sft" / "eval" / P / "predictions.jsonl",
        old / "iter_2" / "eval" / P / "predictions.jsonl",
    )
    assert find_predictions(tmp_path) is None
    table = summary_markdown(_summary(0.6))
    assert table.splitlines()[0] == "| metric | SFT | iter 1 | iter 2 |" and "`iter=2`" in table
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_target(tmp_path / "missing")
