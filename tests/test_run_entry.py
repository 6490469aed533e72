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
          "benchmark", "trainer", "logger", "recipe", "experiment", "debug")  # fmt: skip
# issue: each of these used to fail only after SFT (or never: stage=train ran as stage=sft)
BAD_VALUES = [("iter=three", "an integer >= 0"), ("objective.beta=abc", "a number > 0"),
              ("filter.answer_hi=1.5", "a number in [0, 1]"), ("rollout.n_boxes=-1", "an integer >= 1"),
              ("stage=train", "one of all, sft, eval"), ("dpo.reference=latest", "one of initial, previous"),
              ("scorer.m_org=prev", "one of initial, previous")]  # fmt: skip


def test_help_lists_every_group_and_its_options(cli: Cli) -> None:
    result = cli("run.py", "--help", timeout=120)
    assert result.returncode == 0, result.tail()
    header = result.stdout.split("== Configuration groups ==")[0]
    assert header.startswith("visrl: VisRL"), result.stdout[:500]  # the application header comes first
    for command in (
        "python run.py debug=fast",
        "python run.py -m ",
        "python -m visrl.report",
        "model=qwen2vl",
    ):
        assert command in header, f"--help header lacks {command!r}"
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
    for key in (*(g for g in GROUPS if g not in ("experiment", "debug", "recipe")), "paths", "stage", "seed"):
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
    args = ("run.py", "model=llava15", "data=synthetic", "iter=3", f"hydra.run.dir={run_dir}")
    result = cli(*args, env=env, timeout=120)
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


def test_bad_values_stop_in_seconds_with_one_line(cli: Cli, tmp_path: Path) -> None:
    """Every bad value of the issue: exit 2 before anything is built, ONE stderr line naming the key, the
    value and what is allowed, no traceback; the table is printed for the closing note (pytest -s)."""
    rows = []
    for idx, (override, allowed) in enumerate(BAD_VALUES):
        run_dir = tmp_path / f"run{idx}"
        result = cli("run.py", override, f"hydra.run.dir={run_dir}", timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, f"{override}\n{result.tail()}"
        key, value = override.split("=")
        assert lines[0].startswith(f"error: config key {key}=") and value in lines[0] and allowed in lines[0]
        assert not (run_dir / "metrics.jsonl").exists() and (run_dir / "FAILED").is_file()
        assert result.seconds < 30, (
            f"{override}: {result.seconds:.1f} s"
        )  # ~5 s idle; bound catches real work
        rows.append(f"| `{override}` | {result.seconds:.1f} | `{lines[0]}` |")
    print("\n".join(["| value | seconds | line shown |", "|---|---|---|", *rows]))


def test_missing_data_root_names_the_key(cli: Cli, tmp_path: Path) -> None:
    """The paper's recipe without its data: one line naming data.root and what it holds."""
    result = cli("run.py", "model=qwen2vl", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.tail()
    assert lines[0].startswith("error: config key data.root has no value: set data.root=<Visual-CoT folder")


def test_unwritable_run_dir_is_one_line_and_debug_shows_the_traceback(cli: Cli, tmp_path: Path) -> None:
    """A run directory that cannot be created (here: below a regular file; root ignores permissions) is
    one line naming the path; ``VISRL_DEBUG=1`` prints the traceback of an expected error as well."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = cli("run.py", "debug=fast", f"hydra.run.dir={blocker / 'run'}", timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.tail()
    assert lines[0].startswith(f"error: cannot write {blocker}") and "hydra.run.dir=" in lines[0]
    debug = cli(
        "run.py", "stage=train", f"hydra.run.dir={tmp_path / 'run'}", env={"VISRL_DEBUG": "1"}, timeout=120
    )
    assert debug.returncode == 2 and "Traceback" in debug.stderr, debug.tail()
    assert debug.stderr.strip().splitlines()[-1].startswith("error: config key stage='train'")


def test_unknown_option_is_one_line_with_exit_2(cli: Cli) -> None:
    result = cli("run.py", "objective=dpo", timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.tail()
    assert "Traceback" not in result.stderr
