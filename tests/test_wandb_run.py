"""Read back what an offline W&B run recorded and check it against the run's own files.

Why: W&B is the default logger (offline: no network, ``wandb sync`` later). Users look at its charts,
the per-iteration table of preference pairs (image + chosen/rejected focus boxes, answers, self-scores:
the self-evolving data of VisRL §3.3) and the artifacts (pairs file, model); the project's own
``metrics.jsonl`` mirror is what tests, plots and the sweep report read. The two must agree. The run is
crashed once and resumed (as a long run often is): it must stay ONE W&B run, failed then finished, with no
record, table or artifact logged twice, the iteration and per-phase axes declared, and the evaluation
predictions (boxes drawn), the plots and the paired effect with its CI in W&B.

wandb 0.31 ships no Python reader for the offline ``.wandb`` file (its ``sdk.internal.datastore`` is gone;
the writer is the Go ``wandb-core``), so :func:`read_wandb_records` reads the documented container format
(LevelDB log framing: a 7-byte ``:W&B`` header, 32 KiB blocks, CRC-32 checked records) and parses each
record with the ``wandb.proto.wandb_internal_pb2.Record`` protobuf that ships with the SDK.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from visrl.logging.samples import PAIR_COLUMNS, SAMPLE_PAIRS

HEADER = struct.Struct("<4sHB")  # ident ":W&B", magic 0xBEE1, version 0
RECORD = struct.Struct("<IHB")  # crc32 (seeded with the type byte), length, type
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
TABLE_KEY = "pairs/iter_1"


def read_wandb_records(path: Path) -> list[Any]:
    """Every record of an offline ``run-<id>.wandb`` file, as ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = HEADER.unpack_from(data, 0)
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B log file (header {ident!r} {magic:#x} v{version})")
    records, pending, pos = [], b"", HEADER.size
    while pos + RECORD.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD.size:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        crc, length, kind = RECORD.unpack_from(data, pos)
        if (crc, length, kind) == (0, 0, 0):  # zero padding up to the next block
            pos += left
            continue
        chunk = data[pos + RECORD.size : pos + RECORD.size + length]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: record at byte {pos} fails its CRC check")
        pos += RECORD.size + length
        pending += chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
        elif kind not in (FIRST, MIDDLE):
            raise ValueError(f"{path}: unknown record type {kind} at byte {pos}")
    return records


def of_type(records: list[Any], kind: str) -> list[Any]:
    return [r for r in records if r.WhichOneof("record_type") == kind]


def history_rows(records: list[Any]) -> dict[int, dict[str, Any]]:
    """``_step -> {key: value}`` of the history records (nested keys joined with '.')."""
    rows: dict[int, dict[str, Any]] = {}
    for record in of_type(records, "history"):
        row = {
            ".".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item
        }
        rows.setdefault(int(row["_step"]), {}).update(row)
    return rows


def mirror_rows(run_dir: Path) -> dict[int, dict[str, Any]]:
    """``step -> merged metrics`` of ``metrics.jsonl`` (calls at the same step form one W&B row)."""
    rows: dict[int, dict[str, Any]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row.pop("step"), {}).update(row)
    return rows


def offline_runs(run_dir: Path) -> list[tuple[Path, list[Any]]]:
    """(folder, records) of every ``offline-run-*`` folder of a run dir, oldest first."""
    out = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        files = sorted(folder.glob("run-*.wandb"))
        assert len(files) == 1, f"{folder}: expected one .wandb file, got {files}"
        out.append((folder, read_wandb_records(files[0])))
    return out


def axes(records: list[Any]) -> dict[str, str]:
    """``metric name or glob -> step metric`` of the ``define_metric`` records."""
    return {(r.metric.name or r.metric.glob_name): r.metric.step_metric for r in of_type(records, "metric")}


@pytest.fixture(scope="module")
def wandb_run(run_visrl: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``debug=fast iter=1 logger=wandb`` (offline, W&B dirs in the session tmp dir), crashed right after
    iteration 1's stage 1 (``fail_after``) and resumed with the same command: run dir + records."""
    run_dir = tmp_path_factory.mktemp("wandb_run") / "run"
    args = ("iter=1", "logger=wandb")
    crashed = run_visrl(run_dir, *args, "fail_after=iter_1/stage1", env={"WANDB_MODE": "offline"})
    assert crashed.returncode != 0, crashed.tail()
    resumed = run_visrl(run_dir, *args, env={"WANDB_MODE": "offline"})
    assert resumed.returncode == 0, resumed.tail()
    runs = offline_runs(run_dir)
    assert len(runs) == 2, f"expected one offline folder per process under {run_dir / 'wandb'}, got {runs}"
    pairs = json.loads((run_dir / "iter_1" / "pairs.json").read_text())
    records = [r for _, recs in runs for r in recs]
    return {"run_dir": run_dir, "runs": runs, "dir": runs[0][0], "records": records, "pairs": pairs,
            "stdout": resumed.stdout}  # fmt: skip


def test_crash_then_resume_is_one_failed_then_finished_wandb_run(wandb_run: dict[str, Any]) -> None:
    runs, run_dir = wandb_run["runs"], wandb_run["run_dir"]
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert {r.run.run_id for _, recs in runs for r in of_type(recs, "run")} == {run_id}  # ONE W&B run
    assert [e.exit.exit_code for _, recs in runs for e in of_type(recs, "exit")] == [1, 0]  # failed, finished
    for _, recs in runs:  # each process declares the axes
        assert {"iter": "", "eval/*": "iter", "data/*": "iter"}.items() <= axes(recs).items()
    assert axes(runs[0][1])["sft/train/loss"] == "sft/step"
    assert axes(runs[1][1])["dpo/stage2/train/loss"] == "dpo/stage2/step"
    names = [
        r.artifact.name
        for r in of_type(wandb_run["records"], "artifact")
        if r.artifact.type != "wandb-history"
    ]
    assert len(names) == len(set(names)), f"an artifact was logged twice: {names}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "eval/synthetic/cot_pred/accuracy" in r] == [
        0,
        1,
    ]  # one row per iteration
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})  # monotonic, no step twice
    assert not [k for r in rows for k in r if k.startswith("train/")], "a loss outside its phase"


def test_predictions_plots_and_effect_reach_wandb(wandb_run: dict[str, Any]) -> None:
    (folder0, _), (folder1, recs1) = wandb_run["runs"]
    media0, media1 = folder0 / "files" / "media", folder1 / "files" / "media"
    (sft_table,) = (media0 / "table" / "eval" / "predictions").glob("iter_0_*.table.json")
    (iter_table,) = (media1 / "table" / "eval" / "predictions").glob("iter_1_*.table.json")
    for path in (sft_table, iter_table):
        table = json.loads(path.read_text())
        assert table["columns"][0] == "image" and {"uid", "pred", "correct"} <= set(table["columns"])
        assert len(table["data"]) == 6  # the debug=fast test split, cot_pred rows
    boxes = list((media1 / "metadata" / "boxes2D" / "eval" / "predictions").glob("iter_1_images_*.json"))
    assert boxes and all(
        {"gt"} <= {b["box_caption"] for b in json.loads(f.read_text())["box_data"]} for f in boxes
    )
    assert list((media1 / "images").glob("plots_*.png"))
    summary = {u.key: json.loads(u.value_json) for r in of_type(recs1, "summary") for u in r.summary.update}
    effect = summary["effect"]["cot_pred/accuracy"]
    assert {"before", "after", "diff", "ci95", "n"} <= set(effect) and len(effect["ci95"]) == 2
    assert "| iteration |" in wandb_run["stdout"] and "effect of iteration 1 over SFT" in wandb_run["stdout"]


def test_metrics_mirror_agrees_with_the_wandb_history(wandb_run: dict[str, Any]) -> None:
    ours, theirs = mirror_rows(wandb_run["run_dir"]), history_rows(wandb_run["records"])
    keys = {key for row in ours.values() for key in row}
    assert {
        "sft/train/loss",
        "dpo/stage1/train/loss",
        "eval/synthetic/cot_pred/accuracy",
        "data/pairs",
    } <= keys
    for step, metrics in ours.items():
        assert step in theirs, f"step {step} of metrics.jsonl never reached W&B"
        for key, value in metrics.items():
            got = theirs[step].get(key)
            if value is None:  # the mirror writes non-finite values as null; W&B keeps NaN / inf
                assert isinstance(got, float) and not math.isfinite(got), f"step {step} {key}: {got!r}"
            else:
                assert got == pytest.approx(value, rel=1e-12, abs=0), (
                    f"step {step} {key}: W&B {got!r} != {value!r}"
                )
    media = ("_", "pairs/", "eval/predictions/", "plots")
    last_iter = None
    for step in sorted(theirs):  # and W&B got no scalar the mirror lacks (media rows aside)
        row, mine = theirs[step], ours.get(step, {})
        last_iter = mine.get("iter", last_iter)
        extra = {k for k in row if not k.startswith(media)} - set(mine)
        if "iter" in extra and row["iter"] == last_iter and any(k.startswith("eval/") for k in row):
            extra.discard("iter")  # define_metric's step_sync: a media row under eval/* gets the last `iter`
        assert not extra, f"step {step}: W&B has {sorted(extra)} that metrics.jsonl does not"


def test_pair_table_with_boxed_images_is_logged(wandb_run: dict[str, Any]) -> None:
    pairs, media = wandb_run["pairs"], wandb_run["dir"] / "files" / "media"
    shown = pairs[:SAMPLE_PAIRS]
    assert shown, "debug=fast must produce preference pairs"
    (table_file,) = (media / "table" / "pairs").glob("iter_1_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == list(PAIR_COLUMNS)
    assert [row[0] for row in table["data"]] == [p["uid"] for p in shown]
    images = sorted((media / "images" / "pairs").glob("iter_1_images_*.png"))
    assert len(images) == len(shown)
    drawn = sorted(
        tuple(sorted(box_key(b["box_caption"], *(b["position"][c] for c in ("minX", "minY", "maxX", "maxY")))
                     for b in json.loads(f.read_text())["box_data"]))
        for f in (media / "metadata" / "boxes2D" / "pairs").glob("iter_1_images_*.json")
    )  # fmt: skip
    expected = sorted(  # normalised xyxy in the original image frame, as pairs.json holds them
        tuple(sorted((box_key("chosen", *p["chosen_box"]), box_key("rejected", *p["rejected_box"]))))
        for p in shown
    )
    assert drawn == expected


def box_key(caption: str, *xyxy: float) -> tuple[Any, ...]:
    return (caption, *(round(v, 6) for v in xyxy))


def test_pairs_file_and_model_are_artifacts(wandb_run: dict[str, Any]) -> None:
    artifacts = {r.artifact.name: r.artifact for r in of_type(wandb_run["records"], "artifact")}
    pairs, model = artifacts["pairs_iter_1"], artifacts["model_iter_1"]
    assert pairs.type == "dataset" and [c.path for c in pairs.manifest.contents] == ["pairs.json"]
    model_files = {c.path for c in model.manifest.contents}
    assert model.type == "model" and {"backbone.json", "model.safetensors", "config.json"} <= model_files


def test_config_is_recorded(wandb_run: dict[str, Any]) -> None:
    records = wandb_run["records"]
    config: dict[str, Any] = {}
    for record in of_type(records, "config"):
        config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    assert config["iter"] == 1 and config["model"]["name"] == "tiny_qwen2vl"
    assert config["paths"]["output_dir"] == str(wandb_run["run_dir"])
    assert {r.run.project for r in of_type(records, "run")} == {"visrl"}
