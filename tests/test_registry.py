"""Benchmarks are built by Hydra ``_target_`` (the only registry) and all provide the Benchmark protocol."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from visrl.benchmarks.base import Benchmark

CONF = Path(__file__).resolve().parents[1] / "conf" / "benchmark"
HEADLINES = {"synthetic": "cot_pred/accuracy", "viscot": "overall/em", "vstar": "likelihood/accuracy"}


@pytest.mark.parametrize("name", sorted(HEADLINES))
def test_every_benchmark_config_instantiates_to_a_benchmark(name: str, tmp_path: Path) -> None:
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    required = {"root": str(tmp_path)} if name != "synthetic" else {"split_path": str(tmp_path / "test.json")}
    bench = instantiate(OmegaConf.merge(cfg, required))
    assert isinstance(bench, Benchmark)
    assert bench.name == name and bench.version.startswith(f"{name}-")
    assert bench.headline == HEADLINES[name]
    assert callable(bench.paired_effect) and callable(bench.evaluate)


def test_headline_follows_the_configuration(tmp_path: Path) -> None:
    from visrl.benchmarks.synthetic import SyntheticBenchmark
    from visrl.benchmarks.viscot import VisCoTBenchmark
    from visrl.benchmarks.vstar import VStarBenchmark

    assert SyntheticBenchmark(tmp_path / "t.json", modes=["direct", "cot_gt"]).headline == "cot_gt/accuracy"
    assert VisCoTBenchmark(tmp_path, judge={"kind": "local"}).headline == "overall/judge"
    assert VisCoTBenchmark(tmp_path, judge={"kind": "none", "openai": {}}).headline == "overall/em"
    assert VStarBenchmark(tmp_path, protocols=["generation"]).headline == "generation/accuracy"


@pytest.mark.parametrize("module", ["visrl.benchmarks.registry", "visrl.benchmarks.runner"])
def test_no_name_registry_beside_target(module: str) -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(module)
