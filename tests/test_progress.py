"""Progress lines: labelled, periodic (every 10 % or 30 s) and quiet under CI / non-TTY.

Why: a VisRL run spends hours in rollouts, scoring, reference log-probs and DPO stages (paper §3.3); a person
(or a CI log) must see which iteration and phase is running, how far it is and when it will end.
"""

from __future__ import annotations

import logging

import pytest

from visrl import progress as progress_mod
from visrl.progress import format_line, lines_mode, progress


def test_line_format_has_counts_rate_and_eta() -> None:
    assert (
        format_line("iter 2 | rollouts", 512, 2048, "cand", 16.0)
        == "[iter 2 | rollouts] 512/2048 cand 32.0/s ETA 0:48"
    )
    assert format_line("eval", 3, None, "q", 1.5, "acc 0.5") == "[eval] 3 q 2.0/s acc 0.5"
    assert format_line("x", 10, 10, "it", 2.0).endswith("5.0/s")  # finished: no ETA


def test_ci_prints_a_line_every_tenth_and_a_closing_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CI", "true")
    assert lines_mode()
    with (
        caplog.at_level(logging.INFO, logger="visrl.progress"),
        progress("iter 1 | scoring", 100, "cand") as bar,
    ):
        for _ in range(100):
            bar.advance(1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10  # 10 %, ..., 90 %, then the closing line (100 % is the closing line)
    assert lines[0].startswith("[iter 1 | scoring] 10/100 cand") and "ETA" in lines[0]
    assert lines[-1].startswith("[iter 1 | scoring] done 100/100 cand in ")


def test_a_slow_phase_without_total_logs_every_30_s(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CI", "1")
    now = [0.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: now[0])
    with caplog.at_level(logging.INFO, logger="visrl.progress"):
        bar = progress("sft", None, "batch")
        for _ in range(5):
            now[0] += 10.0
            bar.advance(1)
        bar.close(failed=True)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["[sft] 3 batch 0.1/s", "[sft] stopped at 5 batch in 0:50 (0.1/s)"]
