"""launchers/slurm/multinode.sbatch run by bash with stand-ins for the SLURM commands (srun, scontrol) and for
`accelerate`: the script's own logic is what runs: rendezvous and run id from the SLURM variables, the Hydra
overrides passed through, SIGUSR1 forwarded to the ranks as SIGTERM, and a requeue after they exit."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO

SRUN = """#!/bin/bash
# one node: drop srun's options, run the command with the node id, forward SIGTERM like srun does
while [[ "$1" == --* ]]; do shift; done
export SLURM_NODEID=0
"$@" &
child=$!
trap 'kill -TERM $child' TERM
while kill -0 $child 2>/dev/null; do wait $child; done
wait $child
"""
SCONTROL = """#!/bin/bash
if [[ "$1 $2" == "show hostnames" ]]; then echo node-a; echo node-b; exit 0; fi
echo "$@" >> "$LOG_DIR/scontrol.log"
"""
ACCELERATE = """#!/bin/bash
# records its arguments and environment, then "trains" until SIGTERM: exits 75 like a checkpointed rank
printf '%s\\n' "$@" > "$LOG_DIR/accelerate.args"
env | grep -E '^(STAGEWISE_RUN_ID|MASTER_ADDR|MASTER_PORT|TORCH_ELASTIC_SHUTDOWN_TIMEOUT)=' | sort > "$LOG_DIR/accelerate.env"
trap 'echo checkpointed > "$LOG_DIR/rank.txt"; exit 75' TERM
touch "$LOG_DIR/started"
while true; do sleep 0.1; done
"""


def shim(bin_dir: Path, name: str, text: str) -> None:
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(stat.S_IRWXU)


@pytest.mark.parametrize("preempt", [True, False])
def test_multinode_sbatch_flow(tmp_path, preempt):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim(bin_dir, "srun", SRUN)
    shim(bin_dir, "scontrol", SCONTROL)
    shim(bin_dir, "accelerate", ACCELERATE if preempt else ACCELERATE.replace("while true; do sleep 0.1; done",
                                                                              "exit 0"))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG_DIR": str(tmp_path),
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_SUBMIT_DIR": str(REPO)}
    env.pop("STAGEWISE_RUN_ID", None)
    proc = subprocess.Popen(["bash", str(REPO / "launchers" / "slurm" / "multinode.sbatch"),
                             "experiment=r1/sft", "stage.new_tokens=[<a>,</a>]"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if preempt:
        t0 = time.time()
        while not (tmp_path / "started").exists():
            assert time.time() - t0 < 30 and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1@600
    out, _ = proc.communicate(timeout=60)

    args = (tmp_path / "accelerate.args").read_text().splitlines()
    assert args == ["launch", "--config_file", "launchers/accelerate/multinode.yaml",
                    "--num_machines", "2", "--num_processes", "8", "--machine_rank", "0",
                    "--main_process_ip", "node-a", "--main_process_port", str(20000 + 4242 % 40000),
                    "train.py", "experiment=r1/sft", "stage.new_tokens=[<a>,</a>]",
                    "hardware.num_machines=2", "hardware.num_processes=8"]
    assert (tmp_path / "accelerate.env").read_text().splitlines() == [
        "MASTER_ADDR=node-a", "MASTER_PORT=24242", "STAGEWISE_RUN_ID=slurm-4242",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=540"]
    if preempt:
        assert proc.returncode == 0, out
        assert (tmp_path / "rank.txt").read_text().strip() == "checkpointed"
        assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 4242"]
        assert "got SIGUSR1" in out and "requeueing job 4242" in out
    else:
        assert proc.returncode == 0 and "done (status 0)" in out
        assert not (tmp_path / "scontrol.log").exists()
