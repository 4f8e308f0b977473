"""ZeRO-3 on 2 CPU processes with the colocated vLLM wrapper and uneven turn counts: rank 0's trajectories take two
turns, rank 1's one. The weights are pushed (a ZeRO-3 gather, a collective) only by the step's `sync_weights`, never
between turns, so both ranks gather the same number of times and the run ends; when every turn pushed the weights,
rank 0 entered the gather once more than rank 1 per step and hung. vLLM itself is a recording stand-in (it needs a
GPU); the engine wrapper, the multi-turn loop, the sandbox and DeepSpeed are real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import torchrun_two_cpu_ranks

WORKER = Path(__file__).with_name("zero3_vllm_turns_worker.py")


@pytest.mark.slow
def test_uneven_turns_under_zero3_gather_equally_and_finish(tmp_path):
    out = torchrun_two_cpu_ranks(WORKER, str(tmp_path), timeout=240,
                                 hang_message="the two ranks hung (uneven ZeRO-3 gathers?)")
    results = sorted((json.loads(line) for line in out.splitlines() if line.startswith('{"rank"')),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    assert results[0]["turns"] == [[2], [2]] and results[1]["turns"] == [[1], [1]]  # uneven on purpose
    for r in results:  # two steps: one push each, by sync_weights; none from the turns
        assert r["loaded"] == 2 * r["params"], r
