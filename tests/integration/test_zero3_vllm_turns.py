"""ZeRO-3 on 2 CPU processes, each with a real colocated vLLM engine (vLLM's CPU build), and uneven turn counts:
rank 0's trajectories take two turns, rank 1's one. The weights are pushed (a ZeRO-3 gather, a collective) only by
the step's `sync_weights`, never between turns, so both ranks gather the same number of times and the run ends
(when every turn pushed the weights, rank 0 entered the gather once more than rank 1 per step and hung), and each
engine samples from the gathered, updated weights."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest

from conftest import torchrun_two_cpu_ranks

WORKER = Path(__file__).with_name("zero3_vllm_turns_worker.py")


@pytest.mark.slow
@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"),
                    reason="vLLM's CPU build is published for Linux x86_64 only")
def test_uneven_turns_under_zero3_gather_equally_and_finish(tmp_path):
    out = torchrun_two_cpu_ranks(WORKER, str(tmp_path), timeout=400,
                                 hang_message="the two ranks hung (uneven ZeRO-3 gathers?)")
    results = sorted((json.loads(line) for line in out.splitlines() if line.startswith('{"rank"')),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    assert results[0]["turns"] == [[2], [2]] and results[1]["turns"] == [[1], [1]]  # uneven on purpose
    assert results[0]["texts"][0].startswith("<Code>print(6*7)</Code>\n<Execute>\n42\n")
    assert results[1]["texts"] == ["<Answer>42</Answer>"] * 4
    for r in results:  # two steps: one push each, by sync_weights; none from the turns
        assert r["pushes"] == 2, r
        assert r["worst_logprob"] < 1e-3, r  # the scripted tokens are sampled from the pushed weights (p ~ 1)
