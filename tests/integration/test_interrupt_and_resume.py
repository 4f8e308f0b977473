"""A tiny SFT run interrupted two ways, then rerun with the same run_id (resume=auto), against one uninterrupted
reference run of the same command (built once for the file):

- ``kill -9`` after the run logged steps past its last checkpoint: the rerun resumes from that checkpoint, and
  metrics.jsonl (and the notebook's frame) hold every step exactly once, with the reference's losses;
- Ctrl-C (SIGINT; SIGUSR1 and SIGTERM take the same path, tests/unit/test_preemption.py): a checkpoint at the next
  step boundary, exit 75 and a line saying how to resume; the rerun ends with the reference's per-step losses and
  final eval loss.

GRPO's kill -9 resume is in test_grpo_stage.py, a signal to a pipeline in test_pipeline_resume.py, torchrun's
ranks in test_preemption_torchrun.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, metric_by_step, run_train
from stagewise import runs

STEPS, SAVE_EVERY = 20, 3
ARGS = ["stage=sft", "data=tiny_sft", f"stage.max_steps={STEPS}", "stage.logging_steps=1",
        f"stage.save_steps={SAVE_EVERY}", "stage.save_total_limit=2", "logger.progress_bar=false"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.slow


def records(run_dir, key) -> dict:
    return metric_by_step(run_dir / "metrics.jsonl", key)


def logged_loss_steps(run_dir) -> list[int]:
    """Every step of metrics.jsonl's loss records in file order, repeats included."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def complete_checkpoints(run_dir) -> list[int]:
    ck = run_dir / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in ck.glob("step_*") if (p / "COMPLETE").exists()) \
        if ck.exists() else []


def start(tmp_path, run_id: str) -> subprocess.Popen:
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), **ONE_THREAD}
    env.pop("STAGEWISE_RUN_ID", None)
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *ARGS, f"run_id={run_id}"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until(proc: subprocess.Popen, ready, timeout: float = 400) -> None:
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.stdout.read()[-3000:]}"
        assert time.time() - t0 < timeout, "timed out waiting for the run to get there"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The same command never interrupted: (its run folder, the completed process)."""
    root = tmp_path_factory.mktemp("straight")
    proc = run_train([*ARGS, "run_id=straight"], cwd=root, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "outputs" / "train" / "straight", proc


def test_the_reference_run_leaves_its_files_and_a_quiet_console(straight):
    run, proc = straight
    assert sorted(records(run, "loss")) == list(range(1, STEPS + 1))
    for rel in (".hydra/config.yaml", "train.log", "final/config.json", "final/model.safetensors",
                "final/tokenizer.json"):
        assert (run / rel).exists(), rel
    # the last save_total_limit=2 checkpoints are kept
    last_two = [s for s in range(SAVE_EVERY, STEPS, SAVE_EVERY)][-2:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{s}" for s in last_two]
    # datasets' progress bars ("adapting", "tokenising", "Saving the dataset") are off by default
    assert "examples/s" not in proc.stderr and "tokenising" not in proc.stderr
    assert "Writing model shards" not in proc.stderr  # transformers' own bar, on every checkpoint and final/
    assert "examples/s" not in (run / "train.log").read_text()


def test_rerunning_the_finished_run_has_nothing_to_do(tmp_path, straight):
    """The same command again (resume=auto): no step is redone, nothing is rewritten, exit 0 with a line saying so."""
    run, _ = straight
    kept = {p: p.stat().st_mtime_ns for p in (run / "metrics.jsonl", run / "final" / "model.safetensors",
                                              *(run / "checkpoints").glob("step_*/COMPLETE"))}
    again = run_train([*ARGS, "run_id=straight"], cwd=run.parents[2], env=ONE_THREAD)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{run} already finished (it wrote final/): nothing to do. resume=overwrite trains it again" in \
        again.stderr + again.stdout
    assert {p: p.stat().st_mtime_ns for p in kept} == kept


def test_kill9_then_resume_logs_each_step_once_with_the_same_losses(tmp_path, straight):
    cut = tmp_path / "outputs" / "train" / "cut"
    proc = start(tmp_path, "cut")
    try:  # event-based: a complete checkpoint and at least one step logged after it
        wait_until(proc, lambda: complete_checkpoints(cut) and max(records(cut, "loss"), default=0)
                   > complete_checkpoints(cut)[-1])
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (cut / "final").exists(), "the run finished before the kill; the test would prove nothing"
    resumed_from = complete_checkpoints(cut)[-1]
    assert max(records(cut, "loss")) > resumed_from  # the file now holds steps the resume will replay

    resumed = run_train([*ARGS, "run_id=cut"], cwd=tmp_path, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {cut / 'checkpoints' / f'step_{resumed_from}'}" in (cut / "train.log").read_text()
    assert logged_loss_steps(cut) == list(range(1, STEPS + 1))  # the file: each step once, in order
    reference = records(straight[0], "loss")
    assert records(cut, "loss") == pytest.approx(reference, abs=1e-6)
    frame = runs.load_run(cut).metrics  # the notebook's frame too
    train = frame[frame["loss"].notna()]
    assert train["step"].tolist() == list(range(1, STEPS + 1))
    assert train["loss"].tolist() == pytest.approx([reference[s] for s in range(1, STEPS + 1)], abs=1e-6)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == \
        sorted(p.name for p in (straight[0] / "checkpoints").iterdir())


def test_ctrl_c_checkpoints_exits_75_and_the_rerun_ends_like_the_reference(tmp_path, straight):
    cut = tmp_path / "outputs" / "train" / "cut"
    proc = start(tmp_path, "cut")
    try:
        wait_until(proc, lambda: max(records(cut, "loss"), default=0) >= 2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out[-3000:]
    assert "to resume, rerun the same command with run_id=cut" in out
    stopped = complete_checkpoints(cut)[-1]
    assert 2 <= stopped < STEPS and max(records(cut, "loss")) == stopped  # saved at the step it stopped on
    assert not (cut / "final").exists()

    resumed = run_train([*ARGS, "run_id=cut"], cwd=tmp_path, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {cut / 'checkpoints' / f'step_{stopped}'}" in (cut / "train.log").read_text()
    assert sorted(records(cut, "loss")) == list(range(1, STEPS + 1))
    assert records(cut, "loss") == records(straight[0], "loss")
    assert records(cut, "eval/loss") == records(straight[0], "eval/loss") != {}
