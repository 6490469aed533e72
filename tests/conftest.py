"""Shared fixtures of the test suite: an isolated environment, the ``run.py`` CLI, and one tiny pipeline run.

Why: the integration tests (entry point, configs, pipeline, sweeps, W&B readback) drive the real
``python run.py`` (Hydra + the whole VisRL pipeline, paper §3) in subprocesses. Every session gets

* ``torch.set_num_threads(1)`` (the machine has 2 shared cores);
* its own ``VISRL_CACHE`` (synthetic data and the cached tiny base model), W&B directories and an empty
  ``HF_HOME`` in a session tmp dir, set in ``os.environ`` so that subprocesses inherit them: nothing
  leaks into the repository or the home directory, and no test can read real weights or the network;
* ``tiny_run``: one ``debug=fast iter=2 logger=csv`` run, shared by every test that only reads a finished
  run directory (the expensive part of the suite is running the pipeline, so it runs once per session).
* ``judge_server``: scripted OpenAI-compatible servers on 127.0.0.1 for the judge client tests
  (``tests/judge_server.py``), closed after each test;
* one Hypothesis profile without timing checks (no deadline, no ``too_slow`` health check): on shared cores a
  stalled draw once took 2.3 s and failed a property test that had nothing to do with speed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    from judge_server import ScriptedServer, StartServer, Step

settings.register_profile("shared_cores", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("shared_cores")

REPO = Path(__file__).resolve().parents[1]
RUN_PY = REPO / "run.py"
# the seconds-scale plumbing config of every pipeline run in the tests (conf/debug/fast.yaml)
FAST = ("debug=fast",)


@dataclass
class CliResult:
    """A finished ``python run.py`` / ``python -m`` subprocess."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def tail(self, n: int = 40) -> str:
        """The last ``n`` lines of stderr and stdout, for assertion messages."""
        return "\n".join(
            ["--- stderr:", *self.stderr.splitlines()[-n:], "--- stdout:", *self.stdout.splitlines()[-n:]]
        )


Cli = Callable[..., CliResult]


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> CliResult:
    """Run ``python *args`` in the repository root with the session environment (+ ``env``)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    return CliResult(list(args), proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One thread, and per-session cache / W&B / HF directories (also for subprocesses); restored after."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("env")
    env = {
        "VISRL_CACHE": str(root / "visrl_cache"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_DATA_DIR": str(root / "wandb_data"),  # artifact staging (default ~/.local/share/wandb)
        "WANDB_CACHE_DIR": str(root / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(root / "wandb_config"),
        "HF_HOME": str(root / "hf_home"),  # empty: no real weights are ever found
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield root
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def cli() -> Cli:
    """``cli(*args, env=None, timeout=600)`` runs ``python *args`` in the repo root, e.g.
    ``cli("run.py", "debug=fast", "hydra.run.dir=/tmp/x")``; returns a :class:`CliResult`."""
    return _run


@pytest.fixture(scope="session")
def run_visrl(cli: Cli) -> Callable[..., CliResult]:
    """``run_visrl(run_dir, *overrides, env=None)``: ``python run.py debug=fast <overrides>
    hydra.run.dir=<run_dir>`` (not checked: the caller asserts on the result)."""

    def run(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> CliResult:
        return cli(str(RUN_PY), *FAST, *overrides, f"hydra.run.dir={run_dir}", env=env)

    return run


@pytest.fixture(scope="session")
def tiny_run(run_visrl: Callable[..., CliResult], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of one uninterrupted ``debug=fast iter=2 logger=csv`` pipeline run (~20 s)."""
    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    result = run_visrl(run_dir, "iter=2", "logger=csv")
    if result.returncode != 0:
        pytest.fail(f"tiny pipeline run failed (exit {result.returncode})\n{result.tail()}")
    return run_dir


@pytest.fixture(scope="session")
def real_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight checkpoints of the three real VLM classes in the hub layout, built once per session
    (``tests/real_checkpoints.py``): ``{"llava": dir, "qwen2vl": dir, "qwen25vl": dir}``."""
    from real_checkpoints import FAMILIES, build_checkpoint

    root = tmp_path_factory.mktemp("real_checkpoints")
    return {family: build_checkpoint(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def viscot_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mini Visual-CoT tree (benchmark json, det jsonl, generated images, train.json), built once."""
    from real_checkpoints import build_viscot_tree

    return build_viscot_tree(tmp_path_factory.mktemp("viscot"))


@pytest.fixture
def judge_server() -> Iterator[StartServer]:
    """``judge_server(script)`` starts a scripted OpenAI-compatible server on 127.0.0.1
    (``tests/judge_server.py``: ``("ok", text)``, ``("status", code)``, ``("drop", None)``, ...) and returns
    it (``.url``, ``.requests``, ``.count``); every server started is closed after the test."""
    from judge_server import ScriptedServer

    servers: list[ScriptedServer] = []

    def start(script: list[Step]) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
