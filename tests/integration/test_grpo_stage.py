"""`python train.py stage=grpo` end to end on the tiny model: it resumes exactly after SIGKILL, and two ranks under
ZeRO-3 train padded and packed alike. (That GRPO learns, logs TRL's metric set and the R1-Zero tutorial's console
block and writes samples is checked on the default run's GRPO stage: tests/integration/test_default_run.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REPO, only_run_dir, run_stage_in_process, run_train

# The reward: the share of digit characters. The untrained tiny model samples ~1 digit character in 6, so every
# group's rewards differ from step 0 and every step has a gradient to compare across runs.
REWARD = '''
def digit_fraction(completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]
'''
ENV = {"OMP_NUM_THREADS": "1"}  # the CI box has 2 cores shared by several jobs: no thread oversubscription


def reward_file(tmp_path):
    path = tmp_path / "digits.py"
    path.write_text(REWARD)
    return f"reward.functions=[{{name: '{path}:digit_fraction'}}]"


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def by_step(run, key):
    """step -> value; a step logged twice (before a kill and after the resume) keeps its last value."""
    return {r["step"]: r[key] for r in records(run) if key in r}


def test_sigkill_then_resume_gives_the_same_steps(tmp_path):
    args = ["stage=grpo", "algorithm=grpo", "data=tiny_grpo", "data.eval_sources=[]", reward_file(tmp_path),
            "rollout.n=4", "rollout.max_new_tokens=8", "stage.prompts_per_step=4", "stage.learning_rate=1e-3",
            "stage.max_steps=8", "stage.save_steps=2", "stage.save_total_limit=1", "stage.logging_steps=1",
            "stage.samples_steps=0", "logger.progress_bar=false"]
    ref_run = run_stage_in_process(args, tmp_path / "ref", threads=1)  # never killed; one thread, as the victim

    env = {**os.environ, **ENV, "PROJECT_ROOT": str(tmp_path)}
    env.pop("STAGEWISE_RUN_ID", None)
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, "task_name=killed", "run_id=victim"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "outputs" / "killed" / "victim"
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_2" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its step-2 checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists(), "the run finished before the kill; the test would prove nothing"

    again = run_train([*args, "task_name=killed", "run_id=victim"], tmp_path, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in (run / "train.log").read_text()
    for key in ("loss", "reward/total/mean", "reward/total/std", "grad_norm", "entropy", "completions/mean_length",
                "epoch"):
        ours, ref_values = by_step(run, key), by_step(ref_run, key)
        assert sorted(ours) == sorted(ref_values) == list(range(1, 9)), key
        for step in range(1, 9):
            assert ours[step] == pytest.approx(ref_values[step], rel=1e-6, abs=1e-9), (key, step)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_6"]


@pytest.mark.slow
def test_zero3_two_cpu_processes(tmp_path):
    """Two ranks under ZeRO-3: prompts split across ranks, rewards gathered, the partitioned LM head handled; and
    the packed, padding-free micro-batches (hardware.max_tokens_per_micro_batch) give the padded run's step."""
    def run(name, *extra):
        folder = tmp_path / name
        folder.mkdir()
        proc = run_train(["stage=grpo", "algorithm=grpo", "data=tiny_grpo", "data.eval_sources=[]",
                          reward_file(tmp_path), "hardware=cpu_2proc", "rollout.n=4", "rollout.max_new_tokens=8",
                          "stage.prompts_per_step=4", "stage.learning_rate=1e-3", "stage.max_steps=2",
                          "stage.logging_steps=1", "hardware.per_device_batch_size=3", "logger.progress_bar=false",
                          *extra], cwd=folder, env=ENV, timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        # DeepSpeed's shared-memory all-reduce (inference only) is neither compiled nor loaded: ~35 s of g++ saved
        assert "deepspeed_shm_comm" not in proc.stdout + proc.stderr
        return only_run_dir(folder)

    padded = run("padded")
    rec = [r for r in records(padded) if r["step"] == 2 and "loss" in r][0]
    assert rec["quality/num_completions"] == 16  # both ranks' completions are in the metrics
    assert (padded / "train.rank1.log").exists()
    model = AutoModelForCausalLM.from_pretrained(padded / "final", dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) > 2_000_000

    # 8 rows of ~20-30 tokens per rank: a 40-token budget packs 1-2 sequences per micro-batch, unevenly per rank
    packed = run("packed", "hardware.max_tokens_per_micro_batch=40")
    assert "at most 40 tokens packed into one unpadded row" in (packed / "train.log").read_text()
    first = {key: by_step(padded, key)[1] for key in ("loss", "grad_norm", "entropy", "reward/total/mean")}
    assert first["grad_norm"] > 0
    for key, value in first.items():
        assert by_step(packed, key)[1] == pytest.approx(value, rel=1e-5, abs=1e-7), key
