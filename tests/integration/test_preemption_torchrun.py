"""Preemption under torchrun with 2 CPU ranks: SIGTERM to the launcher (what multinode.sbatch sends through srun),
or SIGUSR1 to one rank only, gives a checkpoint on both ranks and an exit; the rerun resumes and ends with the same
weights and losses as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port

LOOP = r'''
import json, os, sys, time, torch
from accelerate import Accelerator
from stagewise.training.preemption import checkpoint_and_exit_if_preempted, install_preemption_handler

run_dir, total = sys.argv[1], int(sys.argv[2])
acc = Accelerator(cpu=True)
torch.manual_seed(0)
model = torch.nn.Linear(8, 1)
opt = torch.optim.AdamW(model.parameters(), lr=0.05)
model, opt = acc.prepare(model, opt)
ckpt = os.path.join(run_dir, "ckpt.pt")
step = 0
if os.path.exists(ckpt):
    state = torch.load(ckpt)
    acc.unwrap_model(model).load_state_dict(state["model"]); opt.load_state_dict(state["opt"]); step = state["step"]
install_preemption_handler()  # after setup: a signal during setup still stops the process at once
with open(os.path.join(run_dir, f"pid{acc.process_index}"), "w") as f:
    f.write(str(os.getpid()))

def save():
    if acc.is_main_process:
        torch.save({"model": acc.unwrap_model(model).state_dict(), "opt": opt.state_dict(), "step": step}, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)

while step < total:
    g = torch.Generator().manual_seed(1000 * step + acc.process_index)  # data: a pure function of (step, rank)
    x = torch.randn(16, 8, generator=g)
    loss = ((model(x).squeeze(-1) - x.sum(-1)) ** 2).mean()
    acc.backward(loss); opt.step(); opt.zero_grad()
    step += 1
    mean = acc.reduce(loss.detach(), reduction="mean").item()
    if acc.is_main_process:
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "loss": mean}) + "\n")
    time.sleep(0.1)
    checkpoint_and_exit_if_preempted(acc, save)
save()
if acc.is_main_process:
    open(os.path.join(run_dir, "DONE"), "w").close()
acc.wait_for_everyone()  # as every stage ends: a barrier, then the process group torn down on every rank;
acc.end_training()  # without them a rank can abort (SIGABRT) in gloo's teardown while its peer is still in it
'''
TOTAL = 30


def torchrun(script: Path, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), str(script), str(run_dir), str(TOTAL)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_step(run_dir: Path, proc, n: int, timeout: float = 120) -> None:
    t0 = time.time()
    while not steps(run_dir) or steps(run_dir)[-1]["step"] < n:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def interrupt(p: subprocess.Popen, cut: Path, how: str, after_step: int) -> int:
    """Preempt the running job ``p`` once it has logged ``after_step``; returns the step it checkpointed at."""
    import torch

    wait_for_step(cut, p, after_step)
    if how == "sigterm_to_launcher":
        p.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    else:
        os.kill(int((cut / "pid1").read_text()), signal.SIGUSR1)  # only rank 1 hears it
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0, out
    assert "will checkpoint at the next step boundary" in out, (how, out)
    assert not (cut / "DONE").exists()
    stopped_at = torch.load(cut / "ckpt.pt")["step"]
    assert after_step <= stopped_at < TOTAL and steps(cut)[-1]["step"] == stopped_at  # saved where it stopped
    return stopped_at


@pytest.mark.slow
def test_preempt_twice_then_resume_equals_uninterrupted(tmp_path):
    """One job preempted twice, each way (SIGTERM to the launcher, then SIGUSR1 to rank 1 of the requeued job),
    each time resumed from its checkpoint: it ends with the uninterrupted run's losses and weights."""
    import torch

    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    straight.mkdir()
    cut.mkdir()
    q = torchrun(script, straight)  # the reference runs beside the interrupted job
    first = interrupt(torchrun(script, cut), cut, "sigterm_to_launcher", 5)
    interrupt(torchrun(script, cut), cut, "sigusr1_to_rank1", first + 5)  # the requeued job: resumes, then stops
    p = torchrun(script, cut)  # requeued again: resumes and finishes
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    out, _ = q.communicate(timeout=300)
    assert q.returncode == 0, out

    assert [r["step"] for r in steps(cut)] == list(range(1, TOTAL + 1))
    assert [r["loss"] for r in steps(cut)] == [r["loss"] for r in steps(straight)]
    a, b = torch.load(cut / "ckpt.pt"), torch.load(straight / "ckpt.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
