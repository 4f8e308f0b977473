"""SIGUSR1 (what SLURM sends before a time limit) to a running pipeline is forwarded to the stage it is running; the
stage checkpoints and exits 75, the pipeline records it as interrupted in pipeline_state.json and exits 75 too (the
requeue code, not "failed, exit 1"); the rerun with the same run_id resumes that stage from its checkpoint, and the
final metrics equal those of a pipeline that was never interrupted. SIGTERM takes the same path in the pipeline
(tests/unit/test_pipeline.py) and in the stage (tests/unit/test_preemption.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import yaml

from conftest import REPO, metric_by_step, run_stage_in_process, run_train

CONF = REPO / "tests" / "fixtures" / "conf"
ARGS = ["pipeline=preempt_test", f"hydra.searchpath=[file://{CONF}]", "logger.progress_bar=false"]


@pytest.mark.slow
def test_signal_pipeline_mid_stage_then_rerun_equals_uninterrupted(tmp_path):
    sig = signal.SIGUSR1
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("STAGEWISE_RUN_ID", None)
    cut = tmp_path / "outputs" / "train" / "cut"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *ARGS, "run_id=cut"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    try:
        while max(metric_by_step(cut / "00_sft1" / "metrics.jsonl", "loss"), default=0) < 3:  # event: SFT is training
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() - t0 < 400
            time.sleep(0.05)
        proc.send_signal(sig)  # to the pipeline process only
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out[-3000:]
    state = json.loads((cut / "pipeline_state.json").read_text())
    assert state["finished"] == [] and state["interrupted"]["name"] == "sft1"
    assert state["interrupted"]["exit"] == 75 and state["interrupted"]["signal"] == sig.name
    ckpt = cut / "00_sft1" / "checkpoints"
    (saved,) = [p for p in ckpt.iterdir() if (p / "COMPLETE").exists()]
    stopped = int(saved.name.split("_")[1])
    assert state["interrupted"]["checkpoint"] == str(saved) and 3 <= stopped < 40
    assert not (cut / "00_sft1" / "final").exists() and not (cut / "01_sft2").exists()
    assert "exiting with code 75 for requeue" in (cut / "train.log").read_text()

    rerun = run_train([*ARGS, "run_id=cut"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}, timeout=900)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert f"resumed from {saved}" in (cut / "00_sft1" / "train.log").read_text()
    state = json.loads((cut / "pipeline_state.json").read_text())
    assert [r["name"] for r in state["finished"]] == ["sft1", "sft2"] and state["interrupted"] is None

    # the same two stages never interrupted, run in this process (one thread, as the pipeline's were), sft2 from
    # sft1's final/ as the pipeline wires it
    stages = yaml.safe_load((CONF / "pipeline" / "preempt_test.yaml").read_text())["stages"]
    sft1 = run_stage_in_process(stages[0]["overrides"], tmp_path / "straight" / "00_sft1", threads=1)
    sft2 = run_stage_in_process([*stages[1]["overrides"], f"model.name_or_path={sft1 / 'final'}"],
                                tmp_path / "straight" / "01_sft2", threads=1)
    for stage, straight in (("00_sft1", sft1), ("01_sft2", sft2)):
        got, want = metric_by_step(cut / stage / "metrics.jsonl", "loss"), metric_by_step(straight / "metrics.jsonl", "loss")
        assert sorted(got) == sorted(want) and got == want, stage
    want = metric_by_step(sft2 / "metrics.jsonl", "loss")
    assert json.loads((cut / "pipeline_summary.json").read_text())["sft2"]["loss"] == want[max(want)]
