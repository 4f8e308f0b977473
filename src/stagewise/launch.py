"""Relaunch ``train.py`` under torchrun when the hardware preset asks for several processes.

``python train.py hardware=cpu_2proc`` therefore just works: the parent process composes the config, fixes the
run id, and starts ``torch.distributed.run --nproc_per_node N train.py <same overrides>`` with
``$STAGEWISE_RUN_ID`` exported, so every rank writes to the same run folder. Multinode runs are started by
``launchers/slurm/multinode.sbatch`` (one torchrun per node), which sets the rendezvous itself.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from omegaconf import DictConfig

from stagewise.run_folder import RUN_ID_ENV

log = logging.getLogger(__name__)


def on_gpu_machine() -> bool:
    """Whether an NVIDIA driver is present (checked without importing torch)."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def set_cpu_thread_policy(environ=None) -> str | None:
    """On a machine without GPUs, ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it: torch's OpenMP threads then
    sleep when idle instead of spinning, so a busy core (another job, a reward worker, a data loader) does not make
    every parallel region wait for a descheduled spinner (measured: SFT steps 16x slower under one competing busy
    process with the default policy; see benchmarks/cpu_contention.py). OpenMP reads the variable once, when torch
    loads it, so this must run before ``import torch``; child processes (pipeline stages, torchrun ranks, reward
    workers) inherit it. Returns the value set, or None."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ or on_gpu_machine():
        return None
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"


def needs_relaunch(cfg: DictConfig) -> bool:
    return cfg.hardware.num_processes > 1 and "LOCAL_RANK" not in os.environ


def relaunch_distributed(cfg: DictConfig, script: str, overrides: list[str]) -> None:
    env = dict(os.environ)
    env[RUN_ID_ENV] = str(cfg.run_id)
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(cfg.hardware.num_processes),
        "--master_port", str(_free_port()),
        script, *overrides,
    ]
    log.info("relaunching on %d processes: %s", cfg.hardware.num_processes, " ".join(cmd))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"distributed run failed with exit code {proc.returncode} (see {cfg.run_dir}/train*.log)")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
