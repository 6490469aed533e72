"""visrl entry point: ``python run.py [overrides]`` (Hydra; see README "Quick start").

Examples::

    python run.py                                   # the embedded default: tiny Qwen2-VL, synthetic task, iter=3
    python run.py stage=sft                         # base prep -> SFT warm-up -> evaluation
    python run.py model=llava15 iter=3              # the same pipeline on real LLaVA-1.5-7B weights
    python run.py -m objective.beta=0.05,0.1 iter=1,3   # a sweep: one job dir per override combination

The run directory is named from the overrides (``outputs/<overrides>`` or ``outputs/default``), so running
the same command again resumes an interrupted run and skips a finished one.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

# Lightning's startup chatter (tips, device banners) and known-benign deprecations from its internals
warnings.filterwarnings("ignore", message=r".*(LeafSpec|Total length of|val_dataloader|does not have many workers).*")
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)

OmegaConf.register_new_resolver("run_name", lambda s: s.replace("/", "_") if s else "default", replace=True)

log = logging.getLogger("visrl")


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"


def _cause(exc: BaseException, kind: type) -> BaseException | None:
    """``exc`` or the first exception of type ``kind`` in its cause chain (Hydra wraps builder errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from visrl.logging.sweep import mark_failed
    from visrl.runs import is_complete

    job_dir = Path(cfg.paths.output_dir)
    if is_complete(job_dir):
        log.info("%s is complete; skipping (delete it to run again)", job_dir)
        return None
    from visrl.data.errors import InputError
    from visrl.dist import StrategyUnavailableError
    from visrl.models.real import WeightsNotFoundError  # heavy (torch, transformers): not for a skipped job
    from visrl.pipeline import run
    from visrl.runs import RunDirBusyError

    try:
        summary = run(cfg)
    except Exception as e:
        if _cause(e, RunDirBusyError) is None:  # never mark another process's directory
            mark_failed(job_dir, e)
        missing = _cause(e, WeightsNotFoundError) or _cause(e, StrategyUnavailableError) or _cause(e, RunDirBusyError)
        missing = missing or _cause(e, InputError)
        if missing is not None:  # one actionable line, no stack trace
            print(f"error: {missing}", file=sys.stderr)
            if _is_multirun():
                return None
            sys.exit(2)
        if _is_multirun():  # a crashed job must not stop the sweep; visrl.report lists it as failed
            log.exception("job %s failed; the sweep goes on", job_dir)
            return None
        raise
    return summary.get("final_metric") if isinstance(summary, dict) else None


if __name__ == "__main__":
    main()
