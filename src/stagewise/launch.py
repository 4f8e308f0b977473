"""Relaunch ``train.py`` under torchrun when the hardware preset asks for several processes.

``python train.py hardware=cpu_2proc`` therefore just works: the parent process composes the config, fixes the
run id, and starts ``torch.distributed.run --nproc_per_node N train.py <same overrides>`` with
``$STAGEWISE_RUN_ID`` exported, so every rank writes to the same run folder. Multinode runs are started by
``launchers/slurm/multinode.sbatch`` (one torchrun per node), which sets the rendezvous itself.

Before any process starts, `check_hardware` stops a preset that asks for GPUs the machine does not have (or for more
GPU processes than it has devices), naming the preset, what it asks for and what was found. The `CheckHardware`
Hydra callback (``conf/hydra/default.yaml``) runs it before Hydra creates the run folder; ``train.py`` runs it again
before a relaunch (multirun jobs, whose callback runs on the submitting machine and is not checked there).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from typing import Any, Mapping, Optional

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


class HardwareMismatchError(RuntimeError):
    """The hardware preset asks for devices this machine does not have (raised by `check_hardware`)."""


def _already_a_rank(environ: Mapping[str, str]) -> bool:
    """Started by a launcher (torchrun rank, submitit task): the parent or the scheduler chose the devices, and a
    task may see only its own GPU, so the per-machine count does not apply."""
    return any(k in environ for k in ("LOCAL_RANK", "RANK")) or bool(environ.get("SUBMITIT_EXECUTOR"))


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def check_hardware(hardware: Any, preset: Optional[str] = None, environ: Optional[Mapping[str, str]] = None,
                   device_count=cuda_device_count) -> None:
    """Raise `HardwareMismatchError` when ``hardware`` (a GPU preset: ``cpu`` false) asks for GPU processes on a
    machine with no CUDA device, or for more processes per machine than it has devices. CPU presets are not checked
    (``cpu_2proc`` runs on a 2-core machine). ``preset``: the ``hardware=`` choice, named in the message."""
    environ = os.environ if environ is None else environ
    if hardware.cpu or _already_a_rank(environ):
        return
    wanted = int(hardware.num_processes)
    found = device_count()
    if found >= wanted:
        return
    name = f"hardware={preset}" if preset else "the hardware config"
    asks = f"{wanted} GPU process{'es' if wanted != 1 else ''}"
    if found == 0:
        raise HardwareMismatchError(
            f"{name} asks for {asks}, but this machine has no CUDA device (torch.cuda.device_count() == 0); "
            "use hardware=cpu or hardware=cpu_2proc")
    raise HardwareMismatchError(
        f"{name} asks for {asks}, but this machine has {found} CUDA device{'s' if found != 1 else ''} "
        f"(torch.cuda.device_count() == {found}); set hardware.num_processes={found}"
        + (" or use hardware=1xgpu" if found == 1 else ""))


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class CheckHardware(_HydraCallback):  # type: ignore[misc, valid-type]
    """Hydra callback: `check_hardware` before the run folder exists (single runs only: a multirun is often submitted
    from a login node without GPUs; its jobs are checked by ``train.py`` on the machine that runs them). Hydra turns
    a callback's exception into a warning, so the refusal is a ``SystemExit`` (exit 1, message on stderr)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        try:
            preset = config.hydra.runtime.choices.get("hardware")
        except Exception:  # noqa: BLE001 - a config without the hydra node: name no preset
            preset = None
        try:
            check_hardware(config.hardware, preset)
        except HardwareMismatchError as e:
            raise SystemExit(f"Error: {e}") from None


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
