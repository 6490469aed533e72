"""Read back what an offline W&B run recorded and check it against the run's own files.

Why: W&B is the default logger (offline: no network, ``wandb sync`` later). Users look at its charts,
the per-iteration table of preference pairs (image + chosen/rejected focus boxes, answers, self-scores:
the self-evolving data of VisRL §3.3) and the artifacts (pairs file, model); the project's own
``metrics.jsonl`` mirror is what tests, plots and the sweep report read. The two must agree.

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

from visrl.pipeline import PAIR_COLUMNS, SAMPLE_PAIRS

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


@pytest.fixture(scope="module")
def wandb_run(run_visrl: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``debug=fast iter=1 logger=wandb`` (offline, W&B dirs in the session tmp dir): run dir + records."""
    run_dir = tmp_path_factory.mktemp("wandb_run") / "run"
    result = run_visrl(run_dir, "iter=1", "logger=wandb", env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.tail()
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, f"expected one offline run under {run_dir / 'wandb'}, got {offline}"
    files = sorted(offline[0].glob("run-*.wandb"))
    assert len(files) == 1, f"{offline[0]}: expected one .wandb file, got {files}"
    pairs = json.loads((run_dir / "iter_1" / "pairs.json").read_text())
    return {"run_dir": run_dir, "dir": offline[0], "records": read_wandb_records(files[0]), "pairs": pairs}


def test_metrics_mirror_agrees_with_the_wandb_history(wandb_run: dict[str, Any]) -> None:
    ours, theirs = mirror_rows(wandb_run["run_dir"]), history_rows(wandb_run["records"])
    keys = {key for row in ours.values() for key in row}
    assert {"train/loss", "eval/synthetic/cot_pred/accuracy", "data/pairs"} <= keys  # every kind of source
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
    for step, row in theirs.items():  # and W&B got no scalar the mirror lacks (media rows aside)
        extra = {k for k in row if not k.startswith(("_", "pairs/"))} - set(ours.get(step, {}))
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


def test_config_and_exit_are_recorded(wandb_run: dict[str, Any]) -> None:
    records = wandb_run["records"]
    config: dict[str, Any] = {}
    for record in of_type(records, "config"):
        config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    assert config["iter"] == 1 and config["model"]["name"] == "tiny_qwen2vl"
    assert config["paths"]["output_dir"] == str(wandb_run["run_dir"])
    (exit_record,) = of_type(records, "exit")
    assert exit_record.exit.exit_code == 0
    (run_record,) = of_type(records, "run")
    assert run_record.run.project == "visrl"
