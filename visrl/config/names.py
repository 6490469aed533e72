"""Run and sweep directory names from the command-line overrides (Hydra resolvers ``run_name``/``sweep_name``).

Why: a run directory is named from its overrides, so re-running a command resumes or skips that run, and a
sweep directory is named from the sweep command, so re-running a sweep skips its finished jobs. The names
must stay valid file names (at most 255 bytes, no ``/``) and must pass back unquoted as a Hydra value
(``ckpt=outputs/<name>/iter_3/model``): Hydra's unquoted values allow only letters, digits and
``_ / - \\ + . $ % * @ ? |``, so ``=`` and ``,`` never appear (conf/hydra: kv_sep ``-``, item_sep ``+``) and any
other character becomes ``_``. A long name is cut and made unique again by a hash of the full spelling.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

__all__ = ["MAX_NAME", "run_name", "safe_name", "sweep_name"]

MAX_NAME = 120  # characters (ASCII after cleaning): far under the 255-byte file-name limit, readable in `ls`
_UNSAFE = re.compile(r"[^A-Za-z0-9._+@%-]+")


def safe_name(text: str, default: str = "default") -> str:
    """``text`` with unsafe characters as ``_``; a name over ``MAX_NAME`` ends in ``-<8 hex of sha1(text)>``."""
    name = _UNSAFE.sub("_", text).strip("_") or default
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
        name = f"{name[: MAX_NAME - 9].rstrip('_+-.')}-{digest}"
    return name


def run_name(override_dirname: str | None) -> str:
    """``hydra.job.override_dirname`` (e.g. ``iter-3+objective.beta-0.1``) as a directory name; ``default``
    when there are no overrides."""
    return safe_name(override_dirname or "")


def sweep_name(task_overrides: Iterable[str] | None, exclude: Iterable[str] = ()) -> str:
    """The sweep directory name of a ``-m`` command from its overrides (``hydra.overrides.task``), e.g.
    ``objective.beta=0.05,0.1 iter=1`` -> ``iter-1+objective.beta-0.05_0.1``: the same command gives the same
    directory, in any override order. Keys in ``exclude`` (logger, fault injection) are left out."""
    skip = set(exclude)
    items = []
    for override in task_overrides or ():
        key, sep, value = str(override).partition("=")
        if key.lstrip("+~") in skip:
            continue
        items.append(f"{key}-{value}" if sep else key)
    return safe_name("+".join(sorted(items)), default="sweep")
