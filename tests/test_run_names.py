"""Run and sweep directory names (``visrl.config.names`` via conf/hydra): valid, readable, unique, reusable.

Why (issue bug 12): a run directory named from many overrides exceeded the 255-byte file-name limit
(``OSError: [Errno 36]``), a name holding ``=`` or ``,`` could not be passed back as ``ckpt=`` without
quoting, and a sweep directory named by the clock made a relaunched sweep start from scratch unless
``VISRL_SWEEP`` was set.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser

from visrl.config.names import MAX_NAME, run_name, safe_name, sweep_name

CONF = Path(__file__).resolve().parents[1] / "conf"


def hydra_dirs(task: list[str], override_dirname: str) -> tuple[str, str]:
    """(hydra.run.dir, hydra.sweep.dir) of conf/hydra for a command's ``task`` overrides and a job's
    ``override_dirname`` (set as Hydra sets them; run.py registers the resolvers)."""
    import run  # noqa: F401 - registers run_name / sweep_name

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    cfg.hydra.overrides.task = task
    cfg.hydra.job.override_dirname = override_dirname
    HydraConfig.instance().set_config(cfg)
    return str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)


def test_names_pass_back_unquoted_as_a_hydra_value() -> None:
    name = run_name("data.root-/data/viscot+objective.beta-0.1+benchmark.datasets-[gqa,vsr]")
    assert "=" not in name and "," not in name and "/" not in name and " " not in name
    (override,) = OverridesParser.create().parse_overrides([f"ckpt=outputs/{name}/iter_1/model"])
    assert override.value() == f"outputs/{name}/iter_1/model"


def test_long_names_are_cut_and_stay_unique() -> None:
    many = "+".join(f"rollout.key_number_{i}-{i * 0.001}" for i in range(40))  # ~1,000 characters
    other = many.replace("0.039", "0.0391")
    name = safe_name(many)
    assert len(name.encode()) <= MAX_NAME < 255 and name != safe_name(other)
    assert name.startswith("rollout.key_number_0-0.0+rollout.key_number_1-0.001")  # still readable
    assert run_name("") == "default" and run_name("iter-3") == "iter-3"


def test_same_sweep_command_same_directory_in_any_order() -> None:
    one = sweep_name(["objective.beta=0.05,0.1", "iter=1,3", "logger=csv"], exclude=["logger"])
    two = sweep_name(["iter=1,3", "objective.beta=0.05,0.1"], exclude=["logger"])
    assert one == two == "iter-1_3+objective.beta-0.05_0.1"
    assert sweep_name(["iter=1,2", "objective.beta=0.05,0.1"]) != one
    assert sweep_name([]) == "sweep"


def test_hydra_dirs_use_the_names() -> None:
    run_dir, sweep_dir = hydra_dirs(
        ["iter=1", "objective.beta=0.05,0.1", "logger=csv"], "iter-1+objective.beta-0.1"
    )
    assert run_dir == "outputs/iter-1+objective.beta-0.1"
    assert sweep_dir == "multirun/iter-1+objective.beta-0.05_0.1"  # logger: excluded as from run names
    assert hydra_dirs([], "")[0] == "outputs/default"
