"""Several processes: helpers (visrl/dist.py), sharded regeneration and reference log-probs
(visrl/rollout/regenerate.py, visrl/training/{datamodules,ref_logps}.py), the trainer / SLURM configs, and the whole pipeline under ``trainer=ddp``.

The claims under test:

* without ``torch.distributed`` every helper is a no-op, and a launched worker (``LOCAL_RANK=1``) whose
  process group is not up yet never counts as rank 0;
* two gloo ranks regenerating an iteration write exactly the single-process ``candidates.jsonl`` and
  ``pairs.json`` (chunks are seeded by index), leave no shard behind, gather the same reference
  log-probs, and deal the training batches out so that together they see each batch of the epoch;
* reference log-probs (shared-prompt packing) agree with the concatenated forward within 1e-5 and are
  reused by content across runs (a beta sweep over the same iteration data computes them once);
* ``python run.py debug=fast trainer=ddp trainer.devices=2`` runs base prep, SFT, one regeneration and
  both DPO stages, only rank 0 writes files (a Python audit hook in every process records writes), and
  its merged candidates / pairs equal a single-process run's from the same SFT model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from pytorch_lightning.strategies import StrategyRegistry
from test_generator import FMT, TEMPLATES, FakePolicy, HashCropScorer  # tests/ is on sys.path (rootdir)

from visrl import dist as D
from visrl.data.pair_records import read_pairs
from visrl.data.records import read_viscot
from visrl.data.rows import StepBucketSampler, pair_batch
from visrl.data.synthetic import SplitSizes, SyntheticDataset
from visrl.models.logprobs import sequence_logps
from visrl.models.policy import VLMPolicy
from visrl.models.tiny import build_tiny
from visrl.rollout.filter import FilterConfig
from visrl.rollout.generator import RolloutConfig
from visrl.rollout.pairs import load_pairs
from visrl.rollout.scorers import RuleAnswerScorer
from visrl.training.datamodules import PreferenceDataModule
from visrl.training.pair_rows import preference_rows
from visrl.training.ref_logps import attach_reference_logps

torch.set_num_threads(1)
CONF = Path(__file__).resolve().parents[1] / "conf"
CFG = RolloutConfig(n_boxes=8, batch_size=4, max_new_tokens=8, seed=7)  # 16 questions -> 4 chunks, 5 pairs
FILTER = FilterConfig(answer_hi=0.5, answer_lo=0.5, crop_hi=0.5, crop_lo=0.5)  # keeps several pairs
RANK_ENV = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def tiny(seed: int = 0):
    return build_tiny("qwen2vl", text_hidden=64, text_layers=1, vision_hidden=64, vision_layers=1,
                      box_format=FMT, seed=seed)  # fmt: skip


def datamodule(out: Path, world: SimpleNamespace, **kw) -> PreferenceDataModule:
    return PreferenceDataModule(out, world.records, world.root, TEMPLATES, CFG, FILTER,
                                RuleAnswerScorer(), HashCropScorer(), batch_size=2, **kw)  # fmt: skip


def fake_policy() -> FakePolicy:
    policy = FakePolicy()
    policy.backbone = tiny()  # encodes the rows; the fake samples the texts
    return policy


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """16 RL questions and their single-process iteration-1 data (the reference every test compares to)."""
    ds = SyntheticDataset(tmp_path_factory.mktemp("synthetic"), sizes=SplitSizes(sft=2, rl=16, test=2))
    world = SimpleNamespace(root=ds.image_root, records=read_viscot(ds.ensure()["rl"]))
    world.single = tmp_path_factory.mktemp("single")
    dm = datamodule(world.single, world)
    dm.regenerate(fake_policy(), 1)
    assert len(read_pairs(world.single / "iter_1" / "pairs.json")) >= 3, "the fixture should keep pairs"
    world.rows = dm.rows
    return world


# ------------------------------------------------------------------------------------------ helpers
def test_single_process_helpers_are_no_ops(monkeypatch):
    for var in RANK_ENV:
        monkeypatch.delenv(var, raising=False)
    assert D.rank_world() == (0, 1) and D.is_rank_zero()
    D.barrier()
    assert D.on_rank_zero(lambda x: x + 1, 4) == 5
    assert D.all_gather_objects({"a": 1}) == [{"a": 1}]
    sampler = [[0, 1], [2]]
    assert D.shard_batches(sampler) is sampler


def test_a_launched_worker_is_not_rank_zero_before_its_group_is_up(monkeypatch):
    for var in RANK_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")  # what Lightning's launcher sets for the second process
    calls: list[int] = []
    assert D.rank_world() == (0, 1) and not D.is_rank_zero()
    assert D.on_rank_zero(calls.append, 1) is None and calls == []
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert D.is_rank_zero()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_sharded_batches_cover_the_epoch_with_equal_counts(world_size):
    epoch = [[0, 1], [2, 3], [4], [5, 6], [7]]
    shards = [list(D.ShardedBatchSampler(epoch, r, world_size)) for r in range(world_size)]
    per_rank = -(-len(epoch) // world_size)
    assert all(len(s) == per_rank == len(D.ShardedBatchSampler(epoch, r, world_size)) for r, s in
               enumerate(shards))  # fmt: skip
    dealt = [shards[r][i] for i in range(per_rank) for r in range(world_size)]  # round robin
    assert dealt[: len(epoch)] == epoch  # every batch once, in order, then padding from the start
    assert dealt[len(epoch) :] == epoch[: len(dealt) - len(epoch)]
    with pytest.raises(ValueError, match="rank"):
        D.ShardedBatchSampler(epoch, world_size, world_size)


def test_sharded_step_buckets_agree_across_ranks_and_epochs(world):
    """Each rank builds its own seeded StepBucketSampler: together they deal out one shuffled epoch."""
    rows = world.rows
    for epoch in range(2):
        full = StepBucketSampler(rows, 2, shuffle=True, seed=3)
        full.set_epoch(epoch)
        shards = []
        for r in range(2):
            sampler = D.ShardedBatchSampler(StepBucketSampler(rows, 2, shuffle=True, seed=3), r, 2)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        batches = list(full)
        assert sorted(map(tuple, shards[0] + shards[1])) == sorted(
            map(tuple, batches + batches[: len(batches) % 2])
        )
        assert all(len({rows[i].step for i in b}) == 1 for b in shards[0] + shards[1])


def test_wait_for_file(tmp_path):
    (tmp_path / "there").touch()
    assert D.wait_for_file(tmp_path / "there", timeout_s=0.1) == tmp_path / "there"
    with pytest.raises(TimeoutError, match="missing"):
        D.wait_for_file(tmp_path / "missing", timeout_s=0.05, poll_s=0.01)


# ------------------------------------------------------------------------------------------ configs
def compose_cfg(*overrides: str, hydra_node: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_node)


@pytest.mark.parametrize(
    ("name", "strategy", "accelerator", "precision"),
    [
        ("ddp", "ddp", "cpu", "32-true"),
        ("fsdp", "fsdp", "gpu", "bf16-mixed"),
        ("deepspeed_zero2", "deepspeed_stage_2", "gpu", "bf16-mixed"),
        ("deepspeed_zero3", "deepspeed_stage_3", "gpu", "bf16-mixed"),
    ],
)
def test_trainer_configs(name, strategy, accelerator, precision):
    trainer = OmegaConf.to_container(compose_cfg(f"trainer={name}").trainer, resolve=True)
    assert (trainer["strategy"], trainer["accelerator"], trainer["precision"]) == (
        strategy,
        accelerator,
        precision,
    )
    assert strategy in StrategyRegistry.available_strategies()
    assert trainer["use_distributed_sampler"] is False  # the data modules shard their batch samplers
    assert trainer["devices"] > 1 and trainer["accumulate_grad_batches"] >= 1
    gpu = compose_cfg(f"trainer={name}", "trainer.accelerator=gpu", "trainer.devices=8").trainer
    assert (gpu.accelerator, gpu.devices) == ("gpu", 8)


def test_slurm_launcher_composes_only_when_selected():
    cfg = compose_cfg("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", hydra_node=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (4, 4, 1)
    assert launcher.timeout_min > 0 and launcher.partition is None
    default = compose_cfg(hydra_node=True).hydra.launcher
    assert default._target_ == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def test_check_strategy_fails_in_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "deepspeed" else real(n, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    zero2 = OmegaConf.to_container(compose_cfg("trainer=deepspeed_zero2").trainer, resolve=True)
    with pytest.raises(D.StrategyUnavailableError, match="deepspeed") as err:
        D.check_strategy(zero2)
    assert "\n" not in str(err.value) and "trainer.strategy=deepspeed_stage_2" in str(err.value)
    with pytest.raises(D.StrategyUnavailableError, match="no CUDA device") as err:
        D.check_strategy(OmegaConf.to_container(compose_cfg("trainer=fsdp").trainer, resolve=True))
    assert "\n" not in str(err.value)
    D.check_strategy(OmegaConf.to_container(compose_cfg("trainer=ddp").trainer, resolve=True))


# ---------------------------------------------------------------------------------- reference log-probs
@pytest.mark.parametrize("own_crop", [False, True])
def test_reference_logps_agree_with_the_concatenated_forward(world, own_crop):
    """Packing each pair's prompt once gives the previous implementation's values (within 1e-5)."""
    backbone = tiny()
    rows = preference_rows(load_pairs(world.single / "iter_1" / "pairs.json"), world.root, backbone, TEMPLATES,
                           rejected_own_crop=own_crop)  # fmt: skip
    attach_reference_logps(rows, VLMPolicy(backbone), batch_size=3)
    backbone.model.eval()
    for step in ("box", "answer"):
        part = [r for r in rows if r.step == step]
        with torch.no_grad():
            sums, _ = sequence_logps(backbone.model, pair_batch(part, backbone.encoder).batch)  # [2B]
        got = torch.tensor([r.ref_logps for r in part])  # [B, 2]
        torch.testing.assert_close(
            got, torch.stack([sums[: len(part)], sums[len(part) :]], 1), atol=1e-5, rtol=0
        )


def test_reference_cache_is_shared_by_content(world, tmp_path):
    """A second run over the same data and reference (e.g. another beta) reads the values; another
    reference computes its own."""
    root = tmp_path / "ref_logps"
    first = datamodule(tmp_path / "run_a", world, ref_cache_dir=root)
    first.load(world.single / "iter_1", tiny())
    first.attach_reference_logps(VLMPolicy(tiny()))
    assert len(list(root.glob("*.json"))) == 1 and not (world.single / "iter_1" / "ref_logps.json").exists()
    second = datamodule(tmp_path / "run_b", world, ref_cache_dir=root)
    reference = VLMPolicy(tiny())
    second.load(world.single / "iter_1", reference.backbone)
    calls: list[int] = []
    hook = reference.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        second.attach_reference_logps(reference)
    finally:
        hook.remove()
    assert not calls and [r.ref_logps for r in second.rows] == [r.ref_logps for r in first.rows]
    second.attach_reference_logps(VLMPolicy(tiny(seed=1)))
    assert len(list(root.glob("*.json"))) == 2
    assert [r.ref_logps for r in second.rows] != [r.ref_logps for r in first.rows]


# --------------------------------------------------------------------------- two gloo ranks, one iteration
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _regenerate_rank(rank: int, world_size: int, port: int, world: SimpleNamespace, out: Path) -> None:
    """One rank: regenerate iteration 1, gather reference log-probs, record its training batches."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        dm = datamodule(out, world)
        policy = fake_policy()
        result = dm.regenerate(policy, 1)  # rank 1 reads back what rank 0 built
        dm.attach_reference_logps(VLMPolicy(policy.backbone))
        batches = [b.uids for b in dm.dataloader(shuffle=False)]
        record = {
            "rows": [[r.uid, r.step, list(r.ref_logps)] for r in dm.rows],
            "batches": batches,
            "result": [[p.record().raw for p in result.pairs], result.stats.to_json()],
        }
        (out / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~25-40 s: two fresh interpreters import torch + transformers on shared cores
def test_two_ranks_regenerate_exactly_the_single_process_iteration(world, tmp_path):
    questions = SimpleNamespace(root=world.root, records=world.records)  # what the ranks need (picklable)
    mp.start_processes(
        _regenerate_rank, args=(2, _free_port(), questions, tmp_path), nprocs=2, start_method="spawn"
    )
    single, multi = world.single / "iter_1", tmp_path / "iter_1"
    assert (multi / "candidates.jsonl").read_bytes() == (single / "candidates.jsonl").read_bytes()
    assert (multi / "pairs.json").read_bytes() == (single / "pairs.json").read_bytes()
    assert json.loads((multi / "candidates.jsonl.meta.json").read_text()) == json.loads(
        (single / "candidates.jsonl.meta.json").read_text()
    )
    assert not list(multi.glob("candidates.rank*")), "rank 0 removes the shards after merging"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["rows"] == ranks[1]["rows"]  # the same rows and gathered reference values on both
    assert ranks[0]["result"] == ranks[1]["result"]  # the same typed pairs and statistics on both
    assert ranks[0]["result"][1] == json.loads((single / "stats.json").read_text())
    dm = datamodule(tmp_path / "check", world, ref_cache_dir=tmp_path / "ref")  # writes nothing into single/
    dm.load(single, tiny())
    dm.attach_reference_logps(VLMPolicy(tiny()))
    for (uid, step, got), row in zip(ranks[0]["rows"], dm.rows, strict=True):
        assert (uid, step) == (row.uid, row.step)
        assert got == pytest.approx(list(row.ref_logps), abs=1e-5)
    whole = [b.uids for b in dm.dataloader(shuffle=False)]
    dealt = [ranks[r]["batches"][i] for i in range(len(ranks[0]["batches"])) for r in range(2)]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == -(-len(whole) // 2)
    assert dealt[: len(whole)] == whole


# ------------------------------------------------------------------------------ the pipeline under DDP
AUDIT = textwrap.dedent(
    '''
    """Test helper (tests/test_distributed.py): log file writes under VISRL_AUDIT_ROOTS by non-zero ranks."""
    import os
    import sys

    _ROOTS = [r for r in os.environ.get("VISRL_AUDIT_ROOTS", "").split(os.pathsep) if r]
    _FD = os.open(os.environ["VISRL_AUDIT_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT) if _ROOTS else None
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


    def _rank():
        for var in ("RANK", "LOCAL_RANK"):
            if os.environ.get(var):
                return int(os.environ[var])
        return 0


    def _hook(event, args):
        if event == "open":
            path, flags = args[0], args[2]
            if not isinstance(flags, int) or not flags & _WRITE:
                return
            paths = [path]
        elif event in ("os.rename", "os.remove", "os.truncate"):
            paths = list(args[:2]) if event == "os.rename" else [args[0]]
        else:
            return
        rank = _rank()
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)) and rank > 0:
                p = os.path.abspath(os.fsdecode(p))
                if any(p.startswith(root) for root in _ROOTS):
                    os.write(_FD, f"{rank}\\t{event}\\t{p}\\n".encode())


    if _FD is not None:
        sys.addaudithook(_hook)
    '''
)
RANK1_MAY_WRITE = ("candidates.rank1.jsonl", "train_ddp_process_1.log")  # its shard (+ meta) and its log


@pytest.mark.slow  # ~60-90 s on 2 shared cores: the DDP run (~60 s, a second interpreter) + a single run
def test_pipeline_under_ddp_matches_one_process(run_visrl, tmp_path):
    audit_dir, log = tmp_path / "audit", tmp_path / "writes.tsv"
    audit_dir.mkdir()
    (audit_dir / "sitecustomize.py").write_text(AUDIT)
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    cache = Path(os.environ["VISRL_CACHE"]).resolve()
    env = {
        "PYTHONPATH": os.pathsep.join(p for p in [str(audit_dir), os.environ.get("PYTHONPATH")] if p),
        "VISRL_AUDIT_LOG": str(log),
        "VISRL_AUDIT_ROOTS": os.pathsep.join([str(ddp.resolve()), str(cache)]),
    }
    result = run_visrl(ddp, "iter=1", "logger=none", "trainer=ddp", "trainer.devices=2", env=env)
    assert result.returncode == 0, result.tail()
    for done in ("sft/DONE", "iter_1/stage1/DONE", "iter_1/stage2/DONE", "iter_1/DONE", "summary.json"):
        assert (ddp / done).exists(), done
    assert [it["iter"] for it in json.loads((ddp / "summary.json").read_text())["iterations"]] == [0, 1]
    assert not list((ddp / "iter_1").glob("candidates.rank*")), "rank 0 removes the shards after merging"
    writes = [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []
    rank1 = {Path(path).name for _, _, path in writes}
    assert any(name.startswith("candidates.rank1.jsonl") for name in rank1), "rank 1 generated no shard"
    foreign = sorted(p for p in rank1 if not any(ok in p for ok in RANK1_MAY_WRITE))
    assert not foreign, f"rank 1 wrote {foreign}"

    shutil.copytree(ddp / "sft", single / "sft")  # the same SFT model: generation is what is compared
    result = run_visrl(single, "iter=1", "logger=none")
    assert result.returncode == 0, result.tail()
    for name in ("candidates.jsonl", "pairs.json"):
        assert (ddp / "iter_1" / name).read_bytes() == (single / "iter_1" / name).read_bytes(), name
