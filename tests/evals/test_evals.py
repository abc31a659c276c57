"""`make eval`'s table (evals/run.py): scores with their standard errors, side by side."""

from __future__ import annotations

from evals.run import table


def test_table_pairs_each_score_with_its_error_and_the_difference() -> None:
    original = {"moegi_mc_ja": {"acc": 0.375, "acc_stderr": 0.125, "sample_len": 16.0}}
    quantized = {"moegi_mc_ja": {"acc": 0.3125, "acc_stderr": 0.1197, "sample_len": 16.0}}
    rows = table(original, quantized).splitlines()
    assert rows[2] == "| moegi_mc_ja | acc | 0.3750 ± 0.1250 | 0.3125 ± 0.1197 | -0.0625 |"
    assert len(rows) == 3  # sample_len has no standard error: not a score
