"""ZeRO-3 without full logits, on 2 CPU processes: the partitioned LM head is called once per log-prob computation
(so its weight is gathered once, not once per chunk), no tensor the size of tokens x vocabulary is ever created
(the largest is the gathered head itself, or one chunk's logits), and the log-probs and the head's gradient equal
one process without DeepSpeed. The control (one chunk for all tokens) shows the size check can fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import torchrun_two_cpu_ranks

WORKER = Path(__file__).with_name("zero3_lm_head_worker.py")


@pytest.mark.slow
def test_partitioned_head_is_gathered_once_and_never_builds_full_logits(tmp_path):
    torchrun_two_cpu_ranks(WORKER, str(tmp_path), timeout=300, hang_message="the two ranks hung")
    rows = [json.loads(line) for rank in (0, 1) for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()]
    assert sorted((r["rank"], r["chunk"]) for r in rows) == [(0, 16), (0, 10_000), (1, 16), (1, 10_000)]
    for r in rows:
        full_logits = r["tokens"] * r["vocab"]  # 550 trained tokens x 1,088 rows
        assert r["head_calls"] == 1, r  # one gather for all 35 chunks of 16 tokens
        assert r["lp_diff"] < 1e-5 and r["hidden_grad_diff"] < 1e-5, r
        if r["chunk"] == 16:  # the gathered head [V, H] (or its gradient) is the largest tensor, not the logits
            assert r["largest"] == r["vocab"] * r["hidden"] < full_logits, r
            # the head's full gradient, reduced over both ranks (the control's second backward without an optimizer
            # step is left out: ZeRO-3 keeps part of the first one's reduced gradient around)
            assert r["grad_diff"] < 1e-5 * max(1.0, r["grad_norm"]), r
        else:  # the control: one chunk of all tokens builds [tokens, V] logits, and the check sees them
            assert r["largest"] >= full_logits, r
