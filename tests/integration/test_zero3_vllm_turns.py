"""ZeRO-3 on 2 CPU processes with the colocated vLLM wrapper and uneven turn counts: rank 0's trajectories take two
turns, rank 1's one. The weights are pushed (a ZeRO-3 gather, a collective) only by the step's `sync_weights`, never
between turns, so both ranks gather the same number of times and the run ends; when every turn pushed the weights,
rank 0 entered the gather once more than rank 1 per step and hung. vLLM itself is a recording stand-in (it needs a
GPU); the engine wrapper, the multi-turn loop, the sandbox and DeepSpeed are real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("zero3_vllm_turns_worker.py")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_uneven_turns_under_zero3_gather_equally_and_finish(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), str(WORKER), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        out, _ = proc.communicate()
        pytest.fail(f"the two ranks hung (uneven ZeRO-3 gathers?): {out[-2000:]}")
    assert proc.returncode == 0, out[-4000:]
    results = sorted((json.loads(line) for line in out.splitlines() if line.startswith('{"rank"')),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    assert results[0]["turns"] == [[2], [2]] and results[1]["turns"] == [[1], [1]]  # uneven on purpose
    for r in results:  # two steps: one push each, by sync_weights; none from the turns
        assert r["loaded"] == 2 * r["params"], r
