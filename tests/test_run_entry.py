"""The ``python run.py`` entry point as a user meets it: help, printed config, and fast, readable failures.

Why: ``run.py`` is the only command of the framework (README "Quick start"). ``--help`` must list the
groups, ``--cfg job`` must print the composed config, and a run on a real backbone whose weights are not on
the machine (VisRL §4 uses 7B models) must stop within seconds with ONE actionable line (which model, how
to provide it), not after generating data and opening a W&B run, and not with a stack trace.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

Cli = Callable[..., Any]  # the `cli` fixture of conftest.py: cli(*args, env=None, timeout=...) -> CliResult

GROUPS = ("model", "data", "prompt", "base", "sft", "rollout", "scorer", "filter", "objective", "dpo",
          "benchmark", "trainer", "logger", "experiment", "debug")  # fmt: skip


def test_help_lists_every_group_and_its_options(cli: Cli) -> None:
    result = cli("run.py", "--help", timeout=120)
    assert result.returncode == 0, result.tail()
    groups_section = result.stdout.split("== Configuration groups ==")[-1].split("== Config ==")[0]
    lines = {line.split(":", 1)[0].strip(): line for line in groups_section.splitlines() if ":" in line}
    for group in GROUPS:
        assert group in lines, f"--help does not list the group {group!r}\n{result.stdout[:3000]}"
    assert "tiny_qwen2vl" in lines["model"] and "llava15" in lines["model"]
    assert "wandb" in lines["logger"] and "csv" in lines["logger"]


def test_cfg_job_prints_the_composed_config(cli: Cli) -> None:
    result = cli("run.py", "--cfg", "job", "objective=ipo", "iter=5", timeout=120)
    assert result.returncode == 0, result.tail()
    cfg = yaml.safe_load(result.stdout)
    for key in (*(g for g in GROUPS if g not in ("experiment", "debug")), "paths", "stage", "seed"):
        assert key in cfg, f"--cfg job lacks {key!r}: {sorted(cfg)}"
    assert cfg["objective"]["loss"] == "ipo" and cfg["iter"] == 5
    assert cfg["model"]["_target_"] == "visrl.models.tiny.build_tiny"


def test_unknown_option_on_the_command_line_lists_the_valid_ones(cli: Cli) -> None:
    result = cli("run.py", "model=llava_13b", timeout=120)
    assert result.returncode != 0
    assert "Could not find 'model/llava_13b'" in result.stderr, result.tail()
    assert "Available options in 'model'" in result.stderr and "qwen2vl" in result.stderr


def test_missing_real_weights_fail_fast_with_one_actionable_line(cli: Cli, tmp_path: Path) -> None:
    """``model=llava15`` without weights: exit 2 in seconds, before data generation or W&B (the pipeline
    builds the backbone first), stderr ends with one line naming the checkpoint and both remedies."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_home"), "VISRL_CACHE": str(cache)}
    result = cli("run.py", "model=llava15", "iter=3", f"hydra.run.dir={run_dir}", env=env, timeout=120)
    assert result.returncode == 2, result.tail()
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: weights for llava-hf/llava-1.5-7b-hf not found"), result.tail()
    assert "hf download llava-hf/llava-1.5-7b-hf --local-dir " in last and "model.path=" in last
    assert "Traceback" not in result.stderr, result.tail()
    # nothing expensive happened first: no synthetic data, no W&B run, no metrics; the job is marked failed
    assert not cache.exists() or not any(cache.rglob("*.png")), (
        "data was generated before the model was built"
    )
    assert not (run_dir / "wandb").exists() and not (run_dir / "metrics.jsonl").exists()
    assert (run_dir / "FAILED").is_file() and (run_dir / "config.yaml").is_file()
    # ~10 s on an idle machine (imports); the bound only catches a hang (e.g. waiting on the network):
    # the checks above already show that nothing expensive ran before the model was built
    assert result.seconds < 90, f"took {result.seconds:.0f} s to report missing weights"
