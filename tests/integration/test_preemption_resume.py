"""Ctrl-C (SIGINT; SIGUSR1 and SIGTERM take the same path) to a running tiny SFT job -> checkpoint at the next step
boundary, exit 75 and a line saying how to resume -> the rerun with the same run_id resumes (resume=auto) and ends
with the same per-step losses and final eval loss as a run that was never interrupted. GRPO installs the same
handler (tests/unit/test_preemption.py; a GRPO stage is interrupted in test_pipeline_preemption.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_train

ARGS = ["stage=sft", "data=tiny_sft", "stage.max_steps=30", "stage.logging_steps=1", "logger.progress_bar=false"]


def records(run_dir, key):
    return {r["step"]: r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if key in r}


@pytest.mark.slow
def test_ctrl_c_checkpoint_exit_resume_same_metrics(tmp_path):
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("STAGEWISE_RUN_ID", None)
    cut = tmp_path / "outputs" / "train" / "cut"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *ARGS, "run_id=cut"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while max(records(cut, "loss"), default=0) < 5 if (cut / "metrics.jsonl").exists() else True:
        assert proc.poll() is None and time.time() - t0 < 300
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert "to resume, rerun the same command with run_id=cut" in out
    (ckpt,) = (cut / "checkpoints").iterdir()
    stopped = int(ckpt.name.split("_")[1])
    assert (ckpt / "COMPLETE").exists() and 5 <= stopped < 30 and max(records(cut, "loss")) == stopped
    assert not (cut / "final").exists()

    resumed = run_train([*ARGS, "run_id=cut"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt}" in (cut / "train.log").read_text()
    straight = run_train([*ARGS, "run_id=straight"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert straight.returncode == 0, straight.stderr[-3000:]

    other = tmp_path / "outputs" / "train" / "straight"
    assert sorted(records(cut, "loss")) == list(range(1, 31))
    assert records(cut, "loss") == records(other, "loss")
    assert records(cut, "eval/loss") == records(other, "eval/loss")
