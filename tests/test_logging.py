"""RunLogger (mirror, W&B offline, CSV), the Lightning adapter's global step, and the sweep markers."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from visrl.logging import ImageWithBoxes, RunLogger, read_metrics
from visrl.logging.backends import WandbBackend
from visrl.logging.lightning import RunLoggerAdapter
from visrl.logging.media import as_xyxy
from visrl.logging.sweep import (
    failure_message,
    job_status,
    mark_complete,
    mark_failed,
    sweep_group_name,
    sweep_root_of,
)

torch.set_num_threads(1)
CONF = Path(__file__).resolve().parents[1] / "conf" / "logger"


class RecordingBackend:
    """A Backend that records every call (to test what the RunLogger forwards)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def open(self, run_dir: Path) -> None:
        self.calls.append(("open", run_dir))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append(("metrics", (step, metrics)))

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.calls.append(("table", (key, step)))

    def log_artifact(self, path: Path, name: str, type: str) -> None:
        self.calls.append(("artifact", (name, type)))

    def log_config(self, config: dict[str, Any]) -> None:
        self.calls.append(("config", config))

    def define_metric(self, name: str, step_metric: str | None) -> None:
        self.calls.append(("define", (name, step_metric)))

    def log_images(self, key: str, images: list[Path], step: int) -> None:
        self.calls.append(("images", (key, step)))

    def log_summary(self, values: dict[str, Any]) -> None:
        self.calls.append(("summary", values))

    def finish(self, exit_code: int = 0) -> None:
        self.calls.append(("finish", exit_code))


@pytest.fixture
def isolated_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep W&B's global dirs (artifact staging, cache, settings) out of $HOME; never touch the network."""
    for var, sub in (
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"),
    ):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / sub))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "img.png"
    Image.fromarray(np.full((32, 48, 3), 200, dtype=np.uint8)).save(path)
    return path


# -- mirror and steps ---------------------------------------------------------------------------------
def test_mirror_records_exactly_what_was_logged(tmp_path: Path) -> None:
    backend = RecordingBackend()
    with RunLogger(tmp_path, backend) as logger:
        assert logger.log_metrics({"train/loss": 1.5, "iter": 0}) == 0
        assert logger.log_metrics({"train/loss": torch.tensor(0.25), "ok": np.bool_(True)}) == 1
        assert logger.log_metrics({"eval/acc": np.float32(0.5)}, step=logger.step) == 1  # same row
        assert logger.log_metrics({"eval/acc": 0.75}, step=10) == 10
        assert logger.log_metrics({"loss": float("nan")}) == 11
        with pytest.raises(ValueError, match="monotonic"):
            logger.log_metrics({"x": 1.0}, step=3)
        with pytest.raises(TypeError, match="'bad'"):
            logger.log_metrics({"bad": "text"})
        with pytest.raises(TypeError, match="not a scalar"):
            logger.log_metrics({"vec": torch.ones(3)})
        with pytest.raises(ValueError, match="reserved"):
            logger.log_metrics({"step": 1})
    rows = read_metrics(tmp_path)
    assert rows[:4] == [
        {"step": 0, "train/loss": 1.5, "iter": 0},
        {"step": 1, "train/loss": 0.25, "ok": 1},
        {"step": 1, "eval/acc": 0.5},
        {"step": 10, "eval/acc": 0.75},
    ]
    assert rows[4] == {"step": 11, "loss": None} and len(rows) == 5  # strict JSON: NaN -> null
    sent = [c[1] for c in backend.calls if c[0] == "metrics"]
    assert [s for s, _ in sent] == [0, 1, 1, 10, 11]  # the backend got the same steps
    assert backend.calls[-1] == ("finish", 0)


def test_resumed_run_continues_the_step_and_finished_logger_refuses(tmp_path: Path) -> None:
    first = RunLogger(tmp_path)
    first.log_metrics({"a": 1.0}, step=4)
    first.finish()
    with pytest.raises(RuntimeError, match="finished"):
        first.log_metrics({"a": 2.0})
    second = RunLogger(tmp_path)
    assert second.log_metrics({"a": 2.0}) == 5
    second.finish()
    assert [r["step"] for r in read_metrics(tmp_path)] == [4, 5]


def test_context_manager_reports_failure_and_nonzero_rank_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = RecordingBackend()
    with pytest.raises(KeyError), RunLogger(tmp_path / "a", backend):
        raise KeyError("boom")
    assert backend.calls[-1] == ("finish", 1)
    monkeypatch.setenv("RANK", "1")
    other = RecordingBackend()
    logger = RunLogger(tmp_path / "b", other)
    logger.log_metrics({"a": 1.0})
    logger.finish()
    assert not (tmp_path / "b").exists() and other.calls == []


def test_table_rows_are_validated_before_the_backend(tmp_path: Path) -> None:
    backend = RecordingBackend()
    logger = RunLogger(tmp_path, backend)
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        logger.log_table("gallery", ["image", "answer"], [["only one"]])
    bad = ImageWithBoxes(_image(tmp_path), {"pred": ([0.1, 0.2, 0.3], "too short")})
    with pytest.raises(ValueError, match="'pred'"):
        logger.log_table("gallery", ["image"], [[bad]])
    assert not [c for c in backend.calls if c[0] == "table"]
    logger.finish()


def test_box_normalisation_clamps_and_orders() -> None:
    assert as_xyxy([0.6, -0.2, 0.1, 1.4]) == (0.1, 0.0, 0.6, 1.0)
    with pytest.raises(ValueError, match="finite"):
        as_xyxy([0.1, float("nan"), 0.2, 0.3])


# -- W&B offline --------------------------------------------------------------------------------------
def test_wandb_offline_run_from_the_hydra_config(tmp_path: Path, isolated_wandb: None) -> None:
    cfg = OmegaConf.load(CONF / "wandb.yaml")
    assert cfg.mode == "offline" and cfg.project == "visrl"
    run_dir = tmp_path / "run"
    logger = instantiate(cfg)(run_dir=run_dir)
    assert isinstance(logger.backend, WandbBackend)
    assert logger.backend.resolved_group_and_name() == (None, "default")  # outside Hydra
    logger.log_config({"model": "tiny", "objective": {"beta": 0.1}})
    logger.log_metrics({"train/loss": 0.9})
    logger.log_metrics({"train/loss": 0.7, "iter": 1})
    item = ImageWithBoxes(
        _image(tmp_path), {"gt": ([0.1, 0.1, 0.5, 0.5], "gt: red"), "final": ([0.2, 0.2, 0.6, 0.7], "pred")}
    )
    logger.log_table("eval/gallery", ["image", "answer"], [[item, "stripes"]], step=logger.step)
    (tmp_path / "pairs.json").write_text("[]")
    logger.log_artifact(tmp_path / "pairs.json", "pairs iter 1", "dataset")
    logger.finish()

    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (record,) = offline.glob("run-*.wandb")
    assert record.stat().st_size > 0
    pngs = list((offline / "files" / "media" / "images").rglob("*.png"))  # keys with "/" nest
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (48, 32)
    (boxes,) = (offline / "files" / "media" / "metadata" / "boxes2D").rglob("*.json")
    captions = sorted(b["box_caption"] for b in json.loads(boxes.read_text())["box_data"])
    assert captions == ["gt: red", "pred"]
    assert list((offline / "files" / "media" / "table").rglob("gallery*.table.json"))
    assert read_metrics(run_dir) == [
        {"step": 0, "train/loss": 0.9},
        {"step": 1, "train/loss": 0.7, "iter": 1},
    ]


def test_wandb_group_and_name_come_from_the_hydra_multirun(monkeypatch: pytest.MonkeyPatch) -> None:
    from visrl.logging import backends
    from visrl.logging.sweep import HydraJobInfo

    info = HydraJobInfo(True, "multirun/beta_sweep", "model=a,objective.beta=0.1", 3)
    monkeypatch.setattr(backends, "hydra_job_info", lambda: info)
    assert WandbBackend().resolved_group_and_name() == ("beta_sweep", "model=a,objective.beta=0.1")
    assert WandbBackend(group="g", name="n").resolved_group_and_name() == ("g", "n")
    with pytest.raises(ValueError, match="logger.mode"):
        WandbBackend(mode="sometimes")


# -- CSV and none -------------------------------------------------------------------------------------
def test_csv_backend_writes_a_wide_csv_tables_and_config(tmp_path: Path) -> None:
    logger = instantiate(OmegaConf.load(CONF / "csv.yaml"))(run_dir=tmp_path)
    logger.log_metrics({"train/loss": 1.0})
    logger.log_metrics({"train/loss": 0.5})
    logger.log_metrics({"eval/acc": 0.25, "iter": 1})  # a new key: the header grows
    item = ImageWithBoxes(_image(tmp_path), {"gt": ([0.0, 0.0, 0.5, 0.5], "gt")})
    logger.log_table("eval/gallery", ["image", "answer"], [[item, "red"]], step=2)
    logger.log_config({"seed": 3})
    logger.log_artifact(tmp_path / "img.png", "image", "media")
    logger.finish()
    with (tmp_path / "csv" / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["step"], r["train/loss"], r["eval/acc"]) for r in rows] == [
        ("0", "1.0", ""),
        ("1", "0.5", ""),
        ("2", "", "0.25"),
    ]
    table = tmp_path / "csv" / "tables" / "eval-gallery"
    with (table / "step_2.csv").open() as fh:
        (header, row) = list(csv.reader(fh))
    assert header == ["image", "answer"] and row[1] == "red"
    drawn = np.asarray(Image.open(table / row[0]))
    assert (drawn != 200).any()  # the gt box was burnt in
    assert json.loads((tmp_path / "csv" / "config.json").read_text()) == {"seed": 3}
    assert "image,media" in (tmp_path / "csv" / "artifacts.csv").read_text()


def test_none_logger_keeps_only_the_mirror(tmp_path: Path) -> None:
    logger = instantiate(OmegaConf.load(CONF / "none.yaml"))(run_dir=tmp_path)
    logger.log_metrics({"a": 1})
    logger.log_table("t", ["x"], [[1]])
    logger.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# -- Lightning adapter --------------------------------------------------------------------------------
class TinyModule(__import__("pytorch_lightning").LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch  # x [B, 4], y [B, 1]
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _fit(adapter: RunLoggerAdapter, root: Path, steps: int = 5) -> None:
    import pytorch_lightning as pl

    data = torch.utils.data.TensorDataset(torch.randn(steps * 2, 4), torch.randn(steps * 2, 1))
    trainer = pl.Trainer(
        max_steps=steps, logger=adapter, log_every_n_steps=1, accelerator="cpu", default_root_dir=root,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(TinyModule(), torch.utils.data.DataLoader(data, batch_size=2))


def test_adapter_keeps_the_global_step_monotonic_across_fits(tmp_path: Path) -> None:
    backend = RecordingBackend()
    logger = RunLogger(tmp_path, backend)
    logger.log_metrics({"eval/synthetic/cot_pred/accuracy": 0.2, "iter": 0})  # SFT eval, step 0
    _fit(RunLoggerAdapter(logger, name="stage1", context={"iter": 1}), tmp_path)
    eval_step = logger.log_metrics({"eval/synthetic/cot_pred/accuracy": 0.3, "iter": 1})
    _fit(RunLoggerAdapter(logger, name="stage1", context={"iter": 2}), tmp_path)
    logger.finish()

    rows = read_metrics(tmp_path)
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps)
    losses = [r for r in rows if "train/loss" in r]
    assert len(losses) == 10
    loss_steps = [r["step"] for r in losses]
    assert loss_steps == sorted(set(loss_steps))  # strictly increasing over both fits
    assert [r["iter"] for r in losses] == [1] * 5 + [2] * 5
    assert losses[0]["step"] == 1 and losses[4]["step"] < eval_step < losses[5]["step"]
    configs = [c[1] for c in backend.calls if c[0] == "config"]
    assert configs and all(c == {"hparams/stage1/lr": 0.1} for c in configs)


def test_adapter_rebases_when_a_fit_restarts_or_others_log() -> None:
    class Stub:
        step, next_step = -1, 0

    stub = Stub()
    adapter = RunLoggerAdapter(stub)  # type: ignore[arg-type]
    for local, expected in ((0, 0), (3, 3), (3, 3), (0, 4), (2, 6)):  # (0, 4): a second fit from step 0
        assert adapter.global_step_of(local) == expected
        stub.step, stub.next_step = expected, expected + 1
    stub.step, stub.next_step = 20, 21  # someone else logged up to step 20
    assert adapter.global_step_of(3) == 21


# -- sweep markers ------------------------------------------------------------------------------------
def test_job_markers_and_sweep_root(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun" / "2026-01-02" / "03-04-05"
    job = sweep / "1"
    job.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("{}")
    assert job_status(job) == "incomplete"
    try:
        raise RuntimeError("CUDA out of memory")
    except RuntimeError as exc:
        mark_failed(job, exc)
    assert job_status(job) == "failed"
    assert "Traceback" in (job / "FAILED").read_text()
    assert failure_message(job) == "RuntimeError: CUDA out of memory"
    mark_complete(job, [])
    assert job_status(job) == "complete" and not (job / "FAILED").exists()
    assert sweep_root_of(job) == sweep.resolve()
    assert sweep_root_of(tmp_path) is None
    assert sweep_group_name(sweep) == "03-04-05"
