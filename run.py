"""visrl entry point: ``python run.py [overrides]`` (Hydra; ``python run.py --help`` lists the groups).

Examples::

    python run.py                                   # the embedded default: tiny Qwen2-VL, synthetic task, iter=3
    python run.py debug=fast                        # seconds-scale smoke run of every stage (numbers mean nothing)
    python run.py stage=sft                         # base prep -> SFT warm-up -> evaluation
    python run.py model=llava15 data.root=... benchmark.root=...   # the paper's recipe on LLaVA-1.5-7B
    python run.py -m objective.beta=0.05,0.1 iter=1,3   # a sweep: one job dir per override combination

The run directory is named from the overrides (``outputs/<overrides>`` or ``outputs/default``; see
:mod:`visrl.config.names`), so running the same command again resumes an interrupted run and skips a
finished one; the same holds for a sweep and its jobs.

Before any work the composed config is checked against :mod:`visrl.config.schema`. Expected errors (a bad
config value, missing weights, an unavailable strategy, an unwritable run directory, a broken input file:
:mod:`visrl.config.errors`) end the run with ONE line on stderr and exit code 2; ``VISRL_DEBUG=1`` adds the
traceback. A sweep runs every job, then exits non-zero if any job failed.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import NoReturn

import hydra
from omegaconf import DictConfig, OmegaConf

from visrl.config.errors import debug_enabled, expected_cause, one_line
from visrl.config.names import run_name, sweep_name

# Lightning's startup chatter (tips, device banners) and known-benign deprecations from its internals
warnings.filterwarnings(
    "ignore", message=r".*(LeafSpec|Total length of|val_dataloader|does not have many workers).*"
)
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)

OmegaConf.register_new_resolver("run_name", run_name, replace=True)
OmegaConf.register_new_resolver(
    "sweep_name", lambda task, exclude=(): sweep_name(list(task or ()), list(exclude or ())), replace=True
)

log = logging.getLogger("visrl")
UNWRITABLE = (
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.ENAMETOOLONG,
    errno.ENOTDIR,
    errno.EEXIST,
)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One Hydra job: check the config, skip a finished job, run the pipeline, mark the job DONE/FAILED."""
    from visrl.config.schema import validate
    from visrl.logging.sweep import is_complete

    job_dir = Path(cfg.paths.output_dir)
    try:
        validate(cfg)  # before torch, data or any model: a bad value costs seconds, not an SFT
    except Exception as exc:
        _job_failed(job_dir, exc)
    if is_complete(job_dir):
        log.info("%s is complete; skipping (delete it to run again)", job_dir)
        return None
    from visrl.pipeline import run  # heavy (torch): not for a skipped job

    try:
        summary = run(cfg)
    except Exception as exc:
        _job_failed(job_dir, exc)
    return summary.get("final_metric") if isinstance(summary, dict) else None


def _job_failed(job_dir: Path, exc: Exception) -> NoReturn:
    """Mark the job FAILED, then: in a sweep re-raise (the other jobs go on; Hydra re-raises the first failure
    once all have run, so the sweep exits non-zero); in a single run end with one line and exit code 2 when
    the error is expected, else re-raise (traceback)."""
    from visrl.logging.sweep import mark_failed

    expected = expected_cause(exc)
    if not getattr(expected, "owned_by_another", False):  # never mark a directory another process owns
        mark_failed(job_dir, exc)
    if _is_multirun():
        log.error("job %s failed: %s", job_dir, one_line(expected or exc))
        raise exc
    if expected is None:
        raise exc
    if debug_enabled():
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    print(one_line(expected), file=sys.stderr)
    sys.exit(2)


def _unwritable(exc: BaseException) -> OSError | None:
    """The OSError in ``exc``'s chain that says a path cannot be written (permissions, read-only, full)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and cur.errno in UNWRITABLE:
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def report(exc: BaseException) -> int:
    """Show an error raised by Hydra or a job: one line and exit code 2 when expected, else the traceback
    and 1. ``VISRL_DEBUG=1`` prints the traceback of expected errors too."""
    from hydra.errors import HydraException

    expected = expected_cause(exc) or (exc if isinstance(exc, HydraException) else None)
    unwritable = None if expected is not None else _unwritable(exc)
    if expected is None and unwritable is None:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
        return 1
    if debug_enabled():
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    if unwritable is not None:
        where = unwritable.filename or "the run directory"
        print(
            f"error: cannot write {where}: {unwritable.strerror}; choose a writable run directory "
            "(hydra.run.dir=<dir>) or fix its permissions",
            file=sys.stderr,
        )
    else:
        print(one_line(expected), file=sys.stderr)
    return 2


if __name__ == "__main__":
    # Hydra re-raises instead of printing its own report; report() decides between one line and a traceback
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as error:  # noqa: BLE001 - the one place every failure is shown
        sys.exit(report(error))
