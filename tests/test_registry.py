"""Benchmark registry (lookup, errors, lazy built-ins) and the multi-benchmark runner."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from visrl.benchmarks import registry
from visrl.benchmarks.registry import (
    Benchmark,
    UnknownBenchmarkError,
    get_benchmark,
    list_benchmarks,
    load_builtin_benchmarks,
    register_benchmark,
)
from visrl.benchmarks.runner import evaluate_all
from visrl.data.prompts import REFERENCE

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Test registrations never leak into other tests."""
    load_builtin_benchmarks()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    yield


def test_builtins_are_listed_and_built_by_name(tmp_path: Path) -> None:
    names = list_benchmarks()
    assert {"viscot", "vstar"} <= set(names) and names == sorted(names)
    bench = get_benchmark("vstar", root=str(tmp_path), limit=2)
    assert isinstance(bench, Benchmark) and bench.name == "vstar" and bench.version.startswith("vstar-")
    assert get_benchmark("viscot", root=str(tmp_path)).version == "viscot-1.0"


def test_unknown_name_lists_the_valid_names_and_the_closest() -> None:
    with pytest.raises(UnknownBenchmarkError) as info:
        get_benchmark("viscott", root="x")
    message = str(info.value)
    assert "unknown benchmark 'viscott'" in message and "Did you mean 'viscot'?" in message
    assert "viscot, " in message and "vstar" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(KeyError, match="valid names") as info:
        get_benchmark("zzzzzz")
    assert "Did you mean" not in str(info.value)


def test_register_rules() -> None:
    @register_benchmark("toy")
    class Toy:
        version = "toy-1"

        def __init__(self, k: int = 1):
            self.k = k

    assert Toy.name == "toy" and get_benchmark("toy", k=3).k == 3 and "toy" in list_benchmarks()
    register_benchmark("toy")(Toy)  # the same class again (a module reload) is fine

    class Other:
        version = "other-1"

    with pytest.raises(ValueError, match="already registered"):
        register_benchmark("toy")(Other)
    with pytest.raises(TypeError, match="needs a class attribute `version`"):
        register_benchmark("noversion")(type("NoVersion", (), {}))
    with pytest.raises(ValueError, match="registered as 'mismatch'"):
        register_benchmark("mismatch")(type("Named", (), {"name": "named", "version": "1"}))
    with pytest.raises(ValueError, match="invalid name"):
        register_benchmark("a/b")


def test_builtin_loading_skips_missing_modules_but_not_broken_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "BUILTIN_MODULES", ("visrl.benchmarks.not_written_yet",))
    load_builtin_benchmarks()  # a module that does not exist is skipped
    (tmp_path / "visrl_broken_bench.py").write_text("import visrl_dependency_that_is_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "BUILTIN_MODULES", ("visrl_broken_bench",))
    with pytest.raises(ModuleNotFoundError, match="visrl_dependency_that_is_missing"):
        load_builtin_benchmarks()
    sys.modules.pop("visrl_broken_bench", None)


class FakeBenchmark:
    def __init__(self, name: str, metrics: dict):
        self.name, self.version, self.metrics, self.calls = name, f"{name}-0", metrics, []

    def evaluate(self, policy, templates, out_dir: Path) -> dict:
        self.calls.append((policy, templates, out_dir))
        (out_dir / "predictions.jsonl").write_text("{}\n")
        return self.metrics


def test_evaluate_all_prefixes_and_writes(tmp_path: Path) -> None:
    a = FakeBenchmark("a", {"accuracy": 0.5, "n": 4})
    b = FakeBenchmark("b", {"overall/det_acc": 1.0, "x": float("nan")})
    policy = object()
    metrics = evaluate_all({"a": a, "b": b}, policy, REFERENCE, tmp_path / "eval")
    assert (
        a.calls == [(policy, REFERENCE, tmp_path / "eval" / "a")]
        and (tmp_path / "eval/b/predictions.jsonl").exists()
    )
    assert {k: v for k, v in metrics.items() if not k.endswith("/seconds")} == {
        "a/accuracy": 0.5, "a/n": 4.0, "b/overall/det_acc": 1.0, "b/x": metrics["b/x"]}  # fmt: skip
    assert metrics["b/x"] != metrics["b/x"] and metrics["a/seconds"] >= 0  # NaN passed through
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved.keys() == metrics.keys() and saved["a/accuracy"] == 0.5 and saved["b/x"] != saved["b/x"]
    assert json.loads((tmp_path / "eval" / "versions.json").read_text()) == {"a": "a-0", "b": "b-0"}


def test_evaluate_all_rejects_bad_metrics_and_names(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="metric 'acc'='high'"):
        evaluate_all({"a": FakeBenchmark("a", {"acc": "high"})}, None, REFERENCE, tmp_path)
    with pytest.raises(TypeError, match="returned list"):
        evaluate_all({"a": FakeBenchmark("a", [])}, None, REFERENCE, tmp_path)
    with pytest.raises(ValueError, match="invalid benchmark key"):
        evaluate_all({"a/b": FakeBenchmark("a", {})}, None, REFERENCE, tmp_path)
