"""The whole VisRL pipeline end to end at toy scale: artifacts of every stage, training, resume.

Why: the pipeline (paper §3: base prep -> SFT warm-up -> K x (self-evolving data -> step-DPO stage 1 ->
stage 2 -> evaluate)) is the product; unit tests of its modules cannot show that the stages are wired
together. With ``debug=fast`` (random scorers, fallback boxes: every stage gets data) a 2-iteration run
takes ~20 s. Checked here:

* every file of the run directory contract (docs/design.md "Run directory") exists and is consistent
  (summary = evaluation metrics = what the logger mirror received; pairs = stats; reference log-probs);
* every trainable parameter changes in every stage (SFT vs base, stage 1 vs the previous model, stage 2
  vs stage 1), and the saved iteration model is the stage-2 model;
* a run crashed mid-iteration (``fail_after=iter_2/stage1``, the pipeline's fault-injection hook)
  resumes with the same command: finished steps are not touched, and the result equals an uninterrupted
  run with the same seed bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
import yaml
from PIL import Image

from visrl.logging.samples import PAIR_COLUMNS, SAMPLE_PAIRS

ITERS = (1, 2)
STAGES = ("stage1", "stage2")
PREDICTION_KEYS = {"uid", "mode", "question", "answer", "pred", "correct", "box_text", "box", "gt_box", "iou",
                   "parse_failure"}  # fmt: skip


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def model_params(model_dir: Path) -> dict[str, torch.Tensor]:
    """Parameters of a saved backbone (``Backbone.save`` directory), by ``named_parameters`` name."""
    from visrl.models.backbone import load_backbone

    return {n: p.detach().clone() for n, p in load_backbone(model_dir).model.named_parameters()}


def stage_weights(path: Path) -> dict[str, torch.Tensor]:
    """The trainable parameters a step saved (``iter_k/stage*/weights.pt``)."""
    return torch.load(path, weights_only=True)


def base_model_dir(run_dir: Path) -> Path:
    """The cached base model this run started from: the cache entry whose key holds the run's model config."""
    from visrl.training.base_prep import SPEED_ONLY

    model_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    model_cfg = {k: v for k, v in model_cfg.items() if k not in SPEED_ONLY}  # not part of the key
    entries = [
        d for d in (Path(os.environ["VISRL_CACHE"]) / "base").iterdir()
        if (d / "DONE").exists() and read_json(d / "key.json")["model"] == model_cfg
    ]  # fmt: skip
    assert len(entries) == 1, f"expected one cached base model for {model_cfg['name']}, found {entries}"
    return entries[0] / "model"


def assert_all_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], what: str) -> None:
    assert after, f"{what}: no trainable parameters saved"
    assert set(after) <= set(before), f"{what}: unknown parameters {sorted(set(after) - set(before))[:5]}"
    same = [name for name, value in after.items() if torch.equal(value, before[name])]
    assert not same, f"{what}: {len(same)}/{len(after)} trainable parameters did not change, e.g. {same[:5]}"


def snapshot(root: Path, subdirs: tuple[str, ...]) -> dict[str, tuple[str, int]]:
    """``relative path -> (sha256, mtime_ns)`` of every file under ``root/<subdir>``."""
    out = {}
    for sub in subdirs:
        for path in sorted((root / sub).rglob("*")):
            if path.is_file():
                out[path.relative_to(root).as_posix()] = (
                    hashlib.sha256(path.read_bytes()).hexdigest(),
                    path.stat().st_mtime_ns,
                )
    return out


def reference_logps(iter_dir: Path) -> list[list[tuple[float, float]]]:
    """Stored reference log-prob lists: ``iter_k/ref_logps.json``, else the run-shared
    ``$VISRL_CACHE/ref_logps/*.json`` (visrl.training.reference.ReferenceCache, keyed by model + rows)."""
    if (iter_dir / "ref_logps.json").is_file():
        return [list(read_json(iter_dir / "ref_logps.json")["logps"].values())]
    cache = Path(os.environ["VISRL_CACHE"]) / "ref_logps"
    return [[tuple(v) for v in read_json(path)["logps"]] for path in sorted(cache.glob("*.json"))]


def eval_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics.jsonl rows of the benchmark evaluations, in logging order."""
    return [row for row in read_jsonl(run_dir / "metrics.jsonl") if any(k.startswith("eval/") for k in row)]


# ----------------------------------------------------------------------------------------------- one run
def test_run_directory_has_every_stage(tiny_run: Path) -> None:
    expected = ["config.yaml", "git_sha.txt", "metrics.jsonl", "summary.json", "DONE", "plots/iterations.png",
                "plots/gallery.png", "sft/DONE", "sft/model/backbone.json", "sft/eval/predictions.jsonl",
                "sft/eval/metrics.json", "csv/metrics.csv"]  # fmt: skip
    for k in ITERS:
        expected += [f"iter_{k}/{name}" for name in ("DONE", "candidates.jsonl", "pairs.json", "stats.json",
                     "model/backbone.json", "eval/predictions.jsonl", "eval/metrics.json")]  # fmt: skip
        expected += [f"iter_{k}/{stage}/{name}" for stage in STAGES for name in ("DONE", "weights.pt")]
    missing = [name for name in expected if not (tiny_run / name).is_file()]
    assert not missing, f"{tiny_run}: missing {missing}"
    assert not (tiny_run / "FAILED").exists() and not (tiny_run / "summary.partial.json").exists()
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert cfg["iter"] == 2 and cfg["stage"] == "all" and cfg["paths"]["output_dir"] == str(tiny_run)
    assert (tiny_run / "git_sha.txt").read_text().strip()
    env = json.loads((tiny_run / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["transformers"] == transformers.__version__
    for plot in ("iterations", "gallery"):
        with Image.open(tiny_run / "plots" / f"{plot}.png") as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_summary_matches_evaluations_and_the_metrics_mirror(tiny_run: Path) -> None:
    summary = read_json(tiny_run / "summary.json")
    assert [it["iter"] for it in summary["iterations"]] == [0, *ITERS]
    eval_dirs = [tiny_run / "sft" / "eval", *(tiny_run / f"iter_{k}" / "eval" for k in ITERS)]
    logged = eval_rows(tiny_run)
    assert len(logged) == len(eval_dirs)
    for entry, eval_dir, row in zip(summary["iterations"], eval_dirs, logged):
        metrics = read_json(eval_dir / "metrics.json")
        assert {k: entry["metrics"][k] for k in metrics} == metrics, (
            f"summary iter {entry['iter']} != {eval_dir}"
        )
        assert row["iter"] == entry["iter"]  # the iteration axis of W&B
        assert {
            k.removeprefix("eval/synthetic/"): v for k, v in row.items() if k not in ("step", "iter")
        } == metrics
        preds = read_jsonl(eval_dir / "predictions.jsonl")
        assert preds and all(set(p) >= PREDICTION_KEYS for p in preds)
        assert {p["mode"] for p in preds} == {"direct", "cot_gt", "cot_pred"}
        assert metrics["cot_pred/n"] == sum(p["mode"] == "cot_pred" for p in preds)
    steps = [row["step"] for row in read_jsonl(tiny_run / "metrics.jsonl")]
    assert steps == sorted(steps), "the global step of metrics.jsonl went backwards"
    assert summary["final_metric"] == summary["iterations"][-1]["metrics"]["cot_pred/accuracy"]


@pytest.mark.parametrize("k", ITERS)
def test_iteration_data_is_consistent(tiny_run: Path, k: int) -> None:
    it = tiny_run / f"iter_{k}"
    stats, pairs = read_json(it / "stats.json"), read_json(it / "pairs.json")
    assert stats["pairs"] == len(pairs) > 0, "debug=fast must produce preference pairs in every iteration"
    candidates = read_jsonl(it / "candidates.jsonl")
    assert len(candidates) == stats["candidates"] and stats["questions"] > 0
    # reference log-probs of both steps of every pair, computed once up front (dpo.precompute_ref)
    stored = reference_logps(it)
    assert any(len(values) == 2 * len(pairs) for values in stored), "no reference log-probs for the pairs"
    assert all(c < 0 and r < 0 for values in stored for c, r in values)
    summary_metrics = read_json(tiny_run / "summary.json")["iterations"][k]["metrics"]
    assert summary_metrics["data/pairs"] == len(pairs)


def test_every_trainable_parameter_changes_in_every_stage(tiny_run: Path) -> None:
    base = model_params(base_model_dir(tiny_run))
    sft = model_params(tiny_run / "sft" / "model")
    model_cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())["model"]
    if model_cfg.get("freeze_vision"):  # the vision side is frozen by design: it must NOT change
        from visrl.models.backbone import VISION_MODULES

        prefixes = tuple(f"model.{m}." for m in VISION_MODULES[model_cfg["family"]])
        frozen = {n for n in sft if n.startswith(prefixes)}
        assert frozen and all(torch.equal(sft[n], base[n]) for n in frozen), "frozen vision tower changed"
        sft = {n: v for n, v in sft.items() if n not in frozen}
    assert_all_changed(base, sft, "SFT vs base")
    previous = sft
    for k in ITERS:
        stage1 = stage_weights(tiny_run / f"iter_{k}" / "stage1" / "weights.pt")
        stage2 = stage_weights(tiny_run / f"iter_{k}" / "stage2" / "weights.pt")
        assert set(stage1) == set(sft), "full fine-tuning: every parameter is trainable in debug=fast"
        assert_all_changed(previous, stage1, f"iter {k} stage 1 vs the model it started from")
        assert_all_changed(stage1, stage2, f"iter {k} stage 2 vs stage 1")
        saved = model_params(tiny_run / f"iter_{k}" / "model")
        assert all(torch.equal(saved[name], value) for name, value in stage2.items()), (
            f"iter_{k}/model is not the stage-2 model"
        )
        previous = stage2


def test_csv_logger_received_pair_tables_and_artifacts(tiny_run: Path) -> None:
    import csv

    with (tiny_run / "csv" / "artifacts.csv").open() as fh:
        artifacts = {row["name"]: row for row in csv.DictReader(fh)}
    for k in ITERS:
        assert Path(artifacts[f"pairs_iter_{k}"]["path"]) == tiny_run / f"iter_{k}" / "pairs.json"
        assert artifacts[f"model_iter_{k}"]["type"] == "model"
        tables = sorted((tiny_run / "csv" / "tables" / f"pairs-iter_{k}").glob("step_*.csv"))
        assert len(tables) == 1, f"expected one pair table for iteration {k}, got {tables}"
        with tables[0].open() as fh:
            rows = list(csv.reader(fh))
        n_pairs = len(read_json(tiny_run / f"iter_{k}" / "pairs.json"))
        assert rows[0] == list(PAIR_COLUMNS) and len(rows) - 1 == min(SAMPLE_PAIRS, n_pairs)
        for row in rows[1:]:
            image = tables[0].parent / row[PAIR_COLUMNS.index("image")]
            with Image.open(image) as img:  # the image with the chosen/rejected boxes burnt in
                assert img.format == "PNG"


# ----------------------------------------------------------------------------------------------- resume
CRASH_AT = "iter_2/stage1"
FINISHED = ("sft", "iter_1", CRASH_AT)  # steps complete when the crash happens: must not be touched


@pytest.fixture(scope="module")
def resumed(run_visrl: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run crashed right after ``iter_2/stage1`` (fault injection), then the same command again."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    crashed = run_visrl(run_dir, "iter=2", "logger=csv", f"fail_after={CRASH_AT}")
    state = {
        "run_dir": run_dir,
        "crashed": crashed,
        "after_crash": snapshot(run_dir, FINISHED),
        "dirs_after_crash": sorted(p.name for p in run_dir.iterdir()),
    }
    state["resumed"] = run_visrl(run_dir, "iter=2", "logger=csv")
    return state


def test_injected_failure_stops_the_run_after_the_step(resumed: dict[str, Any]) -> None:
    crashed = resumed["crashed"]
    assert crashed.returncode != 0
    assert f"fail_after={CRASH_AT}" in crashed.stderr, crashed.tail()
    assert "FAILED" in resumed["dirs_after_crash"] and "summary.json" not in resumed["dirs_after_crash"]
    assert any(path.startswith(f"{CRASH_AT}/") for path in resumed["after_crash"])  # stage 1 was saved


def test_resume_continues_without_touching_finished_steps(resumed: dict[str, Any]) -> None:
    run_dir, result = resumed["run_dir"], resumed["resumed"]
    assert result.returncode == 0, result.tail()
    assert snapshot(run_dir, FINISHED) == resumed["after_crash"], "a finished step was rewritten on resume"
    assert (run_dir / "DONE").is_file() and not (run_dir / "FAILED").exists()
    assert (run_dir / "iter_2" / "stage2" / "DONE").is_file() and (run_dir / "iter_2" / "DONE").is_file()
    steps = [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == sorted(steps), "the resumed run's global step went backwards"


def test_resumed_run_equals_the_uninterrupted_run(resumed: dict[str, Any], tiny_run: Path) -> None:
    run_dir = resumed["run_dir"]
    assert resumed["resumed"].returncode == 0, resumed["resumed"].tail()
    ours, reference = read_json(run_dir / "summary.json"), read_json(tiny_run / "summary.json")
    for key in ("iterations", "final_metric", "effect"):
        assert ours.get(key) == reference.get(key), f"summary.json {key!r} differs from the uninterrupted run"
    for step in ("stage1", "stage2"):  # same seed, same data: bit-identical training
        ours_w = stage_weights(run_dir / "iter_2" / step / "weights.pt")
        ref_w = stage_weights(tiny_run / "iter_2" / step / "weights.pt")
        assert ours_w.keys() == ref_w.keys()
        assert all(torch.equal(ours_w[n], ref_w[n]) for n in ref_w), f"iter_2/{step} weights differ"
