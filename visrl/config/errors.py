"""Which exceptions are *expected* (a user's mistake or a missing input), and how one is shown: one line.

Why: a bad config value, missing weights, an unavailable training strategy, an unwritable run directory or
a broken input file is not a bug; the user needs one line naming the key / file / record and what to do,
exit code 2, no traceback. The traceback is still there on request: ``VISRL_DEBUG=1 python run.py ...``.

The list of expected types lives here, in ONE place, as ``"module:Class"`` names matched against the
exception's class hierarchy, never imported (importing ``visrl.models`` pulls in transformers and PEFT,
seconds of start-up; and the layers below never import this module). A package that adds an input-error
type (a ``ValueError`` subclass, say) adds its name to :data:`EXPECTED`; subclasses are covered.
"""

from __future__ import annotations

import os

__all__ = [
    "DEBUG_ENV",
    "EXPECTED",
    "ConfigError",
    "debug_enabled",
    "expected_cause",
    "is_expected",
    "one_line",
]

DEBUG_ENV = "VISRL_DEBUG"  # set to 1: expected errors are shown with their traceback too


class ConfigError(ValueError):
    """A config value that is not allowed (raised by :mod:`visrl.config.schema` before any work)."""


EXPECTED: tuple[str, ...] = (
    "visrl.config.errors:ConfigError",
    "visrl.config.errors:RunDirError",
    "visrl.models.real:WeightsNotFoundError",
    "visrl.dist:StrategyUnavailableError",
    "visrl.data.io:UnreadableFileError",
    "visrl.data.errors:InputError",
    "visrl.runs:RunDirBusyError",
)


class RunDirError(OSError):
    """The run directory cannot be created or written (read-only file system, permissions)."""


def is_expected(exc: BaseException) -> bool:
    """True if ``exc``'s class or one of its bases is named in :data:`EXPECTED`."""
    return any(f"{cls.__module__}:{cls.__qualname__}" in EXPECTED for cls in type(exc).__mro__)


def expected_cause(exc: BaseException | None) -> BaseException | None:
    """``exc`` or the first expected exception in its cause/context chain (Hydra and Lightning wrap
    errors raised in builders), else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if is_expected(exc):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def one_line(exc: BaseException) -> str:
    """``error: <message>`` on one line (newlines of a multi-line message folded into ``; ``)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])
    return "error: " + "; ".join(part.strip() for part in text.splitlines() if part.strip())


def debug_enabled() -> bool:
    """True when ``VISRL_DEBUG`` is set to anything but ``""``/``0``/``false``."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
