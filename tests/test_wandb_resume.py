"""A crashed then resumed run is ONE W&B run, failed then finished, and no record is logged twice.

Why (VisRL runs are long: SFT, then K iterations of rollouts and two DPO stages): a crash must show as failed
in W&B, and re-running the same command must continue the same W&B run and the same ``metrics.jsonl``, not
start a second run or repeat the evaluation, data and loss rows the first process already logged. The offline
``.wandb`` files are read back with the reader of ``test_wandb_run`` (which checks the same on a real
pipeline run, crashed by ``fail_after`` and resumed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_wandb_run import of_type, read_wandb_records

from visrl.logging import RunLogger, read_metrics
from visrl.logging.backends import WANDB_ID_FILE, WandbBackend


def offline_runs(run_dir: Path) -> list[tuple[Path, list[Any]]]:
    """(folder, records) of every ``offline-run-*`` folder of a run dir, oldest first."""
    out = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        (log_file,) = folder.glob("run-*.wandb")
        out.append((folder, read_wandb_records(log_file)))
    return out


def axes(records: list[Any]) -> dict[str, str]:
    """``metric name or glob -> step metric`` of the ``define_metric`` records."""
    return {(r.metric.name or r.metric.glob_name): r.metric.step_metric for r in of_type(records, "metric")}


def exit_code(records: list[Any]) -> int:
    (record,) = of_type(records, "exit")
    return record.exit.exit_code


def _session(run_dir: Path, image: Path, crash: bool) -> None:
    """One process's worth of logging: an evaluation, a phase's losses, a table, an artifact."""
    logger = RunLogger(run_dir, WandbBackend(mode="offline"))
    try:
        logger.log_iteration(0, {"eval/synthetic/cot_pred/accuracy": 0.25})
        for local in range(3):
            logger.log_phase("sft", local, {"train/loss": 1.0 / (local + 1)})
        logger.log_predictions("eval/predictions/iter_0", [
            {"uid": "a", "image": str(image), "question": "q?", "pred": "x", "box": [0.1, 0.1, 0.5, 0.5],
             "gt_box": [0.2, 0.2, 0.6, 0.6], "correct": 1.0},
        ])  # fmt: skip
        logger.log_artifact(image, "an_image", "dataset")
        if crash:
            raise RuntimeError("injected")
        for local in range(3, 5):
            logger.log_phase("dpo/stage1", local - 3, {"train/loss": 0.5}, context={"iter": 1})
        logger.log_iteration(1, {"eval/synthetic/cot_pred/accuracy": 0.5})
        logger.log_summary({"effect": {"delta": 0.25, "ci_lo": -0.1, "ci_hi": 0.6}})
    finally:
        logger.finish()  # no exit code: inferred from the propagating exception


def test_crash_then_resume_is_one_failed_then_finished_run(tmp_path: Path) -> None:
    image = tmp_path / "img.png"
    Image.fromarray(np.full((32, 48, 3), 200, dtype=np.uint8)).save(image)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected"):
        _session(run_dir, image, crash=True)
    _session(run_dir, image, crash=False)
    import wandb

    wandb.teardown()  # in-process, wandb-core writes the last run's file out at teardown (a CLI run: at exit)
    runs = offline_runs(run_dir)
    assert len(runs) == 2  # offline: one folder per process, both with the id of wandb_id.txt
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    assert {r.run.run_id for _, records in runs for r in of_type(records, "run")} == {run_id}
    assert [exit_code(records) for _, records in runs] == [1, 0]  # failed, then finished
    for _, records in runs:  # the axes are declared by every process
        assert {"eval/*": "iter", "data/*": "iter", "iter": ""}.items() <= axes(records).items()
    assert axes(runs[0][1])["sft/train/loss"] == "sft/step"
    assert axes(runs[1][1])["dpo/stage1/train/loss"] == "dpo/stage1/step"

    rows = read_metrics(run_dir)  # no row of the first process is repeated by the second
    evals = [
        (r["iter"], r["eval/synthetic/cot_pred/accuracy"])
        for r in rows
        if "eval/synthetic/cot_pred/accuracy" in r
    ]
    assert evals == [(0, 0.25), (1, 0.5)]
    assert [r["sft/step"] for r in rows if "sft/step" in r] == [0, 1, 2]
    assert [r["dpo/stage1/step"] for r in rows if "dpo/stage1/step" in r] == [0, 1]
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)

    first, second = runs[0][1], runs[1][1]
    assert [r.artifact.name for r in of_type(first + second, "artifact") if r.artifact.type == "dataset"] == [
        "an_image"
    ]
    (table_file,) = (runs[0][0] / "files" / "media" / "table" / "eval" / "predictions").glob(
        "iter_0_*.table.json"
    )
    table = json.loads(table_file.read_text())
    assert table["columns"][0] == "image" and "pred" in table["columns"] and len(table["data"]) == 1
    assert not (runs[1][0] / "files" / "media" / "table").exists()  # not logged again on resume
    summary = {u.key: json.loads(u.value_json) for r in of_type(second, "summary") for u in r.summary.update}
    assert summary["effect"] == {"delta": 0.25, "ci_lo": -0.1, "ci_hi": 0.6}


def test_phase_axis_counts_across_iterations_and_skips_replayed_steps(tmp_path: Path) -> None:
    first = RunLogger(tmp_path)
    for it in (1, 2):
        for local in range(3):
            first.log_phase("dpo/stage1", local, {"train/loss": 1.0}, context={"iter": it})
    first.finish()
    second = RunLogger(tmp_path)  # iteration 2's fit resumed from a checkpoint at its local step 1
    assert second.log_phase("dpo/stage1", 1, {"train/loss": 9.0}, context={"iter": 2}) is None
    assert second.log_phase("dpo/stage1", 3, {"train/loss": 0.5}, context={"iter": 2}) is not None
    assert second.log_iteration(2, {"eval/x": 1.0}) is not None
    second.finish()
    third = RunLogger(tmp_path)
    assert third.log_iteration(2, {"eval/x": 1.0}) is None  # already there
    third.finish()
    rows = read_metrics(tmp_path)
    assert [(r["iter"], r["dpo/stage1/step"]) for r in rows if "dpo/stage1/step" in r] == [
        (1, 0), (1, 1), (1, 2), (2, 3), (2, 4), (2, 5), (2, 6)
    ]  # fmt: skip
    assert 9.0 not in [r.get("dpo/stage1/train/loss") for r in rows]


def test_torn_mirror_tail_is_dropped_and_finish_infers_the_exit_code(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "a": 1.0}\n{"step": 1, "a"')
    calls: list[int] = []

    class Backend:
        def open(self, run_dir: Path) -> None: ...

        def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

        def finish(self, exit_code: int = 0) -> None:
            calls.append(exit_code)

    logger = RunLogger(tmp_path, Backend())  # type: ignore[arg-type]
    assert logger.log_metrics({"a": 2.0}) == 1
    with pytest.raises(ValueError):
        try:
            raise ValueError("boom")
        finally:
            logger.finish()
    RunLogger(tmp_path, Backend()).finish()  # type: ignore[arg-type]
    assert calls == [1, 0]
    assert read_metrics(tmp_path) == [{"step": 0, "a": 1.0}, {"step": 1, "a": 2.0}]
