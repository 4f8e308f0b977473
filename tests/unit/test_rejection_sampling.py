"""Rejection sampling's rules on hand-built candidates: acceptance at the threshold, truncation, de-duplication,
best per prompt, and the general-data count."""

from __future__ import annotations

import pytest

from stagewise.stages.rejection_sampling import Candidate, accept, general_rows_needed, select_completions

P, Q = "prompt P", "prompt Q"
CANDIDATES = [
    Candidate(P, "a good answer", 0.8),            # 0: exactly at the threshold -> kept
    Candidate(P, "an almost answer", 0.7999),      # 1: below -> rejected
    Candidate(P, "unscorable", None),              # 2: None -> rejected
    Candidate(P, "cut off", 1.0, truncated=True),  # 3: truncated -> rejected (kept with keep_truncated)
    Candidate(P, "a  good\nanswer ", 0.9),         # 4: same text as 0 up to whitespace -> duplicate
    Candidate(Q, "a good answer", 0.95),           # 5: same text, other prompt -> kept
    Candidate(P, "the best answer", 1.0),          # 6: kept
    Candidate(Q, "fine", 0.85),                    # 7: kept
]


def test_keeps_exactly_the_completions_at_or_above_the_threshold():
    kept, counts = select_completions(CANDIDATES, 0.8)
    assert kept == [0, 5, 6, 7]
    assert counts == {"samples": 8, "above_threshold": 6, "truncated_rejected": 1, "accepted": 5, "duplicates": 1,
                      "not_best": 0, "kept": 4}


def test_keep_truncated_and_other_thresholds():
    kept, counts = select_completions(CANDIDATES, 0.8, keep_truncated=True)
    assert kept == [0, 3, 5, 6, 7] and counts["truncated_rejected"] == 0
    assert select_completions(CANDIDATES, 0.0)[0] == [0, 1, 5, 6, 7]  # None is never accepted, even at 0
    assert select_completions(CANDIDATES, 0.96)[0] == [6]
    assert select_completions(CANDIDATES, 1.01)[0] == []


def test_best_per_prompt_keeps_the_highest_score_first_on_ties():
    kept, counts = select_completions(CANDIDATES, 0.8, best_per_prompt=True)
    assert kept == [5, 6] and counts["not_best"] == 2 and counts["kept"] == 2
    tie = [Candidate(P, "x", 0.9), Candidate(P, "y", 0.9)]
    assert select_completions(tie, 0.8, best_per_prompt=True)[0] == [0]


def test_accept_rule():
    assert accept(Candidate(P, "t", 0.8), 0.8)
    assert not accept(Candidate(P, "t", 0.8, truncated=True), 0.8)
    assert accept(Candidate(P, "t", 0.8, truncated=True), 0.8, keep_truncated=True)
    assert not accept(Candidate(P, "t", None), 0.0)


@pytest.mark.parametrize("reasoning,ratio,expected", [
    (600_000, 0.25, 200_000),  # R1: 600k reasoning + 200k general
    (10, 0.0, 0), (3, 0.5, 3), (7, 0.3, 3), (0, 0.5, 0)])
def test_general_rows_needed(reasoning, ratio, expected):
    assert general_rows_needed(reasoning, ratio) == expected


def test_general_ratio_out_of_range():
    with pytest.raises(ValueError, match="stage.general_data_ratio"):
        general_rows_needed(10, 1.0)
