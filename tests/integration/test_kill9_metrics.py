"""End to end: ``kill -9`` a tiny SFT run after it logged steps past its last checkpoint, resume
it with the same run_id, and metrics.jsonl (and the notebook's frame) hold every training step exactly once, with
the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_train
from stagewise import runs

ARGS = ["stage=sft", "data=tiny_sft", "stage.max_steps=16", "stage.logging_steps=1", "stage.save_steps=3",
        "logger.progress_bar=false"]


def loss_steps(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in r:
            out.append(r["step"])
    return out


def complete_checkpoints(run_dir):
    ck = run_dir / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in ck.glob("step_*") if (p / "COMPLETE").exists()) \
        if ck.exists() else []


@pytest.mark.slow
def test_kill9_then_resume_logs_each_step_once(tmp_path):
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("STAGEWISE_RUN_ID", None)
    cut = tmp_path / "outputs" / "train" / "cut"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *ARGS, "run_id=cut"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    try:
        while True:  # event-based: a complete checkpoint and at least one step logged after it
            ckpts = complete_checkpoints(cut)
            if ckpts and max(loss_steps(cut), default=0) > ckpts[-1]:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() - t0 < 400
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    logged_before = loss_steps(cut)
    resumed_from = complete_checkpoints(cut)[-1]
    assert max(logged_before) > resumed_from  # the file now holds steps the resume will replay

    resumed = run_train([*ARGS, "run_id=cut"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {cut / 'checkpoints' / f'step_{resumed_from}'}" in (cut / "train.log").read_text()
    assert loss_steps(cut) == list(range(1, 17))  # the file: each step once, in order

    straight = run_train([*ARGS, "run_id=straight"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert straight.returncode == 0, straight.stderr[-3000:]
    # datasets' progress bars ("adapting", "tokenising", "Saving the dataset") are off by default
    assert "examples/s" not in straight.stderr and "tokenising" not in straight.stderr
    assert "Writing model shards" not in straight.stderr  # transformers' own bar, on every checkpoint and final/
    assert "examples/s" not in (tmp_path / "outputs" / "train" / "straight" / "train.log").read_text()
    frame = runs.load_run(cut).metrics
    train = frame[frame["loss"].notna()]
    assert train["step"].tolist() == list(range(1, 17))  # the notebook's frame too
    other = runs.load_run(tmp_path / "outputs" / "train" / "straight").metrics
    assert train["loss"].tolist() == other[other["loss"].notna()]["loss"].tolist()
