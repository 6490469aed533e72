"""The end-of-run results table: the README's rows for this run, with the effect and its CI.

Why: the headline of a VisRL run (paper §4) is ``cot_pred`` accuracy and detection per iteration and the
paired effect of the last iteration over the SFT model; a run must end by printing them.
"""

from __future__ import annotations

import io

from visrl.logging.results import format_results, print_results

SUMMARY = {
    "iterations": [
        {"iter": 1, "metrics": {"cot_pred/accuracy": 0.849, "cot_pred/det_acc": 0.823, "data/pairs": 1717.0}},
        {"iter": 0, "metrics": {"cot_pred/accuracy": 0.617, "cot_pred/accuracy_ci_lo": 0.57,
                                "cot_pred/accuracy_ci_hi": 0.66, "cot_pred/det_acc": 0.557}},
    ],
    "effect": {"cot_pred/accuracy": {"before": 0.617, "after": 0.849, "diff": 0.232, "ci95": [0.19, 0.27], "n": 384}},
}  # fmt: skip


def test_rows_per_iteration_and_the_effect_with_its_ci() -> None:
    out = io.StringIO()
    text = print_results(SUMMARY, file=out)
    assert out.getvalue() == text + "\n"
    lines = text.splitlines()
    assert lines[0].split("|")[1:-1] == [" iteration ", " cot_pred             ", " det   ", " pairs "]
    assert lines[2].startswith("| 0 (SFT)   | 0.617 [0.570, 0.660] | 0.557 |")
    assert lines[3].startswith("| 1         | 0.849                | 0.823 | 1717  |")
    assert lines[4] == "effect of iteration 1 over SFT (paired bootstrap, 95% CI):"
    assert lines[5] == "  cot_pred/accuracy: 0.617 -> 0.849, +0.232 [+0.190, +0.270] (n=384)"


def test_an_empty_summary_says_so() -> None:
    assert format_results({"iterations": []}) == "results: no evaluated iteration"
