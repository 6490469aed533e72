"""Progress a person can follow: one labelled display per long phase of a run.

A VisRL run (paper §3) spends hours in a few long loops: base prep, SFT, per iteration the rollouts, the
self-scoring, the reference log-probs, two DPO stages, and the evaluations. Each gets one display labelled
with the iteration and the phase::

    from visrl.progress import progress

    with progress("iter 2 | rollouts", total=len(questions) * n_boxes, unit="cand") as bar:
        for batch in batches:
            ...
            bar.advance(len(batch))          # -> [iter 2 | rollouts] 512/2048 cand 31.2/s ETA 0:49

Two modes, one mechanism (``rich``):

* **live** (an interactive terminal): a ``rich`` progress bar on stderr, redrawn in place;
* **lines** (``CI`` set to a true value, or stderr not a terminal, e.g. a log file, a test, a cluster job):
  one plain log line (logger ``visrl.progress``, so it also lands in Hydra's ``run.log``) at every 10 % of the
  total or every 30 s, whichever comes first, and a closing line with the total time.

Only one live display can be on screen; a display opened while another is live prints lines instead.
This module is bottom plumbing: it imports nothing from visrl.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from types import TracebackType
from typing import Any

__all__ = ["ProgressLine", "format_line", "lines_mode", "progress"]

log = logging.getLogger("visrl.progress")

LINE_FRACTION = 0.10  # lines mode: a line at every 10 % of the total ...
LINE_SECONDS = 30.0  # ... or after 30 s without one
_TRUE = ("1", "true", "yes", "on")
_live_open = False  # a rich Live display is on screen (only one may be)


def lines_mode() -> bool:
    """True under ``CI=true`` or when stderr is not an interactive terminal: periodic lines, no live bar."""
    if os.environ.get("CI", "").strip().lower() in _TRUE:
        return True
    return not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


def _clock(seconds: float) -> str:
    """``h:mm:ss`` or ``m:ss``."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_line(label: str, n: int, total: int | None, unit: str, elapsed: float, postfix: str = "") -> str:
    """``[label] n/total unit rate/s ETA m:ss postfix`` (no total: no ETA)."""
    rate = n / elapsed if elapsed > 0 else 0.0
    count = f"{n}/{total}" if total is not None else f"{n}"
    text = f"[{label}] {count} {unit} {rate:.1f}/s"
    if total is not None and rate > 0 and n < total:
        text += f" ETA {_clock((total - n) / rate)}"
    return f"{text} {postfix}".rstrip()


class ProgressLine:
    """One phase's display: :meth:`advance` as work is done, :meth:`close` (or ``with``) at the end."""

    def __init__(self, label: str, total: int | None = None, unit: str = "it") -> None:
        self.label, self.unit = label, unit
        self.total = None if total is None or not math.isfinite(total) else int(total)
        self.n = 0
        self.postfix = ""
        self._start = self._last_line = time.monotonic()
        self._next_fraction = LINE_FRACTION
        self._live: Any = None
        self._task: Any = None
        self._open_live()

    def _open_live(self) -> None:
        global _live_open
        if lines_mode() or _live_open:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._live = Progress(
            TextColumn("[{task.description}]", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}", markup=False),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._live.add_task(self.label, total=self.total, stats=self.unit)
        self._live.start()
        _live_open = True

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def set_postfix(self, text: str) -> None:
        """Extra text after the counts, e.g. ``"loss 0.412"``."""
        self.postfix = text

    def advance(self, k: int = 1) -> None:
        """``k`` more units done."""
        self.n += int(k)
        if self._live is not None:
            stats = format_line("", self.n, self.total, self.unit, self.elapsed, self.postfix)
            stats = stats.split(" ", 2)[-1]  # drop the "[] n/total" head: the bar columns show it
            self._live.update(self._task, completed=self.n, stats=stats)
            return
        now = time.monotonic()
        due = now - self._last_line >= LINE_SECONDS
        if self.total:
            while self.n >= self._next_fraction * self.total and self._next_fraction <= 1.0:
                due, self._next_fraction = True, self._next_fraction + LINE_FRACTION
        if due and (not self.total or self.n < self.total):
            self._last_line = now
            log.info(format_line(self.label, self.n, self.total, self.unit, self.elapsed, self.postfix))

    def close(self, failed: bool = False) -> None:
        """End the display: the live bar stays on screen; lines mode logs a closing line."""
        global _live_open
        if self._live is not None:
            self._live.stop()
            self._live = None
            _live_open = False
            return
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        rate = self.n / self.elapsed if self.elapsed > 0 else 0.0
        state = "stopped at" if failed else "done"
        log.info(
            f"[{self.label}] {state} {count} {self.unit} in {_clock(self.elapsed)} ({rate:.1f}/s) {self.postfix}".rstrip()
        )

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exc_type is not None)


def progress(label: str, total: int | None = None, unit: str = "it") -> ProgressLine:
    """A progress display for one phase: ``with progress("iter 2 | rollouts", total=n, unit="cand") as bar:``."""
    return ProgressLine(label, total, unit)
