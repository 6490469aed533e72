"""What a person sees: a ``debug=fast`` run's terminal output has one labelled progress line (at least) per
long phase and ends with the results table (captured from a real ``python run.py`` in a fresh cache, so the
base preparation runs too; non-TTY, so the displays print periodic lines)."""

from __future__ import annotations

from pathlib import Path

PHASES = (
    "[base | epoch",
    "[sft | epoch",
    "[iter 1 | rollouts]",
    "[reference log-probs]",
    "[iter 1 | stage1",
    "[iter 1 | stage2",
    "[eval | synthetic sft]",
    "[eval | synthetic iter_1]",
)


def test_debug_fast_output_shows_every_phase_and_the_results(run_visrl, tmp_path: Path) -> None:
    result = run_visrl(
        tmp_path / "run", "iter=1", "logger=none", env={"VISRL_CACHE": str(tmp_path / "cache")}
    )
    assert result.returncode == 0, result.tail()
    output = result.stdout + result.stderr
    missing = [phase for phase in PHASES if phase not in output]
    assert not missing, f"no progress line for {missing}\n{result.tail(60)}"
    assert "| iteration |" in result.stdout and "effect of iteration 1 over SFT" in result.stdout, (
        result.tail()
    )
