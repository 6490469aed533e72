"""Sweep report over a fabricated 2x2 Hydra multirun (model x objective.beta) with one failed job."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from visrl.logging.sweep import find_jobs, mark_complete, mark_failed
from visrl.report import main, parse_overrides, write_report

ACC = "eval/synthetic/cot_pred/accuracy"
DET = "eval/synthetic/cot_pred/det_acc"


def _final_acc(model: str, beta: float) -> float:
    return round((0.4 if model == "tiny_qwen2vl" else 0.3) + beta, 4)


def make_job(sweep: Path, num: int, overrides: list[str], summary: dict | None) -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))
        mark_complete(job, ["summary.json"])  # what the pipeline writes last
    return job


def make_sweep(root: Path) -> Path:
    """Jobs 0..3 = model {tiny_qwen2vl, tiny_llava} x beta {0.05, 0.1}; job 3 crashed."""
    sweep = root / "multirun" / "2026-01-02" / "03-04-05"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    num = 0
    for model in ("tiny_qwen2vl", "tiny_llava"):
        for beta in (0.05, 0.1):
            overrides = [f"model={model}", f"objective.beta={beta}", "pipeline.iterations=2"]
            acc = _final_acc(model, beta)
            summary = {
                "iterations": [
                    {"iter": 0, "metrics": {ACC: 0.25, DET: 0.1}},
                    {"iter": 1, "metrics": {ACC: acc - 0.05, DET: 0.2}},
                    {
                        "iter": 2,
                        "metrics": {
                            ACC: acc,
                            f"{ACC}_ci_lo": acc - 0.02,
                            f"{ACC}_ci_hi": acc + 0.02,
                            DET: 0.3,
                        },
                    },
                ],
                "effect": {
                    ACC: {"before": 0.25, "after": acc, "diff": acc - 0.25, "ci95": [0.01, 0.4], "n": 6}
                },
                "config": dict(o.split("=") for o in overrides),
            }
            job = make_job(sweep, num, overrides, None if num == 3 else summary)
            if num == 3:
                try:
                    raise RuntimeError("stage1 diverged: loss is nan")
                except RuntimeError as exc:
                    mark_failed(job, exc)
            num += 1
    return sweep


def test_parse_overrides_types_values(tmp_path: Path) -> None:
    path = tmp_path / "overrides.yaml"
    path.write_text("- model=tiny_llava\n- objective.beta=0.1\n- +debug=true\n- ~logger\n- k=3\n")
    assert parse_overrides(path) == {
        "model": "tiny_llava", "objective.beta": 0.1, "debug": True, "logger": None, "k": 3,
    }  # fmt: skip
    path.write_text("- model=[unclosed\n")
    with pytest.raises(ValueError, match="override 0"):
        parse_overrides(path)


def test_report_aggregates_a_2x2_sweep_with_a_failed_job(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path)
    report = write_report(sweep, tmp_path / "out")
    with report.csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["status"] for r in rows] == ["complete", "complete", "complete", "failed"]
    assert [(r["model"], r["objective.beta"]) for r in rows] == [
        ("tiny_qwen2vl", "0.05"), ("tiny_qwen2vl", "0.1"), ("tiny_llava", "0.05"), ("tiny_llava", "0.1"),
    ]  # fmt: skip
    for row in rows[:3]:
        assert float(row[ACC]) == pytest.approx(_final_acc(row["model"], float(row["objective.beta"])))
        assert float(row[DET]) == pytest.approx(0.3)  # the final iteration, not the first or the mean
        assert float(row[f"sft/{ACC}"]) == pytest.approx(0.25) and float(row[f"sft/{DET}"]) == 0.1
        assert row["error"] == ""
    assert rows[3][ACC] == "" and rows[3]["error"] == "RuntimeError: stage1 diverged: loss is nan"
    # the CSV holds every metric with its interval (the benchmarks' _ci_lo / _ci_hi) and the paired effect
    assert float(rows[1][f"{ACC}_ci_lo"]) == pytest.approx(0.48) and float(rows[1][f"{ACC}_ci_hi"]) == 0.52
    assert float(rows[1][f"effect/{ACC}"]) == pytest.approx(0.25) and rows[1][f"effect/{ACC}_ci_lo"] == "0.01"
    assert f"{ACC}_ci_lo_ci_lo" not in rows[0]  # an interval is not a metric of its own

    md = report.markdown_path.read_text()
    assert "3 complete, 1 failed, 0 incomplete" in md
    # compact: the swept overrides only, the headline metrics (with an interval, and the effects) as v [lo, hi]
    assert md.splitlines()[4] == f"| job | model | objective.beta | status | {ACC} | effect/{ACC} | error |"
    assert "| 1 | tiny_qwen2vl | 0.1 | complete | 0.500 [0.480, 0.520] | 0.250 [0.010, 0.400] |  |" in md
    assert sorted(p.name for p in report.plots) == [
        "effect__eval__synthetic__cot_pred__accuracy.png",
        "eval__synthetic__cot_pred__accuracy.png",
    ]  # fmt: skip: plots only for the chosen metrics
    assert all(p.stat().st_size > 1000 for p in report.plots)
    chosen = write_report(sweep, tmp_path / "det", metrics=["*det_acc"])
    assert chosen.metrics == [DET, f"sft/{DET}"] and len(chosen.plots) == 2
    with pytest.raises(ValueError, match="matches none of"):
        write_report(sweep, tmp_path / "none", metrics=["nope/*"])


def test_incomplete_and_unreadable_jobs_are_rows_not_crashes(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    make_job(sweep, 0, ["model=a"], {"iterations": [{"iter": 0, "metrics": {ACC: 0.5}}]})
    make_job(sweep, 1, ["model=b"], None)  # still running / killed
    (make_job(sweep, 2, ["model=c"], None) / "summary.json").write_text("{not json")
    make_job(sweep, 10, ["model=d"], {"iterations": []})
    report = write_report(sweep)
    assert [j.name for j in report.jobs] == ["0", "1", "2", "10"]  # natural order without hydra.yaml
    assert [j.status for j in report.jobs] == ["complete", "incomplete", "incomplete", "incomplete"]
    assert "unreadable summary.json" in report.jobs[2].error
    assert "non-empty 'iterations'" in report.jobs[3].error
    assert report.jobs[0].metrics == {ACC: 0.5, f"sft/{ACC}": 0.5}  # K=0: final and SFT are iteration 0
    assert [p.name for p in report.plots] == ["eval__synthetic__cot_pred__accuracy.png"]  # a bar chart
    assert (sweep / "report" / "report.md").is_file()


def test_jobs_follow_hydra_job_numbers(tmp_path: Path) -> None:
    for num, name in enumerate(("b=0.1", "a=2", "a=10")):
        job = make_job(tmp_path, num, [name], None)
        (job / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {2 - num}\n")
    assert [p.name for p in find_jobs(tmp_path)] == ["2", "1", "0"]
    for path in tmp_path.rglob("hydra.yaml"):
        path.unlink()
    assert [p.name for p in find_jobs(tmp_path)] == ["0", "1", "2"]


def test_cli_prints_the_table_and_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = make_sweep(tmp_path)
    assert main([str(sweep), "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "tiny_llava" in out and "failed" in out and "wrote" in out
    assert max(len(line) for line in out.splitlines()) <= 200  # compact: readable in a terminal
    assert main([str(sweep), "--out", str(tmp_path / "m"), "--metrics", f"sft/{ACC}"]) == 0
    assert "0.250" in capsys.readouterr().out
    assert main([str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([str(tmp_path / "cli")]) == 2  # a directory without jobs
    assert find_jobs(tmp_path / "cli") == []
